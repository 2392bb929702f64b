"""bench/memory_speed.py builds qft's benchmark shapes weight by weight on the device (qft_ds.nn.streaming):
the model it trains has every parameter of the shape, nothing left on the meta device, and bf16 compute."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import memory_speed  # noqa: E402

from qft_ds.nn import QLinear, quantized_weights  # noqa: E402


def test_quantized_shape_is_built_whole_on_the_device():
    model = memory_speed.build_quantized("tiny", torch.device("cpu"))
    reference = memory_speed.build("tiny", torch.float32, "cpu")
    n = sum(w.numel for w in quantized_weights(model)) + sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in reference.parameters())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert isinstance(model.lm_head, QLinear) and model.lm_head.compute_dtype == torch.bfloat16
    assert model.is_gradient_checkpointing and not model.config.use_cache
