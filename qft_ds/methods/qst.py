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

Generation: because the side network is token-wise, a new token's output needs only that token's h_i, so the
backbone's KV cache is all the state generation needs: `QSTModel.generate` is the backbone's own HF
`generate` (every decoding strategy, its generation config, its cache) with the backbone's forward
replaced by this model's for the call. Cached and uncached generation give the same tokens (tested).

Saving: the side network reads every layer's hidden state and adds a second residual stream before the
head, which no dense HF architecture has, so a QST model cannot be folded into a plain HF checkpoint.
`save_pretrained` and `qft_ds export` write qft_ds's QST format instead (qft_ds.methods.qst_export), which
`load_qst` reads back bit-exactly and plain transformers refuses.
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

    def __init__(self, backbone: nn.Module, r: int = 16, downsample: str = "adapter", adapter_rank: int = 16,
                 bits: int = 4, group_size: int = 128):
        super().__init__()
        # what rebuilds this model from its tensors (qst_export): the side network's shape, the backbone's format
        self.qst_settings = {"r": r, "downsample": downsample, "adapter_rank": adapter_rank, "bits": bits,
                             "group_size": group_size}
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

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=False, logits_to_keep=0, **kwargs):
        """The backbone's hidden states (and its KV cache, when generating: passed through `kwargs` under
        whatever name this transformers gives it) under no_grad, then the side network on the positions whose
        logits are wanted: it is token-wise, so those positions need only their own hidden states."""
        from transformers.modeling_outputs import CausalLMOutputWithPast
        with torch.no_grad():
            out = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                                           output_hidden_states=True, **kwargs)
        hs = out.hidden_states
        if not isinstance(logits_to_keep, int) or logits_to_keep:  # HF's meaning: the last N, or these indices
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            hs = [h[:, keep] for h in hs]
        g = self.down[0](hs[0])
        gates = torch.sigmoid(self.beta)
        for i, block in enumerate(self.side):
            g = block((1 - gates[i]) * self.down[i + 1](hs[i + 1]) + gates[i] * g)
        h = self.alpha * hs[-1] + (1 - self.alpha) * self.up(self.side_norm(g))
        logits = self.backbone.get_output_embeddings()(h)
        loss = None
        if labels is not None:
            loss = self.backbone.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        name = next((k for k in ("cache", "past_key_values") if out.get(k) is not None), None)  # one, aliased
        return CausalLMOutputWithPast(loss=loss, logits=logits, **({name: out[name]} if name else {}))

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """`transformers` generation (same arguments, same outputs) through this model: the backbone's own
        `generate` runs with the backbone's forward replaced by this model's for the call, so its generation
        config, KV cache and every decoding strategy apply to the QST model."""
        backbone, own = self.backbone, self.backbone.__dict__.get("forward")
        backbone.forward = self.forward  # an instance attribute shadows the class's forward
        try:
            return backbone.generate(*args, **kwargs)
        finally:
            if own is None:
                del backbone.forward
            else:
                backbone.forward = own

    @property
    def generation_config(self):
        return self.backbone.generation_config

    def save_pretrained(self, save_directory, **kwargs):
        """qft_ds's QST format (see qft_ds.methods.qst_export): `load_qst` reads it back; plain transformers
        refuses it. Keyword arguments of transformers' save_pretrained that do not apply are refused."""
        from qft_ds.methods import qst_export
        return qst_export.save_model(self, save_directory, **kwargs)


def build_qst(model: nn.Module, *, bits: int = 4, group_size: int = 128, r: int = 16, downsample: str = "adapter",
              adapter_rank: int = 16, compute_dtype: torch.dtype = torch.float32, quantize: bool = True) -> QSTModel:
    """Quantize the backbone's Linear layers to frozen low-bit codes and wrap it with a side network
    (`quantize=False`: empty low-bit weights, for a loader to fill)."""
    if not hasattr(model, "base_model") or not hasattr(model, "get_output_embeddings"):
        raise ValueError("QST needs a transformers causal LM (base_model, get_output_embeddings)")
    convert_lowbit(model, bits=bits, group_size=group_size, trainable_scales=False, compute_dtype=compute_dtype,
                   quantize=quantize)
    hf_save.install(model, refuse_hf_save, torch.float32)  # Trainer.save_model: a clear error, not a bad folder
    device = next(model.parameters()).device
    return QSTModel(model, r, downsample, adapter_rank, bits, group_size).to(device)


def refuse_hf_save(model, state_dict, dtype):
    """save_pretrained of a QST backbone alone (qft_ds.hf_save): without the side network it is not the
    trained model."""
    raise hf_save.DenseSaveError(
        "a QST model has no Hugging Face form (no dense HF model can hold its side network, the fine-tune), and "
        "this is its frozen backbone alone: call save_pretrained on the QSTModel (engine.module), which writes "
        "qft_ds's QST format (load it with qft_ds.methods.load_qst), or `qft_ds export` a train.py checkpoint")
