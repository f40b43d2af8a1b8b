"""The Phi model (Phi-1, Phi-1.5, Phi-2), as Hugging Face transformers' PhiForCausalLM defines it.

One block is parallel: a single LayerNorm feeds attention and the MLP side by side,

    x = x + dropout(attn(ln(x))) + dropout(mlp(ln(x)))

Attention has biases on q/k/v/dense, rotary embeddings on the first `rotary_pct` of each head's
dimensions (0.5 for phi-1.5, 0.4 for phi-2; theta 10000) and optional LayerNorms on q and k.
The MLP is fc1 -> gelu (tanh form, "gelu_new") -> fc2 at 4x width. A final LayerNorm and an
untied LM head with a bias close the model.

Three things differ from transformers' code without changing the maths:
- q, k, v and fc1 all read the same ln(x), so they are one matrix multiply (`in_proj`);
  `trainer.export` splits it back into transformers' q_proj/k_proj/v_proj/fc1.
- rotary runs once over q and k together, in fewer kernels (`Rotary`).
- training computes the LM head and the cross-entropy chunk by chunk, gradients included
  (`trainer.loss.linear_cross_entropy`), so the (tokens x vocab) logits never exist in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from booksmith.trainer.loss import linear_cross_entropy


@dataclass
class ModelConfig:
    vocab_size: int = 256  # padded to a multiple of 64 by `padded_vocab`
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    intermediate_size: int = 0  # 0 means 4 * n_embd
    rotary_pct: float = 0.5  # partial_rotary_factor
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    qk_layernorm: bool = False
    layer_norm_eps: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.intermediate_size == 0:
            self.intermediate_size = 4 * self.n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def padded_vocab(n_vocab: int, multiple: int = 64) -> int:
    """Round the encoding's vocabulary up to a multiple of 64 (faster matmuls, room to spare)."""
    return (n_vocab + multiple - 1) // multiple * multiple


class Rotary(nn.Module):
    """Tables that rotate the first rotary_dim channels of each head, for max_seq_len positions.

    transformers computes x * cos + rotate_half(x) * sin on the rotated channels, with
    rotate_half(x) = cat(-x2, x1), then concatenates the untouched rest. Here the same sum runs
    over the whole head, x * cos + cat(x2, x1, rest) * sin: the sign of -x2 lives in `sin`,
    and the rest passes through as cos = 1, sin = 0. Same products, and three kernels for q and
    k together instead of six for each (fewer still in backward: no slice or neg gradients).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float), inv_freq)
        self.rot_half = freqs.shape[1]  # rotated channels / 2
        rest = cfg.head_dim - 2 * self.rot_half
        ones, zeros = torch.ones(cfg.max_seq_len, rest), torch.zeros(cfg.max_seq_len, rest)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos, ones), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin, zeros), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, T, heads, head_dim) by position."""
        T, h = x.shape[1], self.rot_half
        cos, sin = self.cos[:T, None].to(x.dtype), self.sin[:T, None].to(x.dtype)  # bf16 too
        swapped = torch.cat((x[..., h : 2 * h], x[..., :h], x[..., 2 * h :]), dim=-1)
        return torch.addcmul(x * cos, swapped, sin)


class Block(nn.Module):
    """One Phi decoder layer: parallel attention and MLP over one LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, ff = cfg.n_embd, cfg.intermediate_size
        self.ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.in_proj = nn.Linear(d, 3 * d + ff)  # [q | k | v | fc1], all with biases
        self.dense = nn.Linear(d, d)  # attention output projection
        self.fc2 = nn.Linear(ff, d)
        if cfg.qk_layernorm:
            self.q_ln = nn.LayerNorm(cfg.head_dim, eps=cfg.layer_norm_eps)
            self.k_ln = nn.LayerNorm(cfg.head_dim, eps=cfg.layer_norm_eps)
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        cfg = self.cfg
        B, T, D = x.shape
        H, hd = cfg.n_head, cfg.head_dim
        qk, v, ff = self.in_proj(self.ln(x)).split([2 * D, D, cfg.intermediate_size], dim=-1)
        qk = qk.view(B, T, 2 * H, hd)  # q's heads then k's: one rotary call for both
        if cfg.qk_layernorm:
            q, k = qk.split(H, dim=2)
            qk = torch.cat((self.q_ln(q), self.k_ln(k)), dim=2)
        q, k = rotary(qk).transpose(1, 2).split(H, dim=1)
        v = v.view(B, T, H, hd).transpose(1, 2)
        # flash / memory-efficient kernels on GPU, a fused kernel on CPU
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=cfg.attn_pdrop if self.training else 0.0
        )
        y = self.dense(y.transpose(1, 2).reshape(B, T, D))
        m = self.fc2(F.gelu(ff, approximate="tanh"))
        return x + self.resid_drop(y) + self.resid_drop(m)


class Phi(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_drop = nn.Dropout(cfg.embd_pdrop)
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)  # untied, with a bias
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' PhiPreTrainedModel: normal(0, 0.02) weights, zero biases
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, n_embd)."""
        T = idx.shape[1]
        if self.cfg.max_seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed_drop(self.embed(idx))
        for block in self.layers:
            x = block(x, self.rotary)
        return self.final_ln(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, fused_loss: bool = True
    ) -> torch.Tensor:
        """Logits (B, T, V) without targets; the mean cross-entropy with them."""
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(h)
        if fused_loss:
            return linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, targets)
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls (N excludes the embedding lookup) plus
        the attention scores and values, 12 * layers * d * T (the PaLM appendix B count)."""
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def optim_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay matrices (linear and embedding weights); never biases or LayerNorm params."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        rest = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
