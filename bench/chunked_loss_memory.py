"""What "qft": {"chunked_loss": N} saves and costs, on the CPU: a LLaMA-shaped model of few layers with a
32k vocabulary, one training step through qft_ds.initialize with and without chunking.

Measured per setting:
- logits_peak_bytes: the most bytes of logits-sized tensors ([*, vocab], any float dtype) alive at once
  during forward and backward (bench/logits_probe.py), and the largest single fp32 one;
- step_s_min / _median: a full step's time (forward, backward, update) without the probe, the two settings'
  steps alternating (a shared CPU's load then hits both alike); the ratio is taken on the fastest steps;
- the losses, which must agree.

    python bench/chunked_loss_memory.py                  # vocab 32000, 2 x 512 tokens, chunk 256
    python bench/chunked_loss_memory.py --chunk 128 --seq 1024

Writes bench/results/chunked_loss_memory_<stamp>.json. CPU times only say what the recompute costs
relative to the unchunked step here; the GPU figures come from bench/memory_speed.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, single_process_env, write_result  # noqa: E402
from logits_probe import LogitsProbe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(args, chunk: int):
    import qft_ds
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq, tie_word_embeddings=False))
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.batch
    cfg["bf16"] = {"enabled": args.bf16}
    cfg["qft"]["chunked_loss"] = chunk
    engine, _, _, _ = qft_ds.initialize(model=model, config=cfg)
    return engine


def step(engine, ids, labels) -> float:
    loss = engine(input_ids=ids, labels=labels).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def batch(args):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt: instruction data's case
    return ids, labels


def probed(engine, args, chunk: int) -> dict:
    """The first step, under the probe."""
    ids, labels = batch(args)
    probe = LogitsProbe(args.vocab)
    with probe:
        loss = step(engine, ids, labels)
    return {"chunk": chunk, "kept_tokens": int((labels[:, 1:] != -100).sum()), "logits_peak_bytes": probe.peak_bytes,
            "largest_fp32_logits_elements": probe.largest_fp32, "largest_fp32_logits_shape": probe.largest_shape,
            "losses": [loss], "step_s_all": []}


def timed(engines, runs, args) -> None:
    """Steps of the two engines alternate, so a neighbour's load on a shared CPU hits both alike; the
    fastest step of each is the least disturbed one."""
    ids, labels = batch(args)
    for _ in range(args.steps):
        for engine, run in zip(engines, runs):
            start = time.perf_counter()
            run["losses"].append(step(engine, ids, labels))
            run["step_s_all"].append(time.perf_counter() - start)
    for run in runs:
        run["step_s_min"] = min(run["step_s_all"])
        run["step_s_median"] = statistics.median(run["step_s_all"])


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each setting after the probed one")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    single_process_env()
    chunks = (0, args.chunk)
    engines = [build(args, chunk) for chunk in chunks]
    runs = [probed(engine, args, chunk) for engine, chunk in zip(engines, chunks)]
    timed(engines, runs, args)
    whole, chunked = runs
    tokens = args.batch * args.seq
    result = {**header(args.commit), "setup": {k: v for k, v in vars(args).items() if k not in ("out", "commit")},
              "tokens": tokens, "kept_tokens": whole["kept_tokens"],
              "runs": runs,
              "logits_peak_ratio": chunked["logits_peak_bytes"] / whole["logits_peak_bytes"],
              "step_time_ratio": chunked["step_s_min"] / whole["step_s_min"],
              "step_time_ratio_median": chunked["step_s_median"] / whole["step_s_median"],
              "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(chunked["losses"], whole["losses"]))}
    path = write_result("chunked_loss_memory", result, args.out)
    print(f"logits peak: {whole['logits_peak_bytes'] / 2**20:.1f} MiB unchunked, "
          f"{chunked['logits_peak_bytes'] / 2**20:.1f} MiB at chunk {args.chunk} "
          f"(x{result['logits_peak_ratio']:.3f}); step {whole['step_s_min']:.3f} s -> {chunked['step_s_min']:.3f} s "
          f"(x{result['step_time_ratio']:.2f}); losses differ by {result['max_loss_rel_diff']:.1e} relative\n{path}")
    return path


if __name__ == "__main__":
    main()
