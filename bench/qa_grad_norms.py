"""The gradient norm of answer-only QA data at the first steps (why the fused flow must clip step 0).

SmolLM2-135M-Instruct on the first 400 rows of bench/data/qa/play_train.jsonl, batches of 8, fp32 Lion
lr 1e-4 with the gradient clipped to 1.0 (torch's clip_grad_norm_, which returns the norm before clipping),
on the CPU. Writes bench/results/qa_grad_norms_<time>.json: (step, loss, global gradient norm) per step.

    python bench/qa_grad_norms.py --steps 25
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qft_ds import hub, sftdata  # noqa: E402
from qft_ds.ops.reference import lion_step_fp32  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = hub.load_model_and_tokenizer(str(hub.prepare_default_model()))
    rows = sftdata.read_sft_jsonl(ROOT / "bench" / "data" / "qa" / "play_train.jsonl")[:400]
    batches = sftdata.sft_batches(sftdata.encode_sft(tok, rows, 128), 8, tok.pad_token_id, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    momenta = [torch.zeros_like(p) for p in params]
    steps = []
    for step in range(args.steps):
        loss = model(**next(batches)).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        steps.append({"step": step, "loss": round(loss.item(), 4), "grad_norm": round(norm, 3)})
        print(steps[-1], flush=True)
        with torch.no_grad():
            for p, m in zip(params, momenta):
                lion_step_fp32(p, m, p.grad, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0)
                p.grad = None
    out = Path(args.out) / f"qa_grad_norms_{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"device": "cpu", "date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m",
                               "task": "play", "batch": 8, "seq": 128, "optimizer": "fp32 Lion lr 1e-4, clip 1.0",
                               "steps": steps}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
