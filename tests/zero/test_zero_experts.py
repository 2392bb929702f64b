"""MoE experts (qft_ds.nn.experts) on 2 gloo ranks whose batches route tokens to different experts: every
expert slice still meets the same per-weight collectives in the same order on both ranks (no hang), and ZeRO
stages 2 and 3 (fused) and 1 (stack) end with the int8 state of stage 0."""
import sys
from pathlib import Path

import torch

import harness as H
from qft_ds.nn.experts import QExperts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from families import make  # noqa: E402

# 8 experts, top-1, 4 tokens a rank: each rank routes to at most half of the experts, and not the same half
MOE = dict(num_local_experts=8, num_experts_per_tok=1)


def _config(stage, gas):
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas, "gradient_clipping": 0.0,
            "optimizer": {"type": "QFTLion", "params": {"lr": 2e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage},
            "qft": {"group_size": 32, "block_size": 64, "outlier_frac": 0.02, "backend": "torch"},
            "steps_per_print": 10**9}


def _worker(rank, world, out):
    import families
    import qft_ds
    families.MORE["mixtral_top1"] = ("MixtralConfig", MOE, [], 0.02)
    res, routed = {}, []
    for stage, gas in ((0, 1), (2, 1), (3, 1), (0, 2), (1, 2)):
        model, _ = make("mixtral_top1")
        engine, opt, _, _ = qft_ds.initialize(model=model, config=_config(stage, gas))
        assert opt.zero_stage == stage
        hooks = [m.register_forward_hook(lambda m, args, y: routed.append(sorted(set(args[1].reshape(-1).tolist()))))
                 for m in model.modules() if isinstance(m, QExperts)]
        g = torch.Generator().manual_seed(1)
        for _ in range(2 * gas):
            x = torch.randint(3, 128, (2, 4), generator=g)[rank:rank + 1]
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        for h in hooks:
            h.remove()
        res[(stage, gas)] = H.full_state(engine.module, opt)
    torch.save({"routed": routed, "res": res if rank == 0 else None}, f"{out}.rank{rank}")


def test_moe_stages_match_stage_0_when_ranks_route_differently(tmp_path):
    H.spawn(_worker, str(tmp_path / "res.pt"))
    r0, r1 = (torch.load(f"{tmp_path / 'res.pt'}.rank{r}", weights_only=False) for r in (0, 1))
    assert r0["routed"] != r1["routed"]  # the ranks' batches did use different experts
    assert all(len(s) < 8 for s in r0["routed"] + r1["routed"])  # and some expert had no token on each rank
    res = r0["res"]
    H.assert_same(res[(2, 1)], res[(0, 1)], "MoE stage 2 vs stage 0 (fused)")
    H.assert_same(res[(3, 1)], res[(0, 1)], "MoE stage 3 vs stage 0 (fused)")
    H.assert_same(res[(1, 2)], res[(0, 2)], "MoE stage 1 vs stage 0 (stack, 2 micro-batches)")
