"""ZeRO-3's gather prefetch: the next weights' all-gathers are in flight while the current weight is used.

A training step uses the weights in the same order every step (forward in module order, then per
checkpointed layer its recompute and its backward). As DeepSpeed's PartitionedParameterCoordinator does,
the order is recorded once (a trace: the first step, and again after a miss) and followed from the next
step on: at each use, the gathers of the next PREFETCH_DEPTH traced weights are started. A recording
that begins with the same pass repeated (train.py evaluates before its first step; gradient accumulation
repeats forward and backward) keeps the last repeat only: the restart rule below replays the others.

- **Same collectives on every rank.** A prefetch is a collective. Every decision here depends only on the
  sequence of uses and of updates, which every rank makes alike (they already had to: each gather is a
  collective), so every rank starts the same gathers at the same points.
- **Never stale.** A gather started ahead reads the shard as it is then. The shard's owner writes it only
  through the optimizer's update and a reshard (outlier refresh, checkpoint load); both call `forget`,
  which drops a gather of that weight still in flight, so its next use gathers afresh.
- **A use out of the traced order** (the control flow changed): a miss. That use is gathered now, the
  gathers in flight are dropped, nothing more is prefetched in this step, and the next step is traced
  again. Misses are counted (`misses`) and the first is logged at warning level.
- **A pass that starts again at the trace's first weight** (an evaluation or generation forward between
  steps; the outlier re-selection inside step(), which reads every weight in order) restarts the trace
  there: not a miss. With a tied embedding and LM head that weight is also the forward's last use and the
  backward's first, so a forward followed by another forward (train.py's evaluation batches, or an
  evaluation then the step's own forward) first reads as forward then backward. Each use of the trace's
  first weight therefore also opens a candidate restart, followed alongside the trace's position; when
  that position stops matching and a candidate still does, the candidate is taken (a restart, not a
  miss), and only the gathers started along the wrong reading are wasted.
- **A step that ends early** (the first step ran clipping's norm-only backward, later steps do not)
  keeps the part of the trace its furthest pass reached: the rest would only start gathers nobody reads.
Prefetching never crosses a step's end: the optimizer updates weights between steps.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("qft_ds")

# Gathers in flight ahead of the weight in use. One hides a gather behind the use before it; a second
# covers a small weight (k/v projections) whose use is shorter than the next gather. Each costs the
# gathered int8 state of one weight (about 1.1 bytes per parameter: 50 MB for a 7B MLP projection), so
# the depth bounds the extra memory; deeper would only add memory.
PREFETCH_DEPTH = 2
# A run that never steps (evaluation, generation) would otherwise record uses forever
MAX_TRACE = 1_000_000


class GatherPrefetcher:
    """Serves each use of a ZeRO-3 weight shard (`WeightShard.gather_full`): from a gather started ahead
    when the trace predicted the use, else gathered now. `end_step()` after each optimizer step."""

    def __init__(self, depth: int = PREFETCH_DEPTH):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.depth = depth
        self.trace = None      # the uses of one traced step, in order (WeightShards); None: not followed
        self.recording = []    # the uses of this step, when it is being traced; else None
        self.pos = 0           # the next use the trace expects
        self.candidates = []   # positions of passes restarted from the trace's first weight, read alongside pos
        self.reached = 0       # the furthest position of this step (of any of its passes)
        self.inflight = {}     # id(shard) -> (shard, PendingGather), started ahead
        self.misses = 0        # uses out of the traced order
        self.prefetched = 0    # uses served by a gather started ahead
        self.restarts = 0      # passes that started again at the trace's first weight
        self.cuts = 0          # steps that ended before their trace did (the trace was shortened)

    # -- a use ---------------------------------------------------------------------------------------
    def use(self, shard):
        """The whole (codes, scales, outlier_idx, outlier_val) of `shard` for one use."""
        if self.depth and self._follow(shard):
            pending = self.inflight.pop(id(shard), None)
            if pending is not None:
                self.prefetched += 1
                pending = pending[1]
            else:  # started before the prefetches: a stream runs collectives in the order they start
                pending = shard.start_gather()
            self._ahead()
            return shard.finish_gather(pending)
        return shard.finish_gather(shard.start_gather())

    def _follow(self, shard) -> bool:
        """Place this use in the trace; True if the trace is followed after it (prefetch along it)."""
        if self.recording is not None:
            self.recording.append(shard)
            if len(self.recording) > MAX_TRACE:
                self.recording = None  # traced again after the next step
            return False
        if self.trace is None:  # a miss earlier in this step
            return False
        trace = self.trace
        # candidate restarts that this use continues, and one that it begins (ordered set: no duplicates)
        candidates = dict.fromkeys(c + 1 for c in self.candidates if c < len(trace) and trace[c] is shard)
        if trace[0] is shard:
            candidates[1] = None
        if self.pos < len(trace) and trace[self.pos] is shard:
            self.pos += 1
            candidates.pop(self.pos, None)  # the followed position itself (a pass from the first weight)
        else:
            self._drop_inflight()  # started along the reading that just failed
            if not candidates:
                return self._miss()
            self.restarts += 1
            self.pos = max(candidates)  # the restart read the longest
            del candidates[self.pos]
        self.candidates = list(candidates)
        self.reached = max(self.reached, self.pos)
        return True

    def _miss(self) -> bool:
        self.misses += 1
        if self.misses == 1:
            logger.warning("ZeRO-3 prefetch: a weight was used out of the traced order (the model's control flow "
                           "changed?): it is gathered now, and the order is traced again at the next step. "
                           "Misses are counted in the optimizer's sharding.prefetcher.misses")
        self.trace, self.candidates = None, []
        return False

    def _ahead(self) -> None:
        for shard in self.trace[self.pos:self.pos + self.depth]:  # never past the step's end
            if id(shard) not in self.inflight:
                self.inflight[id(shard)] = (shard, shard.start_gather())

    # -- what every rank tells it alike --------------------------------------------------------------
    def forget(self, shard) -> None:
        """`shard`'s state changed (an update, a reshard): a gather of it started before is stale."""
        entry = self.inflight.pop(id(shard), None)
        if entry is not None:
            entry[1].wait()  # the collective completes on every rank; its bytes are dropped

    def end_step(self) -> None:
        """After an optimizer step: a recorded step becomes the trace; a step after a miss is recorded."""
        self._drop_inflight()
        if self.recording is not None:
            if self.recording:
                self.trace, self.recording = _drop_leading_repeats(self.recording), None
        elif self.trace is None:
            self.recording = []
        elif 0 < self.reached < len(self.trace):
            self.cuts += 1
            logger.debug("ZeRO-3 prefetch: the step used %d of the trace's %d uses; the trace keeps those",
                         self.reached, len(self.trace))
            self.trace = self.trace[:self.reached]
        self.pos, self.reached, self.candidates = 0, 0, []

    def _drop_inflight(self) -> None:
        for _, pending in self.inflight.values():
            pending.wait()
        self.inflight.clear()

    def stats(self) -> dict:
        return {"prefetch_depth": self.depth, "prefetched": self.prefetched, "misses": self.misses,
                "restarts": self.restarts, "cuts": self.cuts}


def _drop_leading_repeats(uses: list) -> list:
    """`uses` less its leading repeats: while it starts with a prefix P followed by P again (P ends just
    before a later use of its first weight), drop the first P. An evaluation forward recorded before the
    first step's own forward is such a repeat; a training step's forward is followed by its backward."""
    start = 0
    while True:
        first = uses[start]
        for p in range(1, (len(uses) - start) // 2 + 1):
            if uses[start + p] is first and all(uses[start + p + i] is uses[start + i] for i in range(p)):
                start += p
                break
        else:
            return uses[start:]
