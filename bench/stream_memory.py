"""Host memory of converting a sharded checkpoint: streamed (qft_ds.nn.streaming) against load-whole-then-convert.

Saves a random-init LLaMA shape as bf16 safetensors shards, then converts it on the CPU in two fresh processes,
one per path, each reporting its resident set: after its imports (baseline), and its peak (ru_maxrss). On the
CPU the converted int8 model itself lives in host memory, so the streamed path's floor is baseline + int8 state;
what it must not add is more than about one layer. The whole path holds the fp32 model too.

    python bench/stream_memory.py                       # about 0.2B params, 2 processes, a few minutes on 2 cores
    python bench/stream_memory.py --layers 4 --hidden 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(path: str, how: str) -> dict:
    import accelerate  # noqa: F401  (imports before the baseline: they are not the conversion's memory)
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    from qft_ds.nn import convert_model, quantized_weights, streaming
    baseline = rss_bytes()
    at_reads = []  # resident set each time the streamed path reads a tensor: between quantizations
    t0 = time.perf_counter()
    if how == "stream":
        model = streaming.load_skeleton(path)
        streaming.convert_streamed(model, model.__dict__.pop("_qft_stream_source"), "cpu",
                                   census=lambda: at_reads.append(rss_bytes()))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        convert_model(model)
    seconds = time.perf_counter() - t0
    state = sum(w.state_nbytes() for w in quantized_weights(model))
    floats = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"how": how, "baseline_rss": baseline, "peak_rss": peak_rss_bytes(), "end_rss": rss_bytes(),
            "int8_state_bytes": state, "float_param_bytes": floats, "seconds": seconds,
            "max_rss_at_reads": max(at_reads, default=None)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard", default="100MB")
    p.add_argument("--commit", default="")
    p.add_argument("--child", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden), num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      vocab_size=args.vocab, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        layer = max(sum(p.numel() for p in lay.parameters()) for lay in model.model.layers)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp, max_shard_size=args.shard)
        del model
        shards = sorted(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        runs = []
        # glibc keeps freed blocks under its (growing) mmap threshold in the heap: a fixed threshold returns
        # them, so the resident set shows what is alive rather than the allocator's fragmentation
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        for how in ("stream", "whole"):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, how], capture_output=True, text=True,
                                 check=True, env=env)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"commit": args.commit, "config": cfg.to_dict(), "params": params, "fp32_model_bytes": 4 * params,
              "largest_layer_fp32_bytes": 4 * layer, "largest_vocab_matrix_fp32_bytes": 4 * args.vocab * args.hidden,
              "largest_shard_bytes": shards[-1], "shards": len(shards), "malloc_mmap_threshold": 64 * 1024,
              "runs": runs}
    for r in runs:
        r["peak_above_baseline"] = r["peak_rss"] - r["baseline_rss"]
        r["peak_above_baseline_and_int8_state"] = r["peak_above_baseline"] - r["int8_state_bytes"]
        if r["max_rss_at_reads"] is not None:
            r["max_at_reads_above_baseline"] = r["max_rss_at_reads"] - r["baseline_rss"]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"stream_memory_{time.strftime('%Y%m%d-%H%M')}.json"
    path.write_text(json.dumps(result, indent=1))
    gib = 2 ** 30
    for r in runs:
        print(f"{r['how']:6s} peak - baseline {r['peak_above_baseline'] / gib:.3f} GiB "
              f"(- int8 state {r['peak_above_baseline_and_int8_state'] / gib:.3f} GiB), {r['seconds']:.1f} s")
    print(f"fp32 model {4 * params / gib:.3f} GiB, largest layer {4 * layer / gib:.3f} GiB, "
          f"largest shard {shards[-1] / gib:.3f} GiB -> {path}")


if __name__ == "__main__":
    main()
