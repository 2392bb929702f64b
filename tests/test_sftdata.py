"""qft_ds.sftdata: row checks, answer-only masks on SmolLM2-135M-Instruct's real tokenizer and chat template,
padded batches, evaluation helpers, and train.py on instruction data. No network, no hub."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qft_ds import sftdata  # noqa: E402
from qft_ds.sftdata import (IGNORE, answer_loss_sum, collate, encode_sft, exact_match,  # noqa: E402
                            generate_completions, mean_answer_loss, read_sft_jsonl, sft_batches, sft_format)

SMOLLM2_TOKENIZER = Path(__file__).parent / "fixtures" / "smollm2_tokenizer"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Your name?"},
        {"role": "assistant", "content": "SmolLM, a small model."}]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)


def _answer(tok, ids, labels):
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))  # a label is its own input token or nothing
    return tok.decode([lab for lab in labels if lab != IGNORE])


def _spans(labels):
    """(start, end) of each run of labelled positions."""
    out, start = [], None
    for i, lab in enumerate(labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


# --- Masks on the real tokenizer -------------------------------------------------------------------

def test_smollm2_fixture_is_the_instruct_tokenizer(smol):
    assert len(smol) == 49152 and smol.eos_token == "<|im_end|>" and "<|im_start|>" in smol.chat_template


def test_prompt_completion_mask_is_exact(smol):
    row = {"prompt": "Question: what is 17 + 25?\nAnswer:", "completion": " 42"}
    [(ids, labels)] = encode_sft(smol, [row], 64)
    n_prompt = len(smol(row["prompt"], add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]
    assert _answer(smol, ids, labels) == " 42<|im_end|>"
    assert smol.decode(ids) == row["prompt"] + row["completion"] + "<|im_end|>"
    assert ids[-1] == smol.eos_token_id and ids.count(smol.eos_token_id) == 1


def test_prompt_completion_merging_across_the_boundary_keeps_it_exact(smol):
    row = {"prompt": "The capital of France is Par", "completion": "is."}  # "Paris" is one token in context
    whole = smol(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
    prompt = smol(row["prompt"], add_special_tokens=False)["input_ids"]
    assert whole[:len(prompt)] != prompt  # the case under test: tokens merge across the boundary
    [(ids, labels)] = encode_sft(smol, [row], 64)
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert _answer(smol, ids, labels) == "is.<|im_end|>"  # the completion tokenized alone


def test_messages_mask_covers_assistant_turns_and_their_end_of_turn_only(smol):
    [(ids, labels)] = encode_sft(smol, [{"messages": CHAT}], 256)
    assert ids == smol(smol.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    spans = _spans(labels)
    assert [smol.decode(ids[a:b]) for a, b in spans] == [
        "Hello! How can I help?<|im_end|>", "SmolLM, a small model.<|im_end|>"]
    header = smol("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for a, b in spans:  # each span starts right after the assistant header; the newline after it has no loss
        assert ids[a - len(header):a] == header and smol.decode(ids[b]) == "\n"
    assert _answer(smol, ids, labels) == "Hello! How can I help?<|im_end|>SmolLM, a small model.<|im_end|>"


def test_conversational_prompt_completion_mask(smol):
    row = {"prompt": CHAT[:2], "completion": [CHAT[2]]}
    [(ids, labels)] = encode_sft(smol, [row], 256)
    prompt = smol(smol.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert _answer(smol, ids, labels) == "Hello! How can I help?<|im_end|>"
    # the same conversation as messages trains the same tokens
    assert encode_sft(smol, [{"messages": CHAT[:3]}], 256) == [(ids, labels)]


def test_prompt_and_reference_match_training(smol):
    for row in ({"prompt": "Q: 2+2=", "completion": " 4"}, {"messages": CHAT},
                {"prompt": CHAT[:2], "completion": [CHAT[2]]}):
        [(ids, labels)] = encode_sft(smol, [row], 256)
        prompt, ref = sftdata._prompt_and_reference(smol, row)
        a, b = _spans(labels)[-1 if "messages" in row else 0]  # a chat's last turn; a completion's first
        assert prompt == ids[:a] and smol.decode(ids[a:b]) == ref + "<|im_end|>"


def test_tokenizer_without_chat_template_is_a_clear_error(smol):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    tok.chat_template = None
    with pytest.raises(ValueError, match="example 1: the tokenizer has no chat template: set tokenizer.chat_template"):
        encode_sft(tok, [{"messages": CHAT}], 256)


def _bos_tokenizer():
    """A word tokenizer that adds <bos> to every text, like LLaMA's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["[UNK]", "<bos>", "<eos>", "what", "is", "two", "four", "."]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]",
                                   pad_token="<eos>")


