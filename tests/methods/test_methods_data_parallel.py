"""PEQA and QST through the DeepSpeed engine on 2 gloo ranks (plain data parallel): the same trained state
on both (PEQA's scales, QST's side network), and a non-finite loss on one rank skips the step on both
(otherwise the ranks would drift apart)."""
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank, port, out, method="peqa"):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed.comm.torch  # noqa: F401  (skip the shm op build, see tests/conftest.py)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama

    import qft_ds
    from qft_ds.nn.lowbit import lowbit_modules
    cfg = json.loads((ROOT / "ds_configs" / f"{method}.json").read_text())
    if method == "qst":
        cfg["qft"].update(r=4, adapter_rank=4)  # the tiny model's hidden size is 64
    cfg["optimizer"]["params"]["lr"] = 1e-2
    cfg["scheduler"]["params"].update(total_num_steps=10, warmup_num_steps=1)
    model = make_tiny_llama()
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randint(0, 128, (8, 4, 16), generator=g)[rank * 4:(rank + 1) * 4].reshape(-1, 16)[:4]
        loss = engine(input_ids=x, labels=x).loss
        if step == 2 and rank == 1:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    scales = [m.qweight.scale.detach().clone() for m in lowbit_modules(model).values()]
    trained = [p.detach().clone() for p in engine.module.parameters() if p.requires_grad]
    torch.save({"scales": scales, "trained": trained, "skipped": engine.skipped_steps},
               os.path.join(out, f"r{rank}.pt"))


def _two_ranks(tmp_path, method):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), method), nprocs=2, join=True)
    return [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_ranks_hold_the_same_scales_and_skip_together(tmp_path):
    r0, r1 = _two_ranks(tmp_path, "peqa")
    assert r0["skipped"] == r1["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(r0["scales"], r1["scales"]))


def test_qst_two_ranks_hold_the_same_side_network_and_skip_together(tmp_path):
    r0, r1 = _two_ranks(tmp_path, "qst")
    assert r0["skipped"] == r1["skipped"] == 1
    assert len(r0["trained"]) > 0 and all(torch.equal(a, b) for a, b in zip(r0["trained"], r1["trained"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["scales"], r1["scales"]))  # the frozen backbone's
