"""Hostile-user probe of train.py's inputs (issue 18 item 9, issue 17): each bad config, data file or model path
is run through `python train.py` in a clean environment (no launcher variables, as a user would) and classified:

- clear: exit non-zero, no traceback, and the message names what is wrong (the probe's `names` text);
- unnamed: exit non-zero, no traceback, but the message does not name the key / file / row;
- traceback: a Python traceback reached the user;
- silent: exit 0 (the bad input was accepted).

    python bench/input_probe.py [--only NAME ...]      -> bench/results/input_probe_<time>.json

Tiny random LLaMA and a word corpus (the test fixtures), 1 step of 16 tokens: each probe is a process start.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def base_config() -> dict:
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=1, warmup_num_steps=1)
    return cfg


def edit(path: str, value):
    """A config probe: set the dotted `path` (or delete it when value is DELETE) in a copy of qft.json."""
    def make(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return cfg
    return make


DELETE = object()


def rename(old: str, new: str):
    def make(cfg):
        *parents, last = old.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)
        return cfg
    return make


# name -> (config edit, text the message must name)
CONFIG_PROBES = {
    "lr_string": (edit("optimizer.params.lr", "abc"), "optimizer.params.lr"),
    "lr_nan": (edit("optimizer.params.lr", float("nan")), "optimizer.params.lr"),
    "lr_1e999": (edit("optimizer.params.lr", float("inf")), "optimizer.params.lr"),
    "betas_one": (edit("optimizer.params.betas", [0.9]), "optimizer.params.betas"),
    "betas_string": (edit("optimizer.params.betas", "0.9,0.99"), "optimizer.params.betas"),
    "weight_decay_string": (edit("optimizer.params.weight_decay", "0.1"), "optimizer.params.weight_decay"),
    "qft_list": (edit("qft", ["method", "qft"]), "qft"),
    "qft_rounding_bad": (edit("qft.rounding", "nearest"), "qft.rounding"),
    "gas_string": (edit("gradient_accumulation_steps", "2"), "gradient_accumulation_steps"),
    "gas_zero": (edit("gradient_accumulation_steps", 0), "gradient_accumulation_steps"),
    "micro_batch_string": (edit("train_micro_batch_size_per_gpu", "4"), "train_micro_batch_size_per_gpu"),
    "micro_batch_zero": (edit("train_micro_batch_size_per_gpu", 0), "train_micro_batch_size_per_gpu"),
    "bf16_enabled_string": (edit("bf16.enabled", "false"), "bf16.enabled"),
    "bf16_not_object": (edit("bf16", True), "bf16"),
    "top_level_typo": (rename("gradient_clipping", "gradient_cliping"), "gradient_clipping"),
    "top_level_typo_2": (rename("train_micro_batch_size_per_gpu", "train_micro_batch_size"),
                         "train_micro_batch_size_per_gpu"),
    "optimizer_param": (rename("optimizer.params", "param"), "optimizer.param"),
    "optimizer_not_object": (edit("optimizer", "QFTLion"), "optimizer"),
    "clipping_negative": (edit("gradient_clipping", -1), "gradient_clipping"),
    "clipping_nan": (edit("gradient_clipping", float("nan")), "gradient_clipping"),
    "clipping_string": (edit("gradient_clipping", "1.0"), "gradient_clipping"),
    "total_steps_negative": (edit("scheduler.params.total_num_steps", -5), "total_num_steps"),
    "total_steps_zero": (edit("scheduler.params.total_num_steps", 0), "total_num_steps"),
    "total_steps_float": (edit("scheduler.params.total_num_steps", 2.5), "total_num_steps"),
    "warmup_negative": (edit("scheduler.params.warmup_num_steps", -1), "warmup_num_steps"),
    "scheduler_param_typo": (rename("scheduler.params.warmup_num_steps", "warmup_steps"), "warmup_steps"),
    "scheduler_type_unknown": (edit("scheduler.type", "Cosine"), "scheduler.type"),
    "zero_stage_string": (edit("zero_optimization", {"stage": "1"}), "zero_optimization.stage"),
    "optimizer_type_adam": (edit("optimizer.type", "Adam"), "optimizer.type"),
    "config_is_list": (lambda cfg: [cfg], "config"),
}


def write_bytes(data: bytes, suffix: str):
    return lambda d: _write(d / f"data{suffix}", data)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def corpus_text() -> str:
    from conftest import WORDS
    return "\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(60))


def text_then(bad: bytes, suffix=".txt"):
    """A good corpus with one bad line in the middle."""
    def make(d):
        lines = corpus_text().encode().split(b"\n")
        lines.insert(len(lines) // 2, bad)
        return _write(d / f"data{suffix}", b"\n".join(lines))
    return make


def jsonl_rows(rows: list[bytes], bad_at: int | None = None, bad: bytes = b""):
    def make(d):
        out = list(rows)
        if bad_at is not None:
            out.insert(bad_at, bad)
        return _write(d / "data.jsonl", b"\n".join(out) + b"\n")
    return make


def text_rows() -> list[bytes]:
    return [json.dumps({"text": p}).encode() for p in corpus_text().split("\n\n")]


def sft_rows() -> list[bytes]:
    return [json.dumps({"prompt": "the king", "completion": " of the play"}).encode() for _ in range(40)]


def folder_with(bad: bytes):
    def make(d):
        (d / "docs").mkdir()
        for i, para in enumerate(corpus_text().split("\n\n")[:20]):
            (d / "docs" / f"{i:02d}.txt").write_text(para)
        (d / "docs" / "10.txt").write_bytes(bad)
        return d / "docs"
    return make


# name -> (data maker in a folder -> path, text the message must name)
DATA_PROBES = {
    "txt_binary": (write_bytes(bytes(range(256)) * 8, ".txt"), "data.txt"),
    "txt_latin1": (text_then("the king of caf\xe9 and the fool".encode("latin-1")), "data.txt"),
    "txt_empty": (write_bytes(b"", ".txt"), "data.txt"),
    "txt_nul_bytes": (text_then(b"the king \x00\x00\x00 queen"), "data.txt"),
    "jsonl_latin1": (jsonl_rows(text_rows(), 5, '{"text": "caf\xe9"}'.encode("latin-1")), "row 6"),
    "jsonl_binary": (write_bytes(bytes(range(256)) * 8, ".jsonl"), "data.jsonl"),
    "jsonl_lone_surrogate": (jsonl_rows(text_rows(), 5, b'{"text": "the king \\ud800 queen"}'), "row 6"),
    "jsonl_bad_json": (jsonl_rows(text_rows(), 5, b'{"text": "the king'), "row 6"),
    "jsonl_text_not_string": (jsonl_rows(text_rows(), 5, b'{"text": 5}'), "row 6"),
    "sft_lone_surrogate": (jsonl_rows(sft_rows(), 7, b'{"prompt": "the \\udfff", "completion": " king"}'), "row 8"),
    "sft_missing_completion": (jsonl_rows(sft_rows(), 7, b'{"prompt": "the king"}'), "row 8"),
    "sft_latin1": (jsonl_rows(sft_rows(), 7, '{"prompt": "caf\xe9", "completion": " king"}'.encode("latin-1")),
                   "row 8"),
    "folder_latin1_file": (folder_with("caf\xe9 the king".encode("latin-1")), "10.txt"),
    "missing_file": (lambda d: d / "nope.txt", "nope.txt"),
    "unsupported_suffix": (write_bytes(b"the king", ".csv"), "data.csv"),
}

# name -> (args maker in a folder -> extra argv, text the message must name)
MODEL_PROBES = {
    "model_missing_path": (lambda d, m: ["--model", str(d / "no_model")], "no_model"),
    "model_empty_folder": (lambda d, m: (d / "empty").mkdir() or ["--model", str(d / "empty")], "empty"),
    "model_file_not_model": (lambda d, m: ["--model", str(_write(d / "x.bin", b"junk"))], "x.bin"),
    "model_no_weights": (lambda d, m: _copy_config_only(d, m), "cfgonly"),
    "eval_dataset_binary": (lambda d, m: ["--dataset", str(_write(d / "t.jsonl", b"\n".join(sft_rows()))),
                                          "--eval_dataset", str(_write(d / "e.jsonl", bytes(range(256))))],
                            "e.jsonl"),
}


def _copy_config_only(d: Path, model: Path) -> list[str]:
    import shutil
    out = d / "cfgonly"
    out.mkdir()
    for f in model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return ["--model", str(out)]


def classify(rc: int, output: str, names: str) -> str:
    """`clear` needs the last line alone to name the input (an error message is one line)."""
    if rc == 0:
        return "silent"
    if "Traceback (most recent call last)" in output:
        return "traceback"
    return "clear" if names in last_line(output) else "unnamed"


def last_line(output: str) -> str:
    return next((ln for ln in reversed(output.strip().splitlines()) if ln.strip()), "")


def run_train(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    env["QFT_DS_CACHE"] = str(cwd / "cache")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    from conftest import WORDS, make_tiny_llama, make_word_tokenizer

    import common
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny-llama"
        make_tiny_llama(vocab=len(WORDS) + 2).save_pretrained(model)
        make_word_tokenizer().save_pretrained(model)
        corpus = _write(tmp / "corpus.txt", corpus_text().encode())
        common_args = ["--seq_len", "16", "--eval_blocks", "1", "--no-save_final"]  # steps: the config's 1
        probes = ([("config", n, p) for n, p in CONFIG_PROBES.items()] +
                  [("data", n, p) for n, p in DATA_PROBES.items()] +
                  [("model", n, p) for n, p in MODEL_PROBES.items()])
        for i, (category, name, (make, names)) in enumerate(probes):
            if args.only and name not in args.only:
                continue
            d = tmp / f"p{i}"
            d.mkdir()
            argv = [*common_args, "--output_dir", str(d / "run")]
            if category == "config":
                cfg_path = d / "bad.json"
                cfg_path.write_text(json.dumps(make(base_config())))
                argv += ["--deepspeed", str(cfg_path), "--model", str(model), "--dataset", str(corpus)]
            elif category == "data":
                argv += ["--deepspeed", str(ROOT / "ds_configs" / "qft.json"), "--model", str(model),
                         "--dataset", str(make(d))]
            else:
                extra = make(d, model)
                argv += ["--deepspeed", str(ROOT / "ds_configs" / "qft.json")]
                argv += extra if "--model" in extra else ["--model", str(model), *extra]
                if "--dataset" not in extra:
                    argv += ["--dataset", str(corpus)]
            t0 = time.time()
            rc, out = run_train(argv, d)
            outcome = classify(rc, out, names)
            last = last_line(out).replace(str(tmp), "TMP")  # the result file names no machine path
            results.append({"category": category, "name": name, "rc": rc, "outcome": outcome,
                            "rank_prefix": "[rank0]:" in out, "message": last[:400],
                            "seconds": round(time.time() - t0, 1)})
            print(f"{category:7} {name:26} {outcome:9} rc={rc:<4} {last[:150]}", flush=True)
    counts = {}
    for r in results:
        c = counts.setdefault(r["category"], {"tried": 0, "clear": 0, "unnamed": 0, "traceback": 0, "silent": 0})
        c["tried"] += 1
        c[r["outcome"]] += 1
    print(json.dumps(counts, indent=1))
    out = common.RESULTS / f"input_probe_{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"commit": common.git_commit(), "counts": counts, "probes": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
