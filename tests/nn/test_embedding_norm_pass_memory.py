"""Clipping's step-0 norm pass (QFTLion._norm_pass) measures an untied embedding's gradient norm from the
rows its tokens touched (qmodules.norm_only_gradients), never making the dense fp32 [vocab, hidden]: the
norms match the dense ones to fp32 rounding, training gives the same int8 state, and (counted by
bench/live_bytes.py) the pass holds no [vocab, hidden] embedding gradient, where it used to hold one beside
its retained graph (the Llama-3-8B step's peak, bench/NOTES.md). The real backward still makes the dense
gradient the Lion kernel reads."""
import json
import sys
from pathlib import Path

import pytest
import torch

import qft_ds
import qft_ds.optim.lion as lion
from conftest import make_tiny_llama
from qft_ds.nn import qmodules

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from live_bytes import LiveBytes  # noqa: E402

VOCAB, HIDDEN = 3000, 64


def engine_for(tie: bool, **qft):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())  # bf16 compute, clipping 1.0
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["scheduler"]["params"].update(total_num_steps=20, warmup_num_steps=1)
    cfg["qft"].update(qft)
    model = make_tiny_llama(vocab=VOCAB, hidden=HIDDEN, tie=tie)
    model.config.pad_token_id = 7
    model.model.embed_tokens.padding_idx = 7
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    return engine, opt


def batch():
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = 7  # padding: its row of the gradient is zero, in both ways
    ids[1, 3] = ids[0, 9]  # a repeated id: its rows are summed
    return ids


def dense_norm_pass(monkeypatch):
    """The old norm pass: dense embedding gradients."""
    monkeypatch.setattr(lion, "norm_only_gradients", lambda enabled: qmodules.norm_only_gradients(False))


def each_way(monkeypatch):
    """'dense' (the old norm pass patched in), then 'rows' (today's, the patch undone)."""
    dense_norm_pass(monkeypatch)
    yield "dense"
    monkeypatch.undo()
    yield "rows"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_norm_pass_norms_match_the_dense_gradient(tie, monkeypatch):
    refs = {}
    for way in each_way(monkeypatch):
        engine, opt = engine_for(tie)
        ids = batch()
        engine.backward(engine(input_ids=ids, labels=ids).loss)  # step 0: the norm pass, then the real one
        refs[way] = list(opt.clip.refs)
        engine.step()
    emb = [i for i, w in enumerate(opt.weights) if w.shape == (VOCAB, HIDDEN)]
    assert len(emb) == (1 if tie else 2) and all(refs["rows"][i] > 0 for i in emb)
    torch.testing.assert_close(torch.tensor(refs["rows"]), torch.tensor(refs["dense"]), rtol=1e-6, atol=0)


def test_training_gives_the_dense_pass_int8_state(monkeypatch):
    """3 steps: the step-0 clipping budgets come from the pass's norms; with norms equal to fp32 rounding
    every int8 weight and momentum code is the same here."""
    states = {}
    for way in each_way(monkeypatch):
        engine, opt = engine_for(False)
        ids = batch()
        for _ in range(3):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        states[way] = [(w.codes.clone(), opt.state[w.anchor]["m_codes"].clone()) for w in opt.weights]
    for (w_rows, m_rows), (w_dense, m_dense) in zip(states["rows"], states["dense"], strict=True):
        assert torch.equal(w_rows, w_dense) and torch.equal(m_rows, m_dense)


@pytest.mark.parametrize("way", ["rows", "dense"])
def test_norm_pass_makes_no_dense_embedding_gradient(way, monkeypatch):
    """Untied: inside the norm pass no [vocab, hidden] tensor comes from the embedding's backward (the old
    pass made its fp32 gradient there: the `dense` run shows the probe sees it); the real backward still
    makes it, for the update."""
    if way == "dense":
        dense_norm_pass(monkeypatch)
    engine, _ = engine_for(False)
    ids = batch()
    probe = LiveBytes(lambda a: "_QEmbeddingFn" in a.site)
    with probe:
        probe.phase = "backward"
        engine.backward(engine(input_ids=ids, labels=ids).loss)
    dense = VOCAB * HIDDEN * 4
    in_pass = probe.phase_peak["backward (norm pass)"]
    assert probe.phase_peak["backward"] >= dense
    if way == "rows":
        assert 0 < in_pass <= ids.numel() * HIDDEN * 4, probe.composition(phase="backward (norm pass)")
    else:
        assert in_pass >= dense
