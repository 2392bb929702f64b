"""ZeRO stages 1-3 for qft_ds's int8 state: sharded by qft_ds itself over the process group (qft_ds.comm).

DeepSpeed's own ZeRO flattens trainable parameters into fp32 slices and cannot hold int8 weights, so
DeepSpeed runs at stage 0 and QFTLion is given a ZeroSharding strategy, which shards the int8 weights,
momentum and gradient buffers.
"""
from qft_ds.zero.partition import Partition, shard_bounds
from qft_ds.zero.sharding import ZeroSharding

__all__ = ["ZeroSharding", "Partition", "shard_bounds"]
