"""QST (Zhang et al., ACL 2024): a frozen 4-bit backbone run under no_grad, and a small side network.

With h_0 the embeddings and h_i what HF returns as hidden_states[i] (the output of layer i; the last
one, h_L, is after the final norm, i.e. what the LM head reads):

    g_0 = down_0(h_0)
    g_i = block_i((1 - b_i) * down_i(h_i) + b_i * g_{i-1}),   b_i = sigmoid(beta_i), i = 1..L
    out = alpha * h_L + (1 - alpha) * up(norm(g_L))   ->   the frozen LM head

alpha is a plain learnable scalar starting at 1, so at initialisation `out` is h_L exactly and the logits
are the frozen model's, bit for bit. b_i starts at 0.5. The backbone runs under torch.no_grad: none of
its activations are kept for backward, only the L + 1 hidden states the side network reads, and no
gradient can reach it.

Side blocks are pre-norm SwiGLU MLPs of width d/r (intermediate size ffn/r), not full decoder layers:
every h_i the side network reads already carries the backbone's attention over the sequence, and at
d/r = 36 (SmolLM2) attention heads would be 9 or 18 wide. A token-wise block keeps the side network
cheap and free of head-size constraints; its cost is that the side network cannot mix tokens itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qft_ds import hf_save
from qft_ds.nn.lowbit import convert_lowbit

DOWNSAMPLES = ("adapter", "linear", "maxpool", "avgpool")


class Downsample(nn.Module):
    """d -> d/r: a low-rank adapter (d -> rank -> d/r), one linear map, or max/avg pooling over r features."""

    def __init__(self, kind: str, d: int, r: int, rank: int = 16):
        super().__init__()
        if kind not in DOWNSAMPLES:
            raise ValueError(f"'qft.downsample' must be one of {', '.join(DOWNSAMPLES)}; got {kind!r}")
        self.kind, self.r = kind, r
        if kind == "adapter":
            self.proj = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, d // r, bias=False))
        elif kind == "linear":
            self.proj = nn.Linear(d, d // r, bias=False)

    def forward(self, h):
        if self.kind in ("adapter", "linear"):
            return self.proj(h).to(h.dtype)  # under bf16 autocast: the side residual stream stays fp32
        pool = F.max_pool1d if self.kind == "maxpool" else F.avg_pool1d
        return pool(h.reshape(-1, 1, h.shape[-1]), self.r).view(*h.shape[:-1], -1)


class SideBlock(nn.Module):
    """x + SwiGLU(RMSNorm(x)), LLaMA's MLP at width d/r."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        n = self.norm(x)
        return x + self.down(F.silu(self.gate(n)) * self.up(n))


class QSTModel(nn.Module):
    """The frozen backbone (a HF causal LM, already low-bit) plus the trainable side network."""

    def __init__(self, backbone: nn.Module, r: int = 16, downsample: str = "adapter", adapter_rank: int = 16):
        super().__init__()
        cfg = backbone.config
        d, layers = cfg.hidden_size, cfg.num_hidden_layers
        if r < 1 or d % r:
            raise ValueError(f"'qft.r' = {r} must divide the model's hidden size {d}")
        ffn = getattr(cfg, "intermediate_size", 4 * d)
        eps = getattr(cfg, "rms_norm_eps", 1e-5)
        self.backbone = backbone
        self.config = cfg  # checkpoints save it (hf/config.json) like any HF model's
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.down = nn.ModuleList(Downsample(downsample, d, r, adapter_rank) for _ in range(layers + 1))
        self.side = nn.ModuleList(SideBlock(d // r, max(1, ffn // r), eps) for _ in range(layers))
        self.beta = nn.Parameter(torch.zeros(layers))  # b_i = sigmoid(beta_i) = 0.5 at start
        self.alpha = nn.Parameter(torch.ones(1))  # 1-D: DeepSpeed broadcasts params as bytes
        self.side_norm = nn.RMSNorm(d // r, eps=eps)
        self.up = nn.Linear(d // r, d, bias=False)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, whatever the side network does
        return self

    def side_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast
        with torch.no_grad():
            hs = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                          output_hidden_states=True, use_cache=False, **kwargs).hidden_states
        g = self.down[0](hs[0])
        gates = torch.sigmoid(self.beta)
        for i, block in enumerate(self.side):
            g = block((1 - gates[i]) * self.down[i + 1](hs[i + 1]) + gates[i] * g)
        h = self.alpha * hs[-1] + (1 - self.alpha) * self.up(self.side_norm(g))
        logits = self.backbone.get_output_embeddings()(h)
        loss = None
        if labels is not None:
            loss = self.backbone.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def build_qst(model: nn.Module, *, bits: int = 4, group_size: int = 128, r: int = 16, downsample: str = "adapter",
              adapter_rank: int = 16, compute_dtype: torch.dtype = torch.float32) -> QSTModel:
    """Quantize the backbone's Linear layers to frozen low-bit codes and wrap it with a side network."""
    if not hasattr(model, "base_model") or not hasattr(model, "get_output_embeddings"):
        raise ValueError("QST needs a transformers causal LM (base_model, get_output_embeddings)")
    convert_lowbit(model, bits=bits, group_size=group_size, trainable_scales=False, compute_dtype=compute_dtype)
    hf_save.install(model, refuse_hf_save, torch.float32)  # Trainer.save_model: a clear error, not a bad folder
    device = next(model.parameters()).device
    return QSTModel(model, r, downsample, adapter_rank).to(device)


def refuse_hf_save(model, state_dict, dtype):
    """save_pretrained of a QST backbone (qft_ds.hf_save): the side network is the fine-tune, so the backbone
    alone is not the trained model, and there is no HF form of both."""
    raise hf_save.DenseSaveError(
        "a QST model has no Hugging Face form (a frozen low-bit backbone plus a side network): save a qft_ds "
        "checkpoint (qft_ds.checkpoint.save, or train.py) and resume or evaluate from it; use the qft or peqa "
        "method for a model that saves with save_pretrained")
