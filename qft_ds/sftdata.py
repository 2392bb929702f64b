"""Instruction (SFT) data: rows in TRL's dataset formats, answer-only loss masks, padded batches, evaluation.

One .jsonl file holds rows of one format (extra keys are ignored):

    {"prompt": "2+2=", "completion": "4"}                                      prompt-completion
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}

The loss falls on the answer only: the completion and EOS, or each assistant turn's content and the
end-of-turn token its chat template emits, never on the prompt, system/user turns or assistant headers.

API (train.py and the QA benchmark use these):

    read_sft_jsonl(path) -> list[dict]                  validated rows; ValueError names file, row and field
    sft_format(rows) -> "prompt_completion" | "messages"
    dataset_format(spec) -> "text" | "prompt_completion" | "messages"   what train.py --dataset holds
    sft_splits(path, eval_path=None) -> (train_rows, heldout_rows)     the last 5% of rows, or eval_path's
    encode_sft(tokenizer, rows, max_len, *, where="") -> [(input_ids, labels)]   labels -100: no loss
    collate(examples, pad_id) -> {"input_ids", "attention_mask", "labels"}     right-padded LongTensors
    sft_batches(examples, batch_size, pad_id, seed=0, *, start_step=0, max_steps=None, rank=0, world_size=1)
    answer_loss_sum(model, batch) -> (sum of token losses over labels, number of label tokens)
    mean_answer_loss(model, examples, batch_size, pad_id) -> float     exact whatever the batch size
    generate_completions(model, tokenizer, rows, *, batch_size=16, extra_tokens=4) -> [str]   greedy
    exact_match(model, tokenizer, rows, *, batch_size=16, extra_tokens=4) -> float
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .textdata import _n_heldout, step_indices
from .textfiles import jsonl_rows

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
Example = tuple[list[int], list[int]]


# --- Rows ------------------------------------------------------------------------------------------

class _RowError(ValueError):
    pass


def _type(x) -> str:
    return type(x).__name__


def _check_messages(msgs, field: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(msgs, list):
        raise _RowError(f'field "{field}" is a {_type(msgs)}, not a list of messages')
    if not msgs:
        raise _RowError(f'field "{field}" is empty')
    out = []
    for i, m in enumerate(msgs):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise _RowError(f'field "{f}" is a {_type(m)}, not an object with "role" and "content"')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                what = "missing" if key not in m else f"a {_type(m[key])}, not a string"
                raise _RowError(f'field "{f}.{key}" is {what}')
        if m["role"] not in ROLES:
            raise _RowError(f'field "{f}.role" is an unknown role {m["role"]!r} (known: {", ".join(ROLES)})')
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise _RowError(f'field "{field}" has no assistant turn: nothing to learn')
    return out


def _check_row(obj) -> dict:
    """The row with only its format's fields, validated; raises _RowError naming the field."""
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {_type(obj)}")
    pc = [k for k in ("prompt", "completion") if k in obj]
    if "messages" in obj and pc:
        raise _RowError(f'fields "messages" and "{pc[0]}" are both present: use one format per row')
    if "messages" in obj:
        return {"messages": _check_messages(obj["messages"], "messages")}
    if not pc:
        extra = ' (a "text" row is plain LM data, not instruction data)' if "text" in obj else ""
        raise _RowError(f'field "messages" (or "prompt" and "completion") is missing{extra}')
    for k in ("prompt", "completion"):
        if k not in obj:
            raise _RowError(f'field "{k}" is missing')
    p, c = obj["prompt"], obj["completion"]
    if isinstance(p, str) and isinstance(c, str):
        return {"prompt": p, "completion": c}
    if isinstance(p, list) and isinstance(c, list):
        return {"prompt": _check_messages(p, "prompt", need_assistant=False),
                "completion": _check_messages(c, "completion")}
    bad = "prompt" if not isinstance(p, (str, list)) else "completion"
    raise _RowError(f'field "{bad}" is a {_type(obj[bad])}: "prompt" and "completion" must both be strings '
                    f'or both lists of messages')


def _kind(row: dict) -> str:
    if "messages" in row:
        return "messages"
    return "prompt_completion" if isinstance(row["prompt"], str) else "conversational prompt_completion"


