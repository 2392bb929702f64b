"""qft_ds's one communication layer (qft_ds/comm.py): every collective goes through it, on tensors of the
device the process group serves.

NCCL serves CUDA tensors only. On a CPU machine every tensor is a CPU tensor, so a flag put on the CPU
by mistake passes every gloo test and fails on the first NCCL run (issue 16). The tests close that class
of bug in two halves:
1. every path that communicates, run on 2 gloo ranks under a spy (tests/comm_spy.py): no collective of
   qft_ds's own code may bypass qft_ds/comm.py, and each tensor comm.py hands over must be on the group's
   device. A source scan adds the paths that no run reaches: no module but comm.py touches
   torch.distributed or deepspeed.comm;
2. comm.py itself, under a group that serves another device type than the tensors': a real "cuda:gloo"
   group on the CPU (it serves CUDA tensors only, as NCCL does) refuses CPU tensors with comm's error, and
   host flags and means are put on the group's device.
On a machine with 2 GPUs, half 1 also runs under NCCL with the model on the GPUs.
"""
import io
import json
import os
import signal
import sys
import tokenize
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "zero")]
import harness as H  # noqa: E402
from comm_spy import CommSpy  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402

from qft_ds import comm  # noqa: E402


def _spawn(fn, *args, backend="gloo", world=2):
    # gloo ranks are CPU ranks, also on a GPU machine: DeepSpeed would otherwise put the model on CUDA,
    # where gloo lacks reduce-scatter (the children inherit the environment at spawn)
    cpu_only = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""} if backend == "gloo" else {}
    saved = {k: os.environ.get(k) for k in cpu_only}
    os.environ.update(cpu_only)
    try:
        mp.spawn(_entry, args=(fn, backend, world, H.free_port(), args), nprocs=world, join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _entry(rank, fn, backend, world, port, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (the lent machines' advice)
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
        if backend in ("gloo", "nccl"):  # a cuda:gloo group on the CPU serves no barrier tensor
            dist.barrier()  # no rank tears the group down while another still completes its last collective
    finally:
        dist.destroy_process_group()
    H.leave()


# -- the scenarios: every path of qft_ds that communicates ------------------------------------------
def _qft_config(stage: int, gas: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
            "optimizer": {"type": "QFTLion", "params": {"lr": 2e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
            "qft": {"group_size": 32, "block_size": 64, "outlier_frac": 0.02}}


def _method_config(method: str) -> dict:
    cfg = json.loads((ROOT / "ds_configs" / f"{method}.json").read_text())
    cfg.update(bf16={"enabled": False}, train_micro_batch_size_per_gpu=2)
    cfg["qft"]["group_size"] = 32
    return cfg


def _engine_steps(rank, dev, config, steps=2):
    import qft_ds
    engine, opt, _, _ = qft_ds.initialize(model=make_tiny_llama().to(dev), config=config)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps * engine.gradient_accumulation_steps()):
        x = torch.randint(0, 128, (4, 16), generator=g)[2 * rank:2 * rank + 2].to(dev)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return engine, opt


def _build(stage, flow, dev):
    """harness.build on `dev`: a converted tiny LLaMA and its optimizer, without DeepSpeed."""
    from qft_ds.config import QFTConfig
    from qft_ds.engine import build_optimizer
    from qft_ds.nn import convert_model
    torch.manual_seed(0)
    model = make_tiny_llama().to(dev)
    convert_model(model, group_size=32, outlier_frac=0.02)
    cfg = QFTConfig(flow=flow, block_size=64, max_grad_norm=1.0,
                    gradient_accumulation_steps=2 if flow == "stack" else 1)
    cfg.zero_stage = stage
    opt = build_optimizer(model, cfg, {"lr": 2e-3, "weight_decay": 0.1})
    if stage:
        opt.shard()
    opt.init_state()
    return model, opt


def s_spy_selftest(rank, world, dev, tmp):
    """The spy is not blind: a raw collective from a qft_ds file, and a tensor off the group's device."""
    raw = compile("dist.all_reduce(torch.ones(1, device=dev))", str(ROOT / "qft_ds" / "raw.py"), "exec")
    exec(raw, {"dist": dist, "torch": torch, "dev": dev})
    _SPY.device, real = torch.device("meta"), _SPY.device
    try:
        comm.all_reduce_sum(torch.ones(1, device=dev))
    finally:
        _SPY.device = real


def s_comm_api(rank, world, dev, tmp):
    t = torch.full((3,), float(rank + 1), device=dev)
    half = torch.full((2,), float(rank + 1), dtype=torch.bfloat16, device=dev)
    mean_half = comm.all_reduce_mean_(half)
    bcast = torch.full((2,), float(rank), device=dev)
    comm.broadcast_from_rank0([bcast])
    flat = torch.arange(6.0, device=dev) * (rank + 1)
    part, flag = comm.reduce_scatter_mean(flat, [(0, 3), (3, 6)], torch.tensor(float(rank), device=dev))
    comm.barrier()
    return {"any": [comm.any_rank(rank == 1), comm.any_rank(False)], "max": comm.max_over_ranks(7.0 * rank),
            "mean_in_place": comm.all_reduce_mean_(t) is t, "mean": t.cpu(), "mean_half": mean_half.cpu(),
            "half": half.cpu(), "bcast": bcast.cpu(), "slice": part.cpu(), "flag": flag.cpu(),
            "gather": comm.all_gather_bytes(torch.full((2,), rank, dtype=torch.uint8, device=dev)).cpu(),
            "sum": comm.all_reduce_sum(torch.ones(2, device=dev)).cpu()}


def s_zero_fused(rank, world, dev, tmp):
    """ZeRO 1-3, fused flow, real forward/backward (stage 3 gathers weights for each use), no engine."""
    for stage in (1, 2, 3):
        model, opt = _build(stage, "fused", dev)
        H.data_steps(model, opt, rank, world, steps=2)


def s_zero_stack(rank, world, dev, tmp):
    for stage in (1, 2):  # stage 1 reduce-scatters whole buffers at the boundary; 2 every micro-batch
        model, opt = _build(stage, "stack", dev)
        H.data_steps(model, opt, rank, world, steps=2)


def s_qft_engine(rank, world, dev, tmp):
    _engine_steps(rank, dev, _qft_config(0))  # fused
    _engine_steps(rank, dev, _qft_config(0, gas=2))  # stack


def s_zero_engine(rank, world, dev, tmp):
    for stage in (1, 2, 3):
        _engine_steps(rank, dev, _qft_config(stage))


def s_methods(rank, world, dev, tmp):
    for method in ("peqa", "qst"):
        _engine_steps(rank, dev, _method_config(method))


def s_checkpoint(rank, world, dev, tmp):
    from qft_ds import checkpoint
    for stage in (0, 3):
        model, opt = _build(stage, "fused", dev)
        checkpoint.save(f"{tmp}/ckpt{stage}", model, opt, step=1)
        model, opt = _build(stage, "fused", dev)
        checkpoint.load(f"{tmp}/ckpt{stage}", model, opt)


def s_stop_flag(rank, world, dev, tmp):
    import train
    stop = train.StopFlag()
    try:
        quiet = stop.any_rank()
        stop.signum = signal.SIGTERM if rank == 1 else None
        return {"quiet": quiet, "stopped": stop.any_rank()}
    finally:
        stop.restore()


SCENARIOS = {f.__name__[2:]: f for f in (s_spy_selftest, s_comm_api, s_zero_fused, s_zero_stack, s_qft_engine,
                                          s_zero_engine, s_methods, s_checkpoint, s_stop_flag)}


_SPY = None


def _run_all(rank, world, backend, tmp):
    global _SPY
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    spy = _SPY = CommSpy(dev).install()  # before DeepSpeed starts: its backend keeps references to the functions
    out = {}
    for name, fn in SCENARIOS.items():
        spy.scenario = name
        extra, error = None, None
        try:
            extra = fn(rank, world, dev, tmp)
        except Exception:  # (NCCL refuses a CPU tensor on every rank alike; a hang ends at the timeout)
            error = traceback.format_exc()
        out[name] = {"violations": spy.violations[name], "calls": dict(spy.calls[name]), "extra": extra,
                     "error": error}
    spy.uninstall()
    torch.save(out, f"{tmp}/rank{rank}.pt")


def _runs(backend, tmp):
    _spawn(_run_all, backend, str(tmp), backend=backend)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                 reason="needs 2 GPUs"))]


@pytest.fixture(scope="module", params=BACKENDS)
def runs(request, tmp_path_factory):
    return _runs(request.param, tmp_path_factory.mktemp(f"comm-{request.param}"))


def _check(runs, name, ops):
    """No error, no violation, and the scenario did communicate through comm.py (`ops`: name fragments)."""
    for rank, res in enumerate(runs):
        assert not res[name]["error"], f"rank {rank}: {res[name]['error']}"
    bad = [v for res in runs for v in res[name]["violations"]]
    assert not bad, f"{len(bad)} violations: {bad[:6]}"
    calls = runs[0][name]["calls"]
    for op in ops:
        assert any(op in c for c in calls), f"{name}: no {op} went through qft_ds/comm.py ({calls})"


def test_the_spy_sees_raw_calls_and_wrong_devices(runs):
    for res in runs:
        assert res["spy_selftest"]["error"] is None
        bad = res["spy_selftest"]["violations"]
        assert len(bad) == 2, bad
        assert bad[0].startswith("all_reduce from qft_ds/raw.py:1, not through qft_ds/comm.py"), bad
        assert bad[1].startswith("all_reduce from qft_ds/comm.py:") and "the group serves meta" in bad[1], bad


def test_comm_api_on_two_ranks(runs):
    _check(runs, "comm_api", ["all_reduce", "broadcast", "reduce_scatter", "all_gather", "barrier"])
    r0, r1 = (res["comm_api"]["extra"] for res in runs)
    for r in (r0, r1):
        assert r["any"] == [True, False] and r["max"] == 7.0
        assert r["mean_in_place"] and torch.equal(r["mean"], torch.full((3,), 1.5))  # fp32: reduced in place
        assert r["mean_half"].dtype == torch.float32 and torch.equal(r["mean_half"], torch.full((2,), 1.5))
        assert torch.equal(r["bcast"], torch.zeros(2)) and torch.equal(r["sum"], torch.full((2,), 2.0))
        assert torch.equal(r["gather"], torch.tensor([0, 0, 1, 1], dtype=torch.uint8))
        assert r["flag"].item() == 1.0  # the flags are summed
    assert torch.equal(r0["half"], torch.ones(2, dtype=torch.bfloat16))  # a bf16 tensor is left as it was
    assert torch.equal(r0["slice"], torch.tensor([0.0, 1.5, 3.0]))
    assert torch.equal(r1["slice"], torch.tensor([4.5, 6.0, 7.5]))


def test_zero_fused_steps(runs):
    _check(runs, "zero_fused", ["reduce_scatter", "all_gather", "all_reduce"])


def test_zero_stack_steps(runs):
    _check(runs, "zero_stack", ["reduce_scatter", "all_gather"])


def test_qft_engine_steps_fused_and_stack(runs):
    _check(runs, "qft_engine", ["broadcast", "all_reduce"])


def test_zero_engine_steps(runs):
    _check(runs, "zero_engine", ["broadcast", "reduce_scatter", "all_gather"])


def test_methods_steps(runs):
    _check(runs, "methods", ["all_reduce"])  # the non-finite-loss flag


def test_checkpoint_save_and_load(runs):
    _check(runs, "checkpoint", ["barrier"])


def test_train_stop_flag(runs):
    _check(runs, "stop_flag", ["all_reduce"])
    for res in runs:
        assert res["stop_flag"]["extra"] == {"quiet": None, "stopped": signal.SIGTERM}


# -- the source: no module but comm.py touches the process group ------------------------------------
def _code_names(path: Path) -> str:
    """The file's code with strings and comments dropped (docstrings may name torch.distributed)."""
    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.STRING, tokenize.COMMENT))


SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in [*(ROOT / "qft_ds").rglob("*.py"), ROOT / "train.py"]
                 if p != ROOT / "qft_ds" / "comm.py")
ALLOWED = {"qft_ds/launch_env.py": ["deepspeed . comm . torch"]}  # skipping DeepSpeed's shm op build


@pytest.mark.parametrize("rel", SOURCES)
def test_only_comm_touches_the_process_group(rel):
    code = _code_names(ROOT / rel)
    for ok in ALLOWED.get(rel, []):
        code = code.replace(ok, "")
    for name in (" distributed ", "deepspeed . comm"):  # torch.distributed, any alias of it, deepspeed.comm
        assert name not in f" {code} ", f"{rel} uses {name.strip()}: go through qft_ds.comm"


# -- comm.py under a group that does not serve the tensors' device -----------------------------------
def _cuda_only_group(rank, world, tmp):
    errors = []
    for call in (lambda: comm.all_reduce_sum(torch.ones(1)), lambda: comm.broadcast_from_rank0([torch.ones(1)]),
                 lambda: comm.all_gather_bytes(torch.ones(2, dtype=torch.uint8)),
                 lambda: comm.reduce_scatter_mean(torch.ones(4), [(0, 2), (2, 4)], torch.tensor(0.0))):
        try:
            call()
            errors.append(None)
        except RuntimeError as e:
            errors.append(str(e))
    if torch.cuda.is_available():  # a GPU machine: the flag is created on the group's device and works
        errors.append(comm.any_rank(rank == 0))
    torch.save(errors, f"{tmp}/errors{rank}.pt")


