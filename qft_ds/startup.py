"""What train.py tells the user before its first step: what it is doing, and which data it holds out.

- `StartupClock`: one line per start-up phase (loading, tokenising, converting, the first held-out
  evaluation, the first step), each stamped with the seconds since start, so that the minute or two before
  the first update on the default model is never silent, and the stamps show where it went;
- `text_heldout` / `sft_heldout`: one line saying which part of the user's data is held out (the last 5%
  of a file's paragraphs or rows, a folder's last file, a dataset's split, two plays), how much of it
  there is, and how much of it the held-out loss reads.
"""
from __future__ import annotations

import time

from qft_ds.textdata import HELDOUT_FRACTION


class StartupClock:
    """`clock.say("loading ...")` prints `[  8.1 s] loading ...` on the rank that reports (rank 0)."""

    def __init__(self, enabled: bool = True, start: float | None = None):
        self.enabled, self.start = enabled, time.time() if start is None else start

    def say(self, what: str) -> None:
        if self.enabled:
            print(f"[{time.time() - self.start:6.1f} s] {what}", flush=True)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"


def _last(fraction_of: str) -> str:
    return f"the last {HELDOUT_FRACTION:.0%} of {fraction_of}"


def text_heldout(splits, held_blocks: int, seq_len: int) -> str:
    """The held-out part of a text source (textdata.TextSplits) and what the held-out loss reads of it."""
    n_held, n_all = len(splits.heldout), len(splits.heldout) + len(splits.train)
    names = splits.heldout_names
    if len(splits.train_names) != len(splits.train):  # a dataset's own held-out split: one label per split
        what = f"the split {_names(names)} ({n_held} rows)"
    elif len(names) == 1 and "paragraphs:]" in names[0]:  # one .txt file, split by paragraph
        what = f"{_last(splits.source + ' paragraphs')}: {names[0]}"
    elif len(names) == n_held and names and "#" in names[0]:  # rows of a .jsonl or of a dataset without a split
        what = f"{_last(splits.source + ' rows')}: {n_held} of {n_all} rows ({_names(names)})"
    else:  # a folder's last file, or named documents (plays)
        what = f"{n_held} of {n_all} documents of {splits.source}: {_names(names)}"
    words = sum(len(doc.split()) for doc in splits.heldout)
    return (f"{what}; {words:,} words, none trained on; the held-out loss reads {held_blocks} blocks x {seq_len} "
            f"tokens of it (--eval_blocks)")


def sft_heldout(dataset: str, eval_dataset: str | None, n_train_rows: int, n_held_rows: int, held: list) -> str:
    """The held-out rows of instruction data (sftdata.sft_splits), and the answer tokens the held-out loss is
    the mean over (of the encoded examples `held`: rows left without an answer token by --seq_len are not)."""
    answer_tokens = sum(1 for _, labels in held for x in labels if x != -100)
    total = n_train_rows + n_held_rows
    where = (f"--eval_dataset {eval_dataset}: {n_held_rows} rows" if eval_dataset else
             f"{_last(dataset + ' rows')}: rows {n_train_rows + 1}-{total} of {total}")
    kept = "" if len(held) == n_held_rows else f" ({len(held)} scored: the others kept no answer token at --seq_len)"
    return (f"{where}{kept}, none trained on; the held-out loss is the mean over their {answer_tokens:,} answer "
            "tokens")
