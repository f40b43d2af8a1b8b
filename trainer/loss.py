"""LM head plus cross-entropy, chunk by chunk, with the gradients computed in the same pass.

The plain way, `F.cross_entropy(h @ W.T + b, y)`, keeps the (tokens x vocab) logits, the
log-softmax and their gradients alive between forward and backward: with a 50k vocabulary that
is most of the memory traffic of a small model. Here each chunk of rows is turned into logits,
then at once into its loss and into d(loss)/d(logits) = softmax - onehot, which is multiplied
back into the gradients of h, W and b; the chunk is then dropped. Same maths, same FLOPs, no
full logits. The idea is Liger-Kernel's FusedLinearCrossEntropy (and Apple's "Cut Your Losses"
paper), written here in plain PyTorch. Used in fp32 (CPU); the GPU path uses bf16 autocast and
the plain loss, which torch.compile fuses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logits per chunk (512 MB in fp32). Measured on a 2-core CPU: the head's GEMMs dominate and lose
# more to small chunks (short GEMMs, re-reading grad_w) than they gain from cache, so a chunk is
# as big as memory comfortably allows; a typical CPU batch is one chunk.
CHUNK_ELEMENTS = 1 << 27


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        n = h.shape[0]
        valid = y != IGNORE_INDEX
        n_valid = int(valid.sum())
        scale = 1.0 / max(n_valid, 1)
        grad_h = torch.empty_like(h)
        grad_w = torch.empty_like(w)
        grad_b = torch.empty_like(b)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = _chunk_rows(w.shape[0])
        for s in range(0, n, rows):
            hc, yc, vc = h[s : s + rows], y[s : s + rows], valid[s : s + rows]
            # softmax in one pass; the loss is -log p[target] (clamped: p underflows only past
            # 87 nats, a loss no training run sees)
            p = torch.softmax(torch.addmm(b, hc, w.t()), dim=-1)
            yi = yc.clamp_min(0).unsqueeze(1)
            nll = -p.gather(1, yi).squeeze(1).clamp_min(torch.finfo(p.dtype).tiny).log()
            loss += torch.where(vc, nll, 0.0).sum()
            p.scatter_add_(1, yi, torch.full_like(yi, -1.0, dtype=p.dtype))
            if n_valid < n:
                p.mul_(vc.unsqueeze(1))
            torch.mm(p, w, out=grad_h[s : s + rows])
            if s == 0:  # the first chunk writes the gradients, later ones accumulate
                torch.mm(p.t(), hc, out=grad_w)
                torch.sum(p, 0, out=grad_b)
            else:
                grad_w.addmm_(p.t(), hc)
                grad_b += p.sum(0)
        grad_h.mul_(scale)
        grad_w.mul_(scale)
        grad_b.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss * scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * g, grad_w * g, grad_b * g, None


def _loss_only(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    rows = _chunk_rows(w.shape[0])
    for s in range(0, h.shape[0], rows):
        logits = torch.addmm(b, h[s : s + rows], w.t()).float()
        total += F.cross_entropy(logits, y[s : s + rows], reduction="sum")
    return total / max(int((y != IGNORE_INDEX).sum()), 1)


@torch.compiler.disable  # eager by design: torch.compile would only break its graph here
def linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ w.T + b) against y; h (..., D), y (...)."""
    h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or b.requires_grad):
        out: torch.Tensor = _LinearCrossEntropy.apply(h2, w, b, y2)
        return out
    return _loss_only(h2, w, b, y2)
