"""What a user sees on the console: `qft_ds --help` start-up time, and the lines of a short train.py run.

For one source tree (this checkout, or an older commit unpacked with `git archive COMMIT | tar -x -C DIR`):
- the median seconds of `qft_ds --help` (the package and its CLI imported from that tree);
- a 3-step train.py run on a tiny random LLaMA and a generated text, through `python train.py`,
  `deepspeed --num_gpus 1 train.py` and `deepspeed --quiet ...`, without DS_ACCELERATOR (a new user's
  shell): every output line counted by kind (DeepSpeed's own log lines, and the known noisy ones), and
  the longest silence before the progress bar (stdout and stderr read as they come, lines split at \\n and
  \\r as a terminal shows them).

    python bench/console_noise.py                                   # this checkout
    python bench/console_noise.py --tree OLD --label before         # an unpacked older commit
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NOISE = {"accelerator_cpu": "Setting accelerator to CPU", "no_hostfile": "Unable to find hostfile",
         "lr_before_start": "Attempting to get learning rate from scheduler before it has started"}
DEEPSPEED_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(WARNING|INFO)\]")
WORDS = "the king queen a play of and to is fool lord".split()


def tiny_model_and_text(where: Path) -> tuple[Path, Path]:
    """A random 2-layer LLaMA with a word tokenizer (no hub), and 60 paragraphs of its words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *WORDS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model_dir = where / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]",
                            pad_token="<eos>").save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    text = where / "corpus.txt"
    text.write_text("\n\n".join(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g).tolist())
                                for _ in range(60)))
    return model_dir, text


def user_env(tree: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(tree), "QFT_DS_CACHE": str(cache)}


def help_seconds(tree: Path, env: dict, repeats: int) -> list[float]:
    code = "from qft_ds.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, check=True)
        times.append(round(time.perf_counter() - t0, 3))
    return times


def timed_lines(cmd: list[str], cwd: Path, env: dict) -> tuple[int, list[tuple[float, str]]]:
    """(exit status, [(seconds since start, line)]) of stdout and stderr merged, split at \\n and \\r."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, buf = [], b""
    while chunk := proc.stdout.read1(4096):
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        lines += [(time.perf_counter() - t0, ln.decode(errors="replace")) for ln in done if ln.strip()]
    if buf.strip():
        lines.append((time.perf_counter() - t0, buf.decode(errors="replace")))
    return proc.wait(), lines


def count(lines: list[tuple[float, str]]) -> dict:
    """Line counts by kind, ignoring progress-bar redraws (one per bar), and the longest silence before the
    training bar first shows."""
    texts = [t for _, t in lines]
    bars = {t.split(":")[0] for t in texts if re.match(r"^[\w ]+:\s+\d+%\|", t)}
    plain = [t for t in texts if not re.match(r"^[\w ]+:\s+\d+%\|", t)]
    until_bar = [s for s, t in lines if not t.startswith("qft:")]
    first_bar = next((i for i, (_, t) in enumerate(lines) if t.startswith("qft:")), len(lines))
    stamps = [0.0] + [s for s, _ in lines[:first_bar + 1]]
    return {"lines": len(plain) + len(bars), "deepspeed_log_lines": sum(bool(DEEPSPEED_LINE.match(t)) for t in plain),
            **{k: sum(msg in t for t in plain) for k, msg in NOISE.items()},
            "longest_silence_before_training_s": round(max(b - a for a, b in zip(stamps, stamps[1:])), 2),
            "seconds_to_first_line": round(lines[0][0], 2) if lines else None,
            "seconds_to_training_bar": round(lines[first_bar][0], 2) if first_bar < len(lines) else None,
            "seconds_total": round(until_bar[-1], 2) if until_bar else None, "output": plain}


def scrub(line: str, tmp: Path, tree: Path) -> str:
    """The record names no folder of the measuring machine (DeepSpeed's launcher prints its interpreter)."""
    for path, name in ((tmp, "TMP"), (tree, "TREE"), (Path(sys.executable), "PYTHON"), (Path(sys.prefix), "ENV")):
        line = line.replace(str(path), name)
    return line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]), help="the source tree to measure")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--commit", default=None, help="the commit of --tree (default: git rev-parse HEAD)")
    p.add_argument("--help_repeats", type=int, default=5)
    args = p.parse_args(argv)
    tree = Path(args.tree).resolve()
    result = {**common.header(args.commit), "label": args.label}
    with tempfile.TemporaryDirectory(prefix="qft-noise-") as tmp:
        tmp = Path(tmp)
        model, text = tiny_model_and_text(tmp)
        env = user_env(tree, tmp / "cache")
        times = help_seconds(tree, env, args.help_repeats)
        result["qft_ds_help_s"] = {"median": statistics.median(times), "runs": times}
        train = ["train.py", "--deepspeed", "ds_configs/qft.json", "--model", str(model), "--dataset", str(text),
                 "--max_steps", "3", "--seq_len", "16", "--eval_blocks", "2", "--no-save_final"]
        launchers = {"python": [sys.executable], "deepspeed": ["deepspeed", "--num_gpus", "1"],
                     "deepspeed --quiet": ["deepspeed", "--quiet", "--num_gpus", "1"]}
        for name, launcher in launchers.items():
            rc, lines = timed_lines([*launcher, *train, "--output_dir", str(tmp / name.replace(" ", ""))], tree, env)
            result[name] = {"exit": rc, **count(lines)}
            result[name]["output"] = [scrub(ln, tmp, tree) for ln in result[name]["output"]]
            print(f"{name}: exit {rc}, " + ", ".join(f"{k} {v}" for k, v in result[name].items()
                                                     if k not in ("exit", "output")))
    print(f"qft_ds --help: median {result['qft_ds_help_s']['median']} s of {times}")
    print(f"wrote {common.write_result('console_noise_' + args.label.replace(' ', '_'), result)}")


if __name__ == "__main__":
    main()
