"""The chunked causal-LM loss ("qft": {"chunked_loss": N}) against HF's own loss on the same int8 model:
loss and every gradient (tied and untied heads, -100 labels, chunks that do not divide the tokens), and the
int8 state after training steps in both flows. The memory bound is tested in tests/bench/.

Why tolerances and not bit-equality: each token's logits, loss and input gradient come from the same ops,
but the loss (and, in the `sum` way, the head's weight gradient) is summed chunk by chunk, another order of
float additions than one mean / one matmul over all tokens (differences of a few fp32 ulps, which then
reach every earlier layer through the hidden states' gradient). Both ways of making the head's weight
gradient (`keep`, `sum`: _ChunkedHeadLoss) are forced in turn."""
import copy
import json
from pathlib import Path

import pytest
import torch

import qft_ds
from conftest import make_tiny_llama
from qft_ds.config import QFTConfig
import qft_ds.nn.chunked_loss as chunked_loss
from qft_ds.nn.chunked_loss import chunked_causal_lm_loss, install_chunked_loss
from qft_ds.nn.convert import convert_model, quantized_weights

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300  # not the hidden size (64): a [*, vocab] tensor is then surely logits


def converted(tie: bool):
    model = make_tiny_llama(vocab=VOCAB, tie=tie)
    convert_model(model)
    return model


