"""Adversarial probe of qft_ds checkpoints (issue 18, items 2-8 and 10), as a hostile user would try it on the
CPU with a tiny model. Every attack ends in one outcome:

- clear: refused with a CheckpointError (or a train.py exit line) and the loading run left unchanged;
- traceback: any other exception;
- silent: the damaged checkpoint loaded, or an illegal change was accepted;
- data lost: a refused load had already written part of the state, or a killed save left no loadable
  checkpoint behind although one had been saved.

Legal changes (a longer schedule) and tolerated damage (a torn last metrics line) count as clear when they
are applied and said. Writes bench/results/checkpoint_probe_<date>.json.

    python bench/checkpoint_probe.py [--kills 12]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
from qft_ds.launch_env import prepare_process  # noqa: E402

prepare_process()
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import qft_ds  # noqa: E402
from qft_ds import checkpoint, checkpoint_io, checkpoint_meta, run_folder  # noqa: E402
from qft_ds.checkpoint import CheckpointError, state_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
results: list[dict] = []


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def config(name="qft.json", **top):
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    cfg["scheduler"]["params"].update(total_num_steps=20, warmup_num_steps=2)
    cfg.update(top)
    return cfg


def engine_for(cfg):
    engine, opt, _, _ = qft_ds.initialize(model=tiny_model(), config=cfg)
    return engine, opt


def step(engine, seed=0):
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()


def record(category, attack, outcome, detail=""):
    results.append({"category": category, "attack": attack, "outcome": outcome, "detail": str(detail)[:300]})
    print(f"{outcome:10s} {category:14s} {attack:34s} {str(detail)[:110]}", flush=True)


def try_load(category, attack, run, cfg, load_cfg=None):
    """Load `run` into a fresh engine that has trained a step; classify."""
    engine, opt = engine_for(cfg)
    step(engine, 7)
    before = (state_hash(engine.module, opt), engine.lr_scheduler.state_dict(), opt.param_groups[0]["lr"])
    try:
        checkpoint.load(run, engine, opt, ds_config=load_cfg or cfg)
    except CheckpointError as e:
        after = (state_hash(engine.module, opt), engine.lr_scheduler.state_dict(), opt.param_groups[0]["lr"])
        record(category, attack, "clear" if after == before else "data lost", e)
        return
    except Exception as e:  # noqa: BLE001  (what the probe counts)
        record(category, attack, "traceback", f"{type(e).__name__}: {e}")
        return
    record(category, attack, "silent", "loaded")


def fresh_run(tmp: Path, cfg, name="run") -> Path:
    engine, opt = engine_for(cfg)
    step(engine, 0)
    out = tmp / name
    shutil.rmtree(out, ignore_errors=True)
    checkpoint.save(out, engine, opt, step=1, ds_config=cfg)
    return out


def edit_meta(ckpt, change, rehash=False):
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    if rehash:
        checkpoint_meta.write_manifest_hash(ckpt)


def edit_tensors(ckpt, rel, change):
    t = load_file(str(ckpt / rel))
    change(t)
    save_file(t, str(ckpt / rel))
    meta = json.loads((ckpt / "meta.json").read_text())
    for p in (ckpt / "meta.json", ckpt / checkpoint_meta.MANIFEST_HASH):
        p.unlink()
    meta.pop("files")
    checkpoint_io.seal(ckpt, meta)


def key(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


# -- the attacks -----------------------------------------------------------------------------------
META_EDITS = {
    "files emptied": lambda m: m.update(files={}),
    "step 1 -> 2": lambda m: m.update(step=2),
    "step -1": lambda m: m.update(step=-1),
    "step_count x100": lambda m: m["optimizer"]["qft"].update(step_count=100),
    "scheduler iteration x100": lambda m: m["scheduler"].update(last_batch_iteration=100),
    "lr x100": lambda m: m["optimizer"]["param_groups"][0].update(lr=m["optimizer"]["param_groups"][0]["lr"] * 100),
    "quant group x2": lambda m: m["quant"]["model.layers.0.mlp.down_proj.qweight"].update(group=256),
    "no 'engine'": lambda m: m.pop("engine"),
    "no 'optimizer'": lambda m: m.pop("optimizer"),
    "no 'scheduler'": lambda m: m.pop("scheduler"),
    "no 'quant'": lambda m: m.pop("quant"),
    "no 'data'": lambda m: m.pop("data"),
}
TENSOR_DAMAGE = {
    "momentum one short": ("optimizer.safetensors", lambda t: t.update({key(t, ".m_codes"): t[key(t, ".m_codes")][:-1]})),
    "momentum as float": ("optimizer.safetensors", lambda t: t.update({key(t, ".m_codes"): t[key(t, ".m_codes")].float()})),
    "momentum missing": ("optimizer.safetensors", lambda t: t.pop(key(t, ".m_codes"))),
    "momentum scales short": ("optimizer.safetensors", lambda t: t.update({key(t, ".m_scales"): t[key(t, ".m_scales")][:-1]})),
    "float momentum reshaped": ("optimizer.safetensors", lambda t: t.update({key(t, ".momentum"): t[key(t, ".momentum")][:-1]})),
    "codes one short": ("model.safetensors", lambda t: t.update({key(t, ".codes"): t[key(t, ".codes")][:-1]})),
    "norm retyped": ("model.safetensors", lambda t: t.update({key(t, "norm.weight"): t[key(t, "norm.weight")].half()})),
    "rng short": ("rng.safetensors", lambda t: t.update(cpu=t["cpu"][:10])),
}
CONFIG_CHANGES = {  # path, value, legal
    "gradient_accumulation_steps 2": ("gradient_accumulation_steps", 2, False),
    "lr x2": ("optimizer.params.lr", None, False),
    "weight_decay 0.5": ("optimizer.params.weight_decay", 0.5, False),
    "betas": ("optimizer.params.betas", [0.5, 0.9], False),
    "gradient_clipping 0": ("gradient_clipping", 0.0, False),
    "bf16 off": ("bf16.enabled", False, False),
    "warmup 7": ("scheduler.params.warmup_num_steps", 7, False),
    "qft.rounding rtn": ("qft.rounding", "rtn", False),
    "total_num_steps 40 (legal)": ("scheduler.params.total_num_steps", 40, True),
    "ZeRO stage 2 (legal)": ("zero_optimization.stage", 2, True),
}
LATEST = {
    "empty": b"", "binary garbage": b"\xff\xfe\x00\x01", "../other_run/checkpoint-1": b"../other_run/checkpoint-1\n",
    "absolute path": None, "missing step": b"checkpoint-9\n",
}


def with_change(cfg, path, value):
    cfg = json.loads(json.dumps(cfg))
    *keys, last = path.split(".")
    d = cfg
    for k in keys:
        d = d.setdefault(k, {})
    d[last] = d[last] * 2 if value is None else value
    return cfg


def probe_loads(tmp, cfg, category="manifest"):
    for name, change in META_EDITS.items():
        for rehash in (False, True):
            run = fresh_run(tmp, cfg)
            edit_meta(run / "checkpoint-1", change, rehash)
            try_load(category, name + (" (re-hashed)" if rehash else ""), run, cfg)


def probe_tensors(tmp, cfg):
    for name, (rel, change) in TENSOR_DAMAGE.items():
        run = fresh_run(tmp, cfg)
        edit_tensors(run / "checkpoint-1", rel, change)
        try_load("load checks", name, run, cfg)


def probe_config(tmp, cfg):
    run = fresh_run(tmp, cfg)
    for name, (path, value, legal) in CONFIG_CHANGES.items():
        new = with_change(cfg, path, value)
        engine, opt = engine_for(cfg)
        try:
            checkpoint.load(run, engine, opt, ds_config=new)
            record("config change", name, "clear" if legal else "silent", "loaded")
        except CheckpointError as e:
            record("config change", name, "silent" if legal else "clear", e)  # a legal change refused: wrong too
        except Exception as e:  # noqa: BLE001
            record("config change", name, "traceback", f"{type(e).__name__}: {e}")


def probe_latest(tmp, cfg):
    for name, text in LATEST.items():
        run = fresh_run(tmp, cfg)
        other = tmp / "other_run"
        shutil.rmtree(other, ignore_errors=True)
        shutil.copytree(run, other)
        (run / "latest").write_bytes(text if text is not None else f"{other / 'checkpoint-1'}\n".encode())
        if name != "missing step":
            shutil.rmtree(run / "checkpoint-1")  # only the other run's would load
        try_load("latest", name, run, cfg)


def probe_swap_and_leftovers(tmp, cfg):
    run = fresh_run(tmp, cfg)
    want = json.loads((run / "checkpoint-1" / "meta.json").read_text())["files"]
    os.rename(run / "checkpoint-1", run / ".old-checkpoint-1-4242")  # a re-save killed mid-swap
    engine, opt = engine_for(cfg)
    try:
        checkpoint.load(run, engine, opt, ds_config=cfg)
        ok = json.loads((run / "checkpoint-1" / "meta.json").read_text())["files"] == want
        record("killed re-save", "swap: old copy aside", "clear" if ok else "data lost", "recovered with a warning")
    except Exception as e:  # noqa: BLE001
        record("killed re-save", "swap: old copy aside", "data lost", f"{type(e).__name__}: {e}")
    for name in (".tmp-checkpoint-2-123", ".tmp-checkpoint-2-zero", ".latest.tmp77"):
        (run / name).mkdir()
    (run / "notes.tmp").mkdir()
    checkpoint.save(run, engine, opt, step=2, ds_config=cfg)
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    record("leftovers", "3 temp folders of killed saves", "clear" if not left and (run / "notes.tmp").exists()
           else "silent", f"left after the next save: {left}")


def probe_metrics(tmp):
    path = tmp / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    try:
        kept = run_folder.metrics_lines(path, 3)
        record("metrics.jsonl", "torn last line", "clear" if len(kept) == 2 else "silent", "dropped with a warning")
    except Exception as e:  # noqa: BLE001
        record("metrics.jsonl", "torn last line", "traceback", e)
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    try:
        run_folder.metrics_lines(path, 3)
        record("metrics.jsonl", "bad middle line", "silent", "accepted")
    except run_folder.RunFolderError as e:
        record("metrics.jsonl", "bad middle line", "clear", e)


def probe_writers_and_modes(tmp, cfg):
    run = fresh_run(tmp, cfg)
    engine, opt = engine_for(cfg)
    hold = "import sys,time; from qft_ds import run_folder; run_folder.acquire(sys.argv[1]); print(1, flush=True); " \
           "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    try:
        checkpoint.save(run, engine, opt, step=2, ds_config=cfg)
        record("two writers", "live second writer", "silent", "saved")
    except CheckpointError as e:
        record("two writers", "live second writer", "clear", e)
    holder.kill()
    holder.wait()
    try:
        checkpoint.save(run, engine, opt, step=2, ds_config=cfg)
        record("two writers", "stale lock (killed writer)", "clear", "taken over with a warning")
    except Exception as e:  # noqa: BLE001
        record("two writers", "stale lock (killed writer)", "traceback", e)
    (run / run_folder.LOCK).write_text(json.dumps({"host": "other-node", "pid": 1}))
    try:
        checkpoint.save(run, engine, opt, step=3, ds_config=cfg)
        record("two writers", "another host's lock", "silent", "saved")
    except CheckpointError as e:
        record("two writers", "another host's lock", "clear", e)
    (run / run_folder.LOCK).unlink()
    modes = {oct(p.stat().st_mode & 0o777) for p in (run / "checkpoint-2").rglob("*")}
    record("modes", f"umask {oct(checkpoint_io._umask())}", "clear" if "0o600" not in modes and "0o700" not in modes
           else "silent", sorted(modes))


KILL_CHILD = """
import os, sys, json, torch
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, sys.argv[2])
from checkpoint_probe import engine_for, config, step
from qft_ds import checkpoint
engine, opt = engine_for(config())
for i in range(1, 1000):
    if i % 4 == 0:  # mostly saves: most kills then land inside one
        step(engine, i)
    checkpoint.save(sys.argv[1], engine, opt, step=1 + i % 2, ds_config=config())  # re-saves steps 1 and 2
    print(i, flush=True)  # a save done
