"""`"activation_checkpointing": {"cpu_checkpointing": true}` through every way in: train.py, HF Trainer, TRL's
SFTTrainer and accelerate (tests/nn/test_offload.py drives qft_ds.initialize itself).

Each path trains the same tiny model with and without the section: with it, every training forward runs under
the offload and moves bytes, and the losses (and where the client hands back its optimizer, the int8 state) are
those of the run without it, bit for bit. A bad section fails on each path with the error naming the key.
The tiny models' layer inputs are far under the offload's 1 MiB floor, so the floor is lifted (as in
tests/nn/test_offload.py): every saved tensor but the model's state is copied to host memory."""
import json
import sys
from pathlib import Path

import pytest
import torch

import qft_ds
import qft_ds.nn.offload as offload
from qft_ds.checkpoint import state_hash

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
OFFLOAD = {"cpu_checkpointing": True}
STEPS = 3


@pytest.fixture
def forwards(monkeypatch):
    """The HostOffload of each forward run under the offload, in order, with no size floor."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    seen, real_exit = [], offload.HostOffload.__exit__

    def exit_and_record(self, *exc):
        seen.append(self)
        return real_exit(self, *exc)

    monkeypatch.setattr(offload.HostOffload, "__exit__", exit_and_record)
    return seen


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from test_hf_trainer import reset_accelerate_state
    reset_accelerate_state()


def write_config(path: Path, base: str, section=None, qft_gc=True) -> Path:
    """ds_configs/BASE with qft.gradient_checkpointing set to `qft_gc` and the activation_checkpointing section
    (none if None)."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg["qft"]["gradient_checkpointing"] = qft_gc
    if section is not None:
        cfg["activation_checkpointing"] = section
    path.write_text(json.dumps(cfg))
    return path


# Each runner trains STEPS steps on one path and returns (losses, int8 state hash or None).

