"""bench/outlier_cost.py's core on a tiny random model: every outlier storage decodes back to the outliers'
positions, its bytes are the tensors' and match the written-out formula, and the measurements mean what they say."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from conftest import make_tiny_llama  # noqa: E402


def test_every_storage_decodes_back_and_its_bytes_match_the_formula():
    import outlier_encodings as enc
    from qft_ds.quant import HybridWeight
    w = torch.randn(48, 96) * torch.rand(48, 1)  # rows of different sizes: outliers cluster in some rows
    qw = HybridWeight(w, group_size=32, outlier_frac=0.05)
    idx, k = qw.outlier_idx.long(), qw.outlier_idx.numel()
    assert k == round(0.05 * w.numel())
    for scheme in enc.POSITIONS:
        tensors = enc.encode_positions(scheme, idx, qw.shape, qw.group, qw.codes)
        assert torch.equal(enc.decode_positions(scheme, tensors, qw.shape, qw.group), idx), scheme
        for value in enc.VALUES:
            stored = enc.position_nbytes(scheme, tensors) + qw.outlier_val.to(enc.VALUES[value]).nbytes
            assert stored == enc.formula_nbytes(scheme, value, k, qw.shape, qw.group), (scheme, value)
    # today's storage is exactly what HybridWeight holds
    assert enc.formula_nbytes("flat_int32", "fp32", k, qw.shape, qw.group) == qw.outlier_idx.nbytes + qw.outlier_val.nbytes
    # the marker is free because symmetric int8 never writes it
    assert int(qw.codes.min()) >= -127


def test_overflow_rules_raise_naming_the_shape():
    import outlier_encodings as enc
    idx = torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"row_int16: rows of 40000 columns \(shape \(1, 40000\)\)"):
        enc.encode_positions("row_int16", idx, (1, 40000), 128)
    with pytest.raises(ValueError, match="group_uint8: groups of 256"):
        enc.encode_positions("group_uint8", idx, (4, 256), 256)
    codes = torch.zeros(64, dtype=torch.int8)
    codes[3] = enc.MARKER
    with pytest.raises(ValueError, match="already -128"):
        enc.encode_positions("code_marker", idx, (1, 64), 64, codes)


def test_zero_outliers_is_plain_int8_and_outliers_cut_the_error():
    import outlier_cost as oc
    from qft_ds.ops import reference as ref
    from qft_ds.quant import HybridWeight
    w = torch.randn(32, 64)
    w[3, 7] = 25.0  # one real outlier: its group's int8 step is 25/127 without it taken out
    plain = HybridWeight(w, group_size=64, outlier_frac=0.0)
    codes, scales = ref.quantize_blockwise(w.reshape(-1), 64, "rtn")
    int8_err = (ref.dequantize_blockwise(codes, scales, 64) - w.reshape(-1)).square().sum().item()
    stats0 = oc.weight_stats(plain, w.reshape(-1))
    assert stats0["err_sq"]["fp32"] == pytest.approx(int8_err, rel=1e-6)
    assert stats0["outliers"] == 0 and stats0["energy_frac"] == 0.0
    assert all(b == 0 for b in stats0["values"].values())
    stats = oc.weight_stats(HybridWeight(w, group_size=64, outlier_frac=0.01), w.reshape(-1))
    assert stats["err_sq"]["fp32"] < int8_err / 2
    assert stats["energy_frac"] > 25.0 ** 2 / w.square().sum().item()  # the planted one and the largest others
    assert stats["err_sq"]["bf16"] >= stats["err_sq"]["fp32"]


def test_measure_on_a_tiny_model(tmp_path):
    import outlier_cost as oc
    model = make_tiny_llama(vocab=96, hidden=64, layers=2).eval()
    blocks = torch.randint(0, 96, (4, 16))
    res = oc.measure(model, blocks, fracs=[0.0, 0.02], value_fracs=[0.02], group_size=32, bsz=2, logit_blocks=2,
                     log=lambda *_: None)
    none, some = res["rows"]
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name) \
        + model.model.embed_tokens.weight.numel()  # the head is tied to the embedding: one weight
    assert none["quantized_params"] == some["quantized_params"] == n
    # no outliers: every storage costs nothing but its fixed part, and the flat one nothing at all
    assert none["storage"]["flat_int32+fp32"]["outlier_bytes_per_param"] == 0
    assert none["today_state_bytes_per_param"] == pytest.approx(none["storage"]["flat_int32+fp32"]["state_bytes_per_param"])
    assert some["today_state_bytes_per_param"] == pytest.approx(some["storage"]["flat_int32+fp32"]["state_bytes_per_param"])
    assert some["storage"]["flat_int32+fp32"]["outlier_bytes_per_param"] == pytest.approx(8 * some["outliers"] / n)
    assert some["weight_rel_err"]["fp32"] < none["weight_rel_err"]["fp32"]
    # the converted model differs from fp32 by quantization only: close, not equal
    for row in res["rows"]:
        ev = row["eval"]["fp32"]
        assert 0 < ev["kl_per_token"] < 0.05 and 0 < ev["logit_rel_rms"] < 0.2
        assert abs(ev["loss"] - res["fp32"]["loss"]) < 0.05
    assert set(some["eval"]) == {"fp32", "bf16", "fp16"} and set(none["eval"]) == {"fp32"}
    png = oc.plot({**res, "settings": {"model": "tiny", "logit_blocks": 2}}, tmp_path / "o.png")
    assert png.stat().st_size > 0
