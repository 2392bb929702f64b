"""ds_configs/qft_big.json, the config docs/usage.md gives for the largest model a GPU fits: train.py streams a
sharded checkpoint with it, with int4 momentum and gradient checkpointing on, and trains."""
import json
import sys
from pathlib import Path

from conftest import WORDS, make_tiny_llama, make_word_tokenizer
from qft_ds import engine, hub
from qft_ds.nn import streaming

ROOT = Path(__file__).resolve().parents[1]


def test_qft_big_config_streams_a_sharded_model_with_int4_momentum_and_checkpointing(tmp_path, tiny_text_file,
                                                                                      monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    monkeypatch.setenv("QFT_DS_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "sharded"
    make_tiny_llama(vocab=len(WORDS) + 2).save_pretrained(model_dir, max_shard_size="30KB")
    make_word_tokenizer().save_pretrained(model_dir)
    assert streaming.is_sharded_checkpoint(model_dir)
    skeletons, checkpointed, chunked = [], [], []
    load, enable, install = hub.load_model_and_tokenizer, engine.enable_checkpointing, engine.install_chunked_loss

    def spy_load(*a, **k):
        model, tok = load(*a, **k)
        skeletons.append(streaming.is_skeleton(model))
        return model, tok

    def spy_enable(model, reentrant):
        checkpointed.append(reentrant)
        return enable(model, reentrant)
    monkeypatch.setattr(hub, "load_model_and_tokenizer", spy_load)
    monkeypatch.setattr(engine, "enable_checkpointing", spy_enable)
    monkeypatch.setattr(engine, "install_chunked_loss", lambda m, n: (chunked.append(n), install(m, n))[1])
    out = tmp_path / "run"
    train.main(["--deepspeed", str(ROOT / "ds_configs" / "qft_big.json"), "--model", str(model_dir),
                "--dataset", str(tiny_text_file), "--output_dir", str(out), "--max_steps", "3", "--seq_len", "16",
                "--eval_blocks", "2", "--no-save_final"])
    model_line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model: "))
    assert "momentum: int4" in model_line
    assert skeletons == [True]  # streamed, not loaded whole
    assert checkpointed == [True]  # the reentrant checkpoint, qft's default
    assert chunked == [256]  # the loss over 256-token chunks: no [tokens, vocab] fp32 logits
    losses = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(x == x for x in losses)