def test_bos_follows_the_tokenizer_and_is_never_doubled():
    tok = _bos_tokenizer()
    for prompt in ("what is two", "<bos> what is two"):
        [(ids, labels)] = encode_sft(tok, [{"prompt": prompt, "completion": "four ."}], 32)
        assert ids == [1, 3, 4, 5, 6, 7, 2] and labels == [IGNORE] * 4 + [6, 7, 2]


# --- Rows ------------------------------------------------------------------------------------------

GOOD = '{"prompt": "a", "completion": "b"}'


@pytest.mark.parametrize("line, why", [
    ('{"prompt": "a"', "invalid JSON"),
    ('["prompt"]', "expected a JSON object, got list"),
    ('{"prompt": "a", "id": 3}', 'field "completion" is missing'),
    ('{"completion": "b"}', 'field "prompt" is missing'),
    ('{"text": "a"}', 'field "messages" (or "prompt" and "completion") is missing'),
    ('{"prompt": "a", "completion": 3}', 'field "completion" is a int'),
    ('{"prompt": 1, "completion": "b"}', 'field "prompt" is a int'),
    ('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}', 'field "completion" is a list'),
    ('{"messages": []}', 'field "messages" is empty'),
    ('{"messages": "hi"}', 'field "messages" is a str, not a list of messages'),
    ('{"messages": ["hi"]}', 'field "messages[0]" is a str'),
    ('{"messages": [{"content": "hi"}]}', 'field "messages[0].role" is missing'),
    ('{"messages": [{"role": "user"}]}', 'field "messages[0].content" is missing'),
    ('{"messages": [{"role": "user", "content": null}]}', 'field "messages[0].content" is a NoneType'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     'field "messages[1].role" is an unknown role \'bot\''),
    ('{"messages": [{"role": "user", "content": "a"}]}', 'field "messages" has no assistant turn'),
    ('{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}',
     'field "completion" has no assistant turn'),
    ('{"prompt": [], "completion": [{"role": "assistant", "content": "b"}]}', 'field "prompt" is empty'),
    ('{"messages": [{"role": "assistant", "content": "b"}], "prompt": "a"}', 'fields "messages" and "prompt"'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "a messages row, but row 1 is prompt_completion"),
])
def test_bad_row_names_file_row_and_field(tmp_path, line, why):
    p = tmp_path / "data.jsonl"
    p.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n")  # the blank line 2 still counts as a row
    with pytest.raises(ValueError) as e:
        read_sft_jsonl(p)
    assert str(e.value).startswith(f"{p}: row 4: ") and why in str(e.value), str(e.value)


@pytest.mark.parametrize("line, why", [
    (b'{"prompt": "caf\xe9", "completion": "b"}', "not UTF-8 text (byte e9)"),
    (b'{"prompt": "the \\udfff", "completion": "b"}', 'field "prompt": an unpaired surrogate escape'),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\ud800"}]}',
     'field "messages[1].content": an unpaired surrogate escape'),
    (b'{"prompt": "a\x00", "completion": "b"}', "a NUL byte: this is binary data"),
])
def test_row_that_is_not_text_names_file_row_and_field(tmp_path, line, why):
    """Latin-1 bytes and binary data used to raise UnicodeDecodeError without the file; a lone surrogate
    passed the row checks and broke the tokenizer later with UnicodeEncodeError."""
    p = tmp_path / "data.jsonl"
    p.write_bytes(f"{GOOD}\n\n{GOOD}\n".encode() + line + b"\n")
    for read in (read_sft_jsonl, lambda path: sftdata.sft_splits(path, eval_path=path)):
        with pytest.raises(ValueError) as e:
            read(p)
        assert str(e.value).startswith(f"{p}: row 4: ") and why in str(e.value), str(e.value)
    p.write_bytes(line + b"\n")  # the first row decides the format: named there too
    with pytest.raises(ValueError, match="row 1: "):
        sftdata.dataset_format(str(p))


