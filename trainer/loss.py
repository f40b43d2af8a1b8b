"""LM head plus cross-entropy, chunk by chunk, with the gradients computed in the same pass.

The plain way, `F.cross_entropy(h @ W.T + b, y)`, keeps the (tokens x vocab) logits, the
log-softmax and their gradients alive between forward and backward: with a 50k vocabulary that
is most of the memory traffic of a small model. Here each chunk of rows is turned into logits,
then, in the same buffer, into its softmax, its loss and d(loss)/d(logits) = softmax - onehot,
which is multiplied back into the gradients of h, W and b. Same maths, same FLOPs, no full
logits, and on CPU one (rows x vocab) buffer reused from step to step. The idea is Liger-Kernel's
FusedLinearCrossEntropy (and Apple's "Cut Your Losses" paper), written here in plain PyTorch.
Used in fp32 (CPU); the GPU path uses bf16 autocast and the plain loss, which torch.compile
fuses.
"""

from __future__ import annotations

import threading
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


# Rows of the logits buffer are this many floats longer than the vocabulary. A row stride with
# a large power-of-two factor (49,152 floats = 3 * 2**16 bytes) maps the GEMMs' rows onto a few
# cache sets: padding made the forward and grad_w GEMMs 8-11% faster at vocab 49,152, and the
# whole loss 6% (2 cores; 2% at 100,352).
# The pad holds -inf before the softmax, so it adds nothing to the sums and ends up as zeros.
ROW_PAD = 16

# One logits buffer per thread, kept between steps on CPU: a fresh 400 MB tensor each step is
# mapped from the OS and faulted in page by page, which costs as much as the softmax itself.
# (CUDA's caching allocator reuses memory already.)
_local = threading.local()


def _workspace(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    if like.device.type != "cpu":
        return torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    buf: torch.Tensor | None = getattr(_local, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < rows * cols:
        _local.buf = None  # free the old buffer before taking a bigger one
        buf = _local.buf = torch.empty(rows * cols, dtype=like.dtype)
    return buf[: rows * cols].view(rows, cols)


def free_workspace() -> None:
    """Drop this thread's logits buffer (up to 512 MB), e.g. when a training run ends in a
    long-lived worker."""
    _local.buf = None


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place on CPU. The CPU kernel reads each row before it
    writes the same positions, so output may alias input; a copy would be another 400 MB."""
    if x.device.type == "cpu":
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    return torch.softmax(x, dim=-1)


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
        rows, vocab = _chunk_rows(w.shape[0]), w.shape[0]
        buf = _workspace(min(n, rows), vocab + ROW_PAD, h)
        for s in range(0, n, rows):
            hc, yc, vc = h[s : s + rows], y[s : s + rows], valid[s : s + rows]
            full = buf[: hc.shape[0]]
            full[:, vocab:] = -torch.inf
            torch.addmm(b, hc, w.t(), out=full[:, :vocab])
            p = _softmax_(full)[:, :vocab]
            # the loss is -log p[target] (clamped: p underflows only past 87 nats, a loss no
            # training run sees)
            yi = yc.clamp_min(0).unsqueeze(1)
            nll = -p.gather(1, yi).squeeze(1).clamp_min(torch.finfo(p.dtype).tiny).log()
            loss += torch.where(vc, nll, 0.0).sum()
            p.scatter_add_(1, yi, torch.full_like(yi, -1.0, dtype=p.dtype))  # softmax - onehot
            # Each row's weight in the mean (0 for ignored rows) scales the small operands,
            # h's rows and grad_h's rows, never the (rows x vocab) block or grad_w.
            wt = vc.to(p.dtype) * scale
            hc = hc * wt[:, None]
            torch.mm(p, w, out=grad_h[s : s + rows]).mul_(wt[:, None])
            if s == 0:  # the first chunk writes the gradients, later ones accumulate
                torch.mm(p.t(), hc, out=grad_w)
                torch.mv(p.t(), wt, out=grad_b)  # weighted column sums: a GEMV reads p fastest
            else:
                grad_w.addmm_(p.t(), hc)
                grad_b.addmv_(p.t(), wt)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss * scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = ctx.saved_tensors
        # Usually g is 1 (loss.backward()): hand the gradients over as they are, which lets
        # autograd keep them as .grad instead of allocating a scaled copy of grad_w. (Should a
        # retained graph run backward again after clipping changed them in place, autograd's
        # version check raises.)
        if g.item() != 1.0:
            grads = tuple(t * g for t in grads)
        return *grads, None


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
