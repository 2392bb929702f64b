"""`import qft_ds` is light (the CLI starts without torch) and still hooks DeepSpeed whenever it is imported;
DeepSpeed's "Setting accelerator to CPU" is not repeated by the training process under its launcher."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "CROSS_SIZE")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**base, **env},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_the_cli_help_imports_neither_torch_nor_deepspeed():
    out = python("""
        import sys
        from qft_ds.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
        print("loaded:", sorted(m for m in ("torch", "deepspeed", "transformers") if m in sys.modules))
    """).stdout
    assert "usage: qft_ds" in out and "loaded: []" in out


@pytest.mark.parametrize("order", ["qft_ds first", "deepspeed first", "probed first"])
def test_deepspeed_is_hooked_whichever_is_imported_first(order):
    imports = {"qft_ds first": "import qft_ds\nimport deepspeed",
               "deepspeed first": "import deepspeed\nimport qft_ds",
               # transformers' is_deepspeed_available() asks find_spec before anything imports it
               "probed first": "import qft_ds, importlib.util\nimportlib.util.find_spec('deepspeed')\nimport deepspeed"}
    out = python(imports[order] + """
import torch
print("wrapped:", getattr(deepspeed.initialize, "_qft_wrapped", False), hasattr(torch.optim, "QFTLion"))
print("lazy:", qft_ds.initialize is __import__("qft_ds.engine").engine.initialize)
""", DS_ACCELERATOR="cpu").stdout
    assert "wrapped: True True" in out and "lazy: True" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed picks CUDA here: it has no CPU fallback to report")
def test_the_cpu_fallback_line_is_said_once_not_again_under_the_launcher():
    code = "import qft_ds\nimport deepspeed\ndeepspeed.accelerator.get_accelerator()"
    alone = python(code)
    assert (alone.stdout + alone.stderr).count("Setting accelerator to CPU") == 1  # a lone process: said once
    launched = python(code, CROSS_SIZE="1")  # DeepSpeed's launcher sets it, after printing the line twice
    assert "Setting accelerator to CPU" not in launched.stdout + launched.stderr
