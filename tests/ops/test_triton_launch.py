"""The direct launcher runs a compiled kernel only for arguments that specialize as it was compiled for.

On CPU the key logic runs against a stand-in for a JIT function; with CUDA the real kernels compare
direct launches against launches through Triton's JIT, bit for bit."""
import inspect

import pytest
import torch

from qft_ds.ops import triton_launch
from qft_ds.ops import reference as ref


class Param:
    def __init__(self, name, constexpr=False, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default


class FakeJit:
    """Records how each launch went: through the JIT (compiling) or straight to the compiled kernel."""
    __name__ = "fake_kernel"

    def __init__(self, params):
        self.params, self.calls = params, []

    def __getitem__(self, grid):
        def run(*args, num_warps, **constexprs):
            self.calls.append(("jit", grid, args, constexprs))
            return Compiled(self.calls)
        return run


class Compiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("direct", grid, args))


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(triton_launch, "MODE", "direct")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fn = FakeJit([Param("x"), Param("n"), Param("lr"), Param("B", True), Param("R", True, 10)])
    return triton_launch.Launcher(fn), fn


def test_same_specialization_launches_directly_with_constexprs_in_order(launcher):
    launch, fn = launcher
    x = torch.zeros(64, dtype=torch.int8)
    launch((4,), x, 4096, 1e-3, B=256)
    launch((4,), x, 8192, 2e-3, B=256)  # another n that divides by 16, another float: same kernel
    assert [c[0] for c in fn.calls] == ["jit", "direct"]
    assert fn.calls[1][1] == (4, 1, 1) and fn.calls[1][2] == (x, 8192, 2e-3, 256, 10)


@pytest.mark.parametrize("change", ["misaligned", "dtype", "n_not_div16", "n_is_1", "n_64bit", "constexpr",
                                    "default_constexpr", "num_warps"])
def test_any_specialization_change_goes_through_the_jit(launcher, change):
    launch, fn = launcher
    x = torch.zeros(64, dtype=torch.int8)
    launch((4,), x, 4096, 1e-3, B=256)
    args, kw = [x, 4096, 1e-3], dict(B=256)
    if change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "n_not_div16":
        args[1] = 4100
    elif change == "n_is_1":
        args[1] = 1
    elif change == "n_64bit":
        args[1] = 2**33
    elif change == "constexpr":
        kw["B"] = 128
    elif change == "default_constexpr":
        kw["R"] = 7
    elif change == "num_warps":
        kw["num_warps"] = 8
    launch((4,), *args, **kw)
    assert [c[0] for c in fn.calls] == ["jit", "jit"]


def test_unknown_argument_types_and_jit_mode_always_use_the_jit(launcher, monkeypatch):
    launch, fn = launcher
    x = torch.zeros(64, dtype=torch.int8)
    for _ in range(2):
        launch((4,), x, 4096, "text", B=256)
    monkeypatch.setattr(triton_launch, "MODE", "jit")
    for _ in range(2):
        launch((4,), x, 4096, 1e-3, B=256)
    assert [c[0] for c in fn.calls] == ["jit"] * 4


def test_constexprs_must_follow_runtime_arguments():
    with pytest.raises(ValueError, match="constexpr parameters must come after"):
        triton_launch.Launcher(FakeJit([Param("B", True), Param("x")]))


@pytest.mark.gpu
def test_direct_launches_match_the_jit_bit_for_bit(monkeypatch):
    """Lion steps and dequantizes through both paths, with sizes and alignments that specialize apart."""
    from qft_ds.ops import triton_backend as be
    dev = "cuda"
    results = {}
    for mode in ("jit", "direct"):
        monkeypatch.setattr(triton_launch, "MODE", mode)
        out = []
        for n, shift in [(8192, 0), (8192 + 1000, 0), (8192, 3), (8192 + 1000, 3), (8192, 0)]:
            g = torch.Generator().manual_seed(n + shift)
            w = torch.randn(n, generator=g) * 0.02
            wc, ws = ref.quantize_blockwise(w, 128)
            mc, ms = ref.quantize_blockwise(torch.randn(n, generator=g) * 1e-3, 256)
            wc, ws, mc, ms = (t.to(dev) for t in (wc, ws, mc, ms))
            gbuf = (torch.randn(n + shift, generator=g) * 1e-3).to(dev, torch.bfloat16)
            grad = gbuf[shift:]  # shift 3: a gradient 6 bytes off 16-byte alignment; n not divisible by 16
            idx = torch.arange(7, n, 97, dtype=torch.int32, device=dev)
            wc[idx] = 0
            val = torch.randn(idx.numel(), generator=g).to(dev)
            be.lion_step(wc, ws, 128, mc, ms, 256, grad, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
                         rounding="sr", seed=1, step=3, offset=0, outlier_idx=idx, outlier_val=val,
                         finite=torch.linalg.vector_norm(grad.float()))
            out += [wc.cpu(), ws.cpu(), mc.cpu(), ms.cpu(), val.cpu(),
                    be.dequantize_hybrid(wc, ws, 128, idx, val, torch.bfloat16).cpu()]
        results[mode] = out
    assert all(torch.equal(a, b) for a, b in zip(results["jit"], results["direct"]))
