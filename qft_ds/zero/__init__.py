"""ZeRO stages 1-3 for qft_ds's int8 state: sharded by qft_ds itself over torch.distributed / deepspeed.comm.

DeepSpeed's own ZeRO flattens trainable parameters into fp32 slices and cannot hold int8 weights, so
DeepSpeed runs at stage 0 and ZeroLion shards the int8 weights, momentum and gradient buffers.
"""
from qft_ds.zero.optim import ShardedFlow, ZeroLion
from qft_ds.zero.partition import Partition, shard_bounds

__all__ = ["ZeroLion", "ShardedFlow", "Partition", "shard_bounds"]
