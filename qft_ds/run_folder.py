"""An output folder's housekeeping: one writer at a time, leftovers of killed saves, and `latest`.

- **The writer lock** `OUTPUT_DIR/.qft_ds.lock` holds the writer's host, pid and process start time. A
  second live process is refused (its pid and host are named). A lock whose process is gone (same host,
  no such pid, or the pid now belongs to a newer process) is stale: it is taken over, with a warning.
  A lock of another host cannot be checked from here and is refused with what to do.
- **Leftovers of killed saves**, found by our own naming pattern only (nothing else is touched), are
  removed under the lock: `.tmp-checkpoint-STEP-*` (a save's temporary folder), `.latest.tmp*`, and
  `.old-checkpoint-STEP-PID`, the previous copy of a step being re-saved. If the killed save had
  already moved `checkpoint-STEP` aside but not renamed the new one in, the old copy is put back, loudly.
- **`latest`** must name a `checkpoint-STEP` folder beside it: never a path that leaves the run folder.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("qft_ds")

LOCK = ".qft_ds.lock"
LATEST = "latest"
PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMP = re.compile(r"^\.tmp-checkpoint-\d+-.+$|^\.latest\.tmp\d+$")
_OLD = re.compile(r"^\.old-(checkpoint-\d+)-\d+$")

_held: dict[Path, int] = {}  # run folders this process holds the lock of -> nesting depth


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another format version, or does not fit the model."""


class RunFolderError(CheckpointError):
    """The output folder cannot be used: another writer holds it, or `latest` is unusable."""


# -- the writer lock -------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (Linux), to tell a reused pid from the lock's owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    started = _start_time(pid)
    return owner.get("started") is None or started is None or started == owner["started"]


def _read_owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text())
        if not (isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)):
            raise ValueError("no pid and host")
        return owner
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"{lock} is not a qft_ds lock file ({e}); if no run writes into {lock.parent}, "
                             "delete it") from None


def _create(lock: Path) -> bool:
    """Create the lock with our owner record, atomically and only if absent (link is exclusive)."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
    tmp = lock.with_name(f"{LOCK}.{os.getpid()}")
    tmp.write_text(json.dumps(me) + "\n")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def acquire(out_dir) -> None:
    """Hold `out_dir`'s writer lock (re-entrant within this process), then tidy leftovers of killed saves."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = out_dir.resolve()
    if key in _held:
        _held[key] += 1
        tidy(out_dir)
        return
    lock = out_dir / LOCK
    for _ in range(3):  # a stale lock taken over by another starter at the same moment: look again
        if _create(lock):
            break
        owner = _read_owner(lock)
        if owner["host"] == socket.gethostname() and owner["pid"] == os.getpid():
            break  # ours, left by an earlier holder in this process
        if owner["host"] != socket.gethostname():
            raise RunFolderError(f"{out_dir} is in use by pid {owner['pid']} on host {owner['host']} ({lock}); "
                                 f"two runs must not write into one output folder. If that run is over, delete {lock}")
        if _alive(owner):
            raise RunFolderError(f"{out_dir} is in use by another live run, pid {owner['pid']} ({lock}); two runs must "
                                 "not write into one output folder: choose another --output_dir, or wait")
        stale = lock.with_name(f"{LOCK}.stale{os.getpid()}")
        try:
            os.rename(lock, stale)  # only one starter wins this rename
        except FileNotFoundError:
            continue
        if _read_owner(stale) != owner:  # we moved a fresh lock someone just took: give it back
            os.rename(stale, lock)
            continue
        stale.unlink()
        logger.warning(f"{lock}: removed a stale lock of pid {owner['pid']} (that process is gone)")
    else:
        raise RunFolderError(f"could not take {lock}: other processes keep taking it")
    _held[key] = 1
    tidy(out_dir)


def release(out_dir) -> None:
    key = Path(out_dir).resolve()
    if key not in _held:
        return
    _held[key] -= 1
    if _held[key] == 0:
        del _held[key]
        lock = key / LOCK
        try:
            if _read_owner(lock)["pid"] == os.getpid():
                lock.unlink()
        except (RunFolderError, FileNotFoundError):
            pass  # already gone or replaced: not ours to remove


@contextmanager
def locked(out_dir):
    acquire(out_dir)
    try:
        yield
    finally:
        release(out_dir)


@atexit.register
def _release_all() -> None:  # sys.exit paths of a run: the lock goes with the process
    for key in list(_held):
        _held[key] = 1
        release(key)


# -- leftovers of killed saves ---------------------------------------------------------------------
def leftovers(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if _TEMP.match(p.name) or _OLD.match(p.name)) \
        if out_dir.is_dir() else []


def tidy(out_dir) -> None:
    """Remove temporary folders of killed saves and put back a checkpoint a killed re-save had moved aside.
    Call with the lock held: then no save is in flight."""
    out_dir = Path(out_dir)
    removed = []
    for p in leftovers(out_dir):
        old = _OLD.match(p.name)
        if old and not (out_dir / old.group(1)).exists() and (p / "meta.json").is_file():
            os.rename(p, out_dir / old.group(1))
            logger.warning(f"{out_dir}: recovered {old.group(1)} from {p.name}: a save of that step was killed "
                           f"after moving the previous copy aside and before renaming the new one in")
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        removed.append(p.name)
    if removed:
        logger.warning(f"{out_dir}: removed {len(removed)} leftover(s) of killed saves: {', '.join(removed)}")


# -- latest ----------------------------------------------------------------------------------------
def read_latest(run_dir: Path) -> Path:
    """The checkpoint folder `run_dir/latest` names; it must be a `checkpoint-STEP` folder beside it."""
    latest = run_dir / LATEST
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise RunFolderError(f"{latest} is not text; it should hold a checkpoint folder's name, like "
                             f"'{PREFIX}100'") from None
    if not name:
        raise RunFolderError(f"{latest} is empty; it should hold a checkpoint folder's name, like '{PREFIX}100'")
    if not CHECKPOINT_NAME.match(name):
        raise RunFolderError(f"{latest} holds {name[:80]!r}, not a checkpoint folder's name like '{PREFIX}100' "
                             "(latest only names a folder inside its own run folder)")
    target = run_dir / name
    if target.is_symlink():
        raise RunFolderError(f"{target} is a symbolic link; latest only names a folder inside its own run folder")
    if not (target / "meta.json").is_file() and any(_OLD.match(p.name) and p.name[5:].startswith(name + "-")
                                                    for p in leftovers(run_dir)):
        with locked(run_dir):  # a re-save of this step was killed mid-swap: put the previous copy back
            pass
    return target


# -- metrics.jsonl ---------------------------------------------------------------------------------
def metrics_lines(path: Path, upto_step: int) -> list[str]:
    """The rows of a run's metrics.jsonl up to `upto_step` (a resumed run may have gone past its last
    save). A cut-off last line, as a run killed mid-write leaves it, is dropped with a warning; any other
    bad line is an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{path} is not UTF-8 text ({e}); move it away to start a fresh one") from None
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"] if isinstance(row, dict) else None
        except (json.JSONDecodeError, KeyError):
            row = step = None
        if not isinstance(step, int):
            if n == len(lines) and row is None:
                logger.warning(f"{path}: line {n}, the last, is cut off (a run killed while writing it): dropped")
                continue
            raise RunFolderError(f"{path}: line {n} is not a metrics row with an integer \"step\"; fix or move "
                                 "the file away to resume")
        if step <= upto_step:
            keep.append(line)
    return keep
