"""The `"qft"` section of a DeepSpeed JSON config (typed, with defaults and errors that name the key), and
the DeepSpeed sections qft_ds takes over from DeepSpeed for every method."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path

_CHOICES = {
    "method": ("qft", "peqa", "qst"),
    "rounding": ("sr", "ef", "rtn"),
    "flow": ("auto", "fused", "stack"),
    "clip_mode": ("budget", "two_pass"),
    "backend": ("auto", "torch", "triton"),
    "downsample": ("adapter", "linear", "maxpool", "avgpool"),
}
# Keys read by some methods only: set under another method they would be silently ignored, so they
# are errors there. Keys not listed (method, group_size, seed) apply to every method.
_METHOD_KEYS = {
    "rounding": ("qft",), "flow": ("qft",), "outlier_frac": ("qft",), "block_size": ("qft",),
    "backend": ("qft",), "outlier_refresh": ("qft",), "gradient_checkpointing": ("qft", "peqa"),
    "reuse_recomputed_weight": ("qft",), "fuse_projections": ("qft",), "fuse_norms": ("qft",),
    "checkpoint_reentrant": ("qft",), "clip_mode": ("qft",), "momentum_bits": ("qft",), "rand_bits": ("qft",),
    "chunked_loss": ("qft",),
    "bits": ("peqa", "qst"), "r": ("qst",), "downsample": ("qst",), "adapter_rank": ("qst",),
}


@dataclass
class QFTConfig:
    method: str = "qft"             # qft | peqa | qst
    rounding: str = "sr"            # weight rounding: stochastic, error feedback, round-to-nearest
    flow: str = "auto"              # fused if gradient_accumulation_steps == 1, else stack
    clip_mode: str = "budget"       # fused flow's clipping: per-tensor budgets (+ a norm pass at step 0) | two_pass
    outlier_frac: float = 0.01      # fraction of each weight kept exact in fp32
    group_size: int = 128           # int8 weight group (input columns), adjusted to divide the row
    block_size: int = 256           # int8 block of momentum and gradient buffers
    momentum_bits: int = 8          # Lion momentum codes: 8 (int8) or 4 (int4, two per byte; even block_size)
    rand_bits: int = 0              # random bits per element for the stochastic roundings: 0 (the backend's default), 16, 32, 8
    backend: str = "auto"           # kernels: auto | torch | triton
    seed: int = 0                   # stochastic-rounding key
    outlier_refresh: int = 0        # re-select outliers every N steps (0: never)
    gradient_checkpointing: bool = False
    checkpoint_reentrant: bool = True  # checkpointing: torch's reentrant variant (first forward under no_grad)
    reuse_recomputed_weight: bool = True  # checkpointed layers: backward reuses the recompute's weight
    fuse_projections: bool = True   # q/k/v_proj and gate/up_proj: one stacked weight, one matmul each
    fuse_norms: bool = True         # LLaMA-style RMSNorms run as one torch op (qft_ds.nn.norms)
    chunked_loss: int = 0           # causal-LM loss over chunks of N tokens' logits (0: whole; qft_ds.nn.chunked_loss)
    bits: int = 4                   # peqa, qst: low-bit weight width (3 or 4)
    r: int = 16                     # qst: the side network's hidden size is d / r
    downsample: str = "adapter"     # qst: adapter (low-rank) | linear | maxpool | avgpool
    adapter_rank: int = 16          # qst: rank of the adapter downsample
    # Owned by qft_ds but read from DeepSpeed's own keys (not set in the qft section):
    max_grad_norm: float = 0.0      # <- "gradient_clipping"
    compute_bf16: bool = False      # <- "bf16": {"enabled": true}
    gradient_accumulation_steps: int = 1
    zero_stage: int = 0             # <- "zero_optimization": {"stage": 0-3}; qft_ds.zero shards the int8 state
    comm_dtype: str = "fp32"        # <- "communication_data_type": the data-parallel gradient all-reduce's dtype
    cpu_checkpointing: bool = False  # <- "activation_checkpointing": {"cpu_checkpointing": true} (qft_ds.nn.offload)

    _FROM_DS = ("max_grad_norm", "compute_bf16", "gradient_accumulation_steps", "zero_stage", "comm_dtype",
                "cpu_checkpointing")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls._FROM_DS]

    @classmethod
    def from_dict(cls, section: dict | None, where: str = "qft") -> "QFTConfig":
        if section is not None and not isinstance(section, dict):  # before dict(): a list would half-convert
            raise ValueError(f"'{where}' must be a JSON object, got {section!r}")
        section = dict(section or {})
        known = cls.keys()
        for key in section:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"unknown key '{where}.{key}'" + (f"; did you mean '{hint[0]}'?" if hint
                                 else f"; known keys: {', '.join(known)}"))
        cfg = cls()
        method = _check(f"{where}.method", section.get("method", cfg.method), str)
        if method not in _CHOICES["method"]:  # first: the per-method key checks below depend on it
            raise ValueError(f"'{where}.method' must be one of {', '.join(_CHOICES['method'])}; got {method!r}")
        for key in section:
            if key in _METHOD_KEYS and method not in _METHOD_KEYS[key]:
                raise ValueError(f"'{where}.{key}' applies to method {' or '.join(_METHOD_KEYS[key])} only; "
                                 f"remove it for method {method!r}")
        for f in fields(cls):
            if f.name in section:
                setattr(cfg, f.name, _check(f"{where}.{f.name}", section[f.name], type(getattr(cfg, f.name))))
        if "checkpoint_reentrant" in section and not cfg.gradient_checkpointing:
            raise ValueError(f"'{where}.checkpoint_reentrant' is set but '{where}.gradient_checkpointing' is "
                             "not true: it chooses how checkpointed layers are recomputed")
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "qft") -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"'{where}.{key}' must be one of {', '.join(choices)}; "
                                 f"got {getattr(self, key)!r}")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise ValueError(f"'{where}.outlier_frac' must be in [0, 0.5), got {self.outlier_frac}")
        for key in ("group_size", "block_size", "r", "adapter_rank"):
            low = 0 if key == "group_size" and self.method != "qft" else 1  # peqa/qst: 0 = per channel
            if getattr(self, key) < low:
                raise ValueError(f"'{where}.{key}' must be >= {low}, got {getattr(self, key)}"
                                 + (" (0: one group per output channel)" if low == 0 else ""))
        if self.momentum_bits not in (4, 8):
            raise ValueError(f"'{where}.momentum_bits' must be 4 or 8, got {self.momentum_bits}")
        if self.momentum_bits == 4 and self.block_size % 2:
            raise ValueError(f"'{where}.momentum_bits' 4 packs two codes per byte within a block: "
                             f"'{where}.block_size' must be even, got {self.block_size}")
        if self.rand_bits not in (0, 16, 32, 8):
            raise ValueError(f"'{where}.rand_bits' must be 0 (the backend's default), 16, 32 or 8, got {self.rand_bits}")
        if self.bits not in (3, 4):
            raise ValueError(f"'{where}.bits' must be 3 or 4, got {self.bits}")
        if self.chunked_loss < 0:
            raise ValueError(f"'{where}.chunked_loss' must be >= 0 tokens per chunk (0: off), got {self.chunked_loss}")
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


def wants_qft(ds: dict) -> bool:
    """Whether a DeepSpeed config selects a qft_ds method (a "qft" section, or the QFTLion optimizer)."""
    opt = ds.get("optimizer")
    return "qft" in ds or (isinstance(opt, dict) and str(opt.get("type", "")).lower() == "qftlion")


def load_ds_config(config) -> dict:
    """A DeepSpeed config given as a dict or a JSON file path -> a fresh dict. A config that selects qft_ds is
    checked whole (config_schema, then the "qft" section): a ValueError names the file (or "DeepSpeed config")
    and the key. Other configs pass through: they are DeepSpeed's."""
    if isinstance(config, dict):
        source, ds = "DeepSpeed config", json.loads(json.dumps(config))
    else:
        source, ds = str(config), _read_json(Path(config))
    if not isinstance(ds, dict) or wants_qft(ds):
        from qft_ds.config_schema import validate_ds_config
        try:
            validate_ds_config(ds)
            # (on a shallow copy: the section stays for initialize to take)
            take_activation_checkpointing(QFTConfig.from_dict(ds.get("qft")), dict(ds))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return ds


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): a JSON config is text") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:  # a duplicate key
        raise ValueError(f"{path}: {e}") from None


