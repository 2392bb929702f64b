"""Saved tensors in host memory ("activation_checkpointing": {"cpu_checkpointing": true}, qft_ds.nn.offload).

On the CPU the offload's copies are plain host copies, so these tests check what the GPU path shares with
it: which tensors are packed (the checkpointed layers' inputs, not the model's state), that the device
originals are freed, that backward gets the same values back (training bit-identical to no offload, with
clipping's second backward unpacking every tensor twice), and the config's errors."""
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import qft_ds
import qft_ds.nn.offload as offload
from conftest import make_tiny_llama
from qft_ds.checkpoint import state_hash
from qft_ds.config import load_ds_config
from qft_ds.engine import split_config
from qft_ds.nn.offload import HostOffload

ROOT = Path(__file__).resolve().parents[2]


def config(name="qft.json", cpu_checkpointing=True, **qft):
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    cfg["optimizer"]["params"]["lr"] = 2e-3  # int8 weights that move in three steps
    cfg["qft"].update(gradient_checkpointing=True, **qft)
    if cpu_checkpointing:
        cfg["activation_checkpointing"] = {"cpu_checkpointing": True}
    return cfg


def train(cfg, steps=3, hidden=64):
    torch.manual_seed(0)
    engine, opt, _, _ = qft_ds.initialize(model=make_tiny_llama(hidden=hidden, tie=False), config=cfg)
    losses = []
    for i in range(steps):
        x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert opt.step_count == steps and opt.skipped_steps == 0
    return losses, state_hash(engine.module, opt), engine


@pytest.mark.parametrize("name,qft", [("qft.json", {}), ("qft_big.json", {"chunked_loss": 5})],
                         ids=["qft", "qft_big"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "nonreentrant"])
def test_training_is_bit_identical_with_the_offload(reentrant, name, qft, monkeypatch):
    """Every saved tensor but the model's state offloaded (no size floor), three bf16 steps with clipping's
    norm pass at step 0 (a retained graph unpacked twice): the same losses and int8 state, bit for bit."""
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    want_losses, want, plain = train(config(name, False, checkpoint_reentrant=reentrant, **qft))
    got_losses, got, engine = train(config(name, True, checkpoint_reentrant=reentrant, **qft))
    assert not hasattr(plain.module, "qft_host_offload") and engine.qft_config.cpu_checkpointing
    assert engine.module.qft_host_offload.offloaded_bytes > 0  # it ran
    assert got_losses == want_losses
    assert got == want
    assert train(config(name, True, checkpoint_reentrant=reentrant, **qft), steps=1)[1] != got  # it trained


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "nonreentrant"])
def test_layer_inputs_go_to_host_and_are_freed(reentrant):
    """At the default size floor, with hidden states of 1 MiB ([4, 512, 128] fp32): every checkpointed
    layer's input is packed, as a host copy, and the device tensor is gone once forward returns."""
    layers, shape = 2, (4, 512, 128)
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=shape[2], layers=layers, tie=False)
    engine, _, _, _ = qft_ds.initialize(model=model, config=config(checkpoint_reentrant=reentrant))
    x = torch.randint(0, 128, shape[:2])
    loss = engine(input_ids=x, labels=x).loss
    off = engine.module.qft_host_offload
    copies = [r() for r in off.copies]
    assert all(c is not None for c in copies)  # autograd holds them until backward
    residual = [c for c in copies if tuple(c.host.shape) == shape and c.host.dtype == torch.float32]
    assert len(residual) >= layers  # the layer inputs, and the final norm's input
    for c in copies:
        assert c.host.device.type == "cpu" and c.host.numel() * c.host.element_size() >= offload.MIN_BYTES
        assert c.source() is None  # the device tensor was freed: only the host copy is left
    assert off.kept_small > 0  # e.g. the norms' per-token scales
    engine.backward(loss)
    del loss, copies, residual, c
    assert all(r() is None for r in off.copies)  # backward freed the graph, and with it the host copies


