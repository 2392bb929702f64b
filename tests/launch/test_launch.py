"""launch/: each script's dry run builds a well-formed command; bad inputs fail with a clear message; and the
single-node script, the multi-node script's torchrun form and the SLURM script (srun shimmed) really train
a tiny model on the CPU, one process each."""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
BASH = shutil.which("bash")
EXAMPLE_HOSTFILE = "launch/hostfile.example"
CONFIG = "ds_configs/qft.json"
# what the launchers set themselves; the conftest sets them for in-process DeepSpeed
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
SCRIPT_VARS = ("CONFIG", "NUM_GPUS", "NUM_NODES", "HOSTFILE", "LAUNCHER", "RDZV_ID", "DRY_RUN", "GPUS_PER_NODE",
               "QFT_ROOT", "NCCL_NVLS_ENABLE")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in RANK_VARS + SCRIPT_VARS and not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # deepspeed, torchrun
    env.update(extra)
    return env


def run(script: str, *args, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True, cwd=ROOT.parent,
                          env=env if env is not None else clean_env(), timeout=timeout)


def dry_run(script: str, *args, env=None) -> list[str]:
    """The printed command as argv: exactly one line on stdout, parsed as a shell would."""
    r = run(script, "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0])


def split_command(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """`env K=V... PROG OPTS... train.py ARGS...` -> (env assignments, [PROG, OPTS...], [train.py, ARGS...])."""
    assert argv[0] == "env", argv
    i, env = 1, {}
    while "=" in argv[i] and not argv[i].startswith("-"):
        key, value = argv[i].split("=", 1)
        env[key] = value
        i += 1
    assert argv.count("train.py") == 1, argv
    cut = argv.index("train.py")
    return env, argv[i:cut], argv[cut:]


def flags(opts: list[str]) -> dict:
    """--flag VALUE and --flag=VALUE pairs of a launcher's own options (every one of ours takes a value)."""
    out, i = {}, 0
    while i < len(opts):
        assert opts[i].startswith("--"), f"stray token {opts[i]!r} in {opts}"
        if "=" in opts[i]:
            key, value = opts[i].split("=", 1)
            i += 1
        else:
            key, value = opts[i], opts[i + 1]
            assert not value.startswith("--"), f"{key} has no value in {opts}"
            i += 2
        assert key not in out, f"{key} given twice"
        out[key] = value
    return out


def check_train(train: list[str], config=CONFIG, extra=()):
    assert train[:3] == ["train.py", "--deepspeed", config]
    assert (ROOT / train[0]).is_file() and (ROOT / config).is_file()  # the scripts run from the repo root
    assert train[3:] == list(extra)


def check_failure(r: subprocess.CompletedProcess, message: str):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert r.stdout == ""  # nothing that looks like a command to run


# ---------------------------------------------------------------- single node

def test_single_node_defaults():
    env, launcher, train = split_command(dry_run("single_node.sh"))
    assert env == {"NCCL_NVLS_ENABLE": "0"}
    assert launcher[0] == "deepspeed"
    assert flags(launcher[1:]) == {"--num_gpus": "1", "--master_port": "29500"}
    check_train(train)


def test_single_node_options_and_train_args(tmp_path):
    cfg = tmp_path / "my config.json"
    cfg.write_text("{}")
    extra = ["--max_steps", "10", "--dataset", "a file with spaces.txt"]
    env, launcher, train = split_command(
        dry_run("single_node.sh", "--gpus", "8", "--config", str(cfg), "--master_port", "29611", "--", *extra))
    assert flags(launcher[1:]) == {"--num_gpus": "8", "--master_port": "29611"}
    check_train(train, config=str(cfg), extra=extra)


def test_single_node_reads_environment():
    r = run("single_node.sh", env=clean_env(DRY_RUN="1", NUM_GPUS="2", CONFIG="ds_configs/qft_hf.json",
                                            NCCL_NVLS_ENABLE="1"))
    assert r.returncode == 0, r.stderr
    env, launcher, train = split_command(shlex.split(r.stdout))
    assert env == {"NCCL_NVLS_ENABLE": "1"}  # an explicit choice is kept
    assert flags(launcher[1:])["--num_gpus"] == "2"
    check_train(train, config="ds_configs/qft_hf.json")


@pytest.mark.parametrize("args, message", [
    (["--gpus", "x"], "--gpus/NUM_GPUS must be a positive integer, got 'x'"),
    (["--gpus", "0"], "--gpus/NUM_GPUS must be a positive integer, got '0'"),
    (["--gpus"], "--gpus needs a value"),
    (["--config", "nope.json"], "config file not found: nope.json"),
    (["--master_port", "70000"], "--master_port/MASTER_PORT must be a port number"),
    (["--max_steps", "3"], "unknown option '--max_steps' (train.py's own options go after '--')"),
    (["--", "--deepspeed", "other.json"], "pass the config with --config, not --deepspeed"),
])
def test_single_node_bad_input(args, message):
    check_failure(run("single_node.sh", "--dry-run", *args), message)


def test_dry_run_value_is_checked():
    check_failure(run("single_node.sh", env=clean_env(DRY_RUN="yes")), "DRY_RUN must be 0 or 1, got 'yes'")


# ---------------------------------------------------------------- multi node

def test_multi_node_deepspeed_launcher():
    env, launcher, train = split_command(dry_run("multi_node.sh", "--hostfile", EXAMPLE_HOSTFILE, "--", "--seq_len", "256"))
    assert env == {"NCCL_NVLS_ENABLE": "0"}
    assert launcher[0] == "deepspeed"
    # master_addr defaults to the first host; no --num_gpus: every slot of the hostfile is used
    assert flags(launcher[1:]) == {"--hostfile": EXAMPLE_HOSTFILE, "--master_addr": "node-0",
                                   "--master_port": "29500", "--num_nodes": "2"}
    assert (ROOT / EXAMPLE_HOSTFILE).is_file()
    check_train(train, extra=["--seq_len", "256"])


def test_multi_node_options():
    _, launcher, _ = split_command(dry_run("multi_node.sh", "--hostfile", EXAMPLE_HOSTFILE, "--num_nodes", "1",
                                           "--gpus", "4", "--master_addr", "10.1.2.3", "--master_port", "6000"))
    assert flags(launcher[1:]) == {"--hostfile": EXAMPLE_HOSTFILE, "--master_addr": "10.1.2.3",
                                   "--master_port": "6000", "--num_nodes": "1", "--num_gpus": "4"}


def test_multi_node_torchrun():
    argv = dry_run("multi_node.sh", "--hostfile", EXAMPLE_HOSTFILE, "--launcher", "torchrun", "--",
                   "--max_steps", "5")
    env, launcher, train = split_command(argv)
    assert env == {"NCCL_NVLS_ENABLE": "0"}
    assert launcher[0] == "torchrun"
    assert flags(launcher[1:]) == {"--nnodes": "2", "--nproc_per_node": "8", "--rdzv_backend": "c10d",
                                   "--rdzv_endpoint": "node-0:29500", "--rdzv_id": "qft"}
    check_train(train, extra=["--max_steps", "5"])


def write(tmp_path, text) -> str:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("hostfile, args, message", [
    (None, [], "no hostfile: pass --hostfile PATH"),
    ("missing", [], "hostfile not found: "),
    ("a slots=2\nb\n", [], "line 2: expected 'HOSTNAME slots=N', got 'b'"),
    ("a slots=2\n# comment\na slots=2\n", [], "line 3: host 'a' is listed twice"),
    ("a slots=0\n", [], "line 1: slots must be a positive integer, got '0'"),
    ("# nothing\n\n", [], "lists no host"),
    ("a slots=2\nb slots=4\n", ["--num_nodes", "3"], "--num_nodes 3, but "),
    ("a slots=2\nb slots=4\n", ["--gpus", "3"], "--gpus 3, but a has slots=2"),
    ("a slots=2\nb slots=4\n", ["--launcher", "torchrun"], "torchrun needs the same GPU count on every node"),
    ("a slots=2\n", ["--launcher", "mpirun"], "--launcher/LAUNCHER must be deepspeed or torchrun, got 'mpirun'"),
    ("a slots=2\n", ["--master_port", "http"], "--master_port/MASTER_PORT must be a port number"),
    ("a slots=2\n", ["--config", "ds_configs/none.json"], "config file not found: ds_configs/none.json"),
])
def test_multi_node_bad_input(tmp_path, hostfile, args, message):
    if hostfile is not None:
        args = ["--hostfile", str(tmp_path / "nope") if hostfile == "missing" else write(tmp_path, hostfile), *args]
    check_failure(run("multi_node.sh", "--dry-run", *args), message)


def test_torchrun_uneven_slots_ok_with_gpus(tmp_path):
    _, launcher, _ = split_command(dry_run("multi_node.sh", "--hostfile", write(tmp_path, "a slots=2\nb slots=4\n"),
                                           "--launcher", "torchrun", "--gpus", "2"))
    assert flags(launcher[1:])["--nproc_per_node"] == "2"


# ---------------------------------------------------------------- SLURM

def fake_bin(tmp_path, hosts=("gpu01", "gpu02")) -> Path:
    """A `scontrol` that expands the node list as SLURM would for a two-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n"
                        + "".join(f"echo {h}\n" for h in hosts))
    scontrol.chmod(0o755)
    return bin_dir


def slurm_env(tmp_path, **extra) -> dict:
    env = clean_env(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4321", SLURM_JOB_NODELIST="gpu[01-02]",
                    SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="16")
    env["PATH"] = f"{fake_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def test_slurm_rendezvous(tmp_path):
    argv = dry_run("slurm.sbatch", "--", "--max_steps", "100", env=slurm_env(tmp_path))
    env, launcher, train = split_command(argv)
    assert env == {"NCCL_NVLS_ENABLE": "0"}
    cut = launcher.index("torchrun")
    assert launcher[0] == "srun"
    assert flags(launcher[1:cut]) == {"--nodes": "2", "--ntasks-per-node": "1", "--kill-on-bad-exit": "1",
                                      "--cpus-per-task": "16"}
    assert flags(launcher[cut + 1:]) == {"--nnodes": "2", "--nproc_per_node": "8", "--rdzv_backend": "c10d",
                                         "--rdzv_endpoint": f"gpu01:{20000 + 4321 % 20000}", "--rdzv_id": "4321"}
    check_train(train, extra=["--max_steps", "100"])


def test_slurm_gpu_count_and_port_sources(tmp_path):
    env = slurm_env(tmp_path, SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="29999")
    del env["SLURM_GPUS_ON_NODE"], env["SLURM_CPUS_PER_TASK"]
    _, launcher, train = split_command(dry_run("slurm.sbatch", "--config", "ds_configs/qft_hf.json", env=env))
    check_train(train, config="ds_configs/qft_hf.json")
    assert "--cpus-per-task" not in launcher
    opts = flags(launcher[launcher.index("torchrun") + 1:])
    assert opts["--nproc_per_node"] == "4" and opts["--rdzv_endpoint"] == "gpu01:29999"
    env["GPUS_PER_NODE"] = "2"  # an explicit count wins over SLURM's
    _, launcher, _ = split_command(dry_run("slurm.sbatch", env=env))
    assert flags(launcher[launcher.index("torchrun") + 1:])["--nproc_per_node"] == "2"


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set: run this under SLURM"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_JOB_NUM_NODES": "3"}, "scontrol lists 2 host(s) for 'gpu[01-02]', SLURM_JOB_NUM_NODES is 3"),
    ({"SLURM_GPUS_ON_NODE": None}, "no GPU count per node: submit with --gpus-per-node N"),
    ({"SLURM_GPUS_ON_NODE": "eight"}, "must be a positive integer, got 'eight'"),
    ({"SLURM_CPUS_PER_TASK": "all"}, "SLURM_CPUS_PER_TASK must be a positive integer, got 'all'"),
    ({"SLURM_SUBMIT_DIR": "/"}, "cannot find the repo"),
    ({"CONFIG": "ds_configs/qft_zero9.json"}, "config file not found: ds_configs/qft_zero9.json"),
    ({"PATH": "no-scontrol-here"}, "scontrol not found: run this under SLURM"),
])
def test_slurm_bad_input(tmp_path, change, message):
    env = slurm_env(tmp_path)
    for key, value in change.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    check_failure(run("slurm.sbatch", "--dry-run", env=env), message)


# ---------------------------------------------------------------- every script

@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_help(script):
    r = run(script, "--help")
    assert r.returncode == 0 and f"launch/{script}" in r.stdout


def test_scripts_are_strict_and_shellcheck_clean():
    scripts = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
    for path in scripts:
        if path.name != "lib.sh":  # sourced, so it inherits the caller's strict mode
            assert "set -euo pipefail" in path.read_text(), path
            assert os.access(path, os.X_OK), f"{path} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); strict mode checked above")
    r = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(ROOT)) for p in scripts]], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# ---------------------------------------------------------------- real runs on the CPU, one process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_run(tiny_model_dir, tiny_text_file, tmp_path):
    """(config path, train.py args) for 3 steps on the tiny model: about 10 s through a launcher."""
    cfg = json.loads((ROOT / CONFIG).read_text())
    cfg["scheduler"]["params"].update(total_num_steps=3, warmup_num_steps=1)
    cfg_path = tmp_path / "qft.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--output_dir", str(out),
            "--seq_len", "16", "--eval_blocks", "4"]
    return str(cfg_path), args, out


def check_trained(r: subprocess.CompletedProcess, out: Path, ranks=1):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] == 3 * ranks * 4 * 16  # micro-batch 4 per rank
    assert (out / "checkpoint-3" / "meta.json").is_file()


def real_env(tmp_path, **extra) -> dict:
    return clean_env(QFT_DS_CACHE=str(tmp_path / "cache"), DS_ACCELERATOR="cpu", **extra)


def test_single_node_real_run(tiny_run, tmp_path):
    cfg, args, out = tiny_run
    r = run("single_node.sh", "--gpus", "1", "--config", cfg, "--master_port", str(free_port()), "--", *args,
            env=real_env(tmp_path), timeout=120)
    check_trained(r, out)
    assert "NCCL_NVLS_ENABLE=0" in r.stdout + r.stderr  # the launcher logs the NCCL variables it passes on


def test_multi_node_torchrun_real_run(tiny_run, tmp_path):
    """The torchrun form on one node (127.0.0.1, one slot): the c10d rendezvous really forms."""
    cfg, args, out = tiny_run
    hostfile = write(tmp_path, "127.0.0.1 slots=1\n")
    r = run("multi_node.sh", "--hostfile", hostfile, "--launcher", "torchrun", "--master_port", str(free_port()),
            "--config", cfg, "--", *args, env=real_env(tmp_path), timeout=120)
    check_trained(r, out)


def test_slurm_real_run_with_srun_shim(tiny_run, tmp_path):
    """No SLURM here: `srun` is a shim that runs its task once on this machine (a one-node job), so what runs
    for real is the script's rendezvous set-up and the torchrun command it builds."""
    cfg, args, out = tiny_run
    bin_dir = fake_bin(tmp_path, hosts=("127.0.0.1",))
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\nwhile [[ "$1" != torchrun ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = real_env(tmp_path, SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="127.0.0.1",
                   SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    r = run("slurm.sbatch", "--config", cfg, "--", *args, env=env, timeout=120)
    check_trained(r, out)


@pytest.mark.skipif(os.environ.get("QFT_DS_LAUNCH_TESTS") != "1",
                    reason="two ranks JIT-build DeepSpeed's shm op (about 34 s cold); set QFT_DS_LAUNCH_TESTS=1")
def test_single_node_two_processes_real_run(tiny_run, tmp_path):
    """--gpus 2 on the CPU: two gloo ranks, plain data parallel (stage 0)."""
    cfg, args, out = tiny_run
    r = run("single_node.sh", "--gpus", "2", "--config", cfg, "--master_port", str(free_port()), "--", *args,
            env=real_env(tmp_path), timeout=300)
    check_trained(r, out, ranks=2)
