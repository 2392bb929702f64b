"""`qft_ds export`: dense HF folders that plain transformers loads, int8 exports, and matching logits."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds import checkpoint
from qft_ds.cli import main
from qft_ds.export import load_int8

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(tiny_model_dir, tmp_path):
    """A tiny LLaMA trained 3 QFT steps (fp32 compute), saved as a checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 5e-3
    cfg["bf16"] = {"enabled": False}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine, opt, _, _ = qft_ds.initialize(model=model, config=cfg)
    for i in range(3):
        x = torch.randint(0, 12, (4, 16), generator=torch.Generator().manual_seed(i))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    ckpt = checkpoint.save(tmp_path / "run", engine, opt, step=3, ds_config=cfg,
                           tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    model.eval()
    return model, ckpt


IDS = torch.randint(0, 12, (2, 12), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits.float()


def test_fp32_export_matches_the_quantized_model(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    model, ckpt = trained
    out = tmp_path / "hf32"
    assert main(["export", str(ckpt.parent), str(out), "--dtype", "fp32"]) == 0  # a run folder: its latest
    assert "exported" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    err = (logits(hf) - logits(model)).abs().max().item()
    assert err < 1e-4, err


def test_bf16_export_loads_and_generates_without_qft_ds(trained, tmp_path):
    model, ckpt = trained
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "qft" not in json.dumps(cfg)
    assert (out / "tokenizer.json").is_file()
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t('the king', return_tensors='pt').input_ids\n"
        "g = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=t.eos_token_id)\n"
        f"x = torch.tensor({IDS.tolist()})\n"
        "print(json.dumps({'dtype': str(m.dtype), 'new': g.shape[1] - ids.shape[1], 'qft': 'qft_ds' in sys.modules,"
        " 'logits': m(input_ids=x).logits.float().tolist()}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16" and got["new"] == 4 and not got["qft"]
    ref = logits(model)
    err = (torch.tensor(got["logits"]) - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item(), err  # bf16 weights and activations throughout
    assert (torch.tensor(got["logits"]).argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_int8_export_round_trips_exactly(trained, tmp_path):
    model, ckpt = trained
    out = tmp_path / "int8"
    assert main(["export", str(ckpt), str(out), "--int8"]) == 0
    loaded = load_int8(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, qft_ds.QLinear)
    assert checkpoint.state_hash(loaded) == checkpoint.state_hash(model)
    assert torch.equal(logits(loaded), logits(model))
    dense = sum(p.numel() for p in model.parameters()) + sum(w.numel for w in qft_ds.quantized_weights(model))
    assert (out / "qft_int8.safetensors").stat().st_size < 1.5 * dense  # about 1 byte per weight, not 4


def test_export_errors_are_clear(trained, tmp_path, capsys):
    _, ckpt = trained
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["export", str(ckpt), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), str(tmp_path / "o"), "--int8", "--dtype", "fp16"])


def test_export_gets_the_umasks_modes_not_private_ones(trained, tmp_path):
    """Others on a shared machine can read an export, as `cp` would allow (mkdtemp alone makes it 0700)."""
    _, ckpt = trained
    old = os.umask(0o022)
    try:
        assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "hf"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert "config.json" in modes and "model.safetensors" in modes and "tokenizer.json" in modes
    assert set(modes.values()) == {0o644}, modes