def test_a_group_serving_only_cuda_refuses_cpu_tensors_with_a_clear_error(tmp_path):
    _spawn(_cuda_only_group, str(tmp_path), backend="cuda:gloo")  # CPU tensors: like NCCL, it refuses them
    errors = torch.load(tmp_path / "errors0.pt")
    for e, op in zip(errors, ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")):
        assert e is not None and e.startswith(f"qft_ds.comm.{op}: a cpu tensor"), e
        assert "backend 'cuda:gloo' serves cuda tensors only" in e and "qft_ds.comm.device()" in e
    if torch.cuda.is_available():
        assert errors[-1] is True


class _Reached(Exception):
    pass


@pytest.fixture
def meta_group(monkeypatch):
    """A 2-rank group that serves only "meta" tensors (faked: nothing runs): what each collective was
    handed is recorded, then the call stops. Stands in for NCCL on a machine without CUDA."""
    seen = []

    def fake(t, *args, **kwargs):
        seen.append(t.device.type)
        raise _Reached

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "meta:fake")
    monkeypatch.setattr(dist, "all_reduce", fake)
    monkeypatch.delitem(sys.modules, "deepspeed.comm", raising=False)  # torch.distributed's path
    return seen


def test_host_flags_and_means_go_to_the_groups_device(meta_group):
    assert comm.device() == torch.device("meta") and comm.served_device_types() == ("meta",)
    for call in (lambda: comm.any_rank(True), lambda: comm.max_over_ranks(3.0),
                 lambda: comm.all_reduce_mean_(torch.ones(3))):  # a CPU tensor is moved for its mean
        with pytest.raises(_Reached):
            call()
    assert meta_group == ["meta", "meta", "meta"]
    with pytest.raises(RuntimeError, match="qft_ds.comm.all_reduce: a cpu tensor"):
        comm.all_reduce_sum(torch.ones(1))  # the ZeRO collectives move nothing: they refuse
    assert meta_group == ["meta", "meta", "meta"]