def test_rows_keep_their_format_fields_only(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "completion": "b", "id": 1},
            {"prompt": [{"role": "user", "content": "a", "name": "x"}],
             "completion": [{"role": "assistant", "content": "b"}], "source": "s"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    assert read_sft_jsonl(p) == [{"prompt": "a", "completion": "b"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    assert read_sft_jsonl(p) == [{"prompt": [{"role": "user", "content": "a"}],
                                  "completion": [{"role": "assistant", "content": "b"}]}]
    assert sft_format(read_sft_jsonl(p)) == "prompt_completion"
    with pytest.raises(ValueError, match="row 2: a conversational prompt_completion row, but row 1 is prompt_completion"):
        sft_format([{"prompt": "a", "completion": "b"}, read_sft_jsonl(p)[0]])


def test_dataset_format_and_splits(tmp_path):
    text, pc, chat = tmp_path / "t.jsonl", tmp_path / "pc.jsonl", tmp_path / "chat.jsonl"
    text.write_text('{"text": "a"}\n')
    pc.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    chat.write_text(json.dumps({"messages": CHAT}) + "\n")
    assert [sftdata.dataset_format(str(p)) for p in (text, pc, chat)] == ["text", "prompt_completion", "messages"]
    assert sftdata.dataset_format("shakespeare") == "text"
    train, held = sftdata.sft_splits(pc)
    assert [r["prompt"] for r in held] == ["q38", "q39"] and len(train) == 38
    assert sftdata.sft_splits(pc, chat) == (read_sft_jsonl(pc), read_sft_jsonl(chat))


def test_long_examples_are_cut_and_those_without_answer_dropped_loudly(smol):
    rows = [{"prompt": "one two three four five six", "completion": " seven eight"},
            {"prompt": "one", "completion": " two three four five six seven eight"},
            {"prompt": "a", "completion": " b"}]
    with pytest.warns(UserWarning, match=r"d.jsonl: 2 of 3 examples are longer than max_len=4 .* 1 of them kept "
                                         r"no answer token and were dropped \(first: example 1\)"):
        out = encode_sft(smol, rows, 4, where="d.jsonl")
    assert [len(ids) for ids, _ in out] == [4, 3]
    with pytest.raises(ValueError, match="no example keeps an answer token within max_len=2"):
        with pytest.warns(UserWarning):
            encode_sft(smol, rows[:1], 2)


# --- Batches and evaluation ------------------------------------------------------------------------

def _examples(n, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(2, vocab, (p + c,), generator=g).tolist()
        out.append((ids, [IGNORE] * p + ids[p:]))
    return out


def test_collate_pads_right_with_no_loss_on_padding():
    ex = _examples(3)
    b = collate(ex, pad_id=0)
    width = max(len(ids) for ids, _ in ex)
    assert all(t.shape == (3, width) and t.dtype == torch.long for t in b.values())
    for i, (ids, labels) in enumerate(ex):
        n = len(ids)
        assert b["input_ids"][i, :n].tolist() == ids and b["labels"][i, :n].tolist() == labels
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (b["labels"][i, n:] == IGNORE).all() and (b["input_ids"][i, n:] == 0).all()


def test_padding_never_changes_the_loss_of_real_tokens(tiny_llama):
    model = tiny_llama(vocab=13).eval()
    ex = _examples(6)
    alone = [answer_loss_sum(model, collate([e], pad_id=0)) for e in ex]
    b = collate(ex, pad_id=0)
    assert (b["attention_mask"] == 0).any()  # some rows really are padded
    for i in range(len(ex)):
        s, n = answer_loss_sum(model, {k: v[i:i + 1] for k, v in b.items()})
        assert n == alone[i][1] and s == pytest.approx(alone[i][0], rel=1e-5)
    total, count = answer_loss_sum(model, b)
    assert count == sum(n for _, n in alone) and total == pytest.approx(sum(s for s, _ in alone), rel=1e-5)
    means = [mean_answer_loss(model, ex, bs, pad_id=0) for bs in (1, 4, 6)]
    assert means == pytest.approx([total / count] * 3, rel=1e-5)
    with torch.no_grad():  # the model's own loss agrees on an unpadded example
        ids, labels = ex[0]
        hf = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert alone[0][0] / alone[0][1] == pytest.approx(hf, rel=1e-5)


def test_sft_batches_are_deterministic_resumable_and_split_across_ranks():
    ex = _examples(23)
    take = lambda it, k: [next(it) for _ in range(k)]  # noqa: E731
    run = take(sft_batches(ex, 3, 0, seed=5), 12)  # 7 steps per epoch: crosses into epoch 2
    again = take(sft_batches(ex, 3, 0, seed=5), 12)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(run, again) for k in a)
    resumed = take(sft_batches(ex, 3, 0, seed=5, start_step=9), 3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(run[9:], resumed) for k in a)
    other_seed = next(sft_batches(ex, 3, 0, seed=6))
    assert not torch.equal(other_seed["input_ids"], run[0]["input_ids"])
    assert list(sft_batches(ex, 3, 0, max_steps=2)).__len__() == 2
    # a step of 2 ranks x 3 reads the examples one rank reads in a step of 6, in the same order
    whole = take(sft_batches(ex, 6, 0, seed=5), 4)
    for step in range(4):
        parts = [take(sft_batches(ex, 3, 0, seed=5, start_step=step, rank=r, world_size=2), 1)[0] for r in (0, 1)]
        rows = [row[m.bool()].tolist() for p in parts for row, m in zip(p["input_ids"], p["attention_mask"])]
        assert rows == [row[m.bool()].tolist() for row, m in zip(whole[step]["input_ids"],
                                                                 whole[step]["attention_mask"])]
    with pytest.raises(ValueError, match="2 examples are fewer than one step of 3 x 1 ranks"):
        next(sft_batches(ex[:2], 3, 0))


class _EchoModel(torch.nn.Module):
    """generate() answers each prompt with ``answers[its first token]`` and EOS, then padding."""

    def __init__(self, answers, eos, pad):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.eos, self.pad = answers, eos, pad
        self.generation_config = None

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
        new = [(self.answers[int(x[m.bool()][0])] + [self.eos] + [self.pad] * max_new_tokens)[:max_new_tokens]
               for x, m in zip(input_ids, attention_mask)]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_exact_match_strips_and_stops_at_eos(smol):
    enc = lambda s: smol(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [{"prompt": "1+1=", "completion": " 2"}, {"prompt": "Q: 2+2=", "completion": " 4"},
            {"prompt": "3+3=", "completion": "6"}]
    answers = {enc(r["prompt"])[0]: enc(a) for r, a in zip(rows, ["2 ", " 5", " six six six six six six six"])}
    model = _EchoModel(answers, smol.eos_token_id, smol.pad_token_id)
    assert generate_completions(model, smol, rows, batch_size=2, extra_tokens=1) == ["2 ", " 5", " six six"]
    assert exact_match(model, smol, rows, batch_size=2) == pytest.approx(1 / 3)


def test_generation_with_left_padding_matches_one_at_a_time(tiny_llama, smol):
    model = tiny_llama(vocab=len(smol)).eval()
    rows = [{"prompt": "A short one", "completion": " x y z"},
            {"prompt": "A much longer prompt, padded on the left when batched", "completion": " x y"},
            {"messages": CHAT}]
    batched = generate_completions(model, smol, rows, batch_size=3, extra_tokens=2)
    single = [generate_completions(model, smol, [r], extra_tokens=2)[0] for r in rows]
    # the longest reference (the chat row's) sets the batch's token budget: the others generate further
    assert all(single) and [b.startswith(s) for b, s in zip(batched, single)] == [True] * 3
    assert batched[2] == single[2]


# --- train.py --------------------------------------------------------------------------------------

WORDS = "the king queen a play of and to is fool lord".split()  # the vocabulary of conftest's tiny model


def _qa_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())  # noqa
    return [{"prompt": pick(int(torch.randint(3, 9, (1,), generator=g))), "completion": " the king"}
            for _ in range(n)]


def test_train_on_prompt_completion_jsonl(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import train
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(80)))
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"]["params"].update(total_num_steps=8, warmup_num_steps=1)
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    train.main(["--deepspeed", str(cfg_path), "--model", str(tiny_model_dir), "--dataset", str(data),
                "--output_dir", str(out), "--seq_len", "16"])
    printed = capsys.readouterr().out
    assert "76 train examples (prompt_completion, up to 16 tokens), 4 held-out examples" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # tokens count real tokens, not padding: replay the order and count them
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_rows, _ = sftdata.sft_splits(data)
    ex = encode_sft(tok, train_rows, 16)
    batches = sft_batches(ex, cfg["train_micro_batch_size_per_gpu"], tok.pad_token_id, seed=0, max_steps=8)
    assert rows[-1]["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_end"] < summary["eval_start"]
    meta = json.loads(next(out.glob("checkpoint-*/meta.json")).read_text())
    assert meta["data"]["format"] == "prompt_completion"


def test_train_on_messages_with_eval_dataset(tmp_path, monkeypatch, capsys, tiny_llama, smol):
    import train
    model_dir = tmp_path / "tiny-chat"
    tiny_llama(vocab=len(smol)).save_pretrained(model_dir)
    smol.save_pretrained(model_dir)
    rows = [{"messages": [{"role": "user", "content": f"Echo {w}"}, {"role": "assistant", "content": w}]}
            for w in "red green blue cyan pink gold gray teal".split()]
    data, held = tmp_path / "chat.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    cfg_path = tmp_path / "qft.json"
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=2, warmup_num_steps=1)
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    train.main(["--deepspeed", str(cfg_path), "--model", str(model_dir), "--dataset", str(data),
                "--eval_dataset", str(held), "--output_dir", str(tmp_path / "run"), "--seq_len", "64"])
    assert "8 train examples (messages, up to 64 tokens), 3 held-out examples" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_start"] > 0 and summary["steps"] == 2


def test_eval_dataset_is_for_instruction_data(tmp_path, smol):
    import train
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    args = train.parse_args(["--dataset", str(text), "--eval_dataset", str(text)])
    with pytest.raises(SystemExit, match="--eval_dataset: only for instruction data"):
        train.load_data(args, smol)
