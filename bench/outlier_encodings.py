"""Alternative storages of a hybrid weight's outliers, built as real tensors so that their bytes are counted,
not estimated (issue 15: can the outliers cost less than today's 8 bytes each?).

A position scheme stores where the outliers are; a value dtype stores what they are. Every scheme here is
lossless for positions (decode_positions gives back the sorted flat indices) and each states its overflow
rule, raising a ValueError that names the shape or group when a weight breaks it:

- flat_int32 (today): sorted int32 flat indices. Breaks above 2**31 elements in one weight.
- row_int16: CSR by row, an int16 column per outlier plus an int32 row pointer (rows + 1 entries).
  Needs rows of at most 32768 columns (Llama-3-70B's widest, 28672, fits).
- group_uint8: a uint8 offset within the quantization group per outlier plus a uint8 count per group
  (a group's start is the prefix sum of the counts). Needs groups of at most 255 elements.
- bitmap: one bit per element, plus an int32 value pointer per chunk of CHUNK elements for parallel decode.
- code_marker: the dense int8 code -128, which symmetric int8 never uses (codes are clamped to +-127),
  marks an outlier; no position bytes at all beyond the same per-chunk value pointer as the bitmap.
"""
from __future__ import annotations

import torch

CHUNK = 4096          # elements per value pointer of bitmap / code_marker (a kernel block would decode one)
MARKER = -128         # the int8 code symmetric quantization never writes
POSITIONS = ("flat_int32", "row_int16", "group_uint8", "bitmap", "code_marker")
VALUES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _chunk_pointer(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 index of the first value of each CHUNK-element chunk (a prefix count of outliers)."""
    n_chunks = -(-numel // CHUNK)
    counts = torch.bincount(idx // CHUNK, minlength=n_chunks)
    return torch.cumsum(counts, 0).sub_(counts).to(torch.int32)


def encode_positions(scheme: str, idx: torch.Tensor, shape: tuple, group: int,
                     codes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors `scheme` stores for sorted flat indices `idx` of a weight of `shape` quantized in groups of
    `group` elements. code_marker also needs the weight's int8 `codes` (returned marked, not counted: they
    are stored anyway)."""
    idx = idx.long()
    rows, cols = shape
    numel = rows * cols
    if idx.numel() and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("outlier indices must be sorted and unique")
    if scheme == "flat_int32":
        if numel > 2**31:
            raise ValueError(f"flat_int32: a weight of shape {shape} has more than 2**31 elements")
        return {"idx": idx.to(torch.int32)}
    if scheme == "row_int16":
        if cols > 2**15:
            raise ValueError(f"row_int16: rows of {cols} columns (shape {shape}) do not fit int16 offsets")
        counts = torch.bincount(idx // cols, minlength=rows)
        ptr = torch.zeros(rows + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(counts, 0)
        return {"col": (idx % cols).to(torch.int16), "row_ptr": ptr.to(torch.int32)}
    if scheme == "group_uint8":
        if group > 255:
            raise ValueError(f"group_uint8: groups of {group} elements do not fit uint8 offsets and counts")
        counts = torch.bincount(idx // group, minlength=-(-numel // group))
        return {"offset": (idx % group).to(torch.uint8), "count": counts.to(torch.uint8)}
    if scheme == "bitmap":
        bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8)
        bits[idx] = 1
        weights = (2 ** torch.arange(8, dtype=torch.uint8))
        packed = (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
        return {"bits": packed, "chunk_ptr": _chunk_pointer(idx, numel)}
    if scheme == "code_marker":
        if codes is None:
            raise ValueError("code_marker: the weight's int8 codes are needed")
        if bool((codes == MARKER).any()):
            raise ValueError(f"code_marker: a dense code of the weight of shape {shape} is already {MARKER}")
        marked = codes.clone()
        marked[idx] = MARKER
        return {"marked_codes": marked, "chunk_ptr": _chunk_pointer(idx, numel)}
    raise ValueError(f"unknown position scheme {scheme!r}; choose from {', '.join(POSITIONS)}")


def decode_positions(scheme: str, enc: dict[str, torch.Tensor], shape: tuple, group: int) -> torch.Tensor:
    """The sorted int64 flat indices back from encode_positions' tensors."""
    rows, cols = shape
    if scheme == "flat_int32":
        return enc["idx"].long()
    if scheme == "row_int16":
        counts = enc["row_ptr"].long().diff()
        row = torch.repeat_interleave(torch.arange(rows), counts)
        return row * cols + enc["col"].long()
    if scheme == "group_uint8":
        counts = enc["count"].long()
        grp = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        return grp * group + enc["offset"].long()
    if scheme == "bitmap":
        bits = (enc["bits"][:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        return torch.nonzero(bits.reshape(-1)[:rows * cols]).flatten()
    if scheme == "code_marker":
        return torch.nonzero(enc["marked_codes"] == MARKER).flatten()
    raise ValueError(f"unknown position scheme {scheme!r}; choose from {', '.join(POSITIONS)}")


def position_nbytes(scheme: str, enc: dict[str, torch.Tensor]) -> int:
    """Bytes a scheme adds to the weight's state: the marked codes replace the codes, so they cost nothing."""
    return sum(t.numel() * t.element_size() for name, t in enc.items() if name != "marked_codes")


def formula_nbytes(scheme: str, value: str, k: int, shape: tuple, group: int) -> int:
    """The same bytes from the counts alone (k outliers), written out so that a reader can extrapolate them
    to other shapes; tests check it against the tensors."""
    rows, cols = shape
    numel = rows * cols
    per_value = torch.empty(0, dtype=VALUES[value]).element_size()
    chunks = 4 * -(-numel // CHUNK)
    extra = {"flat_int32": 4 * k, "row_int16": 2 * k + 4 * (rows + 1), "group_uint8": k + -(-numel // group),
             "bitmap": -(-numel // 8) + chunks, "code_marker": chunks}[scheme]
    return extra + per_value * k


def rounded_values(val: torch.Tensor, value: str) -> torch.Tensor:
    """fp32 outlier values as stored in `value` and read back."""
    return val.to(VALUES[value]).float()


def ulp(val: torch.Tensor, value: str) -> torch.Tensor:
    """The spacing of the `value` grid at each value: the smallest move an update rounded onto it can make."""
    dt = VALUES[value]
    v = val.to(dt)
    return (torch.nextafter(v.abs(), torch.tensor(float("inf"), dtype=dt)) - v.abs()).float()