def test_model_state_is_never_copied():
    """Parameters saved outside a checkpointed layer (by a matmul with a weight, and a product with a
    slice of the other weight) are large enough but stay, matched by storage: copying them would free
    nothing. The gradients are those of a run without the offload."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    x = torch.randn(8, 32, requires_grad=True)

    def run(hooks):
        for t in (*model.parameters(), x):
            t.grad = None
        with hooks:
            h = x * 2
            for layer in model:
                h = checkpoint(layer, h, use_reentrant=True)
            loss = (h @ model[0].weight).sum() + (h[:, :4] * model[1].weight[0, :4]).sum()
        packed = sorted(tuple(r().host.shape) for r in getattr(hooks, "copies", []))
        loss.backward()
        return [t.grad.clone() for t in (*model.parameters(), x)], packed

    want, _ = run(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    hooks = HostOffload(model, min_bytes=0)
    got, packed = run(hooks)
    assert hooks.kept_state == 2  # the weight, and the slice of the other weight
    # the two layer inputs and the matmul's other operand, the product's [8, 4] slice of h
    assert packed == [(8, 4), (8, 32), (8, 32), (8, 32)]
    assert all(r() is None for r in hooks.copies)  # freed with the graph
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_tensor_saved_twice_is_copied_once():
    """A tensor every checkpointed layer receives: one host copy, unpacked by each."""
    model = nn.Linear(4, 4)
    shared = torch.randn(8, 4)
    x = torch.randn(8, 4, requires_grad=True)
    with HostOffload(model, min_bytes=0) as hooks:
        y = checkpoint(lambda a, c: a * c, x, shared, use_reentrant=True)
        y = checkpoint(lambda a, c: a * c, y, shared, use_reentrant=True)
    assert len(hooks.copies) == 3  # x, shared, the first layer's output
    y.sum().backward()
    assert torch.equal(x.grad, shared * shared)


def test_prefetch_brings_back_the_tensor_packed_before(monkeypatch):
    """Backward unpacks last-packed first: unpacking one starts the copy back of the one before it, which
    the next unpack then takes instead of copying again."""
    model = nn.Linear(4, 4)
    moved = []
    real = offload._HostCopy.prefetch

    def prefetch(self):
        if self.ready is None:
            moved.append(tuple(self.host.shape))
        real(self)

    monkeypatch.setattr(offload._HostCopy, "prefetch", prefetch)
    x = torch.randn(8, 4, requires_grad=True)
    with HostOffload(model, min_bytes=0) as hooks:
        h = x
        for width in (3, 2, 1):  # three layers, inputs told apart by width
            h = checkpoint(lambda a, w=width: a[:, :w] * 2.0, h, use_reentrant=True)
    h.sum().backward()
    assert len(hooks.copies) == 3
    # the last layer's input (width 2) copied back when unpacked, then each one the one before it
    assert moved == [(8, 2), (8, 3), (8, 4)]


@pytest.mark.parametrize("section,match", [
    ({"partition_activations": True}, r"'activation_checkpointing.partition_activations' is not supported"),
    ({"contiguous_memory_optimization": True}, r"'activation_checkpointing.contiguous_memory_optimization' is not"),
    ({"number_checkpoints": 4}, r"'activation_checkpointing.number_checkpoints' is not supported"),
    ({"cpu_checkpoint": True}, r"unknown key 'activation_checkpointing.cpu_checkpoint'; did you mean "
                               r"'activation_checkpointing.cpu_checkpointing'\?"),
    ({"cpu_checkpointing": 1}, r"'activation_checkpointing.cpu_checkpointing' must be true or false"),
    ([], r"'activation_checkpointing' must be a JSON object"),
])
def test_config_errors_name_the_key(section, match):
    cfg = config()
    cfg["activation_checkpointing"] = section
    with pytest.raises(ValueError, match=match):
        split_config(cfg)


def test_a_bad_section_is_named_when_the_file_is_read(tmp_path):
    """Before any model loads (train.py reads the config first), with the file's name."""
    cfg = config()
    cfg["activation_checkpointing"]["partition_activations"] = True
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: 'activation_checkpointing.partition_activations'"):
        load_ds_config(str(path))
    del cfg["activation_checkpointing"]["partition_activations"]
    assert load_ds_config(cfg)["activation_checkpointing"] == {"cpu_checkpointing": True}


def test_cpu_checkpointing_needs_gradient_checkpointing():
    cfg = config()
    cfg["qft"]["gradient_checkpointing"] = False
    with pytest.raises(ValueError, match=r"'activation_checkpointing.cpu_checkpointing' .* needs "
                                         r"'qft.gradient_checkpointing': true"):
        split_config(cfg)


@pytest.mark.parametrize("name", ["peqa.json", "qst.json"])
def test_cpu_checkpointing_is_refused_for_peqa_and_qst(name):
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    cfg["activation_checkpointing"] = {"cpu_checkpointing": True}
    with pytest.raises(ValueError, match=r"'activation_checkpointing.cpu_checkpointing' applies to method qft"):
        split_config(cfg)


def test_defaults_are_accepted_and_the_section_is_taken_from_deepspeed():
    """DeepSpeed would parse the section and never use it: qft_ds takes it (and DeepSpeed gets none)."""
    cfg = config()
    cfg["activation_checkpointing"].update(partition_activations=False, contiguous_memory_optimization=False,
                                           number_checkpoints=None, synchronize_checkpoint_boundary=False,
                                           profile=False)
    qcfg, _, ds = split_config(copy.deepcopy(cfg))
    assert qcfg.cpu_checkpointing and "activation_checkpointing" not in ds
    cfg["activation_checkpointing"]["cpu_checkpointing"] = False
    assert not split_config(cfg)[0].cpu_checkpointing
