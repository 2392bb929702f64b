"""Sharded checkpoints of ZeRO runs: every rank writes its own slices; any world size and stage reads them.

The folder is a qft_ds checkpoint (qft_ds/checkpoint.py: atomic, hashed, no pickle) whose int8 state is
split by owner:
- `zero/rank-RRRRR.safetensors`: rank R's slice [lo, hi) of every quantized weight: `{prefix}.codes`,
  `.scales`, `.outlier_idx` (indices in the whole weight), `.outlier_val`, `.residual` (rounding "ef"),
  `.m_codes`, `.m_scales` (int8 momentum, or int4 packed two per byte);
- `model.safetensors`: the replicated tensors only (norms, biases, buffers), written by rank 0;
- `optimizer.safetensors`: the float parameters' momentum (replicated), rank 0;
- `rng.safetensors`, `hf/`, and `meta.json`, whose `"zero"` entry holds the world size, the stage, every
  weight's slice bounds and the optimizer index of its anchor.

Slices are cut at multiples of lcm(weight group, momentum block), which the config fixes, so a slice
saved on N ranks maps onto any other world size: loading reads, per weight, only the pieces overlapping
what this rank holds (the whole weight at stages 0-2, the slice at stage 3; momentum: the slice). A plain
(stage 0) checkpoint loads into a ZeRO run the same way, as one piece; a ZeRO checkpoint loads into a
stage-0 run, or is consolidated into a plain one (zero/consolidate.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from qft_ds import checkpoint_io as io
from qft_ds import checkpoint_restore, comm, run_folder
from qft_ds.checkpoint_io import CheckpointError
from qft_ds.nn.layout import weights_by_prefix
from qft_ds.quant.momentum import check_checkpoint_momentum

QKEYS = ("codes", "scales", "outlier_idx", "outlier_val", "residual")
SHARD_DIR = "zero"
DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
          torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
          torch.bool: "BOOL"}  # safetensors' names


def shard_file(rank: int) -> str:
    return f"{SHARD_DIR}/rank-{rank:05d}.safetensors"


def anchor_indices(optimizer) -> dict[int, int]:
    """id(HybridWeight) -> index of its anchor in the optimizer's state_dict (torch numbers params in
    param-group order)."""
    out, i = {}, 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            w = getattr(p, "_qft_weight", None)
            if w is not None:
                out[id(w)] = i
            i += 1
    return out


# -- save ------------------------------------------------------------------------------------------
def _rank_tensors(model, optimizer) -> tuple[dict, dict]:
    """This rank's slice of every quantized weight and its momentum, and the bounds of every rank."""
    out, bounds = {}, {}
    for prefix, w in weights_by_prefix(model).items():
        own = optimizer.sharding.owned(w)
        out[f"{prefix}.codes"] = own.codes
        out[f"{prefix}.scales"] = own.scales
        out[f"{prefix}.outlier_idx"] = own.outlier_idx + own.lo
        out[f"{prefix}.outlier_val"] = own.outlier_val
        if own.residual is not None:
            out[f"{prefix}.residual"] = own.residual
        st = optimizer._qstate(w)
        out[f"{prefix}.m_codes"], out[f"{prefix}.m_scales"] = st["m_codes"], st["m_scales"]
        bounds[prefix] = optimizer.sharding.shard_of(w).bounds
    return out, bounds