@pytest.mark.parametrize("backend, at_hand, expect", [
    ("gloo", None, "cpu"),            # gloo's CUDA support lacks reduce-scatter: qft_ds uses it for the CPU
    ("nccl", None, "cuda:3"),         # the current CUDA device
    ("cuda:gloo", None, "cuda:3"),
    ("cuda:nccl,cpu:gloo", None, "cuda:3"),  # a group of several device types: the first named
    ("cuda:nccl,cpu:gloo", "cpu", "cpu"),    # ... unless the tensors at hand are on another it serves
    ("nccl", "cpu", "cuda:3"),               # tensors it does not serve: its own device
])
def test_device_follows_the_groups_backend(monkeypatch, backend, at_hand, expect):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    tensors = [torch.ones(1, device=at_hand)] if at_hand else []
    assert comm.device(*tensors) == torch.device(expect)


def test_one_process_needs_no_group():
    assert comm.world_size() == 1 and comm.rank() == 0 and not comm.is_distributed()
    assert comm.any_rank(True) and not comm.any_rank(False) and comm.max_over_ranks(5) == 5.0
    t = torch.ones(2, dtype=torch.bfloat16)
    assert comm.all_reduce_mean_(t) is t  # one rank: the tensor itself, no copy or cast
    comm.barrier()
