"""Fused projections: q/k/v_proj and gate/up_proj over one stacked HybridWeight, one matmul per group."""
import copy

import pytest
import torch
from torch import nn

from qft_ds.nn.convert import convert_model, is_fused, quantized_weights
from qft_ds.nn.qmodules import QLinear
from qft_ds.optim.lion import QFTLion


def _pair(tiny_llama, **kw):
    model = tiny_llama(tie=False)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    convert_model(fused, group_size=64, outlier_frac=0.0, **kw)
    convert_model(plain, group_size=64, outlier_frac=0.0, fuse_projections=False, **kw)
    return fused, plain


def _opt(model):
    """rtn rounding: deterministic, so the fused and the per-projection runs can be compared bit for bit
    (stochastic rounding is keyed by global offsets, which fusing changes)."""
    return QFTLion([p for p in model.parameters()], lr=1e-3, weight_decay=0.1, rounding="rtn", backend="torch")


def test_fusing_stacks_siblings_and_keeps_the_function(tiny_llama):
    fused, plain = _pair(tiny_llama)
    layers = fused.config.num_hidden_layers
    assert is_fused(fused) and not is_fused(plain)
    assert len(quantized_weights(fused)) == 2 + 4 * layers and len(quantized_weights(plain)) == 2 + 7 * layers
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.qweight is attn.k_proj.qweight is attn.v_proj.qweight
    assert attn.q_proj.qweight.n_uses == 3 and attn.o_proj.qweight.n_uses == 1
    assert [m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj)] == [64, 32, 32]
    assert torch.equal(attn.k_proj.weight, plain.model.layers[0].self_attn.k_proj.weight)
    x = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(fused(input_ids=x).logits, plain(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_fused_training_matches_per_projection_training(tiny_llama):
    fused, plain = _pair(tiny_llama)
    opt_f, opt_p = _opt(fused), _opt(plain)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 128, (2, 16), generator=g)
        for model, opt in ((fused, opt_f), (plain, opt_p)):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    assert opt_f.flow._held == {}  # every fused gradient was applied once, inside backward
    for name, m in plain.named_modules():
        if isinstance(m, QLinear):
            torch.testing.assert_close(fused.get_submodule(name).weight, m.weight, rtol=0, atol=1e-6)


class _CrossAttention(nn.Module):
    """q from one input, k and v from another: the names match a fused group, the inputs do not."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, 8, bias=False) for _ in range(3))

    def forward(self, a, b):
        return (self.q_proj(a) * self.k_proj(b) + self.v_proj(b)).square().sum()


def test_a_member_called_with_another_input_is_right_and_updates_once():
    torch.manual_seed(0)
    base = _CrossAttention()
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    convert_model(fused, group_size=16, outlier_frac=0.0)
    convert_model(plain, group_size=16, outlier_frac=0.0, fuse_projections=False)
    assert is_fused(fused)
    opt_f, opt_p = _opt(fused), _opt(plain)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    for _ in range(2):
        loss_f, loss_p = fused(a, b), plain(a, b)
        torch.testing.assert_close(loss_f, loss_p)
        loss_f.backward()
        loss_p.backward()
        opt_f.step()
        opt_p.step()
    for name in ("q_proj", "k_proj", "v_proj"):  # two matmuls, one update per step: the same weights
        torch.testing.assert_close(fused.get_submodule(name).weight, plain.get_submodule(name).weight, rtol=0,
                                   atol=1e-6)


def test_fused_gradient_checkpointing_reuses_one_stacked_weight(tiny_llama):
    """Under checkpointing the recompute fills the pending outputs again; training matches the plain
    model's and no pending outputs are left behind."""
    fused, plain = _pair(tiny_llama)
    for m in (fused, plain):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from qft_ds.nn.qmodules import mark_checkpointed
    assert mark_checkpointed(fused) == 7 * fused.config.num_hidden_layers
    opt_f, opt_p = _opt(fused), _opt(plain)
    x = torch.randint(0, 128, (2, 16))
    for model, opt in ((fused, opt_f), (plain, opt_p)):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    groups = {id(m.fused): m.fused for m in fused.modules() if isinstance(m, QLinear) and m.fused is not None}
    assert all(g._pending is None for g in groups.values())
    for name, m in plain.named_modules():
        if isinstance(m, QLinear):
            torch.testing.assert_close(fused.get_submodule(name).weight, m.weight, rtol=0, atol=1e-6)


def test_initialize_rejects_a_model_converted_otherwise(tiny_llama):
    from qft_ds.config import QFTConfig
    from qft_ds.engine import prepare_model
    model = tiny_llama()
    convert_model(model, fuse_projections=False)
    with pytest.raises(ValueError, match="qft.fuse_projections"):
        prepare_model(model, QFTConfig.from_dict({}))
    prepare_model(model, QFTConfig.from_dict({"fuse_projections": False}))


def test_resume_checks_the_fusing_a_checkpoint_was_written_with():
    """A checkpoint records how its model was converted; one from before the key existed was not fused."""
    from qft_ds.checkpoint import CheckpointError, check_config
    check_config({"ds_config": {"qft": {}}, "fuse_projections": True}, {"qft": {}})
    with pytest.raises(CheckpointError, match="qft.fuse_projections"):
        check_config({"ds_config": {"qft": {}}}, {"qft": {}})  # older checkpoint: per-projection weights
    check_config({"ds_config": {"qft": {}}}, {"qft": {"fuse_projections": False}})


def test_fused_state_is_the_per_projection_state(tiny_llama):
    """Outliers are chosen per projection and the stacked weight starts at the first member's global
    offset, so fused and per-projection runs hold the same int8 state and draw the same stochastic
    rounding: the same training, up to the matmuls' float summation order."""
    model = tiny_llama(tie=False)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    convert_model(fused, group_size=64, outlier_frac=0.01)
    convert_model(plain, group_size=64, outlier_frac=0.01, fuse_projections=False)
    attn_f, attn_p = fused.model.layers[1].self_attn, plain.model.layers[1].self_attn
    assert attn_f.q_proj.qweight.global_offset == attn_p.q_proj.qweight.global_offset
    w, members = attn_f.q_proj.qweight, (attn_p.q_proj, attn_p.k_proj, attn_p.v_proj)
    assert w.outlier_idx.numel() == sum(m.qweight.outlier_idx.numel() for m in members) > 0
    assert torch.equal(w.outlier_val, torch.cat([m.qweight.outlier_val for m in members]))
    assert torch.equal(w.dequantize(), torch.cat([m.weight for m in members]))
    opts = [QFTLion(list(m.parameters()), lr=1e-3, weight_decay=0.1, backend="torch") for m in (fused, plain)]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randint(0, 128, (2, 16), generator=g)
        for m, opt in zip((fused, plain), opts):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, m in plain.named_modules():
        if isinstance(m, QLinear):  # SR: a near-tie may round differently after a float-order difference
            diff = (fused.get_submodule(name).weight - m.weight).abs()
            assert (diff > 0).float().mean() < 1e-3, name
