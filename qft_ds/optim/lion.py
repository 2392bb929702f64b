"""QFTLion: Lion over int8 weights with int8 blockwise momentum (torch.optim.Optimizer API).

Params are of two kinds:
- the `anchor` of a HybridWeight (empty Parameters made by conversion): int8 weight + int8 momentum,
  updated when the flow hands over the gradient (inside backward in fused mode, at step() in stack
  mode) by ops.lion_step;
- ordinary float Parameters (norms, biases): fp32 Lion with fp32 momentum, updated in step().

Clipping (DeepSpeed's "gradient_clipping"): the stack flow knows the whole gradient at the boundary and
clips exactly. The fused flow updates each layer before later ones exist, so it clips each tensor within
a budget from the previous step's norms (clipping.py); step 0 is measured by a norm-only backward first
(`backward`, `before_backward`), so it is clipped exactly.

Non-finite values never reach the int8 state:
- a non-finite loss (`check_loss`, called by the engine's backward) skips the whole step before backward
  (a NaN loss can have finite gradients: a batch whose labels are all ignored has a 0/0 loss and zero
  gradients, which the kernels would apply);
- stack flow: a non-finite gradient anywhere (quantized or float) skips the whole step at the boundary;
- fused flow: layers updated earlier in the same backward cannot be undone without a copy the fused
  mode must not spend, so a weight whose gradient is non-finite is not written and the step counts as
  *partial* (the other weights, the step counter and the LR schedule advance).
A skipped step sets `overflow`, which DeepSpeed reads: it then counts `skipped_steps` and does not step
the LR scheduler. Every skip and partial step is counted here and logged.

Where the state lives is a strategy the optimizer is given (`sharding`, optim/sharding.py): NoSharding
(one device, plain data parallel) by default, or ZeRO stages 1-3 (qft_ds.zero.ZeroSharding). This file
never asks which: it updates the slice the strategy says this rank owns.
"""
from __future__ import annotations

import collections
import logging
import math

import torch

from qft_ds import comm
from qft_ds.flow import GradientFlow
from qft_ds.nn.qmodules import norm_only_gradients
from qft_ds.ops import configure as configure_ops, get_ops
from qft_ds.ops.reference import clip_scale
from qft_ds.ops.reference_rng import RAND_BITS_CHOICES
from qft_ds.optim.clipping import ClipBudgets
from qft_ds.optim.hyperparams import check_hyperparams
from qft_ds.optim.host import fetch
from qft_ds.optim.sharding import NoSharding
from qft_ds.quant.momentum import MomentumFormat, check_resume_bits

logger = logging.getLogger("qft_ds")


def _qweight(p):
    return getattr(p, "_qft_weight", None)



