"""Fidelity: does QFT learn like fp32 Lion on a real model? (SmolLM2-135M on Shakespeare)

Every run starts from the same weights and sees the same batches (same seed): 300 steps of 16x256
tokens, 20-step linear warm-up then cosine, gradient clipping 1.0, bf16 compute. The held-out loss is
measured on the first 64 blocks of 256 tokens of two unseen plays.

    python bench/fidelity.py --commit $(git rev-parse HEAD)                       # all default runs
    python bench/fidelity.py --runs qft:2e-5:0 fp32_lion:2e-5:0 --steps 50       # a subset
    python bench/fidelity.py --merge bench/results/fidelity_a.json bench/results/fidelity_b.json

Runs are METHOD:LR:SEED with METHOD in fp32_adamw, fp32_lion, qft (stochastic rounding), qft_rtn
(round-to-nearest, the failure mode), qft_ef (error feedback). Writes bench/results/fidelity_<time>.json
and a PNG of the held-out curves.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_RUNS = ["fp32_adamw:3e-5:0", "fp32_lion:2e-5:0", "qft:2e-5:0", "qft_rtn:2e-5:0", "qft:2e-5:1",
                "fp32_lion:2e-5:1"]
WEIGHT_DECAY = {"fp32_adamw": 0.01}  # Lion variants: 0.1 (Lion wants ~10x AdamW's decay)


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
    return {
        "train_micro_batch_size_per_gpu": args.bsz, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "steps_per_print": 10**9,
        "optimizer": {"type": "QFTLion", "params": {"lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps,
                                                           "warmup_num_steps": args.warmup,
                                                           "warmup_type": "linear"}},
        "qft": {"rounding": {"qft": "sr", "qft_rtn": "rtn", "qft_ef": "ef"}[method], "seed": seed},
    }


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


def run_one(spec, base_model, train_blocks, eval_blocks, args):
    import qft_ds
    from qft_ds.textdata import batches
    method, lr, seed = spec.split(":")
    lr, seed = float(lr), int(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model).to(dev)
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if method.startswith("qft"):
        engine, opt, _, sched = qft_ds.initialize(model=model, config=ds_config(method, lr, seed, args))
        fwd, autocast = engine, False  # qft_ds computes in bf16 itself

        def train_step(x):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            return loss
    else:
        wd = WEIGHT_DECAY.get(method, 0.1)
        if method == "fp32_adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, fused=dev == "cuda")
        else:
            opt = FP32Lion(model.parameters(), lr=lr, weight_decay=wd)
        sched, fwd, autocast = schedule(opt, args.steps, args.warmup), model, True

        def train_step(x):
            with torch.autocast(dev, torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss
    curve = [(0, evaluate(fwd, eval_blocks, args.bsz, autocast))]
    data = batches(train_blocks, args.bsz, seed=seed)
    train_time, losses = 0.0, []
    for step in range(1, args.steps + 1):
        x = next(data).to(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step(x)
        losses.append(loss.item())  # syncs
        train_time += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(fwd, eval_blocks, args.bsz, autocast)))
            print(f"  {spec:>18} step {step:4d}  train {sum(losses[-25:]) / len(losses[-25:]):.4f}  "
                  f"held-out {curve[-1][1]:.4f}", flush=True)
    row = {"method": method, "lr": lr, "seed": seed, "eval_start": curve[0][1], "eval_end": curve[-1][1],
           "eval_curve": curve, "train_loss_last25": sum(losses[-25:]) / 25, "peak_gib": common.peak_gib(),
           "tok_s": args.steps * args.bsz * args.seq / train_time}
    if method.startswith("qft"):
        row["state_bytes_per_param"] = opt.state_nbytes()["bytes_per_quantized_param"]
    del model, opt, fwd
    return row


def load_data(args):
    from qft_ds import hub, textdata
    model, tok = hub.load_model_and_tokenizer(args.model)
    splits = textdata.shakespeare_splits(include_milton=args.milton)
    train = textdata.tokenize_blocks(tok, splits.train, args.seq, split="train")
    held = textdata.tokenize_blocks(tok, splits.heldout, args.seq, max_blocks=args.eval_blocks, split="held-out")
    return model, train, held, splits


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result["rows"]:
        xs, ys = zip(*row["eval_curve"])
        ax.plot(xs, ys, label=f"{row['method']} lr={row['lr']:g} seed={row['seed']}",
                linestyle="--" if row["seed"] else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"SmolLM2-135M on Shakespeare, held-out plays ({result['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(paths):
    parts = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(parts[0])
    out["rows"] = [r for p in parts for r in p["rows"]]
    out["merged_from"] = [Path(p).name for p in paths]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--bsz", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval_blocks", type=int, default=64)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--milton", action="store_true", help="also train on the 7 Milton texts")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--merge", nargs="+", default=None, help="merge result JSONs into one and plot")
    args = p.parse_args(argv)
    if args.merge:
        result = merge(args.merge)
    else:
        common.single_process_env()
        model, train, held, splits = load_data(args)
        result = common.header(args.commit)
        result["setup"] = {"model": args.model, "params": sum(p.numel() for p in model.parameters()),
                           "steps": args.steps, "warmup": args.warmup, "bsz": args.bsz, "seq": args.seq,
                           "schedule": "linear warm-up, cosine", "grad_clip": 1.0, "compute": "bf16",
                           "heldout": splits.heldout_names, "eval_blocks": len(held), "train_blocks": len(train),
                           "train_texts": len(splits.train), "weight_decay": {"lion": 0.1, "adamw": 0.01}}
        result["rows"] = []
        for spec in args.runs:
            print(f"run {spec}", flush=True)
            result["rows"].append(run_one(spec, model, train, held, args))
            common.write_partial("fidelity", result, args.out)
    path = common.write_result("fidelity", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path}")
    print(f"{'method':>12} {'lr':>8} {'seed':>4} {'start':>7} {'end':>7} {'peak GiB':>8} {'tok/s':>8}")
    for r in result["rows"]:
        print(f"{r['method']:>12} {r['lr']:>8g} {r['seed']:>4} {r['eval_start']:7.4f} {r['eval_end']:7.4f} "
              f"{r['peak_gib']:8.2f} {r['tok_s']:8.0f}")


if __name__ == "__main__":
    main()
