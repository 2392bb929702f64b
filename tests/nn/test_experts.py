"""MoE experts quantized per expert slice (qft_ds.nn.experts): QExperts against transformers' own experts
forward (eager, grouped_mm, batched_mm), its gradients, the flow's view of them, what it dequantizes, what it
refuses, and training through the DeepSpeed glue with gradient accumulation and checkpointing."""
import copy
import sys
import weakref
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds.nn import convert_model
from qft_ds.nn.adapters import KEPT, classify
from qft_ds.nn.experts import EXPERTS, QExperts
from qft_ds.quant.hybrid import HybridWeight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import V, make  # noqa: E402

E, K, T = 4, 2, 9


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _routing(unused=(3,), seed=3):
    """Top-2 routing of T tokens over E experts that sends no token to the experts in `unused`."""
    g = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(E) if e not in unused]
    index = torch.stack([torch.tensor(allowed)[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    return index, torch.rand(T, K, generator=g).softmax(-1)


def _converted_pair(family):
    """(the first layer's QExperts, the original experts module holding the QExperts' dequantized weights)."""
    model, _ = make(family)
    ref = copy.deepcopy(model)
    convert_model(model)
    q, src = model.model.layers[0].mlp.experts, ref.model.layers[0].mlp.experts
    with torch.no_grad():
        for name, e, w in q.slices():
            getattr(src, name)[e].copy_(w.dequantize())
    return q, src


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # [out, in] slices; GPT-OSS: [in, out], biases, clamped GLU
def test_forward_and_gradients_match_transformers(family, impl):
    q, src = _converted_pair(family)
    src.config._experts_implementation = impl
    index, routing = _routing()
    hidden = torch.randn(T, src.down_proj.shape[1 if not src.is_transposed else 2], generator=torch.Generator().manual_seed(4))
    h1, r1 = hidden.clone().requires_grad_(), routing.clone().requires_grad_()
    h2, r2 = hidden.clone().requires_grad_(), routing.clone().requires_grad_()
    y1, y2 = q(h1, index, r1), src(h2, index, r2)
    assert _rel(y1, y2) < 1e-5
    gy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(5))
    y1.backward(gy)
    y2.backward(gy)
    assert _rel(h1.grad, h2.grad) < 1e-5 and _rel(r1.grad, r2.grad) < 1e-5
    for name, e, w in q.slices():  # no optimizer attached: the flow leaves each slice's gradient in w.grad
        want = getattr(src, name).grad[e]
        if e == 3:
            assert want.abs().max() == 0 and w.grad.abs().max() == 0  # no tokens: a zero gradient, delivered
        else:
            assert _rel(w.grad, want) < 1e-5, (name, e)
    floats = dict(q.float_params())
    assert set(floats) == ({"gate_up_proj_bias", "down_proj_bias"} if family == "gpt_oss" else set())
    for name, p in floats.items():
        assert _rel(p.grad, getattr(src, name).grad) < 1e-5


class _Recorder:
    """A flow that records what arrives, and checks that each gradient handed over before is freed."""

    def __init__(self, names):
        self.names, self.seen, self.alive = names, [], []

    def push(self, weight, grad, uses=1):
        assert all(ref() is None for ref in self.alive), "an earlier expert gradient is still alive"
        self.seen.append((self.names[id(weight)], bool(grad.abs().max() > 0)))
        self.alive.append(weakref.ref(grad))


def test_every_slice_delivers_once_in_a_fixed_order_and_is_freed():
    q, _ = _converted_pair("mixtral")
    names = {id(w): (name, e) for name, e, w in q.slices()}
    want = [(n, e) for e in reversed(range(E)) for n in ("down_proj", "gate_up_proj")]
    for unused in ((3,), (0, 1)):  # another routing, another set of experts without tokens: the same order
        rec = _Recorder(names)
        for _, _, w in q.slices():
            w._qft_flow = rec
        index, routing = _routing(unused, seed=len(unused))
        hidden = torch.randn(T, 64, requires_grad=True)
        q(hidden, index, routing).sum().backward()
        assert [s for s, _ in rec.seen] == want
        assert [nonzero for _, nonzero in rec.seen] == [e not in unused for e in reversed(range(E)) for _ in "du"]


def test_forward_dequantizes_only_the_routed_experts(monkeypatch):
    q, _ = _converted_pair("mixtral")
    names = {id(w): (name, e) for name, e, w in q.slices()}
    calls = []
    real = HybridWeight.dequantize

    def spy(self, *args, **kwargs):
        calls.append(names.get(id(self)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HybridWeight, "dequantize", spy)
    index, routing = _routing(unused=(1, 3))
    with torch.no_grad():
        q(torch.randn(T, 64), index, routing)
    assert sorted(calls) == sorted((n, e) for e in (0, 2) for n in ("gate_up_proj", "down_proj"))


def test_experts_it_cannot_reproduce_stay_fp32_with_the_reason(caplog):
    model, _ = make("mixtral")
    experts = model.model.layers[0].mlp.experts
    assert classify(experts) == (EXPERTS, None)

    class Doubled(type(experts)):  # other maths than the decorator's forward
        def forward(self, *args):
            return 2 * super().forward(*args)

    experts.__class__ = Doubled
    kind, reason = classify(experts)
    assert kind == KEPT and "differs from its forward" in reason
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    assert "expert parallelism" in classify(model.model.layers[1].mlp.experts)[1]
    with caplog.at_level("WARNING", logger="qft_ds"):
        convert_model(model)
    listed = {e["name"]: e["reason"] for e in model._qft_fp32}
    assert "differs from its forward" in listed["model.layers.0.mlp.experts.gate_up_proj"]
    assert "expert parallelism" in listed["model.layers.1.mlp.experts.down_proj"]
    assert "model.layers.0.mlp.experts.gate_up_proj [4, 256, 64]" in caplog.text
    assert not any(isinstance(m, QExperts) for m in model.modules())


@pytest.mark.parametrize("qft", [{"flow": "stack"}, {"gradient_checkpointing": True}, {"rounding": "ef"}, "bf16"])
def test_moe_trains_with_accumulation_checkpointing_and_error_feedback(qft):
    """The stack flow (int8 accumulation buffers, popped at the boundary), HF gradient checkpointing (the
    experts' node runs again in the recompute), error feedback's carry, per expert slice, and bf16 compute."""
    bf16 = qft == "bf16"
    qft = {} if bf16 else qft
    model, _ = make("qwen3_moe")
    accumulate = 2 if qft.get("flow") == "stack" else 1
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulate,
              "optimizer": {"type": "QFTLion", "params": {"lr": 5e-3, "weight_decay": 0.1}},
              "qft": dict(qft), "bf16": {"enabled": bf16}}
    engine, opt, _, _ = qft_ds.initialize(model=model, config=config)
    slices = [w for m in model.modules() if isinstance(m, QExperts) for _, _, w in m.slices()]
    assert slices and all(w in opt.weights for w in slices)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, QExperts)} == {torch.bfloat16 if bf16
                                                                                    else torch.float32}
    if qft.get("rounding") == "ef":
        assert all(w.residual is not None for w in slices)
    before = [w.codes.clone() for w in slices]
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4 * accumulate):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(not torch.equal(b, w.codes) for b, w in zip(before, slices))  # every expert stepped