class QFTLion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 rounding: str = "sr", flow: str = "fused", block_size: int = 256, seed: int = 0,
                 max_grad_norm: float = 0.0, backend: str = "auto", outlier_refresh: int = 0,
                 outlier_frac: float = 0.01, clip_mode: str = "budget", momentum_bits: int = 8, rand_bits: int = 0,
                 sharding=None):
        check_hyperparams({"lr": lr, "betas": betas, "weight_decay": weight_decay}, "optimizer.params")
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"gradient_clipping must be a finite number >= 0, got {max_grad_norm!r}")
        if rounding not in ("sr", "ef", "rtn"):
            raise ValueError(f"QFTLion: rounding must be sr, ef or rtn, got {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.rounding, self.block_size, self.seed = rounding, block_size, seed
        self.momentum = MomentumFormat(momentum_bits, block_size)  # int8 or int4 codes (quant/momentum.py)
        if rand_bits not in (0, *RAND_BITS_CHOICES):
            raise ValueError(f"QFTLion: rand_bits must be 0 (the backend's default), 16, 32 or 8, got {rand_bits!r}")
        self.rand_bits = rand_bits or None  # None: the kernels' default stream; the torch backend its own generator
        self.max_grad_norm, self.backend = max_grad_norm, backend
        self.outlier_refresh, self.outlier_frac = outlier_refresh, outlier_frac
        self.weights = [_qweight(p) for g in self.param_groups for p in g["params"] if _qweight(p)]
        self._group_of = {id(_qweight(p)): g for g in self.param_groups for p in g["params"] if _qweight(p)}
        self._index = {id(w): i for i, w in enumerate(self.weights)}
        n_float = sum(p.numel() for g in self.param_groups for p in g["params"] if _qweight(p) is None)
        # one budget per quantized weight, and one for all float parameters together (the last)
        self.clip = ClipBudgets(max_grad_norm, [w.numel for w in self.weights] + [max(n_float, 1)], clip_mode)
        self._budgets = None         # this step's clipping budgets (fused flow), fixed at the first update
        self._groups_checked = False  # this step's hyperparameters validated (before its first write)
        self._measuring = False      # inside the norm-only backward
        self.sharding = sharding if sharding is not None else NoSharding()
        self.flow = GradientFlow(flow, self._apply, block_size, self.sharding.reduce_on_push)
        self.flow.attach(self.weights)
        self._ops = None
        configure_ops(backend)  # the quantized modules' forward/backward use the same backend
        self.step_count = 0          # optimizer steps taken; keys the stochastic rounding
        self.prev_grad_norm = None   # the last step's global gradient norm (before clipping)
        self.prev_clipped_norm = None  # ... and as the update applied it
        self.overflow = False        # the last step was skipped (DeepSpeed reads this attribute)
        self.skipped_steps = self.partial_steps = self.nonfinite_tensors = 0
        self._skip_reason = None     # set before step() when the step must be skipped
        self._bad_now = 0            # tensors left unwritten in this (fused) step
        self._norms = []             # fused: (weight index, fp32 gradient norm on the device), read once per step
        self._pending = collections.deque()  # fused: (weight, its gradient's reduction in flight), oldest first
        if rounding == "ef":
            for w in self.weights:
                if w.residual is None:  # converted without EF: the original weights are gone
                    w.start_carry()

    # -- state -------------------------------------------------------------------------------
    @property
    def ops(self):
        if self._ops is None:
            dev = self.weights[0].codes.device if self.weights else "cpu"
            self._ops = get_ops(self.backend, dev)
        return self._ops

    @property
    def zero_stage(self) -> int:
        return self.sharding.stage

    def shard(self) -> None:
        """Place the int8 state over the initialised process group (ZeRO: split it; call once, after
        torch.distributed is up and before the first step). A no-op without sharding."""
        if any(self.state.get(w.anchor) for w in self.weights):
            raise RuntimeError("shard() must run before momentum exists (before init_state/step)")
        self.sharding.shard(self.weights, self.block_size)
        # every return path of step() (a skipped step too) ends the strategy's step (ZeRO-3's prefetch trace)
        self.register_step_post_hook(lambda opt, args, kwargs: opt.sharding.end_step())

    def _qstate(self, w):
        st = self.state[w.anchor]
        if "m_codes" not in st:
            lo, hi = self.sharding.owned_range(w)
            st.update(self.momentum.zeros(hi - lo, w.codes.device))
        return st

    def init_state(self) -> None:
        """Allocate every int8 momentum now (on the weights' current device), not in the first step."""
        for w in self.weights:
            self._qstate(w)

    def state_nbytes(self) -> dict:
        """Model-state bytes counted from tensor storage."""
        q_params = sum(w.numel for w in self.weights)
        q_bytes = sum(w.state_nbytes() for w in self.weights)
        q_bytes += sum(t.numel() * t.element_size() for w in self.weights
                       for t in self.state.get(w.anchor, {}).values() if torch.is_tensor(t))
        f_params = f_bytes = 0
        for g in self.param_groups:
            for p in g["params"]:
                if _qweight(p) is None:
                    f_params += p.numel()
                    f_bytes += p.numel() * p.element_size()
                    f_bytes += sum(t.numel() * t.element_size() for t in self.state.get(p, {}).values()
                                   if torch.is_tensor(t))
        return {"quantized_params": q_params, "quantized_bytes": q_bytes,
                "float_params": f_params, "float_bytes": f_bytes,
                "bytes_per_quantized_param": q_bytes / max(q_params, 1), "momentum_bits": self.momentum.bits,
                **self.sharding.describe()}

    # -- updates -----------------------------------------------------------------------------
    def _clip_coef(self, norm) -> float:
        if self.max_grad_norm <= 0 or norm is None or not math.isfinite(norm):
            return 1.0
        return min(1.0, self.max_grad_norm / (norm + 1e-6))

    def backward(self, loss) -> None:
        """`loss.backward()` for loops without the DeepSpeed engine: the loss check and, when clipping
        needs it, the norm-only backward first (see before_backward)."""
        if self.before_backward(loss):
            loss.backward()

    def before_backward(self, loss, retained_backward=None) -> bool:
        """Call before the backward of `loss` (the engine's backward does): False if the loss is
        non-finite (the step will be skipped). Fused flow with clipping on step 0 (or every step in
        clip_mode "two_pass"): a norm-only backward through the same graph measures every tensor's norm
        first, so that this step is clipped exactly. It keeps the graph and writes nothing; the float
        parameters' gradients it leaves (averaged over ranks by the engine's backward) are measured and
        dropped. `retained_backward(loss)` runs that pass (default: loss.backward(retain_graph=True))."""
        if not self.check_loss(loss):
            return False
        if self.flow.mode == "fused" and self.clip.needs_norm_pass():
            self._norm_pass(loss, retained_backward or (lambda l: l.backward(retain_graph=True)))
        return True

    @torch.no_grad()
    def _norm_pass(self, loss, retained_backward) -> None:
        floats = [p for g in self.param_groups for p in g["params"] if _qweight(p) is None]
        kept = [p.grad for p in floats]
        for p in floats:
            p.grad = None
        self._measuring = True
        # on one device the pass only takes norms: an embedding may deliver only its touched rows
        rows_suffice = self.sharding.stage == 0 and not comm.is_distributed()
        try:
            with torch.enable_grad(), norm_only_gradients(rows_suffice):
                retained_backward(loss)
            for w, grad in self.flow.held():
                self._apply(w, grad)
            self._flush()
        finally:
            self._measuring = False
        grads = [p.grad for p in floats if p.grad is not None]
        float_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        for p, g in zip(floats, kept):
            p.grad = g
        measured = self._fetch_norms(float_norm)
        self.clip.observe(measured)
        if not self.clip.ready():  # a tensor without a gradient in this pass: size budgets for it
            logger.debug("clipping: %d tensor(s) had no gradient in the norm pass", self.clip.refs.count(None))

    def _fetch_norms(self, float_norm=None) -> dict[int, float]:
        """This step's fused norms (and the float parameters' at index len(weights)) in one host sync."""
        norms = self._norms + ([] if float_norm is None else [(len(self.weights), float_norm)])
        self._norms = []
        vals = fetch(norms=torch.stack([n.float().to(norms[0][1].device) for _, n in norms]) if norms else None)
        return dict(zip([i for i, _ in norms], vals["norms"] or []))

    def check_loss(self, loss) -> bool:
        """False (and the step will be skipped) if the loss is non-finite on any rank: call before backward.
        One host sync between forward and backward; measured free (bench/NOTES.md, `qft_sync`)."""
        if not comm.finite_on_every_rank(loss):
            self._skip_reason = "non-finite loss"
            return False
        return True

    def _budget(self, w) -> float:
        """Fused flow: this weight's clipping budget for this step (0: no clipping)."""
        if not self.clip.active:
            return 0.0
        if self._budgets is None:  # fixed for the whole step, from the references of the step before
            self._budgets = self.clip.budgets()
        return self._budgets[self._index[id(w)]]

    def _apply(self, w, grad):
        """Fused flow, inside backward: a quantized weight's whole gradient on this rank (called by the
        flow). Its reduction over ranks starts now; where the strategy overlaps reductions with backward
        (`overlap_depth` > 0), the oldest of more than that many in flight is finished and applied instead,
        and _flush finishes the rest. Each weight's update is independent of the others': the order of
        applying them changes no bits."""
        self._pending.append((w, self.sharding.reduce(w, grad)))
        while len(self._pending) > self.sharding.overlap_depth:
            self._finish(*self._pending.popleft())

    def _flush(self) -> None:
        while self._pending:
            self._finish(*self._pending.popleft())

    def _finish(self, w, reduced) -> None:
        """The owned slice of the mean gradient and its whole weight's norm, kept on the device (a host sync
        per layer would serialise the CPU and GPU for the whole backward; step() reads them all at once),
        then the update, which reads that norm as its finite flag and as its clipping budget's measure."""
        grad, finite = reduced()
        norm = self.sharding.grad_norm(grad, finite)
        self._norms.append((self._index[id(w)], norm))
        if not self._measuring:  # the norm-only backward writes nothing
            self._update(w, grad, 1.0, norm, self._budget(w))

    def _update(self, w, grad, coef, finite=None, budget=0.0) -> None:
        """Lion on the slice of `w` this rank owns (the whole weight unsharded), with its owned gradient."""
        if not self._groups_checked:
            self._check_groups()
        group = self._group_of[id(w)]
        st = self._qstate(w)
        own = self.sharding.owned(w)
        if own.hi > own.lo:  # ZeRO: a rank may own nothing of a small weight
            self.ops.lion_step(own.codes, own.scales, w.group, st["m_codes"], st["m_scales"], self.block_size, grad,
                               lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                               weight_decay=group["weight_decay"], rounding=self.rounding, seed=self.seed,
                               step=self.step_count, offset=own.offset, outlier_idx=own.outlier_idx,
                               outlier_val=own.outlier_val, residual=own.residual, grad_scale=coef, finite=finite,
                               clip=budget, momentum_bits=self.momentum.bits, rand_bits=self.rand_bits)
        self.sharding.after_update(w)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        float_params = [(g, p) for g in self.param_groups for p in g["params"]
                        if _qweight(p) is None and p.grad is not None]
        # squared norms of every float gradient in two launches (foreach), not two per tensor
        sqs = torch.stack(torch._foreach_norm([p.grad.float() for _, p in float_params])).square() \
            if float_params else None
        fused = self.flow.mode == "fused"
        if fused and self._skip_reason is None:  # finish the quantized updates begun in backward
            for w, grad in self.flow.held():  # a tied weight whose second use never came
                self._apply(w, grad)
            self._flush()
        # every check of the step in one host sync (each sync drains the GPU queue)
        fused_idx = [i for i, _ in self._norms]
        c = fetch(float_sq=None if sqs is None else sqs.sum(), stack_bad=self.flow.bad_flag(),
                  fused_norms=torch.stack([n.float() for _, n in self._norms]) if self._norms else None)
        self._norms = []
        float_sq = c["float_sq"]
        if float_sq is not None and not math.isfinite(float_sq):  # find the culprits only now
            keep = torch.isfinite(sqs).tolist()
            self._bad_now += keep.count(False)
            float_params = [fp for fp, k in zip(float_params, keep) if k]
            sqs = sqs[torch.tensor(keep, device=sqs.device)]
            float_sq = float(sqs.sum()) if sqs.numel() else None
            if not fused and self._skip_reason is None:
                self._skip_reason = "non-finite gradient"
        if not fused and self._skip_reason is None and comm.any_rank(bool(c["stack_bad"])):
            self._skip_reason = "non-finite gradient"
        if self._skip_reason is not None:
            return self._skip(loss)
        self.overflow = False
        if fused:
            coef = self._finish_fused_norms(dict(zip(fused_idx, c["fused_norms"] or [])), float_sq)
            stacked = []
        else:
            sq = sqs.sum() if sqs is not None and sqs.numel() else None
            stacked_sq = self.sharding.reduce_stacked(self.flow)  # the owned slices, reduced over ranks
            if stacked_sq is not None:
                sq = stacked_sq if sq is None else sq + stacked_sq
            stack_norm = None if sq is None else float(sq) ** 0.5
            coef = self._clip_coef(stack_norm)
            stacked = self.flow.pop_all()
        for w, grad in stacked:
            self._update(w, grad, coef)
        if not self._groups_checked:
            self._check_groups()
        by_group = {}
        for g, p in float_params:
            st = self.state[p]
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p, dtype=torch.float32)
            by_group.setdefault(id(g), (g, []))[1].append(p)
        for g, ps in by_group.values():  # one foreach update per param group (lr, wd)
            self.ops.lion_step_fp32_foreach(ps, [self.state[p]["momentum"] for p in ps], [p.grad for p in ps],
                                            lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                                            weight_decay=g["weight_decay"], grad_scale=coef)
        if not fused:
            self.prev_grad_norm = stack_norm
            self.prev_clipped_norm = None if stack_norm is None else stack_norm * coef
        if self._bad_now:
            self.partial_steps += 1
            self.nonfinite_tensors += self._bad_now
            self._log(f"step {self.step_count} partial: {self._bad_now} tensor(s) with a non-finite gradient "
                      f"left unwritten (partial steps so far: {self.partial_steps})")
            self._bad_now = 0
        self.step_count += 1
        self._groups_checked = False
        if self.outlier_refresh and self.step_count % self.outlier_refresh == 0:
            for w in self.weights:  # from the whole weight (ZeRO-3 gathers it), then placed again
                w.refresh_outliers(self.outlier_frac)
                self.sharding.reshard(w)
        return loss

    def _finish_fused_norms(self, norms: dict, float_sq) -> float:
        """Fused flow, after the one sync: count the unwritten (non-finite) weights, record the step's
        global norm before and after clipping, make this step's norms the next budgets' references, and
        return the float parameters' clipping factor (their budget is the last)."""
        self._bad_now += sum(1 for n in norms.values() if not math.isfinite(n))
        if float_sq is not None:
            norms[len(self.weights)] = float_sq ** 0.5
        finite = [n for n in norms.values() if math.isfinite(n)]
        self.prev_grad_norm = math.sqrt(sum(n * n for n in finite)) if finite else None
        coef = 1.0
        if self.clip.active and norms:
            budgets = self._budgets or self.clip.budgets()
            if float_sq is not None:
                coef = clip_scale(1.0, budgets[-1], float_sq ** 0.5)
            self.prev_clipped_norm = self.clip.clipped_norm(norms, budgets)
            self.clip.observe(norms)
        else:
            self.prev_clipped_norm = self.prev_grad_norm
        self._budgets = None
        return coef

    def _check_groups(self) -> None:
        """Once per step, before its first write: every group's lr, betas and weight decay (an LR scheduler
        rewrites lr every step, so a bad schedule is caught at the step it goes bad)."""
        for i, g in enumerate(self.param_groups):
            check_hyperparams(g, f"QFTLion param group {i} at step {self.step_count} (an LR scheduler sets lr)")
        self._groups_checked = True

    def _skip(self, loss):
        """Write nothing: drop this step's gradients; step_count (the SR key) does not advance."""
        self._flush()  # an update in flight: one device applied it inside backward already
        reason, self._skip_reason = self._skip_reason, None
        self.flow.discard()
        self._bad_now, self._norms, self._budgets, self._groups_checked = 0, [], None, False
        self.overflow = True
        self.skipped_steps += 1
        self._log(f"step {self.step_count} skipped: {reason} (skipped steps so far: {self.skipped_steps})")
        return loss

    @staticmethod
    def _log(msg: str) -> None:
        if comm.rank() == 0:
            logger.warning(msg)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["qft"] = {"step_count": self.step_count, "prev_grad_norm": self.prev_grad_norm,
                     "clip": self.clip.state_dict(),
                     "rounding": self.rounding, "block_size": self.block_size, "seed": self.seed,
                     "momentum_bits": self.momentum.bits,
                     "skipped_steps": self.skipped_steps, "partial_steps": self.partial_steps,
                     "nonfinite_tensors": self.nonfinite_tensors}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("qft", None)
        if extra is not None:
            check_resume_bits(extra, self.momentum.bits)
            if extra["block_size"] != self.block_size:
                raise ValueError(f"checkpoint momentum block_size {extra['block_size']} != {self.block_size}")
            self.step_count, self.prev_grad_norm = extra["step_count"], extra["prev_grad_norm"]
            self.clip.load_state_dict(extra.get("clip") or {})
            for key in ("skipped_steps", "partial_steps", "nonfinite_tensors"):
                setattr(self, key, extra.get(key, 0))
        super().load_state_dict(state_dict)
        # torch replaces the group dicts: re-key weights to the live ones (the scheduler writes lr there)
        self._group_of = {id(_qweight(p)): g for g in self.param_groups for p in g["params"] if _qweight(p)}
        for w in self.weights:  # torch casts state to the param's dtype; codes must stay int8 (uint8: int4)
            st = self.state.get(w.anchor)
            if st and "m_codes" in st:
                st["m_codes"] = st["m_codes"].to(self.momentum.dtype)