def run_train_py(cfg_path, model_dir, text, out):
    import train
    train.main(["--deepspeed", str(cfg_path), "--model", str(model_dir), "--dataset", str(text), "--output_dir",
                str(out), "--max_steps", str(STEPS), "--seq_len", "16", "--eval_blocks", "2"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and not any(r["skipped"] for r in rows)
    return [r["loss"] for r in rows], json.loads((out / "summary.json").read_text())["state_sha256"]


def run_hf_trainer(cfg_path, model_dir, text, out, activation_checkpointing=False):
    import hf_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from test_hf_trainer import reset_accelerate_state
    reset_accelerate_state()
    data = hf_trainer.Blocks(AutoTokenizer.from_pretrained(model_dir), text.read_text(), 16)
    targs = TrainingArguments(output_dir=str(out), deepspeed=str(cfg_path), max_steps=STEPS, learning_rate=3e-3,
                              per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[],
                              seed=0, activation_checkpointing=activation_checkpointing)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    return logged_losses(trainer), trainer_state(trainer)


def run_sft_trainer(cfg_path, model_dir, text, out):
    """SFTConfig's own default, gradient_checkpointing=True (Trainer's activation checkpointing), left as it is."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from test_hf_trainer import reset_accelerate_state
    reset_accelerate_state()
    words = text.read_text().split()
    data = Dataset.from_dict({"text": [" ".join(words[i:i + 12]) for i in range(0, 480, 12)]})
    args = trl.SFTConfig(output_dir=str(out), deepspeed=str(cfg_path), max_steps=STEPS, learning_rate=3e-3,
                         per_device_train_batch_size=4, bf16=False, logging_steps=1, save_strategy="no",
                         report_to=[], max_length=16, seed=0)
    assert args.activation_checkpointing
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    return logged_losses(trainer), trainer_state(trainer)


def run_accelerate(cfg_path, model_dir, text, out):
    """examples/accelerate_qft.py, the documented loop (it hands back only the losses)."""
    import accelerate_qft
    from test_hf_trainer import reset_accelerate_state
    reset_accelerate_state()
    return accelerate_qft.main(["--model", str(model_dir), "--text", str(text), "--max_steps", str(STEPS),
                                "--lr", "3e-3", "--seq_len", "16", "--deepspeed_config", str(cfg_path)]), None


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def trainer_state(trainer):
    opt = trainer.model_wrapped.optimizer
    assert isinstance(opt, qft_ds.QFTLion) and opt.step_count == STEPS
    return state_hash(trainer.model, opt)


# path -> (runner, base config)
PATHS = {"train.py": (run_train_py, "qft.json"), "hf_trainer": (run_hf_trainer, "qft_hf.json"),
         "sft_trainer": (run_sft_trainer, "qft_hf.json"), "accelerate": (run_accelerate, "qft_hf.json")}


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """write_config in tmp_path; for train.py's qft.json also an lr whose int8 weights move in three steps, a
    three-step schedule, and a data cache of the test's own."""
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))

    def config(base, name, section):
        path = write_config(tmp_path / name, base, section)
        if base == "qft.json":
            cfg = json.loads(path.read_text())
            cfg["optimizer"]["params"]["lr"] = 3e-3
            cfg["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=1)
            path.write_text(json.dumps(cfg))
        return path
    return config


@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_offloads_and_trains_bit_identically(path, forwards, configs, tiny_model_dir, tiny_text_file,
                                                      tmp_path):
    runner, base = PATHS[path]
    data = (tiny_model_dir, tiny_text_file)
    want_losses, want_state = runner(configs(base, "plain.json", None), *data, tmp_path / "a")
    assert forwards == []  # no section, no offload
    got_losses, got_state = runner(configs(base, "offload.json", OFFLOAD), *data, tmp_path / "b")
    # every training forward ran under the offload and copied something (evaluation runs without grad: none)
    assert len(forwards) == STEPS and all(f.offloaded_bytes > 0 for f in forwards)
    assert all(r() is None for f in forwards for r in f.copies)  # backward freed every host copy
    assert len(got_losses) == STEPS and got_losses == want_losses
    assert got_state == want_state


def test_trainer_checkpointing_with_the_qft_key_trains_the_same(forwards, tiny_model_dir, tiny_text_file, tmp_path):
    """TrainingArguments(activation_checkpointing=True) (TRL's default) beside qft.gradient_checkpointing: Trainer
    checkpoints the layers first, qft_ds re-enables them with its own reentrant choice; the offload runs and the
    run is the one without Trainer's flag and without the section."""
    plain = write_config(tmp_path / "plain.json", "qft_hf.json")
    want = run_hf_trainer(plain, tiny_model_dir, tiny_text_file, tmp_path / "a")
    cfg = write_config(tmp_path / "offload.json", "qft_hf.json", OFFLOAD)
    got = run_hf_trainer(cfg, tiny_model_dir, tiny_text_file, tmp_path / "b", activation_checkpointing=True)
    assert len(forwards) == STEPS and all(f.offloaded_bytes > 0 for f in forwards)
    assert got == want


BAD = {
    "partition_activations": ({**OFFLOAD, "partition_activations": True}, True,
                              r"'activation_checkpointing\.partition_activations' is not supported by qft_ds"),
    "no_gradient_checkpointing": (OFFLOAD, False, r"'activation_checkpointing\.cpu_checkpointing' .*needs "
                                                  r"'qft\.gradient_checkpointing': true"),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("path", list(PATHS))
def test_a_bad_section_fails_on_each_path_naming_the_key(path, bad, forwards, tiny_model_dir, tiny_text_file, tmp_path,
                                                         monkeypatch):
    """Before any step, with qft_ds's message (not a DeepSpeed traceback); train.py exits with it as its one
    line. On the Trainer paths the model is checkpointed by Trainer (TRL's default; asked for on HF Trainer's):
    that is not the config key, and the message says to set it."""
    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    runner, base = PATHS[path]
    section, qft_gc, match = BAD[bad]
    cfg = write_config(tmp_path / "bad.json", base, section, qft_gc=qft_gc)
    kwargs = {"activation_checkpointing": True} if path == "hf_trainer" else {}
    error = SystemExit if path == "train.py" else ValueError
    with pytest.raises(error) as info:
        runner(cfg, tiny_model_dir, tiny_text_file, tmp_path / "out", **kwargs)
    assert info.match(match)
    if path == "train.py":  # the one line names the file
        assert str(cfg) in str(info.value)
    if bad == "no_gradient_checkpointing" and path in ("hf_trainer", "sft_trainer"):
        assert info.match(r"gradient_checkpointing=True.*does not")
    assert forwards == []


@pytest.mark.parametrize("qft_gc", [True, False])
def test_qft_gradient_checkpointing_replaces_the_callers_checkpointing(qft_gc, tmp_path, caplog):
    """What docs/usage.md says of Trainer's checkpointing: with qft.gradient_checkpointing, qft_ds checkpoints
    every layer again with its own reentrant choice (Trainer's every_n_layers and transformers' `offload` no
    longer apply); without it, the model keeps the caller's set-up."""
    from conftest import make_tiny_llama
    model = make_tiny_llama(layers=4)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                          every_n_layers=2, offload=True)

    def setup():
        return [(layer.gradient_checkpointing, layer._gradient_checkpointing_func) for layer in model.model.layers]

    callers = setup()
    assert [on for on, _ in callers] == [True, False, True, False]
    with caplog.at_level("WARNING", logger="qft_ds"):
        qft_ds.initialize(model=model, config=str(write_config(tmp_path / "c.json", "qft.json", qft_gc=qft_gc)))
    replaced = [r.getMessage() for r in caplog.records if "replaces the model's own checkpointing" in r.getMessage()]
    if not qft_gc:
        assert setup() == callers and not replaced
        return
    assert len(replaced) == 1 and "2 of 4 layers" in replaced[0], replaced  # said once, not silently
    for on, fn in setup():
        assert on and fn.func is torch.utils.checkpoint.checkpoint and fn.keywords == {"use_reentrant": True}
