"""QFTLion: Lion over int8 weights with int8 blockwise momentum (torch.optim.Optimizer API).

Params are of two kinds:
- the `anchor` of a HybridWeight (empty Parameters made by conversion): int8 weight + int8 momentum,
  updated when the flow hands over the gradient (inside backward in fused mode, at step() in stack
  mode) by ops.lion_step;
- ordinary float Parameters (norms, biases): fp32 Lion with fp32 momentum, updated in step().

Clipping (DeepSpeed's "gradient_clipping"): Lion's update is sign(b1*m + (1-b1)*g), so clipping only
rescales g against m. The stack flow knows the whole gradient at the boundary and clips exactly. The
fused flow updates each layer before later ones exist, so it clips each tensor within a budget taken
from the previous step's norms (clipping.py: the clipped global norm never exceeds the limit, and equals
exact clipping when the gradient's shape over tensors holds); step 0 (no previous step) is measured by a
norm-only backward first (`backward`, `before_backward`), so it is clipped exactly.

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
"""
from __future__ import annotations

import logging
import math

import torch

from qft_ds import comm
from qft_ds.flow import GradientFlow
from qft_ds.ops import configure as configure_ops, get_ops
from qft_ds.ops.reference import clip_scale
from qft_ds.optim.clipping import ClipBudgets

logger = logging.getLogger("qft_ds")


def _qweight(p):
    return getattr(p, "_qft_weight", None)


