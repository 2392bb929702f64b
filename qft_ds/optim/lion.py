"""QFTLion: Lion over int8 weights with int8 blockwise momentum (torch.optim.Optimizer API).

Params are of two kinds:
- the `anchor` of a HybridWeight (empty Parameters made by conversion): int8 weight + int8 momentum,
  updated when the flow hands over the gradient (inside backward in fused mode, at step() in stack
  mode) by ops.lion_step;
- ordinary float Parameters (norms, biases): fp32 Lion with fp32 momentum, updated in step().

Clipping (DeepSpeed's "gradient_clipping"): Lion's update is sign(b1*m + (1-b1)*g), so clipping only
rescales g against m. The stack flow knows the whole gradient at the boundary and clips exactly. The
fused flow updates each layer before later ones exist, so it clips step t with the global norm
measured in step t-1 (one pass, no extra memory); step 0 is not clipped.

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

from qft_ds.flow import GradientFlow
from qft_ds.ops import configure as configure_ops, get_ops

logger = logging.getLogger("qft_ds")


def _qweight(p):
    return getattr(p, "_qft_weight", None)


class QFTLion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 rounding: str = "sr", flow: str = "fused", block_size: int = 256, seed: int = 0,
                 max_grad_norm: float = 0.0, backend: str = "auto", outlier_refresh: int = 0,
                 outlier_frac: float = 0.01):
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
        self.flow = GradientFlow(flow, self._apply, block_size)
        self.flow.attach(self.weights)
        self._ops = None
        configure_ops(backend)  # the quantized modules' forward/backward use the same backend
        self.step_count = 0          # optimizer steps taken; keys the stochastic rounding
        self.prev_grad_norm = None   # fused clipping uses the previous step's global norm
        self._sq_norm = None         # this step's squared gradient norm, summed as it arrives
        self.overflow = False        # the last step was skipped (DeepSpeed reads this attribute)
        self.skipped_steps = self.partial_steps = self.nonfinite_tensors = 0
        self._skip_reason = None     # set before step() when the step must be skipped
        self._bad_now = 0            # tensors left unwritten in this (fused) step
        self._finite_flags = []      # fused: device bools (ZeRO: one per weight), counted once per step
        self._norms = []             # fused: fp32 gradient norms, one per weight; summed once per step
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

    def _note_norm(self, grad, finite=None):
        """Fused flow, per weight: one launch, the norm, which is also the finite flag the kernel reads (a
        gradient is finite iff its fp32 norm is; ZeRO passes the flag its reduce-scatter carried). A
        non-finite gradient: the kernel writes nothing (the step becomes partial). Checked on the device:
        a host sync per layer would serialise the CPU and GPU for the whole backward. The norms are summed
        and the flags counted once per step (_take_norms, step)."""
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._norms.append(norm)
        if finite is None:
            return norm
        self._finite_flags.append(finite)
        return finite

    def _take_norms(self):
        """Squared sum of this step's fused norms (a skipped tensor adds nothing), or None. Without explicit
        flags (one device) the non-finite norms are the skipped tensors: counted here, synced in step()."""
        if not self._norms:
            return None
        norms = torch.stack(self._norms)
        if not self._finite_flags:
            self._finite_flags = [torch.isfinite(norms)]
        sq = torch.nan_to_num(norms, 0.0, 0.0, 0.0).square().sum()
        self._norms = []
        return sq

    @staticmethod
    def _all_reduce_mean(grad):
        """Data parallel: every rank applies the mean gradient, so int8 states stay identical (the
        stochastic-rounding draws are keyed by global offset and match on every rank)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            grad = grad.float()  # sum in fp32 whatever the compute dtype
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        return grad

    @staticmethod
    def _any_rank(flag: bool) -> bool:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return flag

    def check_loss(self, loss) -> bool:
        """False (and the step will be skipped) if the loss is non-finite on any rank: call before backward.
        One host sync between forward and backward; measured free (bench/NOTES.md, `qft_sync`)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self._any_rank(not finite):
            self._skip_reason = "non-finite loss"
            return False
        return True

    def _apply(self, w, grad, coef=None):
        """Update one quantized weight with its full fp32 gradient (called by the flow)."""
        finite = None
        if coef is None:  # fused: inside backward
            grad = self._all_reduce_mean(grad)  # NaN on any rank is NaN on all: every rank skips alike
            finite = self._note_norm(grad)
            coef = self._clip_coef(self.prev_grad_norm)
        group = self._group_of[id(w)]
        st = self._qstate(w)
        self.ops.lion_step(w.codes, w.scales, w.group, st["m_codes"], st["m_scales"], self.block_size, grad,
                           lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                           weight_decay=group["weight_decay"], rounding=self.rounding, seed=self.seed,
                           step=self.step_count, offset=w.global_offset, outlier_idx=w.outlier_idx,
                           outlier_val=w.outlier_val, residual=w.residual, grad_scale=coef, finite=finite)

    def _reduce_stacked(self):
        """Stack flow, at the boundary: average the int8 buffers over ranks; returns their squared norm
        (None if empty). qft_ds.zero reduce-scatters them instead."""
        self.flow.map_buffers(self._all_reduce_mean)
        return self.flow.stacked_sq_norm()

    def _fused_sq(self):
        """Fused flow: this step's squared gradient norm over the quantized weights, on the device, summed
        over ranks where each holds a slice (qft_ds.zero); None if no weight was updated."""
        return self._take_norms()

    def _bad_flags(self):
        """Fused flow: how many weights were left unwritten this step (device count), or None."""
        if not self._finite_flags:
            return None
        bad = (~torch.cat([f.reshape(-1) for f in self._finite_flags])).sum()
        self._finite_flags = []
        return bad

    @staticmethod
    def _fetch(**scalars):
        """Device scalars -> Python floats in one host sync (a None stays None)."""
        names = [k for k, v in scalars.items() if v is not None]
        out = dict.fromkeys(scalars)
        if names:
            dev = scalars[names[0]].device
            vals = torch.stack([scalars[k].reshape(()).float().to(dev) for k in names]).tolist()
            out.update(zip(names, vals))
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
        c = self._fetch(float_sq=None if sqs is None else sqs.sum(), stack_bad=self.flow.bad_flag(),
                        fused_sq=self._fused_sq() if fused else None, fused_bad=self._bad_flags() if fused else None)
        float_sq = c["float_sq"]
        if float_sq is not None and not math.isfinite(float_sq):  # find the culprits only now
            keep = torch.isfinite(sqs).tolist()
            self._bad_now += keep.count(False)
            float_params = [fp for fp, k in zip(float_params, keep) if k]
            sqs = sqs[torch.tensor(keep, device=sqs.device)]
            float_sq = float(sqs.sum()) if sqs.numel() else None
            if not fused and self._skip_reason is None:
                self._skip_reason = "non-finite gradient"
        if not fused and self._skip_reason is None and self._any_rank(bool(c["stack_bad"])):
            self._skip_reason = "non-finite gradient"
        if self._skip_reason is not None:
            return self._skip(loss)
        self.overflow = False
        if fused:
            coef = self._clip_coef(self.prev_grad_norm)
            stacked = []
            if c["fused_bad"]:
                self._bad_now += int(c["fused_bad"])
            sq = (c["fused_sq"] or 0.0) + (float_sq or 0.0)
            self.prev_grad_norm = sq ** 0.5 if c["fused_sq"] is not None or float_sq is not None else None
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
            self.prev_grad_norm = self._norm_now()
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

    def _skip(self, loss):
        """Write nothing: drop this step's gradients; step_count (the SR key) does not advance."""
        reason, self._skip_reason = self._skip_reason, None
        self.flow.discard()
        self._sq_norm, self._bad_now, self._finite_flags, self._norms = None, 0, [], []
        self.overflow = True
        self.skipped_steps += 1
        self._log(f"step {self.step_count} skipped: {reason} (skipped steps so far: {self.skipped_steps})")
        return loss

    @staticmethod
    def _log(msg: str) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            logger.warning(msg)

    def _norm_now(self):
        """Stack flow: the global gradient norm of this step (the fused flow reads it in step()'s one sync)."""
        return None if self._sq_norm is None else float(self._sq_norm) ** 0.5

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["qft"] = {"step_count": self.step_count, "prev_grad_norm": self.prev_grad_norm,
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
            for key in ("skipped_steps", "partial_steps", "nonfinite_tensors"):
                setattr(self, key, extra.get(key, 0))
        super().load_state_dict(state_dict)
        # torch replaces the group dicts: re-key weights to the live ones (the scheduler writes lr there)
        self._group_of = {id(_qweight(p)): g for g in self.param_groups for p in g["params"] if _qweight(p)}
        for w in self.weights:  # torch casts state to the param's dtype; codes must stay int8
            st = self.state.get(w.anchor)
            if st and "m_codes" in st:
                st["m_codes"] = st["m_codes"].to(torch.int8)