def test_a_moe_checkpoint_loads_whole_instead_of_streaming():
    """Streaming conversion builds the model on the meta device; QExperts' probe needs real weights, so a MoE
    checkpoint loads whole (hub warns with this reason) instead of failing or keeping its experts fp32."""
    from qft_ds.nn import streaming
    _, cfg = make("mixtral")
    model = streaming.skeleton(cfg)

    class EveryName:  # a checkpoint that stores every parameter under its own name
        def keys(self):
            return {n for n, _ in model.named_parameters(remove_duplicate=False)}

    why = streaming.why_not_streamable(model, EveryName())
    assert why is not None and "MoE experts" in why and "model.layers.0.mlp.experts" in why


def test_bf16_autocast_backward_recomputes_as_the_forward_ran(monkeypatch):
    """bf16 compute (the forward under autocast): the backward's recompute runs under the same autocast state,
    so the gradients are those of the bf16 forward, as torch's autograd of the dense experts gives them."""
    from qft_ds.nn import experts
    states, real = [], experts._expert
    monkeypatch.setattr(experts, "_expert", lambda *a: states.append(torch.is_autocast_enabled("cpu")) or real(*a))
    model, _ = make("mixtral")
    ref = copy.deepcopy(model)
    convert_model(model, compute_dtype=torch.bfloat16)
    q, src = model.model.layers[0].mlp.experts, ref.model.layers[0].mlp.experts
    with torch.no_grad():
        for name, e, w in q.slices():
            getattr(src, name)[e].copy_(w.dequantize())
    src.config._experts_implementation = "eager"
    index, routing = _routing()
    hidden = torch.randn(T, 64, generator=torch.Generator().manual_seed(4))
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    states.clear()  # conversion's probe ran the experts' maths too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = q(h1, index, routing), src(h2, index, routing)
    gy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(5))
    y1.float().backward(gy)
    y2.float().backward(gy)
    assert len(states) == 2 * 3 and all(states)  # 3 routed experts: forward, then the recompute in backward
    assert _rel(y1, y2) < 1e-2 and _rel(h1.grad, h2.grad) < 2e-2
    for name, e, w in q.slices():
        if e != 3:
            assert w.grad.dtype == torch.bfloat16 and _rel(w.grad, getattr(src, name).grad[e]) < 2e-2, (name, e)


