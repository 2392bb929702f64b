"""Streaming conversion (qft_ds.nn.streaming): a sharded checkpoint converted one weight at a time gives exactly
the ordinary load-then-convert model, and host memory holds no more than about one shard plus one layer."""
import gc
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qft_ds
from conftest import make_tiny_llama
from qft_ds import hub
from qft_ds.nn import convert_model, quantized_weights, streaming
from qft_ds.quant.hybrid import HybridWeight

ROOT = Path(__file__).resolve().parents[2]
CONVERT = dict(group_size=32, outlier_frac=0.02)


def save_sharded(path: Path, layers=3, tie=True, shard="60KB") -> Path:
    make_tiny_llama(layers=layers, tie=tie).save_pretrained(path, max_shard_size=shard)
    assert streaming.is_sharded_checkpoint(path) and len(list(path.glob("*.safetensors"))) > 2
    return path


def stream(path: Path, census=None, **kw):
    model = streaming.load_skeleton(path)
    assert all(p.is_meta for p in model.parameters())
    assert streaming.why_not_streamable(model, model._qft_stream_source) is None
    source = model.__dict__.pop("_qft_stream_source")
    streaming.convert_streamed(model, source, "cpu", census=census, **CONVERT, **kw)
    return model


def ordinary(path: Path, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    convert_model(model, **CONVERT, **kw)
    return model


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert not [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    # also the non-persistent buffers (rotary inv_freq), the parameters' flags and conversion's tags
    assert [(n, torch.equal(x, y)) for (n, x), (_, y) in zip(a.named_buffers(), b.named_buffers())] == \
        [(n, True) for n, _ in a.named_buffers()]
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m and p.requires_grad == q.requires_grad
        assert getattr(p, "_qft_no_decay", False) == getattr(q, "_qft_no_decay", False), n
    assert a.training == b.training
    x = torch.randint(0, 128, (2, 12))
    assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


@pytest.mark.parametrize("tie,fuse,ef", [(True, True, False), (False, False, True), (True, True, True)])
def test_streamed_model_equals_load_then_convert(tmp_path, tie, fuse, ef):
    path = save_sharded(tmp_path / "m", tie=tie)
    kw = dict(fuse_projections=fuse, error_feedback=ef)
    a, b = ordinary(path, **kw), stream(path, **kw)
    assert_same_model(a, b)
    assert (b.lm_head.qweight is b.model.embed_tokens.qweight) == tie
    assert [w.global_offset for w in quantized_weights(a)] == [w.global_offset for w in quantized_weights(b)]
    assert all(w.residual is not None for w in quantized_weights(b)) == ef


# -- host memory --------------------------------------------------------------------------------------------

def live_float_bytes(objs, exclude: set[int]) -> int:
    """Bytes of the full-precision tensor storages among `objs` that are not in `exclude` (data pointers), not
    on the meta device, and not a HybridWeight's own state (its fp32 scales and outliers)."""
    quant = {b.untyped_storage().data_ptr() for o in objs if issubclass(type(o), HybridWeight)
             for b in o.buffers(recurse=False)}
    seen, total = set(), 0
    for o in objs:
        if not issubclass(type(o), torch.Tensor) or not o.is_floating_point() or o.is_meta:
            continue
        s = o.untyped_storage()
        ptr = s.data_ptr()
        if ptr in seen or ptr in exclude or ptr in quant or s.nbytes() == 0:
            continue
        seen.add(ptr)
        total += s.nbytes()
    return total


class Census:
    """The peak of live full-precision bytes over the calls, above what lived when it started. Automatic
    garbage collection is off meanwhile, so every object made since stays in generation 0 (a cheap scan);
    garbage in cycles then stays counted, which can only raise the peak."""

    def __enter__(self):
        gc.collect()
        gc.disable()
        self.before = {o.untyped_storage().data_ptr() for o in gc.get_objects()
                       if issubclass(type(o), torch.Tensor) and not o.is_meta}
        self.peak, self.calls = 0, 0
        return self

    def __call__(self):
        self.calls += 1
        self.peak = max(self.peak, live_float_bytes(gc.get_objects(generation=0), self.before))

    def __exit__(self, *exc):
        gc.enable()


def layer_bytes(model) -> int:
    """The largest 'layer' of an fp32 model: a decoder layer, or a top-level weight (embedding, head)."""
    sizes = [sum(p.numel() * 4 for p in layer.parameters()) for layer in model.model.layers]
    sizes += [p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n]
    return max(sizes)


def test_host_memory_stays_within_a_shard_and_a_layer(tmp_path):
    path = save_sharded(tmp_path / "m", layers=8, shard="150KB")
    probe = make_tiny_llama(layers=8)
    whole, layer = sum(p.numel() * 4 for p in probe.parameters()), layer_bytes(probe)
    del probe
    shard = max(f.stat().st_size for f in path.glob("*.safetensors"))
    bound = shard + layer
    assert whole > 2 * bound  # the model is far bigger than the bound: the test can tell

    with Census() as census:
        model = stream(path, census=census)
    assert census.calls >= len(quantized_weights(model))  # counted at every read
    assert 0 < census.peak <= bound, (census.peak, bound)

    # the same count sees the ordinary path hold the whole model
    del model
    with Census() as census:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        census()
    assert census.peak >= whole > bound
    del loaded


def test_random_shapes_never_hold_more_than_a_layer():
    cfg = make_tiny_llama(layers=6, tie=False).config
    probe = make_tiny_llama(layers=6, tie=False)
    whole, layer = sum(p.numel() * 4 for p in probe.parameters()), layer_bytes(probe)
    del probe
    with Census() as census:
        model, weights = streaming.build_random(cfg, "cpu", census=census, **CONVERT)
    assert layer < whole / 4 and 0 < census.peak <= layer, (census.peak, layer)
    assert sum(w.numel for w in weights) + sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in make_tiny_llama(layers=6, tie=False).parameters())
    q = model.model.layers[0].mlp.down_proj.qweight.dequantize()
    assert abs(q.std().item() / cfg.initializer_range - 1) < 0.1  # normal(0, initializer_range), quantized
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert torch.isfinite(model(input_ids=torch.randint(0, 128, (1, 8))).logits).all()


# -- the loading entry ---------------------------------------------------------------------------------------

def test_hub_streams_only_sharded_folders_it_can_read(tmp_path, caplog):
    path = save_sharded(tmp_path / "m")
    from conftest import make_word_tokenizer
    make_word_tokenizer().save_pretrained(path)
    model, tok = hub.load_model_and_tokenizer(str(path), stream=True)
    assert streaming.is_skeleton(model) and tok.pad_token is not None
    model, _ = hub.load_model_and_tokenizer(str(path))  # not asked: loaded whole
    assert not streaming.is_skeleton(model) and not any(p.is_meta for p in model.parameters())

    # a checkpoint whose keys transformers renames while loading cannot stream: said, then loaded whole
    index = json.loads((path / streaming.INDEX).read_text())
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import load_file, save_file
    for f in set(index["weight_map"].values()):
        save_file({k.replace("model.", "base.", 1): v for k, v in load_file(path / f).items()}, renamed / f)
    index["weight_map"] = {k.replace("model.", "base.", 1): v for k, v in index["weight_map"].items()}
    (renamed / streaming.INDEX).write_text(json.dumps(index))
    (renamed / "config.json").write_text((path / "config.json").read_text())
    make_word_tokenizer().save_pretrained(renamed)
    with caplog.at_level("WARNING", logger="qft_ds"):
        model = hub._skeleton_or_none(renamed, torch.float32)
    assert model is None and "not streamed" in caplog.text and "model.embed_tokens.weight" in caplog.text


def _ds_config(**qft):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["scheduler"]["params"].update(total_num_steps=4, warmup_num_steps=1)
    cfg["qft"].update(qft)
    return cfg


def test_initialize_converts_a_streamed_skeleton_as_the_ordinary_model_trains(tmp_path):
    path = save_sharded(tmp_path / "m")
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    states = []
    for model in (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), streaming.load_skeleton(path)):
        engine, opt, _, _ = qft_ds.initialize(model=model, config=_ds_config())
        for _ in range(2):
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert not [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]


