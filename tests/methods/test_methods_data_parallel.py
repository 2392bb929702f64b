"""PEQA through the DeepSpeed engine on 2 gloo ranks: the same scales on both, and a non-finite loss on
one rank skips the step on both (otherwise the ranks would drift apart)."""
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed.comm.torch  # noqa: F401  (skip the shm op build, see tests/conftest.py)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama

    import qft_ds
    from qft_ds.nn.lowbit import lowbit_modules
    cfg = json.loads((ROOT / "ds_configs" / "peqa.json").read_text())
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
    torch.save({"scales": scales, "skipped": engine.skipped_steps}, os.path.join(out, f"r{rank}.pt"))


def test_two_ranks_hold_the_same_scales_and_skip_together(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(r0["scales"], r1["scales"]))
