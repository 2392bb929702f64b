"""Conversion beyond exact nn.Linear/nn.Embedding (issue 17): subclasses (Gemma's scaled embedding, Falcon's
Linear), GPT-2's Conv1D, layers that must stay fp32 (listed, never untied), all-or-nothing conversion, the
norm probe on norms of two inputs, weight decay of fp32 matrices, and the state line."""
import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qft_ds.nn import QEmbedding, QLinear, convert_model, quantized_weights
from qft_ds.nn.adapters import QConv1D, ScaledQEmbedding, classify
from qft_ds.nn.coverage import decays, fp32_matrices, state_line
from qft_ds.nn.norms import FusedRMSNorm, fuse_rms_norms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import make  # noqa: E402


# -- Gemma: a scaled embedding, tied to the head ------------------------------------------------------------

@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_embedding_is_quantized_and_stays_tied_to_the_head(family):
    model, cfg = make(family)
    assert cfg.tie_word_embeddings
    ids = torch.randint(0, 128, (2, 9))
    want = model.model.embed_tokens(ids)
    convert_model(model)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, ScaledQEmbedding) and emb.scale == pytest.approx(cfg.hidden_size ** 0.5)
    assert isinstance(head, QLinear) and head.qweight is emb.qweight and emb.qweight.n_uses == 2
    got = emb(ids)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert torch.allclose(got, F.embedding(ids, emb.qweight.dequantize()) * emb.scale)
    assert fp32_matrices(model) == []


def test_scaled_embedding_in_bf16_takes_the_scale_as_the_model_rounds_it():
    """Gemma casts embed_scale to the weight's dtype: sqrt(3000) in bf16 is 54.75, not 54.77."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
    m = GemmaTextScaledWordEmbedding(50, 16, 0, embed_scale=3000 ** 0.5).to(torch.bfloat16)
    kind, scale = classify(m)
    assert kind == "embedding" and scale == float(torch.tensor(3000 ** 0.5).to(torch.bfloat16))


# -- subclasses: reproduced, or kept in fp32 with the reason ------------------------------------------------

class PlainSub(nn.Linear):  # no forward of its own
    pass


class SameMathsLinear(nn.Linear):  # Falcon's FalconLinear
    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias) + 1


class TwoInputLinear(nn.Linear):
    def forward(self, x, gate):
        return F.linear(x, self.weight) * gate


class GainLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.gain


class PositionsEmbedding(nn.Embedding):  # OPT-like: forward takes a mask, not ids
    def forward(self, attention_mask):
        return super().forward(attention_mask.cumsum(-1) * 1000)


def test_subclasses_are_converted_when_their_forward_is_reproduced():
    assert classify(PlainSub(8, 4)) == ("linear", None)
    assert classify(SameMathsLinear(8, 4)) == ("linear", None)
    from transformers.models.falcon.modeling_falcon import FalconLinear
    assert classify(FalconLinear(8, 4, bias=False)) == ("linear", None)
    for m in (DoubledLinear(8, 4), TwoInputLinear(8, 4), GainLinear(8, 4), PositionsEmbedding(10, 4)):
        kind, reason = classify(m)
        assert kind == "kept" and type(m).__name__ in reason, (m, reason)
    assert classify(nn.LayerNorm(4)) is None


class TiedCustom(nn.Module):
    """An embedding whose forward int8 cannot reproduce, tied to a plain Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = PositionsEmbedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.odd = DoubledLinear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, mask):
        return self.head(self.odd(self.mid(self.embed(mask))))


def test_layers_that_stay_fp32_are_listed_loudly_and_never_untie_a_weight(caplog):
    model = TiedCustom()
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        convert_model(model)
    assert isinstance(model.mid, QLinear)
    assert type(model.embed) is PositionsEmbedding and type(model.head) is nn.Linear  # both kept: still tied
    assert model.head.weight is model.embed.weight and model.head.weight.dtype == torch.float32
    listed = {e["name"]: e for e in model._qft_fp32}
    assert set(listed) == {"embed.weight", "odd.weight"}  # the head's weight is the embedding's: listed once
    assert "tied to embed" in model._qft_kept["head"]
    assert listed["odd.weight"]["bytes"] == 8 * 8 * 4 and "DoubledLinear" in listed["odd.weight"]["reason"]
    for name, e in listed.items():
        assert f"{name} {e['shape']}" in caplog.text and e["reason"] in caplog.text
    assert "2 weight matrices stay fp32" in caplog.text


def test_a_model_with_nothing_to_quantize_is_refused_with_the_reasons():
    with pytest.raises(ValueError, match="DoubledLinear"):
        convert_model(nn.Sequential(DoubledLinear(4, 4)))


