"""TinyMoE: a decoder-only, pre-norm transformer whose FFNs are MoE layers (nanoGPT-sized).

Legend: B batch, S sequence length, D model dim, H heads, V vocabulary, F expert hidden, K top-k.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import EC_EVAL_MODES, ModelConfig, MoEConfig
from .moe import MoEFeedForward, MoEStats
from .routing import table_seed, token_expert_counts


class DenseFeedForward(torch.nn.Module):
    """A dense GELU/SwiGLU MLP with the same weight layout and init as one expert."""

    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w1_DF = torch.nn.Parameter(torch.randn(dim, hidden) / math.sqrt(dim))
        self.w2_FD = torch.nn.Parameter(torch.randn(hidden, dim) / math.sqrt(hidden))
        self.w3_DF = torch.nn.Parameter(torch.randn(dim, hidden) / math.sqrt(dim)) if activation == "swiglu" else None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        up = x_BSD @ self.w1_DF
        h = F.silu(x_BSD @ self.w3_DF) * up if self.w3_DF is not None else F.gelu(up)
        return h @ self.w2_FD


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.qkv = torch.nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = torch.nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


class Block(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, token_counts=None):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(cfg.dim, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = torch.nn.LayerNorm(cfg.dim, bias=False)
        moe = cfg.moe
        if cfg.is_moe_layer(layer):
            self.ffn = MoEFeedForward(_layer_moe_config(moe, layer), token_counts)
        else:
            self.ffn = DenseFeedForward(cfg.dim, moe.top_k * moe.hidden, moe.activation)
        self.drop = torch.nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, idx_BS: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD)))
        h = self.ln2(x_BSD)
        if isinstance(self.ffn, MoEFeedForward):
            out, stats = self.ffn(h, token_ids=idx_BS)
        else:
            out, stats = self.ffn(h), None
        return x_BSD + self.drop(out), stats


def _layer_moe_config(moe: MoEConfig, layer: int) -> MoEConfig:
    """Each layer's hash router gets its own seeded table, so layers do not share one partition."""
    return replace(moe, hash_seed=table_seed(moe) + layer) if moe.router == "hash" else moe


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None  # cross-entropy only, nats per token
    aux_loss: torch.Tensor  # sum over MoE layers of the Switch balance loss
    z_loss: torch.Tensor  # sum over MoE layers of the router z-loss
    stats: list[MoEStats]  # one per MoE layer


class TinyMoEModel(torch.nn.Module):
    """Token + learned position embeddings, pre-norm blocks (causal SDPA attention, MoE or dense FFN),
    final norm, weight-tied LM head. Training loss = out.loss + out.aux_loss + out.z_loss.
    ``token_counts`` [V]: the training split's count of each token id, which a frequency-balanced hash
    table (``hash_balance="frequency"``) is built from; other configs ignore it."""

    def __init__(self, cfg: ModelConfig, token_counts=None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = torch.nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = torch.nn.Embedding(cfg.seq_len, cfg.dim)
        self.drop = torch.nn.Dropout(cfg.dropout)
        self.blocks = torch.nn.ModuleList(Block(cfg, i, token_counts) for i in range(cfg.layers))
        self.ln_f = torch.nn.LayerNorm(cfg.dim, bias=False)
        self.lm_head = torch.nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        for name, p in self.named_parameters():
            if name.endswith(("qkv.weight", "emb.weight")):
                torch.nn.init.normal_(p, std=cfg.init_std)
            elif name.endswith("proj.weight"):  # residual projections scaled by depth (GPT-2)
                torch.nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.layers))

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]

    def set_expert_choice_eval(self, mode: str) -> None:
        """How expert_choice layers route in eval mode: "causal" (token-choice top-k), "noncausal"
        (the training rule) or "prefix" (the training rule over causal prefix groups)."""
        if mode not in EC_EVAL_MODES:
            raise ValueError(f"mode: unknown {mode!r}; valid: {', '.join(EC_EVAL_MODES)}")
        for layer in self.moe_layers():
            layer.router.ec_eval = mode

    @contextlib.contextmanager
    def counting_assignments(self) -> Iterator[torch.Tensor]:
        """Inside the block, every forward adds each MoE layer's (token id, chosen expert) pairs
        (routing.token_expert_counts) to the yielded counts_LVE [L, V, E], float64 on the model's device."""
        layers = self.moe_layers()
        counts_LVE = torch.zeros(len(layers), self.cfg.vocab_size, self.cfg.moe.num_experts, dtype=torch.float64,
                                 device=self.tok_emb.weight.device)

        def adder(i: int):
            def add(router, args, out) -> None:  # args: (x_TD, token_ids_T, seq_len)
                counts_LVE[i] += token_expert_counts(out[0], args[1], self.cfg.vocab_size)
            return add

        hooks = [layer.router.register_forward_hook(adder(i)) for i, layer in enumerate(layers)]
        try:
            yield counts_LVE
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        B, S = idx_BS.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"idx: sequence length {S} exceeds seq_len={self.cfg.seq_len}")
        pos_S = torch.arange(S, device=idx_BS.device)
        x_BSD = self.drop(self.tok_emb(idx_BS) + self.pos_emb(pos_S))
        stats = []
        for block in self.blocks:
            x_BSD, layer_stats = block(x_BSD, idx_BS)
            if layer_stats is not None:
                stats.append(layer_stats)
        logits_BSV = self.lm_head(self.ln_f(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.float().view(B * S, -1), targets_BS.reshape(-1))
        zero = logits_BSV.new_zeros((), dtype=torch.float32)
        return ModelOutput(logits=logits_BSV, loss=loss,
                           aux_loss=sum((s.aux_loss for s in stats), zero),
                           z_loss=sum((s.z_loss for s in stats), zero), stats=stats)