def save(out_dir, engine, optimizer, *, step: int, data: dict | None = None, ds_config: dict | None = None,
         tokenizer=None) -> Path:
    """Every rank writes its slices into one temporary folder; rank 0 adds the rest, then renames the
    folder into place and points `latest` at it. Returns the checkpoint folder on every rank."""
    out_dir = Path(out_dir)
    model = engine.module if hasattr(engine, "module") else engine
    rank, world = comm.rank(), comm.world_size()
    final = out_dir / f"{io.PREFIX}{step}"
    tmp = io.temp_folder(final, "zero")
    error = None
    if rank == 0:
        try:  # the lock also tidies what killed saves left, this step's temporary folder included
            run_folder.acquire(out_dir)
        except BaseException as e:
            error = e
        else:
            try:
                (tmp / SHARD_DIR).mkdir(parents=True)
            except BaseException as e:
                run_folder.release(out_dir)
                error = e
    if comm.max_over_ranks(error is not None):  # every rank stops, none waits in a barrier
        raise error if error is not None else CheckpointError(f"rank 0 could not start the save of {final}")
    try:
        return _save_shards(tmp, final, engine, model, optimizer, step, data, ds_config, tokenizer, rank, world)
    finally:
        if rank == 0:
            run_folder.release(out_dir)


def _save_shards(tmp, final, engine, model, optimizer, step, data, ds_config, tokenizer, rank, world) -> Path:
    mine, bounds = _rank_tensors(model, optimizer)
    io.save_tensors(mine, tmp / shard_file(rank))
    io.fsync_file(tmp / shard_file(rank))
    del mine
    comm.barrier()
    error = None
    if rank == 0:
        try:
            _write_rank0(tmp, final, engine, model, optimizer, step, data or {}, ds_config, tokenizer, bounds,
                         world)
        except BaseException as e:  # the others must not hang in the barrier below
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier()
    if error is not None:
        raise error
    if not (final / "meta.json").is_file():
        raise CheckpointError(f"the ZeRO checkpoint {final} was not written (rank 0 failed; see its error)")
    return final


def _write_rank0(tmp, final, engine, model, optimizer, step, data, ds_config, tokenizer, bounds, world):
    tensors, aliases = io.model_tensors(model)
    prefixes = set(bounds)
    quantized = {f"{p}.{k}" for p in prefixes for k in QKEYS}
    missing = sorted(f"{p}.codes" for p in prefixes if f"{p}.codes" not in tensors)
    if missing:
        raise CheckpointError(f"ZeRO save: quantized weights {missing[:3]} are not under their first name")
    io.save_tensors({k: v for k, v in tensors.items() if k not in quantized}, tmp / "model.safetensors")
    osd = optimizer.state_dict()
    index = anchor_indices(optimizer)
    anchor_idx = {prefix: index[id(w)] for prefix, w in weights_by_prefix(model).items()}
    float_state = {k: v for k, v in osd["state"].items() if k not in set(anchor_idx.values())}
    opt_tensors, opt_scalars = io.optimizer_tensors({"state": float_state})
    io.save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    io.save_rng_and_hf(tmp, model, tokenizer)
    meta = io.base_meta(engine, model, step, data, aliases, osd, opt_scalars, ds_config)
    meta["zero"] = {"world_size": world, "stage": optimizer.zero_stage, "block_size": optimizer.block_size,
                    "bounds": {p: [list(b) for b in v] for p, v in bounds.items()}, "anchor_index": anchor_idx}
    io.seal(tmp, meta)
    io.publish(tmp, final)


