"""What is alive at the peak of a qft training step, by category, on the CPU, for a big shape's dimensions
with few layers (issue 15: the Llama-3-8B and LLaMA-2-13B steps missed their memory targets).

The model is a shape of bench/shapes.py with --layers decoder layers, built and trained as
bench/memory_speed.py's qft_m4 / qft_m4_chunked methods are (the same builder and config: int4 momentum,
gradient checkpointing, bf16 compute, clipping with its step-0 norm pass). Each step runs under
bench/live_bytes.py's accountant, which counts every storage torch makes (not the int8 state, which
existed before) and keeps the live set at its peak. Two counts: "all" (what the CPU held) and "device"
(without the CPU stand-ins' temporaries: what the GPU's kernels would hold). The reference Lion step runs
in slices (bench/sliced_ops.py: the same bits) so that its temporaries fit the CPU's memory. The int8 state of the full
shape comes from its parameter count and the measured bytes per parameter.

    python bench/peak_composition.py                                     # llama3-8b dims, 2 layers, chunk 0 and 1024
    python bench/peak_composition.py --shape 13b --chunks 0 1024
    python bench/peak_composition.py --shape llama3-8b --seq 512 --chunks 0 256   # quicker

Writes bench/results/peak_composition_<shape>_<stamp>.json: per setting and step, each count's peak, the
moment it was reached, the coarse categories (CATEGORIES below) and the detailed labels (dtype, shape,
phase, site) alive then. CPU seconds are not measured here.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, single_process_env, write_result  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402
from memory_speed import qft_config  # noqa: E402
from sliced_ops import install as slice_lion_steps  # noqa: E402
from shapes import SHAPES, _checkpointed, llama_config, shape_sizes  # noqa: E402

GIB = 2**30


class Classifier:
    """Coarse categories of a live storage from its size, dtype, phase and site, for one shape."""

    def __init__(self, cfg, tokens: int):
        h, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        self.tokens, self.hidden, self.vocab = tokens, h, v
        # a decoder layer's weights (fused q/k/v and gate/up as qft_ds fuses them, and unfused)
        self.layer_weights = {(h + 2 * kv) * h, h * h, kv * h, 2 * i * h, i * h}

    def __call__(self, a) -> str:
        n = a.nbytes // max(1, torch.empty(0, dtype=getattr(torch, a.dtype)).element_size())
        backward = a.phase.startswith("backward")
        if a.shape and a.shape[-1] == self.vocab and n % self.vocab == 0 and n != self.vocab * self.hidden:
            if "chunked_loss" in a.site and a.op.endswith("empty"):
                return f"logits' gradient kept for backward {a.dtype} (chunked loss)"
            return f"logits {a.dtype}" + (" gradient" if backward else "")
        if n == self.vocab * self.hidden:
            if "dequantize" in a.site:
                return f"dequantized head {a.dtype}"
            if "_QEmbeddingFn" in a.site:
                return f"embedding dense gradient {a.dtype}"
            if "chunked_loss" in a.site and a.dtype == "float32":
                return "head gradient fp32 accumulator (chunked loss)"
            return f"head gradient {a.dtype}"
        if "HeadRowSlices" in a.site:
            return f"a dequantized slice of the head {a.dtype} (chunked loss)"
        if "_QEmbeddingFn" in a.site and a.shape and a.shape[-1] == self.hidden and "norm pass" in a.phase:
            return "embedding gradient's touched rows (norm pass)"
        if "chunked_loss" in a.site:
            return "chunked loss: its hidden states, their gradient, a chunk's small temporaries"
        if n == self.tokens * self.hidden:
            if not backward and "checkpointed layer" not in a.phase:
                return f"hidden states kept from forward {a.dtype} (layer inputs, final norm)"
            return f"hidden-sized activations/gradients in backward {a.dtype}"
        if n in self.layer_weights:
            if "dequantize" in a.site:
                return f"a layer's dequantized weights {a.dtype}"
            return f"a layer's weight gradient {a.dtype}"
        if "checkpointed layer" in a.phase:
            return "a layer's recomputed activations and their gradients"
        return f"other ({'backward' if backward else a.phase.split(' ')[0]})"


def build(shape: str, layers: int, seq: int, batch: int, chunk: int):
    """qft_m4(_chunked) of bench/memory_speed.py on `shape` with `layers` decoder layers, on the CPU."""
    import qft_ds
    from qft_ds.nn.streaming import build_random
    cfg = llama_config(shape, seq)
    cfg.num_hidden_layers = layers
    model, _ = build_random(cfg, "cpu", dtype=torch.bfloat16, compute_dtype=torch.bfloat16, fuse_projections=True)
    model = _checkpointed(model, False)
    engine, opt, _, _ = qft_ds.initialize(model=model, config=qft_config(batch, momentum_bits=4, chunked_loss=chunk))
    slice_lion_steps(opt.ops)  # the CPU reference step's fp32 temporaries of a 128k-row head: ~15 GB
    return cfg, engine, opt


def measured_step(engine, x, probe: LiveBytes) -> float:
    with probe:
        probe.phase = "forward"
        loss = engine(input_ids=x, labels=x).loss
        probe.phase = "backward"
        engine.backward(loss)
        probe.phase = "step"
        engine.step()
        value = loss.item()
        del loss
    return value


def summarise(probe: LiveBytes, classify) -> dict:
    """Each count's peak and what was alive then ({label: [bytes, storages]}); and the device count's peak
    inside each phase with its categories (a full shape's peak may fall in another phase than few layers')."""
    out = {}
    for count in ("device", "all"):
        out[count] = {"peak_bytes": probe.peak[count], "peak_gib": probe.peak[count] / GIB,
                      "moment": probe.peak_moment(count),
                      "categories": probe.composition(count, classify),
                      "detail": dict(list(probe.composition(count).items())[:40])}
    out["device_by_phase"] = {phase: {"peak_gib": peak / GIB, "categories": probe.composition(classify=classify, phase=phase)}
                              for phase, peak in probe.phase_peak.items()}
    return out


def run_setting(args, chunk: int) -> dict:
    cfg, engine, opt = build(args.shape, args.layers, args.seq, args.batch, chunk)
    st = opt.state_nbytes()
    state_bytes = st["quantized_bytes"] + st["float_bytes"]
    classify = Classifier(cfg, args.batch * args.seq)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    steps = []
    for i in range(args.steps):
        probe = LiveBytes()
        loss = measured_step(engine, x, probe)
        steps.append({"step": i, "loss": loss, **summarise(probe, classify)})
        d = steps[-1]["device"]
        print(f"chunk {chunk} step {i}: device peak {d['peak_gib']:.3f} GiB (all {steps[-1]['all']['peak_gib']:.3f}) "
              f"at {d['moment']}", flush=True)
        for k, (nbytes, n) in d["categories"].items():
            print(f"    {nbytes / GIB:8.3f} GiB  {k} ({n})", flush=True)
        for phase, v in steps[-1]["device_by_phase"].items():
            print(f"  phase {phase}: {v['peak_gib']:.3f} GiB", flush=True)
    del engine, opt
    gc.collect()
    return {"chunked_loss": chunk, "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / (st["quantized_params"] + st["float_params"]), "steps": steps}


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=[s for s in SHAPES if s != "tiny"] + ["tiny"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024], help="qft.chunked_loss settings (0: off)")
    p.add_argument("--steps", type=int, default=2, help="measured steps per setting (step 0 has the norm pass)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        raise SystemExit("peak_composition counts CPU tensors; on a GPU use bench/memory_speed.py")
    args.batch = args.batch or SHAPES[args.shape]["batch"]
    args.seq = args.seq or SHAPES[args.shape]["seq"]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    single_process_env()
    # one CPU process: qft_ds's launch_env already skips DeepSpeed's shm op build (replacing the builder here
    # would leak into the caller's process, e.g. a test session)
    runs = [run_setting(args, chunk) for chunk in args.chunks]
    full = shape_sizes(args.shape)
    result = {**header(args.commit), "setup": {k: v for k, v in vars(args).items() if k not in ("out", "commit")},
              "full_shape": {"params": full["params"], "layers": SHAPES[args.shape]["num_hidden_layers"],
                             "state_gib_at_measured_bytes_per_param":
                                 full["params"] * runs[0]["state_bytes_per_param"] / GIB},
              "runs": runs}
    path = write_result(f"peak_composition_{args.shape}", result, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