# -- GPT-2's Conv1D -----------------------------------------------------------------------------------------

def _conv1d(nx=24, nf=40):
    from transformers.pytorch_utils import Conv1D
    m = Conv1D(nf, nx)
    nn.init.normal_(m.bias)
    return m


@pytest.mark.parametrize("autocast", [False, True])
def test_qconv1d_matches_conv1d_on_the_dequantized_weight(autocast):
    conv = _conv1d()
    holder = nn.Sequential(conv)
    convert_model(holder, group_size=8)
    q = holder[0]
    assert isinstance(q, QConv1D) and q.qweight.shape == (24, 40)  # stored as Conv1D stores it: [in, out]
    dense = copy.deepcopy(conv)
    dense.weight.data = q.qweight.dequantize()
    x = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(3, 5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, y2 = q(x), dense(x2)
    assert y.shape == y2.shape == (3, 5, 40)
    tol = 1e-2 if autocast else 1e-5
    assert ((y.float() - y2.float()).norm() / y2.float().norm()).item() < tol
    (y.float() * gy).sum().backward()
    (y2.float() * gy).sum().backward()
    assert ((x.grad - x2.grad).norm() / x2.grad.norm()).item() < tol
    assert q.qweight.grad.shape == (24, 40)
    assert ((q.qweight.grad - dense.weight.grad).norm() / dense.weight.grad.norm()).item() < tol
    assert torch.allclose(q.bias.grad, dense.bias.grad, atol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gpt2_checkpointed_layers_give_the_same_gradients(reentrant):
    """QConv1D inside checkpointed GPT-2 blocks (marked: the recomputed weight is reused) delivers the same
    gradients as without checkpointing."""
    from qft_ds.nn.qmodules import enable_checkpointing, mark_checkpointed
    model, _ = make("gpt2")
    convert_model(model)
    model.train()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randint(0, 128, (2, 12))

    def grads():
        model(input_ids=x, labels=x).loss.backward()
        out = [w.grad.clone() for w in quantized_weights(model)]
        for w in quantized_weights(model):
            w.grad = None
        return out

    want = grads()
    enable_checkpointing(model, reentrant)
    assert mark_checkpointed(model) == 4 * 2
    for a, b in zip(want, grads()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gpt2_converts_fully():
    model, _ = make("gpt2")
    convert_model(model)
    assert fp32_matrices(model) == []
    assert sum(isinstance(m, QConv1D) for m in model.modules()) == 8
    assert model.transformer.wte.qweight is model.lm_head.qweight


# -- all or nothing -----------------------------------------------------------------------------------------

def test_a_failing_conversion_leaves_the_model_as_it_was(monkeypatch):
    from qft_ds.nn import convert as convert_mod
    model, _ = make("gemma")
    model.to(torch.bfloat16)
    before = {n: (type(m), m) for n, m in model.named_modules()}
    params = {n: (p, p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    real, calls = convert_mod.HybridWeight, []

    class Failing(real):
        def __init__(self, *a, **k):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("out of memory (simulated)")
            super().__init__(*a, **k)

    monkeypatch.setattr(convert_mod, "HybridWeight", Failing)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_model(model)
    assert {n: (type(m), m) for n, m in model.named_modules()} == before
    for n, p in model.named_parameters():
        q, dtype, data = params[n]
        assert p is q and p.dtype == dtype and torch.equal(p, data), n
    assert not hasattr(model, "_qft_fp32") and "save_pretrained" not in vars(model)
    monkeypatch.setattr(convert_mod, "HybridWeight", real)
    convert_model(model)  # and it converts afterwards
    assert isinstance(model.model.embed_tokens, ScaledQEmbedding)


def test_a_failing_swap_is_undone(monkeypatch):
    from qft_ds.nn import convert as convert_mod
    model, _ = make("llama")
    before = {n: m for n, m in model.named_modules()}
    real, calls = convert_mod._set, []

    def failing(model_, name, module):
        calls.append(name)
        if len(calls) == 6:
            raise RuntimeError("swap failed (simulated)")
        return real(model_, name, module)

    monkeypatch.setattr(convert_mod, "_set", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_model(model)
    assert {n: m for n, m in model.named_modules()} == before


# -- the norm probe -----------------------------------------------------------------------------------------

class GatedRMSNorm(nn.Module):
    """Qwen3.5's gated norm: forward wants the gate too."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x, gate):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x * F.silu(gate)


class BrokenRMSNorm(GatedRMSNorm):
    def forward(self, x, gate=None):
        return super().forward(x, gate)  # fails on the probe (no gate)


class LlamaLikeRMSNorm(GatedRMSNorm):
    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def test_norm_probe_skips_norms_it_cannot_call_with_one_input():
    model = nn.ModuleDict({"a": LlamaLikeRMSNorm(8), "gated": GatedRMSNorm(8), "broken": BrokenRMSNorm(8),
                           "b": LlamaLikeRMSNorm(8)})
    assert fuse_rms_norms(model) == 2
    assert isinstance(model["a"], FusedRMSNorm) and isinstance(model["b"], FusedRMSNorm)
    assert type(model["gated"]) is GatedRMSNorm and type(model["broken"]) is BrokenRMSNorm


def test_qwen3_5_initializes():
    """Qwen3.5's gated norm crashed the norm-fusion probe in initialize, after conversion."""
    import qft_ds
    model, _ = make("qwen3_5")
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "QFTLion", "params": {"lr": 1e-3}},
           "qft": {}, "bf16": {"enabled": False}}
    qft_ds.initialize(model=model, config=cfg)
    assert any(isinstance(m, FusedRMSNorm) for m in model.modules()) is False  # its norms are Gemma-style
    assert type(model.model.layers[0].linear_attn.norm).__name__ == "Qwen3_5RMSNormGated"
    assert [e["name"] for e in model._qft_fp32] == ["model.layers.0.linear_attn.conv1d.weight"]


# -- weight decay and the state line ------------------------------------------------------------------------

def test_decays_weight_matrices_not_norms_or_biases():
    hw_anchor = nn.Parameter(torch.empty(0))
    hw_anchor._qft_weight = object()
    assert decays(hw_anchor)
    assert decays(nn.Parameter(torch.zeros(4, 8, 2)), "model.layers.0.mlp.experts.gate_up_proj")
    assert decays(nn.Parameter(torch.zeros(4, 8)), "model.layers.0.mlp.gate.weight")
    assert decays(nn.Parameter(torch.zeros(4, 8)))
    assert not decays(nn.Parameter(torch.zeros(8)), "model.norm.weight")
    assert not decays(nn.Parameter(torch.zeros(8)))
    assert not decays(nn.Parameter(torch.zeros(())))
    assert not decays(nn.Parameter(torch.zeros(2, 8)), "model.layers.0.input_layernorm.weight")
    assert not decays(nn.Parameter(torch.zeros(2, 8)), "model.layers.0.attn.c_attn.bias")


def test_moe_experts_get_weight_decay_and_the_state_line_counts_them():
    """MoE experts are int8 per expert slice (qft_ds.nn.experts); the router stays fp32 and is decayed as a
    weight matrix; the state line counts every parameter, and the fp32 router barely moves its mean."""
    import qft_ds
    from qft_ds.nn.experts import QExperts
    model, _ = make("mixtral")
    cfg = {"train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "QFTLion", "params": {"lr": 1e-3, "weight_decay": 0.1}},
           "qft": {}, "bf16": {"enabled": False}}
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QExperts)
    router = model.model.layers[0].mlp.gate.weight
    for p in (router, experts.gate_up_proj[0].anchor):
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        assert group["weight_decay"] == 0.1
    x = torch.randint(0, 128, (1, 8))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()  # fp32 momentum exists from the first step on
    state = opt.state_nbytes()
    line = state_line(state)
    n_all = sum(w.numel for w in quantized_weights(model)) + sum(
        p.numel() for p in model.parameters() if not hasattr(p, "_qft_weight"))
    assert f"over all {n_all:,}" in line
    total = state["quantized_bytes"] + state["float_bytes"]
    assert f"{total / n_all:.3f} bytes/param over all" in line
    # int8 weight + int8 momentum + scales and outliers, and the small fp32 rest (norms, routers) with momentum:
    # far from fp32 Lion's 8 bytes/param, which the experts cost while they stayed fp32
    assert total / n_all < 3


def test_multihead_attention_keeps_its_projections_and_says_so(caplog):
    """nn.MultiheadAttention reads out_proj.weight itself (a Linear subclass that forward never runs): swapping it
    would train nothing. It stays fp32, listed, with the raw in_proj_weight; the layer's MLP converts."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 16)
    want = layer(x)
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        model = nn.Sequential(layer)
        convert_model(model)
    assert isinstance(layer.linear1, QLinear) and isinstance(layer.linear2, QLinear)
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    listed = {e["name"]: e["reason"] for e in fp32_matrices(model)}
    assert set(listed) == {"0.self_attn.in_proj_weight", "0.self_attn.out_proj.weight"}
    assert "MultiheadAttention reads" in listed["0.self_attn.out_proj.weight"]
    assert "0.self_attn.out_proj.weight [16, 16]" in caplog.text
    assert ((layer(x) - want).norm() / want.norm()).item() < 0.02
