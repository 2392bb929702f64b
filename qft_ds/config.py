"""The `"qft"` section of a DeepSpeed JSON config: typed, with defaults and errors that name the key."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path

_CHOICES = {
    "method": ("qft",),
    "rounding": ("sr", "ef", "rtn"),
    "flow": ("auto", "fused", "stack"),
    "backend": ("auto", "torch", "triton"),
}


@dataclass
class QFTConfig:
    method: str = "qft"             # qft (peqa, qst: later)
    rounding: str = "sr"            # weight rounding: stochastic, error feedback, round-to-nearest
    flow: str = "auto"              # fused if gradient_accumulation_steps == 1, else stack
    outlier_frac: float = 0.01      # fraction of each weight kept exact in fp32
    group_size: int = 128           # int8 weight group (input columns), adjusted to divide the row
    block_size: int = 256           # int8 block of momentum and gradient buffers
    backend: str = "auto"           # kernels: auto | torch | triton
    seed: int = 0                   # stochastic-rounding key
    outlier_refresh: int = 0        # re-select outliers every N steps (0: never)
    gradient_checkpointing: bool = False
    # Owned by qft_ds but read from DeepSpeed's own keys (not set in the qft section):
    max_grad_norm: float = 0.0      # <- "gradient_clipping"
    compute_bf16: bool = False      # <- "bf16": {"enabled": true}
    gradient_accumulation_steps: int = 1

    _FROM_DS = ("max_grad_norm", "compute_bf16", "gradient_accumulation_steps")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls._FROM_DS]

    @classmethod
    def from_dict(cls, section: dict | None, where: str = "qft") -> "QFTConfig":
        section = dict(section or {})
        if not isinstance(section, dict):
            raise ValueError(f"'{where}' must be a JSON object, got {type(section).__name__}")
        known = cls.keys()
        for key in section:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"unknown key '{where}.{key}'" + (f"; did you mean '{hint[0]}'?" if hint
                                 else f"; known keys: {', '.join(known)}"))
        cfg = cls()
        for f in fields(cls):
            if f.name in section:
                setattr(cfg, f.name, _check(f"{where}.{f.name}", section[f.name], type(getattr(cfg, f.name))))
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "qft") -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"'{where}.{key}' must be one of {', '.join(choices)}; "
                                 f"got {getattr(self, key)!r}")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise ValueError(f"'{where}.outlier_frac' must be in [0, 0.5), got {self.outlier_frac}")
        for key in ("group_size", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"'{where}.{key}' must be >= 1, got {getattr(self, key)}")
        if self.outlier_refresh < 0:
            raise ValueError(f"'{where}.outlier_refresh' must be >= 0, got {self.outlier_refresh}")

    def resolved_flow(self) -> str:
        if self.flow == "auto":
            return "fused" if self.gradient_accumulation_steps == 1 else "stack"
        if self.flow == "fused" and self.gradient_accumulation_steps > 1:
            raise ValueError("'qft.flow' is 'fused' but gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps}: fused updates at every micro-batch. "
                             "Use \"flow\": \"stack\" (or \"auto\") to accumulate int8 gradients.")
        return self.flow


def _check(key: str, value, want: type):
    if want is bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{key}' must be true or false, got {value!r}")
        return value
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"'{key}' must be an integer, got {value!r}")
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if want is str and not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {value!r}")
    return value


def load_ds_config(config) -> dict:
    """A DeepSpeed config given as a dict or a JSON file path -> a fresh dict."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def gradient_accumulation_steps(ds: dict, world_size: int = 1) -> int:
    if "gradient_accumulation_steps" in ds:
        return int(ds["gradient_accumulation_steps"])
    tb, mb = ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu")
    if tb and mb:
        return max(1, int(tb) // (int(mb) * world_size))
    return 1
