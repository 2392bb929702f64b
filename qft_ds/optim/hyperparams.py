"""Lion's hyperparameters, checked where the config gives them and at every step (a scheduler rewrites lr)."""
from __future__ import annotations

import math


def check_hyperparams(group: dict, where: str) -> None:
    """lr, betas and weight_decay finite and in range, or a ValueError naming the key: a NaN or inf here
    would be written into every int8 weight and momentum by the next update (JSON's 1e999 reads as inf)."""
    def bad(key, value, why):
        raise ValueError(f"{where}.{key} {why}, got {value!r}")
    for key in ("lr", "weight_decay"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            bad(key, v, "must be a finite number >= 0")
    betas = group["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        bad("betas", betas, "must be two numbers in [0, 1)")