# -- reading pieces --------------------------------------------------------------------------------
class Pieces:
    """Reads any element range of a quantized weight's saved state, from a ZeRO or a plain checkpoint,
    opening each file lazily and reading only the overlapping slices."""

    def __init__(self, ckpt: Path, meta: dict, plain_anchor_index: dict | None = None):
        """`plain_anchor_index` {prefix: optimizer index}: where a plain checkpoint keeps each momentum."""
        self.ckpt, self.meta, self.zero = ckpt, meta, meta.get("zero")
        self.plain_anchor_index = plain_anchor_index or {}
        self._files = {}

    def open(self, rel: str):
        if rel not in self._files:
            try:
                self._files[rel] = safe_open(str(self.ckpt / rel), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.ckpt / rel} is not a readable safetensors file ({e})") from None
        return self._files[rel]

    def _sources(self, prefix: str, kind: str):
        """[(file, key, elem_lo, elem_hi)] covering the whole weight, in element order."""
        if self.zero is not None:
            return [(shard_file(r), f"{prefix}.{kind}", lo, hi)
                    for r, (lo, hi) in enumerate(self.zero["bounds"][prefix])]
        numel = self.meta["quant"][prefix]["shape"][0] * self.meta["quant"][prefix]["shape"][1]
        if kind in ("m_codes", "m_scales"):
            if prefix not in self.plain_anchor_index:
                raise CheckpointError(f"{self.ckpt}: no optimizer index for {prefix}")
            idx = self.plain_anchor_index[prefix]
            return [("optimizer.safetensors", f"state.{idx}.{kind}", 0, numel)]
        return [("model.safetensors", f"{prefix}.{kind}", 0, numel)]

    def has(self, prefix: str, kind: str) -> bool:
        rel, key, _, _ = self._sources(prefix, kind)[0]
        return key in self.open(rel).keys()

    def read(self, prefix: str, kind: str, lo: int, hi: int, per: int = 1) -> torch.Tensor:
        """Elements [lo, hi) (per=1) or the scales of blocks of `per` elements covering them."""
        a, b = lo // per, -(-hi // per)
        parts = []
        for rel, key, plo, phi in self._sources(prefix, kind):
            pa, pb = plo // per, -(-phi // per)
            s, e = max(a, pa), min(b, pb)
            if s < e:
                parts.append(self.open(rel).get_slice(key)[s - pa:e - pa])
        if not parts:  # an empty slice (a rank that owns nothing): keep the stored dtype
            rel, key, _, _ = self._sources(prefix, kind)[0]
            parts.append(self.open(rel).get_slice(key)[0:0])
        out = torch.cat(parts)
        if out.numel() != b - a:
            raise CheckpointError(f"{self.ckpt}: {prefix}.{kind} has {out.numel()} values for [{a}, {b})")
        return out

    def outliers(self, prefix: str):
        """(int32 indices in the whole weight, fp32 values), all of them, sorted."""
        idx, val = [], []
        for rel, key, _, _ in self._sources(prefix, "outlier_idx"):
            f = self.open(rel)
            idx.append(f.get_tensor(key))
            val.append(f.get_tensor(key.replace(".outlier_idx", ".outlier_val")))
        return torch.cat(idx), torch.cat(val)


# -- load ------------------------------------------------------------------------------------------
@torch.no_grad()
def load(path, engine, optimizer, *, ds_config: dict | None = None, verify: bool = True) -> dict:
    """Restore a ZeRO or plain checkpoint into a run of any world size and stage (at 1-3 the optimizer is
    already sharded). Each rank reads only what it holds, one weight at a time. Hashes, config, every
    shape and dtype (from the files' headers) and the optimizer state are checked before anything is
    written; past the checks, only an I/O error while reading the weights could leave a partial state."""
    ckpt = io.resolve(path)
    meta = io.read_meta(ckpt, verify=verify)
    io.check_config(meta, ds_config)
    check_checkpoint_momentum(meta, optimizer)  # by name, before the pieces' dtype checks
    model = engine.module if hasattr(engine, "module") else engine
    weights = weights_by_prefix(model)
    io.check_layout(ckpt, meta, model)
    index = anchor_indices(optimizer)
    # a plain checkpoint keeps momentum under the optimizer's param index: the same model and config
    # (checked above) number the params alike
    pieces = Pieces(ckpt, meta, {prefix: index[id(w)] for prefix, w in weights.items()})
    device = next((w.codes.device for w in weights.values()), torch.device("cpu"))
    tensors, _ = io.model_tensors(model)
    replicated = io.read_tensors(ckpt / "model.safetensors", device)
    quantized = {f"{p}.{k}" for p in weights for k in QKEYS}
    names = {n for n in tensors if n not in quantized}
    if names - set(replicated):
        raise CheckpointError(f"{ckpt} does not fit this model: missing {sorted(names - set(replicated))[:5]}")
    for name in names:  # plain checkpoints also hold the quantized tensors: read per weight below
        if replicated[name].shape != tensors[name].shape or replicated[name].dtype != tensors[name].dtype:
            raise CheckpointError(f"{ckpt}: '{name}' is {replicated[name].dtype}{list(replicated[name].shape)} in "
                                  f"the checkpoint, {tensors[name].dtype}{list(tensors[name].shape)} in the model")
    for prefix, w in weights.items():
        _check_pieces(pieces, prefix, w, optimizer)
    state = {}
    for prefix, w in weights.items():
        lo, hi = optimizer.sharding.owned_range(w)
        state[index[id(w)]] = {"m_codes": pieces.read(prefix, "m_codes", lo, hi,  # int4: 2 elements a byte
                                                      optimizer.momentum.elements_per_code).to(device),
                               "m_scales": pieces.read(prefix, "m_scales", lo, hi, optimizer.block_size).to(device)}
    osd = io.optimizer_state(ckpt, meta, device)
    osd["state"] = {k: v for k, v in osd["state"].items() if k not in state} | state
    checkpoint_restore.check_optimizer_state(ckpt, osd, optimizer)

    def write_model():
        for name in names:
            tensors[name].copy_(replicated[name])
        for prefix, w in weights.items():
            _load_weight(pieces, prefix, w, optimizer, device)
    checkpoint_restore.apply(ckpt, meta, engine, optimizer, osd, write_model)
    return meta