def read_sft_jsonl(path) -> list[dict]:
    """Validated rows of ``path`` (blank lines skipped but counted); one format per file."""
    rows, first = [], None
    for n, obj in jsonl_rows(path):
        try:
            row = _check_row(obj)
        except _RowError as e:
            raise ValueError(f"{path}: row {n}: {e}") from None
        first = first or (n, _kind(row))
        if _kind(row) != first[1]:
            raise ValueError(f"{path}: row {n}: a {_kind(row)} row, but row {first[0]} is {first[1]}: "
                             "use one format per file")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def sft_format(rows: Sequence[dict]) -> str:
    """"messages" or "prompt_completion" (string or conversational); mixed formats raise."""
    kinds = [_kind(r) for r in rows]
    for i, k in enumerate(kinds):
        if k != kinds[0]:
            raise ValueError(f"row {i + 1}: a {k} row, but row 1 is {kinds[0]}: use one format")
    return "messages" if kinds[0] == "messages" else "prompt_completion"


def dataset_format(spec: str) -> str:
    """"text" unless ``spec`` is a .jsonl file whose first row is instruction data (read_sft_jsonl checks all)."""
    path = Path(spec).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return "text"
    n, obj = next(jsonl_rows(path), (1, {}))  # a bad first row: ValueError naming it
    if not isinstance(obj, dict) or not {"messages", "prompt", "completion"} & obj.keys():
        return "text"
    try:
        return sft_format([_check_row(obj)])
    except _RowError as e:
        raise ValueError(f"{path}: row {n}: {e}") from None


def sft_splits(path, eval_path=None) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows: ``eval_path``'s rows, else the last 5% of ``path``'s (as textdata splits)."""
    rows = read_sft_jsonl(path)
    if eval_path:
        return rows, read_sft_jsonl(eval_path)
    k = _n_heldout(len(rows), f"{path}: rows")
    return rows[:-k], rows[-k:]


# --- Tokens and masks ------------------------------------------------------------------------------

def _plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _lead(tok, text: str) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS or none), unless the text starts with them."""
    probe, plain = tok("a")["input_ids"], _plain(tok, "a")
    lead = probe[:probe.index(plain[0])] if plain and plain[0] in probe else []
    return [] if lead and _plain(tok, text)[:len(lead)] == lead else lead  # no double BOS


def _render(tok, messages: list[dict], gen: bool = False) -> list[int]:
    # Chat templates write BOS into the text themselves, so the text is tokenized without added specials.
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    return _plain(tok, text)


def _encode_text_pair(tok, prompt: str, completion: str) -> Example:
    """Prompt tokens, then completion tokens and EOS (the only ones with a loss).

    The completion is tokenized in context (prompt+completion) when the prompt's tokens are a prefix of
    those; if tokens merge across the boundary it is tokenized alone and appended, as at inference.
    """
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (it ends every completion)")
    lead = _lead(tok, prompt)
    p, full = lead + _plain(tok, prompt), lead + _plain(tok, prompt + completion)
    c = full[len(p):] if full[:len(p)] == p else _plain(tok, completion)
    c = c if c and c[-1] == eos else c + [eos]
    return p + c, [IGNORE] * len(p) + c


def _encode_chat(tok, messages: list[dict], first: int) -> Example:
    """The conversation through the chat template; assistant turns from message ``first`` on get the loss.

    Each assistant turn's tokens are found by rendering the conversation before it with the generation
    prompt (which ends with the assistant header) and through it; both must be token prefixes of the
    whole. The loss covers the turn up to its last special token (the end-of-turn), not the newline after.
    """
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: set tokenizer.chat_template (a Jinja string) or use "
                         "a model whose tokenizer has one, or write prompt/completion string rows")
    ids = _render(tok, messages)
    specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    labels = [IGNORE] * len(ids)
    for i in [i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]:
        head, turn = _render(tok, messages[:i], gen=True), _render(tok, messages[:i + 1])
        if turn[:len(head)] != head or ids[:len(turn)] != turn:
            raise ValueError(f"message {i}: the chat template does not render this assistant turn as an extension "
                             "of the conversation before it, so its tokens cannot be told apart")
        ends = [j + 1 for j in range(len(head), len(turn)) if turn[j] in specials]
        end = ends[-1] if ends else len(turn)
        labels[len(head):end] = ids[len(head):end]
    return ids, labels


def _encode_row(tok, row: dict) -> Example:
    if "messages" in row:
        return _encode_chat(tok, row["messages"], 0)
    if isinstance(row["prompt"], str):
        return _encode_text_pair(tok, row["prompt"], row["completion"])
    return _encode_chat(tok, row["prompt"] + row["completion"], len(row["prompt"]))