"""


def _lone_process_env() -> dict:
    """The child picks its own rendezvous port (this process holds the one in its environment)."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def probe_kills(tmp, n):
    """kill -9 at a random moment of a loop that saves and re-saves; the next start must load a checkpoint."""
    rng = random.Random(0)
    cfg = config()
    for trial in range(n):
        run = tmp / f"kill{trial}"
        log = open(tmp / f"kill{trial}.log", "w")
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(run), str(Path(__file__).parent)],
                                 stdout=subprocess.PIPE, stderr=log, text=True, env=_lone_process_env())
        saves = rng.choice([n for n in range(3, 16) if (n + 1) % 4])  # the next iteration only saves
        line = "-"
        while line and not (line.strip().isdigit() and int(line) >= saves):  # (DeepSpeed logs to stdout too)
            line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the saving child died: {(tmp / f'kill{trial}.log').read_text()[-2000:]}")
        time.sleep(rng.uniform(0.0, 0.2))  # a tiny model's save takes about this long: most kills land in one
        child.kill()
        child.wait()
        before = sorted(p.name for p in run.iterdir())
        engine, opt = engine_for(cfg)
        try:
            run_folder.acquire(run)  # what train.py does at start: stale lock, leftovers, swap recovery
            run_folder.release(run)
            meta = checkpoint.load(run, engine, opt, ds_config=cfg)
            after = sorted(p.name for p in run.iterdir())
            left = [p for p in after if p.startswith(".") and p != run_folder.LOCK]
            record("kill -9 save", f"trial {trial}", "clear" if not left else "silent",
                   f"resumed step {meta['step']}; before {before}; after {after}")
        except CheckpointError as e:
            record("kill -9 save", f"trial {trial}", "data lost", f"{e}; folder {before}")
        except Exception as e:  # noqa: BLE001
            record("kill -9 save", f"trial {trial}", "traceback", f"{type(e).__name__}: {e}")


