"""DeepSpeed's "communication_data_type" for QFT's data-parallel gradient all-reduce: fp32 (default, the
bits of one device) or bf16 (half the bytes, the sum rounded to bf16 once)."""
import sys

import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent / "zero"))
import harness as H  # noqa: E402

from qft_ds import comm  # noqa: E402
from qft_ds.engine import split_config  # noqa: E402
from qft_ds.optim.sharding import NoSharding  # noqa: E402


def _ds(**extra):
    return {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "QFTLion", "params": {"lr": 1e-4}}, **extra}


def test_config_reads_deepspeeds_key_and_names_it_in_errors():
    assert split_config(_ds())[0].comm_dtype == "fp32"
    assert split_config(_ds(communication_data_type="bf16"))[0].comm_dtype == "bf16"
    assert split_config(_ds(communication_data_type="fp32"))[0].comm_dtype == "fp32"
    with pytest.raises(ValueError, match="communication_data_type"):
        split_config(_ds(communication_data_type="fp16"))
    with pytest.raises(ValueError, match="communication_data_type.*stage 2"):
        split_config(_ds(communication_data_type="bf16", zero_optimization={"stage": 2}))
    with pytest.raises(ValueError, match="fp32 or bf16"):
        NoSharding(reduce_dtype=torch.float16)


def _means(rank, world, out):
    g = torch.Generator().manual_seed(rank)
    grads = torch.randn(4096, generator=g) * torch.logspace(-6, 2, 4096)
    mean = comm.all_reduce_mean_async(grads.bfloat16(), reduce_dtype=torch.bfloat16).wait()
    from_fp32 = comm.all_reduce_mean_async(grads, reduce_dtype=torch.bfloat16).wait()
    torch.save({"mean": mean, "from_fp32": from_fp32, "grads": grads}, f"{out}.{rank}")


def test_bf16_mean_is_the_exact_mean_rounded_once(tmp_path):
    H.spawn(_means, str(tmp_path / "m.pt"))
    r = [torch.load(tmp_path / f"m.pt.{k}") for k in range(2)]
    exact = (r[0]["grads"].bfloat16().double() + r[1]["grads"].bfloat16().double()) / 2
    for k in range(2):
        assert r[k]["mean"].dtype == torch.bfloat16 and r[k]["from_fp32"].dtype == torch.bfloat16
        assert torch.equal(r[k]["mean"], exact.to(torch.bfloat16))  # g/2 exact, one rounding of the sum
        assert torch.equal(r[k]["from_fp32"], r[k]["mean"])  # an fp32 gradient is cast first
    assert not torch.equal(exact.to(torch.bfloat16).float(), exact.float())  # the rounding is exercised


def _train(rank, world, out, comm_dtype, round_reduced=False):
    model, opt = H.build(0, comm_dtype=comm_dtype)
    if round_reduced:  # one device: its (accumulated) gradient rounded to bf16 where a rank would reduce it
        reduce = opt.sharding.reduce
        opt.sharding.reduce = lambda w, grad: (lambda: (reduce(w, grad)()[0].bfloat16(), None))
    H.inject_steps(model, opt, 3)
    torch.save(H.full_state(model, opt), f"{out}.{rank}")


def test_two_ranks_with_bf16_reduction_train_as_one_device_with_bf16_rounded_gradients(tmp_path):
    # the same gradients on both ranks: g/2 + g/2 is exact, so the bf16 mean is bf16(g), the gradient
    # (summed over a fused weight's uses first) rounded once
    H.spawn(_train, str(tmp_path / "two.pt"), "bf16")
    H.spawn(_train, str(tmp_path / "one.pt"), "fp32", True, world=1)
    H.spawn(_train, str(tmp_path / "one32.pt"), "fp32", world=1)
    two = torch.load(tmp_path / "two.pt.0")
    H.assert_same(two, torch.load(tmp_path / "two.pt.1"), "the two ranks' int8 states")
    H.assert_same(two, torch.load(tmp_path / "one.pt.0"), "2 ranks (bf16 reduction) against 1 rounding to bf16")
    fp32 = torch.load(tmp_path / "one32.pt.0")
    assert any(not torch.equal(two[k], fp32[k]) for k in two)  # the bf16 rounding reached the state
