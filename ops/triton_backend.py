"""Triton backend: registers faster kernels for the reference ops of the same names.

Runs on CUDA GPUs (compute capability >= 8.0), or on CPU tensors under TRITON_INTERPRET=1 (slow; for
tests at small sizes). Asking for it where it cannot run is an error raised by the dispatcher.
"""
from __future__ import annotations

import math
import os
import weakref

import torch

from . import reference as ref
from . import reference_rng as ref_rng


def is_compatible(device="cpu") -> tuple[bool, str]:
    try:  # import triton only: the kernels module is decorated once, on first use, with the env then
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    dev = torch.device(device)
    if dev.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "TRITON_INTERPRET=1: interpreted on the CPU (slow, for tests)"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to interpret kernels on the CPU)"
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False, f"device {dev} is not CUDA"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 0):
        return False, f"compute capability {cap} < 8.0"
    return True, f"CUDA {torch.cuda.get_device_name(dev)}"


_KERNELS = None


def _kernels():
    """The kernels module, imported on first use (it decorates with the environment of then) and kept:
    an import statement per launch is Python work in a host-bound step."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels
        _KERNELS = triton_kernels
    return _KERNELS


_LAUNCHERS: dict = {}


def _kernel(name: str):
    """A triton_launch.Launcher for the kernel `name`: direct launches of the compiled kernel."""
    launcher = _LAUNCHERS.get(name)
    if launcher is None:
        from .triton_launch import Launcher
        launcher = _LAUNCHERS[name] = Launcher(getattr(_kernels(), name))
    return launcher


def _rounding_id(rounding: str) -> int:
    return {"sr": 0, "rtn": 1, "ef": 2}[rounding]


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def dequantize_blockwise_kernel(codes, scales, block, dtype=torch.float32):
    """The Triton dequantize. Not registered as the backend's `dequantize_blockwise`: without outliers the
    reference's single mixed-dtype torch kernel does the same in one launch, and a torch launch costs
    less host time than a Triton one (8.9 against 15.3 us on the H100, results/launch_overhead_*)."""
    n = codes.numel()
    out = torch.empty(n, dtype=dtype, device=codes.device)
    BLOCK = 4096
    _kernel("dequant_kernel")((triton_cdiv(n, BLOCK),), codes, scales, out, n, G=block, BLOCK=BLOCK)
    return out


DEQUANT_CHUNK = 8192


def dequantize_hybrid(codes, scales, block, outlier_idx, outlier_val, dtype=torch.float32):
    """reference.dequantize_hybrid in one launch (dense dequantize + the outliers). The training forward
    is host-bound: this replaces four torch launches per weight use (bench/NOTES.md)."""
    if outlier_idx is None or not outlier_idx.numel():
        return ref.dequantize_blockwise(codes, scales, block, dtype)
    n = codes.numel()
    out = torch.empty(n, dtype=dtype, device=codes.device)
    n_chunks = triton_cdiv(n, DEQUANT_CHUNK)
    _kernel("dequant_hybrid_kernel")(
        (n_chunks,), codes, scales, out, n, outlier_idx, outlier_val, outlier_chunk_ptrs(outlier_idx, DEQUANT_CHUNK, n_chunks),
        G=block, BLOCK=DEQUANT_CHUNK)
    return out


def quantize_blockwise(x, block, rounding="rtn", key=None, offset=0, scales=None):
    if scales is not None:
        raise ValueError("the triton quantize computes its own absmax scales; pass scales=None")
    x = x.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    nb = ref.num_blocks(n, block)
    codes = torch.empty(n, dtype=torch.int8, device=x.device)
    out_scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    _kernel("quant_kernel")((nb,), x, codes, out_scales, n, key or 0, offset, B=block, BP2=_next_pow2(block),
                                   ROUNDING=_rounding_id(rounding))
    return codes, out_scales


def lion_step(w_codes, w_scales, w_block, m_codes, m_scales, m_block, grad, *, lr, beta1, beta2,
              weight_decay, rounding, seed, step, offset, outlier_idx=None, outlier_val=None,
              residual=None, grad_scale=1.0, finite=None, clip=0.0, quad_rng=None, chunk=None, num_warps=4,
              philox_rounds=10, layout=None, fused_outliers=None, momentum_bits=8, rand_bits=None, m4_vec=None,
              keep_outliers=None):
    """Same contract as reference.lion_step; the dense part is one fused kernel per tensor.

    `grad` may be bf16 or fp32 (read once, upcast in registers). `finite` (a device bool, or a float
    tensor such as the gradient's norm, which counts as "finite" when it is) masks every write without
    a host sync. Tuning knobs: `quad_rng`
    (default: whenever the layout allows) draws one Philox call per 128 / rand_bits elements, False forces the
    element-wise path, which yields the same numbers (tests compare them); `chunk` elements per program;
    `philox_rounds` (10, Random123's default; fewer rounds are another stream, for the benchmark's sweep);
    `layout` "3d" runs lion_kernel_3d (one load of g, m, w when the weight group divides the momentum
    block; the same outputs, tested); with it, `fused_outliers` updates the (sorted) outliers inside that
    kernel too: one launch per tensor. `layout=None` reads QFT_DS_LION_LAYOUT: "auto" (the default: 3d with
    fused outliers for every tensor whose shape allows it, two-pass for the others) or "2pass". On the
    H100, auto made the 1.1B LLaMA-shape step 1.43x faster (bench/NOTES.md). `grad_scale` must be >= 0
    (the kernels fold it into the sign test, see _lion_scalars). `clip` > 0: a clipping budget, applied on
    the device from the norm passed as `finite` (see reference.lion_step). `momentum_bits` 4: m_codes are
    packed int4 (reference.quantize_momentum; constexpr M4 of both kernels), which needs an even block.
    `rand_bits` (None: reference_rng.DEFAULT_RAND_BITS, 16; or 32 or 8: constexpr RAND_BITS, see triton_rng)
    is the number of random bits per element; reference.lion_step with the same value draws the same bits.
    `m4_vec` (int4 momentum, layout "3d" only): the packed momentum loaded and stored as whole byte tiles
    (constexpr M4_VEC), the same bits as the byte-wise kernel, 1.9x its speed on the H200 (22% -> 43% of copy
    with 1% outliers, bench/results/lion_sweep_20261130-0204.json). None (the default) takes it wherever it
    applies unless QFT_DS_LION_M4_VEC=0 (the byte-wise kernel, for A/B runs: bench/memory_speed.py's
    qft_m4_bytewise_chunked). `keep_outliers` (fused outliers only; None: whenever the outliers are fused):
    the first 64 outliers of a chunk updated outside the loops and their indices kept for the zeroing
    (constexpr KEEP_OUTLIERS), the same bits, 2-5% faster on the H200 (same file).
    """
    ref.check_momentum_bits(momentum_bits)
    rand_bits = ref_rng.check_rand_bits(ref_rng.DEFAULT_RAND_BITS if rand_bits is None else rand_bits)
    pieces = 128 // rand_bits  # elements per Philox call: tiles start on a call's first element
    if momentum_bits == 4 and m_block % 2:
        raise ValueError(f"int4 momentum packs element pairs within a block: block_size must be even, got {m_block}")
    if layout is None:
        layout = os.environ.get("QFT_DS_LION_LAYOUT", "auto")
        if layout not in ("2pass", "auto"):
            raise ValueError(f"QFT_DS_LION_LAYOUT must be '2pass' or 'auto', got {layout!r}")
        if layout == "auto":
            layout = "3d" if _fits_3d(w_block, m_block, offset, chunk, pieces) else "2pass"
    if fused_outliers is None:
        fused_outliers = layout == "3d"
    if m4_vec is None:
        flag = os.environ.get("QFT_DS_LION_M4_VEC", "1")
        if flag not in ("0", "1"):
            raise ValueError(f"QFT_DS_LION_M4_VEC must be '0' or '1', got {flag!r}")
        m4_vec = (flag == "1" and momentum_bits == 4 and layout == "3d"
                  and m_codes.numel() == (w_codes.numel() + 1) // 2)
    if keep_outliers is None:
        keep_outliers = bool(fused_outliers)
    if m_block & (m_block - 1):
        raise ValueError(f"the triton Lion kernel needs a power-of-two momentum block_size, got {m_block}")
    if layout not in ("2pass", "3d"):
        raise ValueError(f"layout must be '2pass' or '3d', got {layout!r}")
    if layout == "3d" and not _fits_3d(w_block, m_block, offset, chunk, pieces):
        raise ValueError(f"layout '3d' needs a power-of-two weight group dividing the momentum block, a group and "
                         f"an offset divisible by {pieces} (128 / rand_bits) and a power-of-two number of blocks "
                         f"per chunk (group {w_block}, block {m_block}, offset {offset}, chunk {chunk})")
    if fused_outliers and layout != "3d":
        raise ValueError("fused_outliers needs layout='3d'")
    if m4_vec and (momentum_bits != 4 or layout != "3d"):
        raise ValueError(f"m4_vec needs momentum_bits=4 and layout='3d' (got {momentum_bits}, {layout!r})")
    if keep_outliers and not fused_outliers:
        raise ValueError("keep_outliers needs fused_outliers (layout='3d')")
    if m4_vec and m_codes.numel() != (w_codes.numel() + 1) // 2:  # the kernel masks by the buffer's length
        raise ValueError(f"m4_vec: m_codes holds {m_codes.numel()} bytes, {w_codes.numel()} int4 codes need "
                         f"{(w_codes.numel() + 1) // 2}")
    g = grad.reshape(-1)
    if not g.is_contiguous():
        g = g.contiguous()
    n = w_codes.numel()
    if finite is None:
        finite = torch.ones((), dtype=torch.bool, device=w_codes.device)
    if clip > 0 and not finite.is_floating_point():
        raise ValueError("lion_step: a clipping budget needs the gradient's norm as `finite`")
    has_outliers = outlier_idx is not None and outlier_idx.numel() > 0
    if has_outliers and fused_outliers:
        _launch_3d(w_codes, w_scales, w_block, m_codes, m_scales, m_block, g, residual, finite, n, lr, beta1,
                   beta2, weight_decay, rounding, seed, step, offset, grad_scale, clip, chunk, num_warps,
                   philox_rounds, momentum_bits, rand_bits, outlier_idx, outlier_val, m4_vec, keep_outliers)
        return
    if has_outliers:  # exact fp32 outliers, from the *old* momentum, before the kernel overwrites it
        # As few torch ops as the maths allows: the training step is host-bound (bench/NOTES.md).
        idx = outlier_idx  # int32 indexes directly: no int64 copy of 1% of the weight
        m_o = ref.momentum_at(m_codes, m_scales, m_block, idx, momentum_bits)
        g_o = g[idx].float()
        if clip > 0:
            g_o.mul_(torch.clamp(clip / (finite.float() + ref.CLIP_EPS), max=grad_scale))
        elif grad_scale != 1.0:
            g_o.mul_(grad_scale)
        u_o = torch.lerp(m_o, g_o, 1 - beta1).sign_()
        torch.where(ref.finite_flag(finite), torch.add(outlier_val * (1 - lr * weight_decay), u_o, alpha=-lr), outlier_val,
                    out=outlier_val)
    if layout == "3d":
        _launch_3d(w_codes, w_scales, w_block, m_codes, m_scales, m_block, g, residual, finite, n, lr, beta1,
                   beta2, weight_decay, rounding, seed, step, offset, grad_scale, clip, chunk, num_warps,
                   philox_rounds, momentum_bits, rand_bits, m4_vec=m4_vec)
    elif layout == "2pass":
        base = math.lcm(w_block, m_block)
        chunk = chunk or base
        if chunk % base:
            raise ValueError(f"chunk {chunk} must be a multiple of lcm(w_block, m_block) = {base}")
        while chunk < 2048 and chunk * 2 // w_block <= 64:
            chunk *= 2
        rw, rm = chunk // w_block, chunk // m_block
        aligned = offset % pieces == 0 and w_block % pieces == 0 and m_block % pieces == 0
        if quad_rng is None:
            quad_rng = aligned
        elif quad_rng and not aligned:
            raise ValueError(f"quad_rng needs offset, w_block and m_block divisible by {pieces} (128 / rand_bits) "
                             f"({offset}, {w_block}, {m_block})")
        _kernel("lion_kernel")(
            (triton_cdiv(n, chunk),), w_codes, w_scales, m_codes, m_scales, g, residual if residual is not None else w_codes, finite, n,
            float(lr), float(beta1), float(beta2), float(1 - lr * weight_decay), float(grad_scale),
            *_lion_scalars(beta1, beta2, grad_scale),
            _step_key(seed, step), offset, float(clip),
            G=w_block, GP2=_next_pow2(w_block), RW=rw, RWP2=_next_pow2(rw), B=m_block, RM=rm, RMP2=_next_pow2(rm),
            ROUNDING=_rounding_id(rounding), QUAD_RNG=bool(quad_rng), ROUNDS=philox_rounds,
            OK_FLOAT=finite.is_floating_point(), CLIP=clip > 0, M4=momentum_bits == 4, RAND_BITS=rand_bits,
            num_warps=num_warps)
    if has_outliers:  # the kernel rounded -lr*u at outlier slots; their dense code must stay 0
        w_codes[idx] = 0
        if residual is not None:
            residual[idx] = 0


def _lion_scalars(beta1, beta2, grad_scale) -> tuple[float, float]:
    """The kernels' folded scalars (mix, g2). The momentum is m*b2 + g*g2, g2 = (1-b2)*gs; Lion's direction
    sign(b1*m + (1-b1)*gs*g) is sign(m*mix + g), mix = b1 / ((1-b1)*gs): one FMA on the raw gradient.
    Where (1-b1)*gs = 0 (gs = 0, or b1 = 1), mix = inf keeps sign(m) (m = 0 gives nan: no step, as
    sign(0)); with b1 = 0 too it is nan: no step. A negative gs would flip the sign: refused."""
    if grad_scale < 0:
        raise ValueError(f"grad_scale must be >= 0 (a clip or unscale factor), got {grad_scale}")
    d = (1 - beta1) * grad_scale
    mix = beta1 / d if d else (math.copysign(math.inf, beta1) if beta1 else math.nan)
    return float(mix), float((1 - beta2) * grad_scale)


_KEYS: dict = {}


def _step_key(seed: int, step: int) -> int:
    """The Lion kernels' Philox key for one step (one draw per element feeds both roundings; see
    triton_kernels). Cached: every weight of a step uses the same key, and the hash is Python work."""
    key = _KEYS.get((seed, step))
    if key is None:
        if len(_KEYS) > 64:
            _KEYS.clear()
        key = _KEYS[(seed, step)] = ref.rng_key(seed, step, ref.STREAM_WEIGHT)
    return key


def _fits_3d(w_block, m_block, offset, chunk, pieces=4) -> bool:
    blocks = max(1, (chunk or 2048) // m_block)
    return not (w_block & (w_block - 1) or m_block % w_block or w_block % pieces or offset % pieces
                or blocks & (blocks - 1))


_PTRS: dict = {}  # id(index tensor) -> (weakref to it, its version, {(chunk, n_chunks): ptrs})


def outlier_chunk_ptrs(outlier_idx: torch.Tensor, chunk: int, n_chunks: int) -> torch.Tensor:
    """int32 [n_chunks + 1]: chunk c of `chunk` elements owns the (sorted) outliers ptr[c]:ptr[c+1].

    Cached per index tensor (while it lives) and checked against its version: the indices change only
    when the outliers are refreshed or loaded, and two launches (arange, searchsorted) per weight use add
    up in a host-bound step. Not keyed by data_ptr: a freed index tensor's memory is soon another's, and
    not stored on the tensor: torch.save would write it into checkpoints."""
    key = id(outlier_idx)
    entry = _PTRS.get(key)
    if entry is None or entry[0]() is not outlier_idx or entry[1] != outlier_idx._version:
        entry = _PTRS[key] = (weakref.ref(outlier_idx, lambda _, k=key: _PTRS.pop(k, None)), outlier_idx._version, {})
    ptrs = entry[2].get((chunk, n_chunks))
    if ptrs is None:
        bounds = torch.arange(0, n_chunks + 1, dtype=torch.int32, device=outlier_idx.device) * chunk
        ptrs = entry[2][(chunk, n_chunks)] = torch.searchsorted(outlier_idx, bounds, out_int32=True)
    return ptrs


def _launch_3d(w_codes, w_scales, w_block, m_codes, m_scales, m_block, g, residual, finite, n, lr, beta1, beta2,
               weight_decay, rounding, seed, step, offset, grad_scale, clip, chunk, num_warps, philox_rounds,
               momentum_bits=8, rand_bits=32, outlier_idx=None, outlier_val=None, m4_vec=False, keep_outliers=False):
    rm = max(1, (chunk or 2048) // m_block)  # preconditions checked by lion_step before any write
    chunk = rm * m_block
    n_chunks = triton_cdiv(n, chunk)
    if outlier_idx is not None:  # chunk c owns outliers optr[c]:optr[c+1] (the indices are sorted)
        optr = outlier_chunk_ptrs(outlier_idx, chunk, n_chunks)
        extra = dict(OUTLIERS=True, KEEP_OUTLIERS=bool(keep_outliers))
    else:
        outlier_idx = outlier_val = optr = w_codes  # unused pointers
        extra = {}
    _kernel("lion_kernel_3d")(
        (n_chunks,), w_codes, w_scales, m_codes, m_scales, g, residual if residual is not None else w_codes, finite, n,
        float(lr), float(beta1), float(beta2), float(1 - lr * weight_decay), float(grad_scale),
        *_lion_scalars(beta1, beta2, grad_scale),
        _step_key(seed, step), offset, float(clip),
        outlier_idx, outlier_val, optr, m_codes.numel(),
        G=w_block, K=m_block // w_block, RM=rm, ROUNDING=_rounding_id(rounding), ROUNDS=philox_rounds,
        OK_FLOAT=finite.is_floating_point(), CLIP=clip > 0, M4=momentum_bits == 4, RAND_BITS=rand_bits,
        M4_VEC=bool(m4_vec), num_warps=num_warps, **extra)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