class QFTLion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 rounding: str = "sr", flow: str = "fused", block_size: int = 256, seed: int = 0,
                 max_grad_norm: float = 0.0, backend: str = "auto", outlier_refresh: int = 0,
                 outlier_frac: float = 0.01, clip_mode: str = "budget"):
        if lr < 0:
            raise ValueError(f"QFTLion: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"QFTLion: betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"QFTLion: weight_decay must be >= 0, got {weight_decay}")
        if rounding not in ("sr", "ef", "rtn"):
            raise ValueError(f"QFTLion: rounding must be sr, ef or rtn, got {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.rounding, self.block_size, self.seed = rounding, block_size, seed
        self.max_grad_norm, self.backend = max_grad_norm, backend
        self.outlier_refresh, self.outlier_frac = outlier_refresh, outlier_frac
        self.weights = [_qweight(p) for g in self.param_groups for p in g["params"] if _qweight(p)]
        self._group_of = {id(_qweight(p)): g for g in self.param_groups for p in g["params"] if _qweight(p)}
        self._index = {id(w): i for i, w in enumerate(self.weights)}
        n_float = sum(p.numel() for g in self.param_groups for p in g["params"] if _qweight(p) is None)
        # one budget per quantized weight, and one for all float parameters together (the last)
        self.clip = ClipBudgets(max_grad_norm, [w.numel for w in self.weights] + [max(n_float, 1)], clip_mode)
        self._budgets = None         # this step's clipping budgets (fused flow), fixed at the first update
        self._measuring = False      # inside the norm-only backward
        self.flow = GradientFlow(flow, self._apply, block_size)
        self.flow.attach(self.weights)
        self._ops = None
        configure_ops(backend)  # the quantized modules' forward/backward use the same backend
        self.step_count = 0          # optimizer steps taken; keys the stochastic rounding
        self.prev_grad_norm = None   # the last step's global gradient norm (before clipping)
        self.prev_clipped_norm = None  # ... and as the update applied it
        self._sq_norm = None         # this step's squared gradient norm, summed as it arrives
        self.overflow = False        # the last step was skipped (DeepSpeed reads this attribute)
        self.skipped_steps = self.partial_steps = self.nonfinite_tensors = 0
        self._skip_reason = None     # set before step() when the step must be skipped
        self._bad_now = 0            # tensors left unwritten in this (fused) step
        self._norms = []             # fused: (weight index, fp32 gradient norm on the device), read once per step
        if rounding == "ef":
            for w in self.weights:
                if w.residual is None:
                    w.residual = torch.zeros_like(w.codes)

    # -- state -------------------------------------------------------------------------------
    @property
    def ops(self):
        if self._ops is None:
            dev = self.weights[0].codes.device if self.weights else "cpu"
            self._ops = get_ops(self.backend, dev)
        return self._ops

    def _qstate(self, w):
        st = self.state[w.anchor]
        if "m_codes" not in st:
            n = w.codes.numel()
            st["m_codes"] = torch.zeros(n, dtype=torch.int8, device=w.codes.device)
            st["m_scales"] = torch.zeros(-(-n // self.block_size), dtype=torch.float32, device=w.codes.device)
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
                "bytes_per_quantized_param": q_bytes / max(q_params, 1)}

    # -- updates -----------------------------------------------------------------------------
    def _clip_coef(self, norm) -> float:
        if self.max_grad_norm <= 0 or norm is None or not math.isfinite(norm):
            return 1.0
        return min(1.0, self.max_grad_norm / (norm + 1e-6))

    def _add_sq(self, sq):
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq

    def _flush(self) -> None:
        """Finish fused updates still in flight (ZeRO overlaps each with the next layer's backward)."""

    def _note_norm(self, w, grad):
        """Fused flow, per weight: the gradient's fp32 norm (one launch), which is also the finite flag the
        kernel reads (a gradient is finite iff its fp32 norm is) and the norm its clipping budget is
        applied to. Checked on the device: a host sync per layer would serialise the CPU and GPU for
        the whole backward. The norms are read once per step (step)."""
        norm = self._tensor_norm(grad)
        self._norms.append((self._index[id(w)], norm))
        return norm

    def _tensor_norm(self, grad):
        """The norm of one weight's whole (rank-mean) gradient; qft_ds.zero sums its slices over ranks."""
        return torch.linalg.vector_norm(grad, dtype=torch.float32)

    @staticmethod
    def _all_reduce_mean(grad):
        """Data parallel: every rank applies the mean gradient, so int8 states stay identical (the
        stochastic-rounding draws are keyed by global offset and match on every rank)."""
        if comm.is_distributed():
            grad = comm.all_reduce_mean_(grad.float())  # summed in fp32 whatever the compute dtype
        return grad

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
        try:
            with torch.enable_grad():
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
        idx = [i for i, _ in self._norms]
        vals = [n.reshape(1).float() for _, n in self._norms]
        if float_norm is not None:
            idx.append(len(self.weights))
            vals.append(float_norm.reshape(1).float())
        self._norms = []
        if not vals:
            return {}
        return dict(zip(idx, torch.cat([v.to(vals[0].device) for v in vals]).tolist()))

    def check_loss(self, loss) -> bool:
        """False (and the step will be skipped) if the loss is non-finite on any rank: call before backward.
        One host sync between forward and backward; measured free (bench/NOTES.md, `qft_sync`)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if comm.any_rank(not finite):
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

    def _apply(self, w, grad, coef=None):
        """Update one quantized weight with its full fp32 gradient (called by the flow)."""
        finite, budget = None, 0.0
        if coef is None:  # fused: inside backward
            grad = self._all_reduce_mean(grad)  # NaN on any rank is NaN on all: every rank skips alike
            finite = self._note_norm(w, grad)
            if self._measuring:  # the norm-only backward: nothing is written
                return
            coef, budget = 1.0, self._budget(w)
        group = self._group_of[id(w)]
        st = self._qstate(w)
        self.ops.lion_step(w.codes, w.scales, w.group, st["m_codes"], st["m_scales"], self.block_size, grad,
                           lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                           weight_decay=group["weight_decay"], rounding=self.rounding, seed=self.seed,
                           step=self.step_count, offset=w.global_offset, outlier_idx=w.outlier_idx,
                           outlier_val=w.outlier_val, residual=w.residual, grad_scale=coef, finite=finite,
                           clip=budget)

    def _reduce_stacked(self):
        """Stack flow, at the boundary: average the int8 buffers over ranks; returns their squared norm
        (None if empty). qft_ds.zero reduce-scatters them instead."""
        self.flow.map_buffers(self._all_reduce_mean)
        return self.flow.stacked_sq_norm()

    @staticmethod
    def _fetch(**tensors):
        """Device scalars (-> floats) and 1-D tensors (-> lists) in one host sync (a None stays None)."""
        names = [k for k, v in tensors.items() if v is not None]
        out = dict.fromkeys(tensors)
        if names:
            dev = tensors[names[0]].device
            flat = torch.cat([tensors[k].reshape(-1).float().to(dev) for k in names]).tolist()
            pos = 0
            for k in names:
                n = tensors[k].numel()
                out[k] = flat[pos] if tensors[k].dim() == 0 else flat[pos:pos + n]
                pos += n
        return out

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
        c = self._fetch(float_sq=None if sqs is None else sqs.sum(), stack_bad=self.flow.bad_flag(),
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
            if sqs is not None and sqs.numel():
                self._add_sq(sqs.sum())
            stacked_sq = self._reduce_stacked()
            if stacked_sq is not None:
                self._add_sq(stacked_sq)
            coef = self._clip_coef(self._norm_now())
            stacked = self.flow.pop_all()
        for w, grad in stacked:
            self._apply(w, grad, coef)
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
            self.prev_grad_norm = n = self._norm_now()
            self.prev_clipped_norm = None if n is None else n * coef
        self._sq_norm = None
        if self._bad_now:
            self.partial_steps += 1
            self.nonfinite_tensors += self._bad_now
            self._log(f"step {self.step_count} partial: {self._bad_now} tensor(s) with a non-finite gradient "
                      f"left unwritten (partial steps so far: {self.partial_steps})")
            self._bad_now = 0
        self.step_count += 1
        if self.outlier_refresh and self.step_count % self.outlier_refresh == 0:
            for w in self.weights:
                w.refresh_outliers(self.outlier_frac)
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

    def _skip(self, loss):
        """Write nothing: drop this step's gradients; step_count (the SR key) does not advance."""
        reason, self._skip_reason = self._skip_reason, None
        self.flow.discard()
        self._sq_norm, self._bad_now, self._norms, self._budgets = None, 0, [], None
        self.overflow = True
        self.skipped_steps += 1
        self._log(f"step {self.step_count} skipped: {reason} (skipped steps so far: {self.skipped_steps})")
        return loss

    @staticmethod
    def _log(msg: str) -> None:
        if comm.rank() == 0:
            logger.warning(msg)

    def _norm_now(self):
        """Stack flow: the global gradient norm of this step (the fused flow reads it in step()'s one sync)."""
        return None if self._sq_norm is None else float(self._sq_norm) ** 0.5

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["qft"] = {"step_count": self.step_count, "prev_grad_norm": self.prev_grad_norm,
                     "clip": self.clip.state_dict(),
                     "rounding": self.rounding, "block_size": self.block_size, "seed": self.seed,
                     "skipped_steps": self.skipped_steps, "partial_steps": self.partial_steps,
                     "nonfinite_tensors": self.nonfinite_tensors}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("qft", None)
        if extra is not None:
            if extra["block_size"] != self.block_size:
                raise ValueError(f"checkpoint momentum block_size {extra['block_size']} != {self.block_size}")
            self.step_count, self.prev_grad_norm = extra["step_count"], extra["prev_grad_norm"]
            self.clip.load_state_dict(extra.get("clip") or {})
            for key in ("skipped_steps", "partial_steps", "nonfinite_tensors"):
                setattr(self, key, extra.get(key, 0))
        super().load_state_dict(state_dict)
        # torch replaces the group dicts: re-key weights to the live ones (the scheduler writes lr there)
        self._group_of = {id(_qweight(p)): g for g in self.param_groups for p in g["params"] if _qweight(p)}
        for w in self.weights:  # torch casts state to the param's dtype; codes must stay int8
            st = self.state.get(w.anchor)
            if st and "m_codes" in st:
                st["m_codes"] = st["m_codes"].to(torch.int8)
