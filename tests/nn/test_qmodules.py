"""Quantized modules: exact gradients against dense twins, tied weights, conversion."""
import pytest
import torch
from torch import nn

from qft_ds.nn import QEmbedding, QLinear, convert_model, quantized_weights
from qft_ds.quant import HybridWeight


def test_qlinear_matches_dense_linear_on_the_dequantized_weight():
    hw = HybridWeight(torch.randn(48, 96) * 0.1, 32, 0.02)
    q = QLinear(hw, bias=torch.randn(48))
    dense = nn.Linear(96, 48)
    dense.weight.data = hw.dequantize()
    dense.bias.data = q.bias.data.clone()
    x = torch.randn(3, 5, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(3, 5, 48)
    (q(x) * gy).sum().backward()
    (dense(x2) * gy).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(hw.grad, dense.weight.grad, atol=1e-4)  # no optimizer: kept for inspection
    assert torch.allclose(q.bias.grad, dense.bias.grad, atol=1e-5)
    assert hw.anchor.grad is None  # the weight gradient never entered autograd


def test_qlinear_bf16_compute_is_close():
    hw = HybridWeight(torch.randn(64, 128) * 0.1, 128, 0.0)
    x = torch.randn(8, 128)
    y32 = QLinear(hw)(x)
    y16 = QLinear(hw, compute_dtype=torch.bfloat16)(x)
    assert y16.dtype == torch.float32  # out in the input's dtype, like nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert QLinear(hw, compute_dtype=torch.bfloat16)(x).dtype == torch.bfloat16
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 1e-2


@pytest.mark.parametrize("autocast", [False, True])
def test_both_matmul_paths_give_the_same_output_and_gradients(autocast):
    """qlinear's two paths (torch's own matmul backward through _DeliverGrad, used inside checkpointed
    layers, and the Python _QLinearFn elsewhere) on fresh random inputs: the same output, input gradient and
    delivered weight gradient, in bf16 compute with and without autocast."""
    from qft_ds.nn.qmodules import qlinear
    torch.manual_seed(0)
    hw = HybridWeight(torch.randn(40, 96) * 0.1, 32, 0.02)
    x = torch.randn(3, 7, 96)
    gy = torch.randn(3, 7, 40)
    got = {}
    for keep in (False, True):
        xi = x.clone().requires_grad_()
        hw.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = qlinear(xi, hw, torch.bfloat16, keep_weight=keep)
        (y.float() * gy).sum().backward()
        got[keep] = (y, xi.grad, hw.grad)
    for a, b in zip(got[False], got[True]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2  # bf16 matmuls in another order
    assert got[True][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert hw.anchor.grad is None


def test_qembedding_gradient_and_padding():
    hw = HybridWeight(torch.randn(50, 32), 32, 0.01)
    emb = QEmbedding(hw, padding_idx=0)
    dense = nn.Embedding(50, 32, padding_idx=0)
    dense.weight.data = hw.dequantize()
    ids = torch.randint(0, 50, (4, 9))
    ids[0, 0] = 0
    gy = torch.randn(4, 9, 32)
    out = emb(ids)
    assert torch.equal(out, dense(ids))
    (out * gy).sum().backward()
    (dense(ids) * gy).sum().backward()
    assert torch.allclose(hw.grad, dense.weight.grad, atol=1e-5)


def test_convert_ties_embedding_and_head(tiny_llama):
    model = tiny_llama(tie=True)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(input_ids=x).logits
    weights = convert_model(model, group_size=64, outlier_frac=0.0, fuse_projections=False)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    assert weights[0].n_uses == 2 and all(w.n_uses == 1 for w in weights[1:])
    assert len(weights) == len(quantized_weights(model)) == 1 + 2 * 7
    offsets = [w.global_offset for w in weights]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert ((after - before).norm() / before.norm()).item() < 0.02  # int8 weights, same function


def test_tied_gradient_is_the_sum_of_both_uses(tiny_llama):
    model = tiny_llama(tie=True)
    x = torch.randint(0, 128, (2, 16))
    dense = tiny_llama(tie=True)
    convert_model(model, group_size=64, outlier_frac=0.0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (QLinear, QEmbedding)):
                dense.get_submodule(name).weight.data.copy_(mod.weight)  # a fused projection: its rows
    model(input_ids=x, labels=x).loss.backward()
    dense(input_ids=x, labels=x).loss.backward()
    g = model.model.embed_tokens.qweight.grad
    assert torch.allclose(g, dense.model.embed_tokens.weight.grad, atol=1e-5)


def test_convert_rejects_a_model_without_layers():
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert_model(nn.Sequential(nn.ReLU()))


def _dequantize_counts(model, x, monkeypatch):
    """Dequantize calls per weight name over one forward + backward, and the weights' gradients."""
    calls = {}
    names = {id(m.qweight): n for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    real = HybridWeight.dequantize

    def counting(self, *a, **k):
        calls[names[id(self)]] = calls.get(names[id(self)], 0) + 1
        return real(self, *a, **k)

    monkeypatch.setattr(HybridWeight, "dequantize", counting)
    model(input_ids=x, labels=x).loss.backward()
    monkeypatch.setattr(HybridWeight, "dequantize", real)
    grads = {n: w.grad.clone() for n, w in zip(names.values(), quantized_weights(model))}
    for w in quantized_weights(model):
        w.grad = None
    return calls, grads


def test_checkpointed_layers_reuse_the_recomputed_weight_in_backward(tiny_llama, monkeypatch):
    """Under gradient checkpointing a layer's QLinear dequantizes twice per step (forward, recompute),
    not three times, with the same gradients; the head (not checkpointed) and a model whose
    checkpointing was switched off dequantize in backward as before."""
    from qft_ds.nn.qmodules import mark_checkpointed
    model = tiny_llama(tie=False)
    convert_model(model, group_size=64, outlier_frac=0.01, fuse_projections=False)  # counted per projection
    model.train()
    x = torch.randint(0, 128, (2, 16))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before, g_before = _dequantize_counts(model, x, monkeypatch)  # not marked yet: three per layer weight
    n_layer_linears = 7 * model.config.num_hidden_layers
    assert mark_checkpointed(model) == n_layer_linears
    after, g_after = _dequantize_counts(model, x, monkeypatch)
    layer = [n for n in after if ".layers." in n]
    assert len(layer) == n_layer_linears and {before[n] for n in layer} == {3} and {after[n] for n in layer} == {2}
    assert after["lm_head"] == before["lm_head"] == 2
    for n in g_before:
        assert torch.equal(g_before[n], g_after[n]), n
    model.gradient_checkpointing_disable()
    off, g_off = _dequantize_counts(model, x, monkeypatch)
    assert {off[n] for n in layer} == {2}  # forward + backward: nothing kept from the forward
    for n in g_before:
        assert torch.allclose(g_off[n], g_before[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_recomputed_weight_key_decides_the_marking(tiny_llama, reuse):
    from qft_ds.config import QFTConfig
    from qft_ds.engine import prepare_model
    from qft_ds.nn.qmodules import _CHECKPOINTED_LAYER
    model = tiny_llama(tie=False)
    cfg = QFTConfig.from_dict({"gradient_checkpointing": True, "reuse_recomputed_weight": reuse})
    prepare_model(model, cfg)
    linears = [m for m in model.modules() if isinstance(m, QLinear)]
    marked = [m for m in linears if m in _CHECKPOINTED_LAYER]
    assert len(marked) == (7 * model.config.num_hidden_layers if reuse else 0)
    with pytest.raises(ValueError, match="reuse_recomputed_weight"):
        QFTConfig.from_dict({"reuse_recomputed_weight": "yes"})


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_delivery_nodes_and_gradients(tiny_llama, monkeypatch, reentrant):
    """Marked checkpointed layers deliver each weight's gradient exactly once per step, equal to the
    unmarked model's. Non-reentrant: the recompute (whose graph is never backpropagated) builds no
    delivery node, one per layer weight and step is left; reentrant: the recompute's graph is the one
    backpropagated, so it carries them."""
    from qft_ds.nn import qmodules
    model = tiny_llama(tie=False)
    convert_model(model, group_size=64, outlier_frac=0.01)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    x = torch.randint(0, 128, (2, 16))

    def grads():
        model(input_ids=x, labels=x).loss.backward()
        out = [w.grad.clone() for w in quantized_weights(model)]
        for w in quantized_weights(model):
            w.grad = None
        return out

    want = grads()  # not marked: the Python Function path
    assert qmodules.mark_checkpointed(model) > 0
    applied = []
    real = qmodules._DeliverGrad.apply
    monkeypatch.setattr(qmodules._DeliverGrad, "apply", lambda *a: applied.append(a[2]) or real(*a))
    got = grads()
    layer_weights = {id(m.qweight) for m in model.modules() if isinstance(m, QLinear) and m in qmodules._CHECKPOINTED_LAYER}
    assert len(applied) == len(layer_weights) and {id(w) for w in applied} == layer_weights
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_trains_to_the_same_state(tiny_llama):
    """`qft.checkpoint_reentrant` changes how the layers are recomputed, not the maths: after three
    steps through the engine the int8 state is bit-equal to the non-reentrant run's."""
    import json
    from pathlib import Path

    import qft_ds
    from qft_ds.checkpoint import state_hash
    cfg = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3
    hashes = []
    for reentrant in (False, True):
        c = json.loads(json.dumps(cfg))
        c["qft"].update(gradient_checkpointing=True, checkpoint_reentrant=reentrant)
        torch.manual_seed(0)
        engine, opt, _, _ = qft_ds.initialize(model=tiny_llama(tie=False), config=c)
        for i in range(3):
            x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        assert opt.step_count == 3 and opt.skipped_steps == 0
        hashes.append(state_hash(engine.module, opt))
    assert hashes[0] == hashes[1]


def test_checkpoint_reentrant_needs_checkpointing():
    from qft_ds.config import QFTConfig
    with pytest.raises(ValueError, match="checkpoint_reentrant"):
        QFTConfig.from_dict({"checkpoint_reentrant": True})
