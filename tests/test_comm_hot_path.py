"""The per-weight collectives' call path (issue 16: the data-parallel hook's host cost).

- A bf16/fp16 gradient's mean over 2**k ranks is cast and divided in one kernel before the sum, and has
  the bits of the old order (cast, sum, divide): checked on the arithmetic, subnormals and exponent
  extremes included, for 2..16 ranks, and on 2 gloo ranks with the ops the mean launches counted.
- Collectives go through deepspeed.comm only when it adds something (its comms logger on, or a backend
  of its own), else straight to torch.distributed.
"""
import sys
import types

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent / "zero"))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
import harness as H  # noqa: E402
from common import OpNames  # noqa: E402  (bench/common.py: the aten ops a code path runs)

from qft_ds import comm  # noqa: E402


def _wide_values(dtype, n, seed):
    """Random finite values of `dtype` over its whole exponent range, subnormals and signed zeros included
    (drawn as raw bit patterns)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    if dtype == torch.bfloat16:  # keep the sums inside fp32: the one documented difference is overflow
        x = torch.where(x.float().abs() < 1e37, x, x * 0)
    return x


def _fold(parts):
    """Left-to-right fp32 sum, one rounding per addition (as a backend adds the ranks' buffers)."""
    acc = parts[0].clone()
    for p in parts[1:]:
        acc = acc + p
    return acc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_prescaled_mean_has_the_bits_of_the_divided_sum(dtype, world):
    assert comm.prescaled_mean_exact(dtype, world)
    grads = [_wide_values(dtype, 200_000, seed) for seed in range(world)]
    subnormal = (grads[0].float().abs() < torch.finfo(dtype).tiny) & (grads[0] != 0)
    assert subnormal.sum() > 50  # the corner the argument is about is exercised
    old = _fold([g.float() for g in grads]) / world
    rec = comm._reciprocal(torch.device("cpu"), world)
    new = _fold([torch.mul(g, rec) for g in grads])
    assert new.dtype == torch.float32
    assert torch.equal(old.view(torch.int32), new.view(torch.int32))  # bits, signed zeros included
    rev = _fold([torch.mul(g, rec) for g in reversed(grads)])  # another order: still the old order's bits
    assert torch.equal((_fold([g.float() for g in reversed(grads)]) / world).view(torch.int32), rev.view(torch.int32))


def test_other_inputs_are_divided_after_the_sum():
    for dtype, world in [(torch.float32, 2), (torch.bfloat16, 3), (torch.float16, 6), (torch.bfloat16, 2 ** 17)]:
        assert not comm.prescaled_mean_exact(dtype, world)
    # why fp32 is excluded: halving its smallest subnormal rounds it away
    a = torch.tensor([2.0 ** -149])
    assert torch.equal((a + a) / 2, a) and torch.equal(a / 2 + a / 2, torch.zeros(1))


def _two_rank_means(rank, world, out):
    g = [_wide_values(torch.bfloat16, 50_000, seed) for seed in range(world)]
    comm.all_reduce_mean_async(g[rank]).wait()  # the first call makes the cached 1/world
    with OpNames() as ops:
        mean = comm.all_reduce_mean_async(g[rank]).wait()
    g32 = [g[r].float().clone() for r in range(world)]
    fp32 = comm.all_reduce_mean_(g32[rank])  # fp32: reduced in place, divided after
    if rank == 0:
        torch.save({"mean": mean, "expect": (g[0].float() + g[1].float()) / 2, "ops": ops.ops,
                    "fp32": fp32, "fp32_expect": (g[0].float() + g[1].float()) / 2}, out)


def test_two_ranks_bf16_mean_is_one_kernel_and_the_same_bits(tmp_path):
    H.spawn(_two_rank_means, str(tmp_path / "m.pt"))
    r = torch.load(tmp_path / "m.pt")
    assert r["mean"].dtype == torch.float32
    assert torch.equal(r["mean"].view(torch.int32), r["expect"].view(torch.int32))
    assert torch.equal(r["fp32"].view(torch.int32), r["fp32_expect"].view(torch.int32))
    kernels = [n for n in r["ops"] if n not in ("view", "_to_copy", "empty", "detach", "alias")]
    assert kernels == ["mul", "allreduce_"], r["ops"]  # was: copy (the cast), allreduce_, div_


# -- which library carries the call ----------------------------------------------------------------
class TorchBackend:  # the class name deepspeed.comm's torch.distributed backend has
    pass


@pytest.fixture
def routed(monkeypatch):
    """A 2-rank group faked on the CPU, and a deepspeed.comm faked as initialised: each collective records
    whether torch.distributed or deepspeed.comm ran it."""
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: seen.append("torch"))
    logger = types.SimpleNamespace(enabled=False)
    ds = types.SimpleNamespace(is_initialized=lambda: True, comms_logger=logger,
                               all_reduce=lambda t, **kw: seen.append("deepspeed"))
    ds_comm = types.SimpleNamespace(cdb=TorchBackend())
    monkeypatch.setitem(sys.modules, "deepspeed.comm", ds)
    monkeypatch.setitem(sys.modules, "deepspeed.comm.comm", ds_comm)
    return seen, logger, ds_comm


