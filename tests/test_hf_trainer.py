"""HF Trainer (TrainingArguments(deepspeed=...)) and accelerate with ds_configs/qft_hf.json, on the CPU."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qft_ds
from qft_ds import checkpoint
from qft_ds.engine import split_config
from qft_ds.config import load_ds_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
HF_CONFIG = ROOT / "ds_configs" / "qft_hf.json"


@pytest.fixture
def corpus(tmp_path):
    from conftest import WORDS
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "c.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g).tolist()))
    return path


def reset_accelerate_state():
    """Trainer and Accelerator share process-wide singletons: reset them between trainers."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def mean(xs):
    return sum(xs) / len(xs)


def test_hf_trainer_trains_with_int8_state(tiny_model_dir, corpus, tmp_path):
    import hf_trainer
    out = tmp_path / "out"
    trainer = hf_trainer.main(["--model", str(tiny_model_dir), "--text", str(corpus), "--output_dir", str(out),
                               "--max_steps", "12", "--lr", "3e-3", "--seq_len", "16"])
    model = trainer.model
    assert isinstance(model.model.layers[0].mlp.up_proj, qft_ds.QLinear) and isinstance(model.lm_head, qft_ds.QLinear)
    opt = trainer.model_wrapped.optimizer
    assert isinstance(opt, qft_ds.QFTLion) and opt.step_count == 12
    assert opt.max_grad_norm == 1.0 and opt.param_groups[0]["betas"] == (0.9, 0.99)  # "auto" clipping; Lion betas
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and mean(losses[-4:]) < mean(losses[:4])
    assert checkpoint.read_meta(out / "checkpoint-12")["optimizer"]["qft"]["step_count"] == 12


def test_accelerate_loop_trains_with_int8_state(tiny_model_dir, corpus):
    import accelerate_qft
    losses = accelerate_qft.main(["--model", str(tiny_model_dir), "--text", str(corpus), "--max_steps", "12",
                                  "--lr", "3e-3", "--seq_len", "16", "--deepspeed_config", str(HF_CONFIG)])
    assert len(losses) == 12 and mean(losses[-4:]) < mean(losses[:4])


def test_hf_config_with_plain_deepspeed_is_a_clear_error():
    with pytest.raises(ValueError, match='"auto" at train_micro_batch_size_per_gpu.*qft_hf.json'):
        split_config(load_ds_config(HF_CONFIG))


def readme_accelerate_command() -> list[str]:
    """The README's `accelerate launch ... --model ...` command, as written: inline code (wrapped over lines)
    or a code block (with backslash continuations); it ends at a backtick or a blank line."""
    text = (ROOT / "README.md").read_text()
    for m in re.finditer(r"accelerate launch ", text):
        end = min(k for k in (text.find("`", m.start()), text.find("\n\n", m.start()), len(text)) if k != -1)
        cmd = shlex.split(text[m.start():end].replace("\\\n", " "), comments=True)
        if "--model" in cmd:
            return cmd
    raise AssertionError("the README has no `accelerate launch ... --model ...` command")