def _load_weight(pieces: Pieces, prefix: str, w, optimizer, device) -> None:
    """The whole weight into `w` (one layer in memory), then sliced again if this rank holds a shard."""
    n = w.numel
    idx, val = pieces.outliers(prefix)
    w.hold(pieces.read(prefix, "codes", 0, n).to(device), pieces.read(prefix, "scales", 0, n, w.group).to(device),
           idx.to(device), val.to(device))
    if w.residual is not None:
        lo, hi = optimizer.sharding.owned_range(w)
        w.residual = pieces.read(prefix, "residual", lo, hi).to(device)
    optimizer.sharding.reshard(w)  # ZeRO: outlier ownership again; stage 3 slices the whole weight


def _check_pieces(pieces: Pieces, prefix: str, w, optimizer) -> None:
    """Every saved piece of weight `prefix` has the dtype and length its slice needs (headers only)."""
    kinds = {"codes": (w.codes.dtype, 1), "scales": (w.scales.dtype, w.group),
             "m_codes": (optimizer.momentum.dtype, optimizer.momentum.elements_per_code),
             "m_scales": (torch.float32, optimizer.block_size)}
    if w.residual is not None:
        if not pieces.has(prefix, "residual"):
            raise CheckpointError(f"{pieces.ckpt} has no error-feedback residual for {prefix}")
        kinds["residual"] = (w.residual.dtype, 1)
    for kind, (dtype, per) in kinds.items():
        for rel, key, lo, hi in pieces._sources(prefix, kind):
            _check_header(pieces, rel, key, dtype, [-(-hi // per) - lo // per])
    for rel, key, _, _ in pieces._sources(prefix, "outlier_idx"):
        n = _check_header(pieces, rel, key, w.outlier_idx.dtype, None)
        _check_header(pieces, rel, key.replace(".outlier_idx", ".outlier_val"), w.outlier_val.dtype, n)


def _check_header(pieces: Pieces, rel: str, key: str, dtype, shape) -> list:
    f = pieces.open(rel)
    if key not in f.keys():
        raise CheckpointError(f"{pieces.ckpt / rel} has no tensor '{key}'")
    sl = f.get_slice(key)
    got_shape, got_dtype = list(sl.get_shape()), sl.get_dtype()
    if got_dtype != DTYPES[dtype] or len(got_shape) != 1 or (shape is not None and got_shape != shape):
        raise CheckpointError(f"{pieces.ckpt / rel}: '{key}' is {got_dtype}{got_shape}; this run needs "
                              f"{DTYPES[dtype]}{shape if shape is not None else '[n]'}")
    return got_shape