def encode_sft(tokenizer, rows: Sequence[dict], max_len: int, *, where: str = "") -> list[Example]:
    """(input_ids, labels) per row, cut to ``max_len`` from the right.

    An example left with no loss token after the cut is dropped, with a warning counting them; if none is
    left, ValueError. ``where`` (e.g. the file name) prefixes messages.
    """
    pre = f"{where}: " if where else ""
    out, cut, dropped = [], 0, []
    for n, row in enumerate(rows, 1):
        try:
            ids, labels = _encode_row(tokenizer, row)
        except ValueError as e:
            raise ValueError(f"{pre}example {n}: {e}") from None
        if len(ids) > max_len:
            cut += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(x == IGNORE for x in labels):
            dropped.append(n)
            continue
        out.append((ids, labels))
    if cut:
        warnings.warn(f"{pre}{cut} of {len(rows)} examples are longer than max_len={max_len} and were cut from the "
                      f"right; {len(dropped)} of them kept no answer token and were dropped"
                      + (f" (first: example {dropped[0]})" if dropped else "") + ". Raise the length limit "
                      "(train.py --seq_len) to keep them.", stacklevel=2)
    if not out:
        raise ValueError(f"{pre}no example keeps an answer token within max_len={max_len}")
    return out


# --- Batches ---------------------------------------------------------------------------------------

def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: attention_mask 0 and labels -100 on padding."""
    n, width = len(examples), max(len(ids) for ids, _ in examples)
    batch = {"input_ids": torch.full((n, width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((n, width), dtype=torch.long),
             "labels": torch.full((n, width), IGNORE, dtype=torch.long)}
    for i, (ids, labels) in enumerate(examples):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["labels"][i, :len(ids)] = torch.tensor(labels)
    return batch


def sft_batches(examples: Sequence[Example], batch_size: int, pad_id: int, seed: int = 0, *, start_step: int = 0,
                max_steps: int | None = None, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Padded batches in textdata.batches's order (same seed, step and rank give the same examples)."""
    for idx in step_indices(len(examples), batch_size, seed, start_step=start_step, max_steps=max_steps,
                            rank=rank, world_size=world_size, what="examples"):
        yield collate([examples[i] for i in idx.tolist()], pad_id)


# --- Evaluation ------------------------------------------------------------------------------------

def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.no_grad()
def answer_loss_sum(model, batch: dict) -> tuple[float, int]:
    """Summed next-token loss over the label tokens of ``batch``, and their count (the model predicts
    ``labels[t]`` at position ``t - 1``, as HF causal LMs do)."""
    dev = _device(model)
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    labels = batch["labels"][:, 1:].to(dev)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss.item(), int((labels != IGNORE).sum())


def mean_answer_loss(model, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    """Mean loss per answer token over all examples, in order (so it does not depend on batch_size)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, n = answer_loss_sum(model, collate(examples[i:i + batch_size], pad_id))
        total, count = total + s, count + n
    return total / count


def _prompt_and_reference(tok, row: dict) -> tuple[list[int], str]:
    """The tokens a model is given at inference, and the answer it should produce."""
    if "messages" in row or not isinstance(row["prompt"], str):
        msgs = row.get("messages") or row["prompt"] + row["completion"]
        start = 0 if "messages" in row else len(row["prompt"])
        asst = [i for i in range(start, len(msgs)) if msgs[i]["role"] == "assistant"]
        j = asst[-1] if "messages" in row else asst[0]  # the last turn of a chat; the first of a completion
        return _render(tok, msgs[:j], gen=True), msgs[j]["content"]
    return _lead(tok, row["prompt"]) + _plain(tok, row["prompt"]), row["completion"]


def _eos_ids(model, tok) -> list[int]:
    # A template's end-of-turn token may differ from the tokenizer's EOS; generation_config lists both.
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({*ids, tok.eos_token_id} - {None})


@torch.no_grad()
def generate_completions(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 16,
                         extra_tokens: int = 4) -> list[str]:
    """Greedy answers, batched with left padding; each batch generates up to its longest reference
    answer's token count + ``extra_tokens`` new tokens, and each answer stops at EOS."""
    model = getattr(model, "module", model)  # a DeepSpeed engine's model
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    items = [_prompt_and_reference(tokenizer, r) for r in rows]
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=_device(model))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=ids.device)
        new = max(len(_plain(tokenizer, ref)) for _, ref in chunk) + extra_tokens
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for g in gen:
            stop = next((k for k, t in enumerate(g) if t in eos), len(g))
            out.append(tokenizer.decode(g[:stop], skip_special_tokens=True))
    return out


def exact_match(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 16, extra_tokens: int = 4) -> float:
    """Fraction of rows whose greedy answer equals the reference answer, both stripped."""
    preds = generate_completions(model, tokenizer, rows, batch_size=batch_size, extra_tokens=extra_tokens)
    refs = [_prompt_and_reference(tokenizer, r)[1] for r in rows]
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(rows)