def test_readme_accelerate_launch_command_runs_as_written(tiny_model_dir, corpus):
    """The README's command in a clean environment (no launcher variables), from the repo root; only its
    `...` placeholders are filled in and a short run is asked for. On a CPU machine it needs --num_processes;
    one process skips DeepSpeed's shm op build (minutes on a first launch)."""
    from qft_ds.launch_env import LAUNCH_VARS
    cmd = readme_accelerate_command()
    for flag, value in (("--model", tiny_model_dir), ("--text", corpus)):
        assert cmd[cmd.index(flag) + 1] == "..."
        cmd[cmd.index(flag) + 1] = str(value)
    cmd[0] = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or cmd[0]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run([*cmd, "--max_steps", "4", "--lr", "3e-3", "--seq_len", "16"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "step 4: loss" in res.stdout
    assert "deepspeed_shm_comm_op built" not in res.stdout + res.stderr


def _load_plain(path):
    """AutoModelForCausalLM.from_pretrained, asserting that every weight came from the folder."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def _logits(model, vocab=12):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(9))
    return model(input_ids=ids).logits.float()


def test_trainer_save_model_writes_a_checkpoint_that_loads(tiny_model_dir, corpus, tmp_path):
    """Trainer.save_model() under DeepSpeed hands save_pretrained the engine's state dict (int8 internals):
    the folder must still be dense HF weights, the trained ones."""
    import hf_trainer
    trainer = hf_trainer.main(["--model", str(tiny_model_dir), "--text", str(corpus), "--output_dir",
                               str(tmp_path / "out"), "--max_steps", "4", "--lr", "3e-3", "--seq_len", "16"])
    trainer.save_model(str(tmp_path / "final"))
    hf = _load_plain(tmp_path / "final")
    model = trainer.model.eval()
    assert isinstance(model.model.layers[0].mlp.up_proj, qft_ds.QLinear)
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    err = (_logits(hf) - _logits(model)).abs().max().item()
    assert err < 1e-4, err


def test_trl_sft_trainer_save_model_loads(tiny_model_dir, corpus, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    words = corpus.read_text().split()
    data = Dataset.from_dict({"text": [" ".join(words[i:i + 12]) for i in range(0, 480, 12)]})
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), deepspeed=str(HF_CONFIG), max_steps=3,
                         per_device_train_batch_size=4, learning_rate=3e-3, bf16=False, logging_steps=1,
                         save_strategy="no", report_to=[], max_length=16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert isinstance(trainer.model_wrapped.optimizer, qft_ds.QFTLion)
    trainer.save_model(str(tmp_path / "final"))
    hf = _load_plain(tmp_path / "final")
    err = (_logits(hf) - _logits(trainer.model.eval())).abs().max().item()
    assert err < 1e-4, err


def test_hf_trainer_resume_from_its_own_checkpoint_is_exact(tiny_model_dir, corpus, tmp_path):
    """Trainer's save_steps checkpoint (DeepSpeed's format, which holds QFTLion's int8 state through its
    state_dict) resumed with `train(resume_from_checkpoint=...)`: the same losses, lrs, int8 weights and
    momentum as the unbroken run."""
    import hf_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    class StopAt(TrainerCallback):  # the first session ends after step 2 of a 4-step schedule
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = hf_trainer.Blocks(tok, corpus.read_text(), 16)

    def run(out, stop=False, resume=None):
        reset_accelerate_state()
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        targs = TrainingArguments(output_dir=str(out), deepspeed=str(HF_CONFIG), max_steps=4, learning_rate=3e-3,
                                  per_device_train_batch_size=4, lr_scheduler_type="cosine", warmup_steps=1,
                                  weight_decay=0.1, logging_steps=1, save_strategy="steps", save_steps=2,
                                  report_to=[], seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[StopAt()] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    def logged(trainer, key):
        return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=True)
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "checkpoint-4").exists()
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    assert logged(resumed, "loss") == logged(straight, "loss") and len(logged(straight, "loss")) == 4
    assert logged(resumed, "learning_rate") == logged(straight, "learning_rate")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = straight.model_wrapped.optimizer, resumed.model_wrapped.optimizer
    assert isinstance(ob, qft_ds.QFTLion) and oa.step_count == ob.step_count == 4
    ma = [s["m_codes"] for s in oa.state.values() if "m_codes" in s]
    mb = [s["m_codes"] for s in ob.state.values() if "m_codes" in s]
    assert ma and len(ma) == len(mb) and all(torch.equal(x, y) for x, y in zip(ma, mb))


def test_accelerate_save_state_and_load_state_resume_exactly(tiny_model_dir, corpus, tmp_path):
    """accelerate's save_state/load_state under the DeepSpeed plugin (DeepSpeed's checkpoint, holding
    QFTLion's int8 state): 2 steps, save, a fresh Accelerator and model load it, 2 more steps: the unbroken
    4-step run's losses, int8 weights and momentum."""
    import hf_trainer
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = hf_trainer.Blocks(AutoTokenizer.from_pretrained(tiny_model_dir), corpus.read_text(), 16)
    batches = [{k: torch.stack([data[i][k] for i in range(4 * s, 4 * s + 4)]) for k in data[0]} for s in range(4)]

    def session(steps, save=None, load=None):
        reset_accelerate_state()
        acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=str(HF_CONFIG), gradient_clipping=1.0))
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loader = torch.utils.data.DataLoader(data, batch_size=4)  # accelerate reads the micro-batch size here
        model, opt, _ = acc.prepare(model, DummyOptim(model.parameters(), lr=3e-3, weight_decay=0.1), loader)
        if load:
            acc.load_state(str(load))
        losses = []
        for batch in steps:
            loss = model(**batch).loss
            acc.backward(loss)
            losses.append(loss.item())
        if save:
            acc.save_state(str(save))
        return losses, model

    straight, a = session(batches)
    first, _ = session(batches[:2], save=tmp_path / "state")
    second, b = session(batches[2:], load=tmp_path / "state")
    assert first + second == straight
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer, b.optimizer
    assert isinstance(ob, qft_ds.QFTLion) and oa.step_count == ob.step_count == 4
    ma = [s["m_codes"] for s in oa.state.values() if "m_codes" in s]
    mb = [s["m_codes"] for s in ob.state.values() if "m_codes" in s]
    assert ma and all(torch.equal(x, y) for x, y in zip(ma, mb))


@pytest.mark.parametrize("tie", [False, True])
def test_trl_sft_trainer_trains_the_int8_lm_head(tmp_path, corpus, tie):
    """TRL's SFTTrainer projects with `lm_head.weight` itself (its fused LM head), not through the module: the
    int8 head must still get its gradient (it got none: 0 of its momentum codes moved) and, tied, the
    embedding both of its gradients."""
    trl = pytest.importorskip("trl")
    from conftest import WORDS, make_tiny_llama, make_word_tokenizer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    path = tmp_path / "m"
    make_tiny_llama(vocab=len(WORDS) + 2, tie=tie).save_pretrained(path)
    tok = make_word_tokenizer()
    words = corpus.read_text().split()
    data = Dataset.from_dict({"text": [" ".join(words[i:i + 12]) for i in range(0, 480, 12)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), deepspeed=str(HF_CONFIG), max_steps=3,
                         per_device_train_batch_size=4, learning_rate=3e-3, bf16=False, logging_steps=1,
                         save_strategy="no", report_to=[], max_length=16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()  # converts the model (deepspeed.initialize) and trains 3 steps
    head, opt = trainer.model.lm_head, trainer.model_wrapped.optimizer
    assert isinstance(head, qft_ds.QLinear) and isinstance(opt, qft_ds.QFTLion) and opt.step_count == 3
    m = opt.state[head.qweight.anchor]["m_codes"]
    assert (m != 0).float().mean() > 0.3  # the head's gradients reached its momentum