def probe_methods(tmp):
    for name in ("peqa.json", "qst.json"):
        cfg = config(name)
        cfg["bf16"] = {"enabled": False}
        cat = name.split(".")[0]
        for attack, change in (("step edited", lambda m: m.update(step=9)),
                               ("step -1 re-hashed", None)):
            run = fresh_run(tmp, cfg)
            if change:
                edit_meta(run / "checkpoint-1", change)
            else:
                edit_meta(run / "checkpoint-1", lambda m: m.update(step=-1), rehash=True)
            try_load(cat, attack, run, cfg)
        run = fresh_run(tmp, cfg)
        edit_tensors(run / "checkpoint-1", "optimizer.safetensors",
                     lambda t: t.update({key(t, ".exp_avg"): t[key(t, ".exp_avg")].flatten()[:-1]}))
        try_load(cat, "AdamW momentum cut", run, cfg)
        run = fresh_run(tmp, cfg)
        try_load(cat, "lr x2 on resume", run, cfg, load_cfg=with_change(cfg, "optimizer.params.lr", None))


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=12)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qft_probe-"))
    cfg = config()
    try:
        probe_loads(tmp, cfg)
        probe_tensors(tmp, cfg)
        probe_config(tmp, cfg)
        probe_latest(tmp, cfg)
        probe_swap_and_leftovers(tmp, cfg)
        probe_metrics(tmp)
        probe_writers_and_modes(tmp, cfg)
        probe_methods(tmp)
        probe_kills(tmp, args.kills)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = {}
    for r in results:
        c = table.setdefault(r["category"], Counter())
        c["tried"] += 1
        c[r["outcome"]] += 1
    out = ROOT / "bench" / "results" / f"checkpoint_probe_{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"machine": "CPU", "torch": torch.__version__, "commit": _commit(),
                               "counts": {k: dict(v) for k, v in table.items()}, "trials": results}, indent=1) + "\n")
    print(f"\n{'category':16s} tried clear traceback silent lost")
    for k, v in table.items():
        print(f"{k:16s} {v['tried']:5d} {v['clear']:5d} {v['traceback']:9d} {v['silent']:6d} {v['data lost']:4d}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