def _no_duplicate_keys(pairs):
    # json keeps the last of two equal keys silently; DeepSpeed's own loader refuses them too
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key '{key}' appears twice in one object")
        seen[key] = value
    return seen


def gradient_accumulation_steps(ds: dict, world_size: int = 1) -> int:
    if "gradient_accumulation_steps" in ds:
        return int(ds["gradient_accumulation_steps"])
    tb, mb = ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu")
    if tb and mb:
        return max(1, int(tb) // (int(mb) * world_size))
    return 1


def take_deepspeed_sections(cfg: QFTConfig, ds: dict, world_size: int = 1) -> None:
    """The DeepSpeed sections qft_ds applies itself, for every method; `ds` (qft_ds's copy) is what DeepSpeed
    gets:
    - "fp16" is refused: qft_ds computes in bf16 or fp32;
    - "bf16": {"enabled": true} becomes bf16 *compute*; DeepSpeed's bf16 mode is switched off, because it
      casts every Parameter (QFT's norms and outliers, PEQA's scales, QST's side network) to bf16 and adds
      fp32 master copies;
    - "gradient_clipping" is applied by qft_ds, over what qft_ds trains; DeepSpeed's (default 1.0) is set to 0;
    - the gradient accumulation steps, which qft_ds's flow must know before DeepSpeed starts;
    - "activation_checkpointing" (take_activation_checkpointing)."""
    if (ds.get("fp16") or {}).get("enabled"):
        raise ValueError('"fp16" is not supported by qft_ds: use "bf16": {"enabled": true} (bf16 compute)')
    cfg.compute_bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    if "bf16" in ds:
        ds["bf16"] = {"enabled": False}
    cfg.max_grad_norm = float(ds.get("gradient_clipping", 0.0) or 0.0)
    ds["gradient_clipping"] = 0.0
    cfg.gradient_accumulation_steps = gradient_accumulation_steps(ds, world_size)
    take_activation_checkpointing(cfg, ds)


# DeepSpeed's "activation_checkpointing" keys and their defaults (deepspeed.runtime.activation_checkpointing)
_ACTIVATION_CHECKPOINTING = {"partition_activations": False, "contiguous_memory_optimization": False,
                             "number_checkpoints": None, "synchronize_checkpoint_boundary": False,
                             "profile": False, "cpu_checkpointing": False}


def take_activation_checkpointing(cfg: QFTConfig, ds: dict) -> None:
    """DeepSpeed's "activation_checkpointing" section configures DeepSpeed's own checkpoint function
    (deepspeed.checkpointing), which a model checkpointed by transformers (`qft.gradient_checkpointing`)
    never calls: DeepSpeed would ignore the section silently. qft_ds implements `cpu_checkpointing` (the
    layer inputs kept in host memory: qft_ds.nn.offload) and refuses the other keys set to anything but
    their defaults. The section is removed from what DeepSpeed gets."""
    section = ds.pop("activation_checkpointing", None)
    if section is None:
        return
    if not isinstance(section, dict):
        raise ValueError(f"'activation_checkpointing' must be a JSON object, got {section!r}")
    for key, value in section.items():
        where = f"activation_checkpointing.{key}"
        if key not in _ACTIVATION_CHECKPOINTING:
            hint = difflib.get_close_matches(key, list(_ACTIVATION_CHECKPOINTING), n=1)
            raise ValueError(f"unknown key '{where}'" + (f"; did you mean 'activation_checkpointing.{hint[0]}'?"
                                                        if hint else ""))
        if key == "cpu_checkpointing":
            cfg.cpu_checkpointing = _check(where, value, bool)
        elif value is not _ACTIVATION_CHECKPOINTING[key]:  # `is`: 0 is not false here
            raise ValueError(f"'{where}' is not supported by qft_ds (it configures DeepSpeed's own checkpoint "
                             f"function; qft_ds checkpoints through transformers): remove it")
    if cfg.cpu_checkpointing and cfg.method != "qft":
        raise ValueError(f"'activation_checkpointing.cpu_checkpointing' applies to method qft only; remove it "
                         f"for method {cfg.method!r}")
    if cfg.cpu_checkpointing and not cfg.gradient_checkpointing:
        # the config is checked before qft_ds sees the model, so a model checkpointed by its caller (HF Trainer's
        # activation_checkpointing/gradient_checkpointing=True, on by default in TRL) cannot stand in for the key
        raise ValueError("'activation_checkpointing.cpu_checkpointing' keeps checkpointed layers' inputs in host "
                         "memory: it needs 'qft.gradient_checkpointing': true (HF Trainer's or TRL's "
                         "gradient_checkpointing=True does not set it: add the key to the config; both may be on)")
