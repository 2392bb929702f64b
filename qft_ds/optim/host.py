"""Device values read on the host, many in one sync: each sync drains the GPU queue, so a step reads once."""
from __future__ import annotations

import torch


def fetch(**tensors):
    """Device scalars (-> floats) and 1-D tensors (-> lists) in one host sync (a None stays None)."""
    names = [k for k, v in tensors.items() if v is not None]
    out = dict.fromkeys(tensors)
    if names:
        dev = tensors[names[0]].device
        flat = torch.cat([tensors[k].reshape(-1).float().to(dev) for k in names]).tolist()
        pos = 0
        for k in names:
            n = tensors[k].numel()
            out[k] = flat[pos] if tensors[k].dim() == 0 else flat[pos:pos + n]
            pos += n
    return out