def test_only_the_qft_method_takes_a_skeleton(tmp_path):
    path = save_sharded(tmp_path / "m")
    cfg = json.loads((ROOT / "ds_configs" / "peqa.json").read_text())
    with pytest.raises(ValueError, match="needs a whole model"):
        qft_ds.initialize(model=streaming.load_skeleton(path), config=cfg)


def test_train_py_streams_a_sharded_model_and_trains_as_the_whole_one(tmp_path, tiny_text_file, monkeypatch):
    import sys
    sys.path.insert(0, str(ROOT))
    import train
    from conftest import WORDS, make_word_tokenizer

    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    for path, shard in ((sharded, "30KB"), (whole, "10GB")):
        make_tiny_llama(vocab=len(WORDS) + 2).save_pretrained(path, max_shard_size=shard)
        make_word_tokenizer().save_pretrained(path)
    assert streaming.is_sharded_checkpoint(sharded) and not streaming.is_sharded_checkpoint(whole)
    cfg = _ds_config()
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    skeletons = []  # whether each load gave a skeleton (initialize converts it right after)
    real = hub.load_model_and_tokenizer

    def spy(*a, **k):
        model, tok = real(*a, **k)
        skeletons.append(streaming.is_skeleton(model))
        return model, tok
    monkeypatch.setattr(hub, "load_model_and_tokenizer", spy)
    losses = []
    for path in (sharded, whole):
        out = tmp_path / f"run-{path.name}"
        train.main(["--deepspeed", str(cfg_path), "--model", str(path), "--dataset", str(tiny_text_file),
                    "--output_dir", str(out), "--max_steps", "3", "--seq_len", "16", "--eval_blocks", "2",
                    "--no-save_final"])
        losses.append([json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()])
    assert skeletons == [True, False]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_weight_quantized_from_meta_tensors_is_an_error():
    """A layer that quantizes its own (meta) parameters instead of asking the source must not pass unnoticed."""
    model = streaming.skeleton(make_tiny_llama().config)

    class Unread(streaming.RandomSource):
        def weight(self, module, device):
            return module.weight.detach()  # the skeleton's meta tensor, as such a layer would read it

    with pytest.raises(RuntimeError, match="made from meta tensors"):
        streaming.convert_streamed(model, Unread(model), "cpu", **CONVERT)
