"""The stochastic roundings' random bits ("qft": {"rand_bits": ...}) in QFTLion: the config key, and that the
value reaches every weight's update (what each value draws: tests/ops/test_lion_rand_bits.py)."""
import pytest
import torch

from qft_ds.config import QFTConfig
from qft_ds.engine import build_optimizer
from qft_ds.nn import convert_model, quantized_weights


@pytest.mark.parametrize("section,match", [({"rand_bits": 12}, "'qft.rand_bits' must be 0"),
                                           ({"rand_bits": "16"}, "'qft.rand_bits' must be an integer"),
                                           ({"method": "peqa", "rand_bits": 16}, "applies to method qft")])
def test_the_config_key_takes_the_kernels_choices_only(section, match):
    with pytest.raises(ValueError, match=match):
        QFTConfig.from_dict(section)
    assert QFTConfig().rand_bits == 0  # the backend's default
    assert QFTConfig.from_dict({"rand_bits": 32}).rand_bits == 32


@pytest.mark.parametrize("rand_bits", [0, 16, 32])
def test_the_value_reaches_every_update(tiny_llama, rand_bits):
    """Every weight's lion_step gets it (0: None, the backend's default), and the step trains."""
    torch.manual_seed(0)
    model = tiny_llama()
    convert_model(model, group_size=64, outlier_frac=0.01)
    opt = build_optimizer(model, QFTConfig(seed=3, rand_bits=rand_bits), {"lr": 2e-3, "weight_decay": 0.1})
    seen, lion_step = [], opt.ops.lion_step
    opt.ops.lion_step = lambda *a, **kw: (seen.append(kw["rand_bits"]), lion_step(*a, **kw))[1]
    before = [w.codes.clone() for w in quantized_weights(model)]
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert len(seen) == len(before) and set(seen) == {rand_bits or None}
    assert any(not torch.equal(b, w.codes) for b, w in zip(before, quantized_weights(model)))
    with pytest.raises(ValueError, match="rand_bits must be 0"):
        build_optimizer(model, QFTConfig(), {"lr": 1e-3}).__class__(list(model.parameters()), rand_bits=7)
