"""Plain `python script.py` (no launcher variables) works: qft_ds sets up rank 0 of 1 itself.

tests/conftest.py sets RANK, WORLD_SIZE, ... for every test, which would hide the failure (DeepSpeed's MPI
discovery: `ModuleNotFoundError: mpi4py`), so the user scripts here run in subprocesses without them.
"""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qft_ds import launch_env

ROOT = Path(__file__).resolve().parents[1]
SHM_BUILT = "deepspeed_shm_comm_op built successfully"  # DeepSpeed's line after building (or loading) the op


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in launch_env.LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def run(args, cwd, env, timeout=300):
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "mpi4py" not in out and SHM_BUILT not in out, out[-4000:]
    return res.stdout


# The README's "From your own script" snippet, around a tiny local model.
SNIPPET = """
import os, sys
import torch
from transformers import AutoModelForCausalLM
import {module}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
x = torch.randint(0, 12, (4, 16), generator=torch.Generator().manual_seed(0))
losses = []
engine, optimizer, _, scheduler = {call}(model=model, config=sys.argv[2])
for _ in range({steps}):
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print("env", *(os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")))
print("optimizer", type(optimizer).__name__, "losses", *losses)
"""


@pytest.mark.parametrize("module,call", [("qft_ds", "qft_ds.initialize"),
                                         ("deepspeed\nimport qft_ds", "deepspeed.initialize")])
def test_readme_snippet_runs_under_plain_python(tiny_model_dir, tmp_path, module, call):
    script = tmp_path / "my_script.py"
    script.write_text(SNIPPET.format(module=module, call=call, steps=6))
    cfg = ROOT / "ds_configs" / "qft.json"
    out = run([str(script), str(tiny_model_dir), str(cfg)], tmp_path, clean_env())
    env = next(line.split()[1:] for line in out.splitlines() if line.startswith("env "))
    assert env[:4] == ["0", "1", "0", "127.0.0.1"] and env[4] not in ("29500", "29533")
    losses = [float(v) for v in next(line for line in out.splitlines() if line.startswith("optimizer")).split()[3:]]
    assert "QFTLion" in out and len(losses) == 6 and losses[-1] < losses[0]


def test_hf_trainer_example_runs_under_plain_python(tiny_model_dir, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text(" ".join(["the king a play of the queen and the fool"] * 60))
    run([str(ROOT / "examples" / "hf_trainer.py"), "--model", str(tiny_model_dir), "--text", str(text),
         "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--seq_len", "16"], tmp_path, clean_env())
    assert (tmp_path / "out" / "checkpoint-3" / "meta.json").is_file()


def test_lone_process_env_sets_a_free_port_and_keeps_a_users_values(monkeypatch):
    for k in launch_env.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    assert launch_env.lone_process_env()
    assert [os.environ[k] for k in launch_env.LAUNCH_VARS[:4]] == ["0", "1", "0", "127.0.0.1"]
    with socket.socket() as s:  # free now: bindable
        s.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
    for k in launch_env.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_PORT", "31234")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    assert launch_env.lone_process_env()
    assert os.environ["MASTER_PORT"] == "31234" and os.environ["MASTER_ADDR"] == "10.0.0.7"
    monkeypatch.setenv("RANK", "3")  # a launcher's process: left alone
    monkeypatch.delenv("WORLD_SIZE")
    assert not launch_env.lone_process_env() and "WORLD_SIZE" not in os.environ


def test_a_users_master_port_is_kept_by_a_plain_script(tmp_path):
    port = launch_env.free_port()
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import os
        from qft_ds.launch_env import prepare_process
        prepare_process()
        import deepspeed
        deepspeed.init_distributed()
        print("port", os.environ["MASTER_PORT"], deepspeed.comm.get_world_size())
    """))
    out = run([str(script)], tmp_path, clean_env(MASTER_PORT=str(port)), timeout=120)
    assert f"port {port} 1" in out


def test_train_py_runs_under_plain_python(tiny_model_dir, tiny_text_file, tmp_path):
    out = run([str(ROOT / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "qft.json"), "--model",
               str(tiny_model_dir), "--dataset", str(tiny_text_file), "--output_dir", str(tmp_path / "run"),
               "--max_steps", "2", "--seq_len", "16", "--eval_blocks", "2", "--no-save_final"], tmp_path,
              clean_env(QFT_DS_CACHE=str(tmp_path / "cache")))
    assert "held-out loss:" in out


def test_shm_op_build_is_skipped_for_one_cpu_process_and_announced_for_several(monkeypatch, capsys):
    import qft_ds  # noqa: F401  (installs the wrapper)
    mod = sys.modules["deepspeed.comm.torch"]
    assert getattr(mod.build_shm_op, "_qft_wrapped", False)
    calls = []
    monkeypatch.setattr(mod, "build_shm_op", lambda: calls.append(1) or "op")
    launch_env.skip_cpu_shm_build()  # wraps this stand-in for DeepSpeed's builder
    monkeypatch.setattr(launch_env, "_on_cpu", lambda: True)
    monkeypatch.setattr(launch_env, "_shm_op_cached", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert mod.build_shm_op() is None and not calls and capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert mod.build_shm_op() == "op" and calls == [1]
    assert "building its deepspeed_shm_comm op" in capsys.readouterr().err
