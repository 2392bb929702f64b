"""MoE experts quantized per expert slice (qft_ds.nn.experts), measured against the same models with their experts
left fp32 (as qft_ds did before): training-state bytes per parameter, logits at conversion, CPU step time, and
why the router stays exact (how many routing decisions an int8 router would flip).

    python bench/moe_state.py                      # tiny random configs of tests/nn/families.py, CPU
    python bench/moe_state.py --hidden 256 --steps 6

Random-init models: logits and routing figures say what int8 does to these weights, not to a trained checkpoint.
Step times on a shared CPU are indicative only (median of --steps after one warm-up step).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "nn"))

from bench.common import header, write_result  # noqa: E402

FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_next"]


def _config():
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "QFTLion", "params": {"lr": 1e-3, "weight_decay": 0.1}},
            "qft": {}, "bf16": {"enabled": False}}


def _build(family, hidden):
    import families
    kw = dict((families.FAMILIES.get(family) or families.MORE[family])[1])
    if hidden != families.H:  # scale the tiny config: wider layers, same structure
        families.BASE.update(hidden_size=hidden, intermediate_size=2 * hidden)
        for k in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if k in kw:
                kw[k] = hidden // 2
        key = "FAMILIES" if family in families.FAMILIES else "MORE"
        entry = getattr(families, key)[family]
        getattr(families, key)[family] = (entry[0], kw, *entry[2:])
    model, _ = families.make(family)
    return model


def _router_flips(model, ids) -> float:
    """Fraction of (token, layer) routing decisions whose top-k expert set changes when the router weight is
    quantized like every other weight (int8, 1% outliers) instead of kept exact: the top-k of the router's
    logits (+ its bias), which is the routing of softmax routers (DeepSeek-V3 adds a group limit and a
    correction bias: an approximation there)."""
    from qft_ds.quant.hybrid import HybridWeight
    routers = [m for n, m in model.named_modules() if n.endswith((".mlp.gate", ".mlp.router"))
               and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and hasattr(m, "top_k")]
    seen = []
    hooks = [r.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].detach()))) for r in routers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    flipped = total = 0
    for r, x in seen:
        x = x.reshape(-1, r.weight.shape[1])
        bias = getattr(r, "bias", None)
        exact = F.linear(x, r.weight, bias).topk(r.top_k, dim=-1).indices.sort(-1).values
        q = HybridWeight(r.weight.detach()).dequantize()
        rounded = F.linear(x, q, bias).topk(r.top_k, dim=-1).indices.sort(-1).values
        flipped += int((exact != rounded).any(-1).sum())
        total += exact.shape[0]
    return flipped / max(total, 1)


def _routes(model, ids):
    """(logits, [per experts call: the sorted top-k expert ids of each token]) of one forward."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, y: seen.append(args[1].sort(-1).values.clone()))
             for m in model.modules() if m.__class__.__name__.endswith("Experts")]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return logits, seen


def _run(family, hidden, steps, experts_fp32: bool) -> dict:
    import qft_ds
    from qft_ds.nn import experts
    from qft_ds.nn.coverage import state_line
    model = _build(family, hidden)
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model).eval()
    want, want_routes = _routes(ref, ids)
    flips = _router_flips(ref, ids) if not experts_fp32 else None
    n_params = sum(p.numel() for p in ref.parameters())
    del ref
    keep = mock.patch.object(experts, "classify",
                             lambda m: ("kept", "left fp32 for this comparison") if experts.is_experts_module(m) else None)
    if experts_fp32:
        keep.start()
    try:
        engine, opt, _, _ = qft_ds.initialize(model=model, config=_config())
    finally:
        if experts_fp32:
            keep.stop()
    model.eval()
    got, got_routes = _routes(model, ids)
    # the exact routers' decisions that the other layers' int8 error changed (per layer, the largest fraction)
    rerouted = max(float((a != b).any(-1).float().mean()) for a, b in zip(want_routes, got_routes))
    token_err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).median().item()
    model.train()
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    state = opt.state_nbytes()
    total = state["quantized_bytes"] + state["float_bytes"]
    return {"params": n_params, "counted": state["quantized_params"] + state["float_params"],
            "bytes_per_param": round(total / n_params, 3), "state_line": state_line(state),
            "fp32_params": state["float_params"],
            "logits_rel_err": round(((got - want).norm() / want.norm()).item(), 5),
            "median_token_logits_rel_err": round(token_err, 5), "rerouted_frac_max_layer": round(rerouted, 4),
            "step_s_median": round(statistics.median(times[1:]), 4), "losses": losses,
            "router_flip_frac_if_int8": None if flips is None else round(flips, 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread, less noise from the neighbours
    rows = {}
    for fam in args.families:
        rows[fam] = {"int8_experts": _run(fam, args.hidden, args.steps, False),
                     "fp32_experts": _run(fam, args.hidden, args.steps, True)}
        a, b = rows[fam]["int8_experts"], rows[fam]["fp32_experts"]
        print(f"{fam:12s} B/param {b['bytes_per_param']:.2f} -> {a['bytes_per_param']:.2f}  logits err "
              f"{b['logits_rel_err']:.4f} -> {a['logits_rel_err']:.4f}  step {b['step_s_median']:.3f}s -> "
              f"{a['step_s_median']:.3f}s  router flips if int8 {a['router_flip_frac_if_int8']:.3f}  rerouted "
              f"{b['rerouted_frac_max_layer']:.3f} -> {a['rerouted_frac_max_layer']:.3f}  median token err "
              f"{b['median_token_logits_rel_err']:.4f} -> {a['median_token_logits_rel_err']:.4f}", flush=True)
    path = write_result(f"moe_state_h{args.hidden}", {**header(args.commit), "args": vars(args), "rows": rows})
    print(path)


if __name__ == "__main__":
    main()
