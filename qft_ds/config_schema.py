"""The whole DeepSpeed JSON config of a qft_ds run, checked before anything is built (issue 18, item 9).

Every error names the key; nothing is coerced. DeepSpeed reads most scalars with a plain `dict.get`, so
`"bf16": {"enabled": "false"}` would be truthy there (it turned bf16 on), `"2"` could reach an `int()`, and a
misspelt top-level key was ignored. Here:
- the keys qft_ds reads or DeepSpeed's schedule uses are typed (pydantic, as DeepSpeed's own sections are);
- a JSON string "true"/"false" anywhere is refused: DeepSpeed would read it as true;
- a top-level key must be one DeepSpeed reads (learnt from DeepSpeed's own config parser) or "qft", with the
  closest known key suggested;
- the scheduler's params must be arguments of the scheduler DeepSpeed will build.
"auto" values are left alone: HF Trainer and accelerate resolve them, and the plain paths refuse them by name.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]  # strict: no bool, no "1e-4"
Beta = Annotated[float, Field(strict=True, ge=0, lt=1)]
_OPEN = ConfigDict(extra="allow")  # the rest of a section is DeepSpeed's (or the optimizer's) to check
_CLOSED = ConfigDict(extra="forbid")


class _Precision(BaseModel):
    model_config = _OPEN
    enabled: StrictBool = False


class _OptimizerParams(BaseModel):
    model_config = _OPEN  # each optimizer's own key set is checked where it is built
    lr: NonNegative = 0.0
    betas: Annotated[list[Beta], Field(min_length=2, max_length=2)] = [0.9, 0.99]
    weight_decay: NonNegative = 0.0
    eps: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)] = 1e-8


class _Optimizer(BaseModel):
    model_config = _CLOSED  # DeepSpeed reads these three only: "param" for "params" was silently ignored
    type: StrictStr
    params: _OptimizerParams = _OptimizerParams()
    legacy_fusion: StrictBool = False


class _SchedulerParams(BaseModel):
    model_config = _OPEN
    total_num_steps: PositiveInt = 1  # <= 0 trained nothing and saved "checkpoint--5"
    warmup_num_steps: NonNegativeInt = 0
    warmup_min_lr: NonNegative = 0.0
    warmup_max_lr: NonNegative = 0.0
    warmup_min_ratio: NonNegative = 0.0
    cos_min_ratio: NonNegative = 0.0
    warmup_type: StrictStr = "log"


class _Scheduler(BaseModel):
    model_config = _CLOSED
    type: StrictStr
    params: _SchedulerParams = _SchedulerParams()


class _Zero(BaseModel):
    model_config = _OPEN
    stage: Annotated[StrictInt, Field(ge=0, le=3)] = 0


class _DeepSpeedConfig(BaseModel):
    model_config = _OPEN  # other top-level keys: checked against DeepSpeed's key set
    train_batch_size: PositiveInt = 1
    train_micro_batch_size_per_gpu: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    gradient_clipping: NonNegative = 0.0  # -1 and NaN were accepted
    bf16: _Precision = _Precision()
    bfloat16: _Precision = _Precision()
    fp16: _Precision = _Precision()
    optimizer: _Optimizer | None = None
    scheduler: _Scheduler | None = None
    zero_optimization: _Zero = _Zero()
    qft: dict = {}  # its keys: QFTConfig.from_dict


def validate_ds_config(ds) -> None:
    """Raise ValueError naming the first bad key of the DeepSpeed config dict `ds`."""
    if not isinstance(ds, dict):
        raise ValueError(f"the config must be a JSON object, got a {_json_type(ds)}")
    _refuse_string_booleans(ds)
    unknown = [k for k in ds if k not in known_top_level_keys()]
    if unknown:
        raise ValueError(_unknown_key_message(unknown[0], known_top_level_keys()))
    try:
        _DeepSpeedConfig.model_validate(_without_auto(ds))
    except ValidationError as e:
        raise ValueError(_first_error(e)) from None
    sched = ds.get("scheduler")
    if isinstance(sched, dict) and sched.get("params"):
        _check_scheduler_params(sched["type"], sched["params"])


def _refuse_string_booleans(obj, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _refuse_string_booleans(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _refuse_string_booleans(v, f"{where}[{i}]")
    elif isinstance(obj, str) and obj.strip().lower() in ("true", "false"):
        raise ValueError(f"'{where}' is the string {obj!r}: write {obj.strip().lower()} without quotes "
                         "(DeepSpeed reads any non-empty string as true)")


def _without_auto(obj):
    if isinstance(obj, dict):
        return {k: _without_auto(v) for k, v in obj.items() if v != "auto"}
    return obj


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        section = err["loc"][:-1]
        model = {("optimizer",): _Optimizer, ("scheduler",): _Scheduler}[tuple(section)]
        return _unknown_key_message(key, list(model.model_fields), prefix=".".join(section) + ".")
    if err["type"] == "missing":
        return f"'{key}' is missing"
    if err["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return f"'{key}' must be a JSON object, got {err['input']!r}"
    msg = err["msg"].replace("Input should be", "must be").replace("List should have", "must have")
    msg = re.sub(r" after validation, not \d+", "", msg)  # pydantic's wording for a list's length
    hint = (" (a JSON string: remove the quotes)" if isinstance(err["input"], str)
            and err["type"] in ("int_type", "float_type", "bool_type") else "")
    return f"'{key}' {msg}, got {err['input']!r}{hint}"


def _unknown_key_message(key: str, known, prefix: str = "") -> str:
    name = key[len(prefix):] if key.startswith(prefix) else key
    hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"unknown key '{prefix}{name}'" + (f"; did you mean '{prefix}{hint[0]}'?" if hint else
                                              f"; known: {', '.join(sorted(known))}")


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _check_scheduler_params(name: str, params: dict) -> None:
    """DeepSpeed calls `scheduler(optimizer, **params)`: an unknown key would be a TypeError at initialize."""
    from deepspeed.runtime import lr_schedules
    import torch

    cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if not inspect.isclass(cls):
        raise ValueError(f"'scheduler.type' {name!r} is neither a DeepSpeed schedule "
                         f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}) nor a torch.optim.lr_scheduler class")
    accepted = [p for p in inspect.signature(cls).parameters if p != "optimizer"]
    for key in params:
        if key not in accepted:
            raise ValueError(_unknown_key_message(f"scheduler.params.{key}", accepted, prefix="scheduler.params."))


@functools.lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser reads, recorded by parsing an empty config that notes each
    key asked for (DeepSpeed keeps no list), plus the keys read outside it and "qft"."""
    from deepspeed.runtime import config as ds_config

    class KeysAskedFor(dict):
        def __init__(self):
            super().__init__()
            self.asked = set()

        def get(self, key, default=None):
            self.asked.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            self.asked.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):  # a parser may write a default section, then read it
            self.asked.add(key)
            return super().__getitem__(key)

        def __bool__(self):  # some sections are read only `if param_dict and KEY in param_dict.keys()`
            return True

        def keys(self):
            return self

    seen = KeysAskedFor()
    parser = object.__new__(ds_config.DeepSpeedConfig)
    parser.world_size, parser.global_rank = 1, 0
    try:
        parser._initialize_params(seen)
    except Exception as e:  # noqa: BLE001 - a DeepSpeed change; say which, never guess the keys
        import deepspeed
        raise RuntimeError(f"could not learn DeepSpeed {deepspeed.__version__}'s config keys from its parser "
                           f"({type(e).__name__}: {e}); qft_ds.config_schema needs updating") from e
    # read by deepspeed.initialize's device mesh, not the parser; and DeepSpeed's own message for removed keys
    outside = {"sequence_parallel_size", "data_parallel_size", "qft"}
    removed = set(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    return frozenset(seen.asked | outside | removed)
