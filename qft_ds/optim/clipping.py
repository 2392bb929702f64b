"""Global-norm gradient clipping for a flow that updates each tensor before the next gradient exists.

Clipping scales step t's gradient by min(1, M / N_t), N_t its global norm. The stack flow holds the
whole gradient and clips exactly. The fused flow updates each weight inside backward, before later
weights' gradients exist, so N_t is unknown when the first update is written. It clips by *budgets*:

    tensor i is scaled by  min(1, M * r_i / (R * n_i))

where n_i is its gradient's norm now (measured on the device, read by the kernel: no host sync), r_i
its norm at the last step where it had one, and R = sqrt(sum r_i^2). Then:
- the clipped gradient's global norm is at most M, always: each tensor stays within M * r_i / R, and
  those budgets' squares sum to M^2. A spike at step t is clipped at step t;
- when the gradient's shape over tensors is that of the reference step (whatever its size: a spike
  scales every tensor alike), the scale is exactly min(1, M / N_t), global clipping;
- when it drifts, a tensor whose share of the norm grew is clipped a little more, one whose share
  shrank a little less, and only when clipping is active.

Step 0 has no reference: `QFTLion.backward` (and the DeepSpeed engine's backward) then runs a
norm-only backward first (`needs_norm_pass`), so step 0 is clipped exactly. The same pass runs every
step in clip_mode "two_pass" (exact global clipping at every step, at the cost of a second backward).
A loop that calls `loss.backward()` itself skips that pass: step 0 then falls back to budgets by size
(r_i^2 proportional to numel), still bounded by M, with a warning.
"""
from __future__ import annotations

import logging
import math

logger = logging.getLogger("qft_ds")

CLIP_MODES = ("budget", "two_pass")


class ClipBudgets:
    """Reference norms per tensor (index len(sizes) - 1 may be a group, e.g. every float parameter)."""

    def __init__(self, max_norm: float, sizes: list[int], mode: str = "budget"):
        if mode not in CLIP_MODES:
            raise ValueError(f"qft.clip_mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
        self.max_norm, self.sizes, self.mode = float(max_norm), list(sizes), mode
        self.refs: list[float | None] = [None] * len(sizes)
        self._total = None
        self._warned = False

    @property
    def active(self) -> bool:
        return self.max_norm > 0

    def ready(self) -> bool:
        return all(r is not None for r in self.refs)

    def needs_norm_pass(self) -> bool:
        return self.active and (self.mode == "two_pass" or not self.ready())

    def budgets(self) -> list[float]:
        """M * r_i / R per tensor; by size (with a warning) for tensors with no reference yet."""
        if not self.active:
            return [0.0] * len(self.sizes)
        refs = self.refs
        if not self.ready():
            if not self._warned:
                logger.warning("clipping: no reference norms yet (the norm pass was skipped: call "
                               "optimizer.backward(loss) or the engine's backward instead of loss.backward()); "
                               "this step's clipping budgets are by tensor size (still bounded)")
                self._warned = True
            known = [(r, s) for r, s in zip(refs, self.sizes) if r is not None]
            per_elem = math.sqrt(sum(r * r for r, _ in known) / sum(s for _, s in known)) if known else 1.0
            refs = [r if r is not None else per_elem * math.sqrt(s) for r, s in zip(refs, self.sizes)]
        total = math.sqrt(sum(r * r for r in refs))
        if total == 0:
            return [self.max_norm / math.sqrt(len(refs))] * len(refs)
        return [self.max_norm * r / total for r in refs]

    def observe(self, norms: dict[int, float]) -> None:
        """This step's finite, non-zero norms become the references (others keep theirs)."""
        for i, n in norms.items():
            if n is not None and math.isfinite(n) and n > 0:
                self.refs[i] = n

    @staticmethod
    def clipped_norm(norms: dict[int, float], budgets: list[float]) -> float:
        """The global norm of the gradient as the updates applied it (finite tensors only)."""
        sq = 0.0
        for i, n in norms.items():
            if n is not None and math.isfinite(n):
                sq += min(n, budgets[i] * n / (n + 1e-6)) ** 2 if budgets[i] > 0 else n * n
        return math.sqrt(sq)

    def state_dict(self) -> dict:
        return {"refs": list(self.refs), "mode": self.mode}

    def load_state_dict(self, sd: dict) -> None:
        refs = sd.get("refs")
        if refs is None:  # a checkpoint from before budgets: the next step measures them (a norm pass)
            return
        if len(refs) != len(self.refs):
            raise ValueError(f"checkpoint clipping state has {len(refs)} reference norms, this model {len(self.refs)}")
        self.refs = [None if r is None else float(r) for r in refs]