def test_moe_checkpoint_resumes_bit_exact(tmp_path):
    """Every expert slice's codes, outliers and momentum go through qft_ds's checkpoint: 2 steps, save, a fresh
    model loads and takes 2 more, equal to 4 unbroken steps bit for bit (losses and int8 state)."""
    from qft_ds import checkpoint
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "QFTLion", "params": {"lr": 5e-3, "weight_decay": 0.1}},
              "qft": {}, "bf16": {"enabled": False}}
    batches = [torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(4)]

    def start():
        model, _ = make("gpt_oss")
        engine, opt, _, _ = qft_ds.initialize(model=model, config=copy.deepcopy(config))
        return model, engine, opt

    def train(engine, ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    def state(model, opt):
        out = {}
        for m in model.modules():
            if isinstance(m, QExperts):
                for name, e, w in m.slices():
                    out[(id(m), name, e)] = [w.codes.clone(), w.scales.clone(), w.outlier_val.clone(),
                                             opt.state[w.anchor]["m_codes"].clone()]
        return list(out.values())

    model, engine, opt = start()
    unbroken = [train(engine, ids) for ids in batches]
    want = state(model, opt)
    model, engine, opt = start()
    first = [train(engine, ids) for ids in batches[:2]]
    ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=2, ds_config=copy.deepcopy(config))
    model, engine, opt = start()
    checkpoint.load(ckpt, engine, opt, ds_config=copy.deepcopy(config))
    resumed = first + [train(engine, ids) for ids in batches[2:]]
    assert resumed == unbroken
    got = state(model, opt)
    assert len(got) == len(want) == 2 * 2 * 4  # layers x weights x experts
    assert all(torch.equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))


def test_train_py_state_line_counts_every_moe_parameter(tmp_path, capsys, monkeypatch):
    """train.py on a saved tiny Mixtral: its start-up line counts every parameter (experts int8, routers fp32)
    and the training state is int8's ~2 bytes per parameter, not fp32 Lion's 8."""
    import json

    from conftest import WORDS, make_word_tokenizer
    import transformers
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    import train
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = transformers.MixtralConfig(vocab_size=len(WORDS) + 2, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "moe")
    make_word_tokenizer().save_pretrained(tmp_path / "moe")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g).tolist()) for _ in range(40)))
    ds = json.loads((root / "ds_configs" / "qft.json").read_text())
    ds["scheduler"]["params"].update(total_num_steps=2, warmup_num_steps=1)
    (tmp_path / "qft.json").write_text(json.dumps(ds))
    train.main(["--deepspeed", str(tmp_path / "qft.json"), "--model", str(tmp_path / "moe"), "--dataset",
                str(tmp_path / "corpus.txt"), "--output_dir", str(tmp_path / "out"), "--seq_len", "16",
                "--eval_blocks", "2", "--max_steps", "2"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model:"))
    assert f"over all {n_params:,} (" in line
    per_param = float(line.split(" bytes/param over all")[0].rsplit(" ", 1)[1])
    assert per_param < 3, line