def batch(ignore_prompt: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels = ids.clone()
    if ignore_prompt:  # instruction data: prompt tokens and padding carry -100
        labels[0, :4] = -100
        labels[1, 7:] = -100
        labels[2, 1:3] = -100
    return ids, labels


def grads(model):
    """Every gradient a backward produced: the quantized weights' (delivered, no optimizer attached)
    and the float parameters'."""
    out = {f"q{i}": w.grad.clone() for i, w in enumerate(quantized_weights(model))}
    out.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.fixture(params=["keep", "sum"])
def way(request, monkeypatch):
    """Force one way of making the head's weight gradient (else chosen by bytes: keeps_logits_grad)."""
    monkeypatch.setattr(chunked_loss, "keeps_logits_grad", lambda *a: request.param == "keep")
    return request.param


def test_the_cheaper_way_is_chosen():
    # 2048 tokens at hidden 4096: a bf16 [2048, vocab] < an fp32 [vocab, 4096]; 16k tokens: not
    assert chunked_loss.keeps_logits_grad(2048, 4096, torch.bfloat16)
    assert not chunked_loss.keeps_logits_grad(8 * 2048, 4096, torch.bfloat16)
    assert not chunked_loss.keeps_logits_grad(4096, 4096, torch.float32)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk,ignore_prompt", [(5, True), (7, False), (1, True), (64, True)])
def test_loss_and_every_gradient_match_unchunked(tie, chunk, ignore_prompt, way):
    ref = converted(tie)
    model = install_chunked_loss(copy.deepcopy(ref), chunk)
    ids, labels = batch(ignore_prompt)
    want = ref(input_ids=ids, labels=labels)
    got = model(input_ids=ids, labels=labels)
    assert got.logits is None and "logits" not in got.keys()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    want.loss.backward()
    got.loss.backward()
    g_want, g_got = grads(ref), grads(model)
    assert g_want.keys() == g_got.keys() and len(g_want) > 10
    for name, g in g_want.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_got[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)


def test_positional_labels_and_calls_without_labels():
    ref = converted(tie=True)
    model = install_chunked_loss(copy.deepcopy(ref), 4)
    ids, labels = batch(True)
    # forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
    got = model(ids, None, None, None, None, labels)
    torch.testing.assert_close(got.loss, ref(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=0)
    plain = model(input_ids=ids)  # no labels: the model's own forward, logits and all
    assert torch.equal(plain.logits, ref(input_ids=ids).logits) and plain.loss is None
    with torch.no_grad():  # evaluation (train.py's held-out loss): the forward's loss-only branch
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss,
                                   rtol=1e-6, atol=0)


def test_num_items_in_batch_and_shift_labels_as_hf():
    """Trainer passes num_items_in_batch (sum / count over the whole accumulated batch); sequence
    parallelism passes labels already shifted."""
    ref = converted(tie=False)
    ids, labels = batch(True)
    hidden = ref.model(input_ids=ids).last_hidden_state
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    for kwargs in ({"num_items_in_batch": torch.tensor(57)}, {"shift_labels": shifted}):
        want = ref.loss_function(logits=ref.lm_head(hidden), labels=labels, vocab_size=VOCAB, **kwargs)
        got = chunked_causal_lm_loss(hidden, labels, ref.lm_head, 6, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_every_label_ignored_gives_nan_as_hf():
    ref = converted(tie=True)
    model = install_chunked_loss(copy.deepcopy(ref), 4)
    ids, labels = batch(False)
    labels[:] = -100
    assert ref(input_ids=ids, labels=labels).loss.isnan()
    assert model(input_ids=ids, labels=labels).loss.isnan()  # the engine then skips the step


def test_refusals_name_the_problem():
    model = make_tiny_llama(vocab=VOCAB)
    with pytest.raises(ValueError, match="converted to int8"):  # an fp32 nn.Linear head
        install_chunked_loss(model, 8)
    convert_model(model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        install_chunked_loss(model, 8)
    model.config.final_logit_softcapping = None
    install_chunked_loss(model, 8)
    ids, labels = batch(False)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="chunked_loss"):
        QFTConfig.from_dict({"chunked_loss": -1})
    with pytest.raises(ValueError, match="method"):
        QFTConfig.from_dict({"method": "peqa", "chunked_loss": 8})


def ds_config(chunk: int, gas: int, **qft):
    cfg = json.loads((ROOT / "ds_configs" / "qft.json").read_text())  # bf16 compute, clipping 1.0
    cfg["optimizer"]["params"]["lr"] = 2e-3
    cfg["scheduler"]["params"].update(total_num_steps=20, warmup_num_steps=1)
    cfg["gradient_accumulation_steps"] = gas
    cfg["qft"].update(chunked_loss=chunk, **qft)
    return cfg


def train(tie: bool, chunk: int, gas: int, steps: int = 3, **qft):
    engine, opt, _, _ = qft_ds.initialize(model=make_tiny_llama(vocab=VOCAB, tie=tie),
                                          config=ds_config(chunk, gas, **qft))
    ids, labels = batch(True)
    losses = []
    for _ in range(steps * gas):
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = [(w.codes.clone(), opt.state[w.anchor]["m_codes"].clone()) for w in opt.weights]
    return losses, state, opt


def differing_codes(got, want) -> tuple[int, int]:
    """(int8 weight and momentum codes that differ, codes in all) between two [(codes, m_codes)] lists."""
    differ = total = 0
    for (w_got, m_got), (w_want, m_want) in zip(got, want, strict=True):
        differ += int((w_got != w_want).sum() + (m_got != m_want).sum())
        total += w_got.numel() + m_got.numel()
    return differ, total


@pytest.mark.parametrize("gas", [1, 2], ids=["fused", "stack"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_training_steps_give_the_unchunked_int8_state(gas, tie, way):
    """bf16 compute, clipping's norm pass (a second backward through the chunked loss at step 0), 3 steps.
    The head's gradient is made by the unchunked matmul (`keep`), or summed in fp32 and rounded to bf16 once
    as that matmul does (`sum`), so the bf16 gradients agree unless an fp32 sum lands on a bf16 rounding
    boundary; Lion's sign and the keyed
    stochastic rounding then give the same int8 weights and momentum (every code equal here; the bound
    leaves room for such a tie on another BLAS)."""
    want_losses, want, opt = train(tie, 0, gas)
    got_losses, got, chunked_opt = train(tie, 5, gas)
    assert chunked_opt.flow.mode == opt.flow.mode == ("fused" if gas == 1 else "stack")
    assert chunked_opt.step_count == opt.step_count == 3
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    differ, total = differing_codes(got, want)
    assert differ <= total * 1e-4, f"{differ} of {total} int8 codes differ"
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(got, train(tie, 5, gas, steps=1)[1]))  # it trained


def test_hf_trainer_with_chunked_loss_trains_as_unchunked(tiny_model_dir, tmp_path, monkeypatch):
    """HF Trainer through DeepSpeed (qft_hf.json): it passes num_items_in_batch to the model, which the
    chunked loss uses as HF's loss does; the logged losses and the int8 state match the unchunked run."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import qft_ds.nn.chunked_loss as chunked
    seen = []
    real = chunked.chunked_causal_lm_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked, "chunked_causal_lm_loss", spy)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (8, 16), generator=g)
    data = [{"input_ids": x, "labels": torch.where(torch.arange(16) < 4, -100, x)} for x in ids]

    def run(chunk):
        for state in (AcceleratorState, GradientState, PartialState):  # process-wide singletons
            state._reset_state(*(True,) if state is AcceleratorState else ())
        cfg = json.loads((ROOT / "ds_configs" / "qft_hf.json").read_text())
        cfg["qft"]["chunked_loss"] = chunk
        path = tmp_path / f"ds{chunk}.json"
        path.write_text(json.dumps(cfg))
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        targs = TrainingArguments(output_dir=str(tmp_path / f"out{chunk}"), deepspeed=str(path), max_steps=3,
                                  learning_rate=3e-3, per_device_train_batch_size=4, logging_steps=1,
                                  save_strategy="no", report_to=[], seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data)
        trainer.train()
        opt = trainer.model_wrapped.optimizer
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        return losses, [(w.codes.clone(), opt.state[w.anchor]["m_codes"].clone()) for w in opt.weights]

    want_losses, want = run(0)
    assert not seen
    got_losses, got = run(5)
    assert len(seen) == 3 and all(n is not None for n in seen)  # one call per step, with Trainer's count
    assert len(got_losses) == 3
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    differ, total = differing_codes(got, want)
    assert differ <= total * 1e-4, f"{differ} of {total} int8 codes differ"  # 1 of 75k here: a momentum tie


@pytest.mark.gpu
def test_cuda_bf16_head_gradient_sums_in_fp32():
    """CUDA's bf16 path (addmm with an fp32 out_dtype, which the CPU cannot run) against exact products of
    the same bf16 values: equal to fp32 rounding, in fp32, summed in place."""
    from qft_ds.nn.chunked_loss import add_mm_fp32
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(4096, 256, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    acc = torch.zeros(4096, 4096, device="cuda")
    exact = torch.zeros_like(acc)
    for i in range(0, 256, 64):  # four chunks of tokens
        add_mm_fp32(acc, a[:, i:i + 64], b[:, i:i + 64].t())
        exact += (a[:, i:i + 64].double() @ b[:, i:i + 64].t().double()).float()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reentrant", [True, False])
def test_with_gradient_checkpointing(reentrant, way):
    """Checkpointed decoder layers: the hidden state the decoder hook catches is the checkpointed model's,
    and the recompute in backward runs after the chunked loss's gradients are made."""
    qft = dict(gradient_checkpointing=True, checkpoint_reentrant=reentrant)
    want_losses, want, _ = train(True, 0, 1, **qft)
    got_losses, got, _ = train(True, 5, 1, **qft)
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    differ, total = differing_codes(got, want)
    assert differ <= total * 1e-4, f"{differ} of {total} int8 codes differ"
