"""Which config changes a resume accepts: the rule, written once.

A change is legal when it leaves the trained numbers where an unbroken run with the new config would have
put them at the checkpoint's step, or only says how the work is spread or logged:
- the schedule's length, `scheduler.params.total_num_steps` (train.py's --max_steps): applied in full, the
  lr from the next step on is the new schedule's (checkpoint_restore recomputes it);
- the ZeRO stage and the micro-batch size (train.py checks that micro-batch x ranks, hence the data, stays);
- logging and profiling sections, and the `qft` keys that do not touch the int8 state or its RNG stream.
Every other difference (gradient_accumulation_steps, optimizer type and params such as lr, betas and
weight_decay, the scheduler's other params, gradient_clipping, bf16/fp16, the rest of `qft`) is refused,
each named with its saved and new value: the checkpoint's state was made under the saved values.
"""
from __future__ import annotations

from qft_ds.config import QFTConfig

LEGAL_PATHS = (
    "scheduler.params.total_num_steps", "zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size",
    "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger", "timers", "checkpoint",
)
# qft keys that may change across a resume: they do not change the int8 state or its RNG stream.
RESUMABLE_QFT_KEYS = ("backend", "gradient_checkpointing", "flow", "reuse_recomputed_weight")
# DeepSpeed's value when a key is absent, so that writing the default out is not a change
DEFAULTS = {"gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "bf16.enabled": False,
            "fp16.enabled": False}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def _legal(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in LEGAL_PATHS)


def config_changes(saved: dict, now: dict, fuse_projections: bool | None = None) -> list[str]:
    """The refused differences between the checkpoint's DeepSpeed config and this run's, each named."""
    changes = []
    a = DEFAULTS | _flatten({k: v for k, v in saved.items() if k != "qft"})
    b = DEFAULTS | _flatten({k: v for k, v in now.items() if k != "qft"})
    for path in sorted(set(a) | set(b)):
        if not _legal(path) and a.get(path, "absent") != b.get(path, "absent"):
            changes.append(f"'{path}' ({a.get(path, 'absent')!r} saved, {b.get(path, 'absent')!r} now)")
    qs, qn = saved.get("qft"), now.get("qft")
    if qs is not None:
        if qs.get("method", "qft") == "qft" and fuse_projections is not None:  # what the model was converted with
            qs = {**qs, "fuse_projections": fuse_projections}
        x, y = QFTConfig.from_dict(qs).__dict__, QFTConfig.from_dict(qn).__dict__
        changes += [f"'qft.{k}' ({x[k]!r} saved, {y[k]!r} now)" for k in QFTConfig.keys()
                    if k not in RESUMABLE_QFT_KEYS and x[k] != y[k]]
    return changes