def test_collectives_skip_deepspeed_comm_unless_it_logs_or_owns_the_backend(routed):
    seen, logger, ds_comm = routed
    comm.all_reduce_sum(torch.ones(2))
    logger.enabled = True  # a user's "comms_logger": every call is logged by DeepSpeed
    comm.all_reduce_sum(torch.ones(2))
    logger.enabled = False
    ds_comm.cdb = object()  # a DeepSpeed backend that is not torch.distributed's
    comm.all_reduce_sum(torch.ones(2))
    assert seen == ["torch", "deepspeed", "deepspeed"]


def _real_deepspeed_routing(rank, world, out):
    import deepspeed.comm.torch  # noqa: F401  (skip the shm op build, see tests/conftest.py)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the group the harness made
    ds = sys.modules["deepspeed.comm"]
    seen = [comm._deepspeed_adds(ds)]
    ds.configure(enabled=True)  # what a DeepSpeed config's "comms_logger": {"enabled": true} does
    seen.append(comm._deepspeed_adds(ds))
    seen.append(comm._function("all_reduce") is ds.all_reduce)
    ds.configure(enabled=False)
    seen.append(comm._function("all_reduce") is dist.all_reduce)
    torch.save(seen, out)


def test_the_installed_deepspeed_is_bypassed_until_its_comms_logger_is_on(tmp_path):
    H.spawn(_real_deepspeed_routing, str(tmp_path / "r.pt"), world=1)
    assert torch.load(tmp_path / "r.pt") == [False, True, True, True]


def _two_rank_slices(rank, world, out):
    res = {}
    for name, n, bounds in (("even", 6000, [(0, 3000), (3000, 6000)]), ("uneven", 5000, [(0, 3000), (3000, 5000)])):
        g = [_wide_values(torch.bfloat16, n, seed) for seed in range(world)]
        flag = torch.tensor(float(rank))
        comm.reduce_scatter_mean(g[rank], bounds, flag)  # warm: the cached 1/world
        with OpNames() as ops:
            part, summed = comm.reduce_scatter_mean(g[rank], bounds, flag)
        lo, hi = bounds[rank]
        g32 = [x.float() for x in g]
        part32, _ = comm.reduce_scatter_mean(g32[rank], bounds, flag)  # fp32: divided after the sum
        res[name] = {"part": part, "part32": part32, "expect": ((g32[0] + g32[1]) / 2)[lo:hi], "flag": summed,
                     "ops": ops.ops}
    torch.save(res, f"{out}.{rank}")


def test_two_ranks_reduce_scatter_packs_in_one_copy_and_keeps_the_bits(tmp_path):
    H.spawn(_two_rank_slices, str(tmp_path / "s.pt"))
    for rank in range(2):
        res = torch.load(tmp_path / f"s.pt.{rank}")
        for name, r in res.items():
            for got in (r["part"], r["part32"]):
                assert torch.equal(got.view(torch.int32), r["expect"].view(torch.int32)), (rank, name)
            assert r["flag"].item() == 1.0  # 0 + 1: the flags are summed
        ops = res["even"]["ops"]
        packing = [n for n in ops[:ops.index("_reduce_scatter_base_")]
                   if n not in ("view", "empty", "slice", "select", "detach", "alias", "reshape")]
        assert packing == ["mul", "fill_"], ops  # was: zeros, 2 row copies, 2 flag copies (then a divide)
        assert "div_" not in res["even"]["ops"] and "div_" in res["uneven"]["ops"]  # uneven: cast, summed, divided
