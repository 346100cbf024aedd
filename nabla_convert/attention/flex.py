"""Block-sparse attention on a NABLA block mask: FlexAttention and a dense reference.

Facts this module is built around (DESIGN §2):
- eager flex_attention ignores the block indices, so the BlockMask always carries a mask_mod that
  looks the block up; compiled kernels skip it on full blocks, so it costs nothing there;
- after dynamo's recompile limit a compiled frame silently falls back to eager, which materialises
  S x S scores: we compile with dynamic=False and make that fallback an error instead;
- the full and partial index tensors must be distinct tensors (the CPU compile breaks otherwise).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

Backend = Literal["auto", "flex", "flex_eager", "reference"]
BACKENDS = ("auto", "flex", "flex_eager", "reference")


def compact_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) bool -> (count (...,), indices (..., n)) int32, selected columns first, without a sort."""
    n = selected.shape[-1]
    count = selected.sum(-1, dtype=torch.int32)
    position = torch.where(selected, selected.cumsum(-1) - 1, n)
    columns = torch.arange(n, device=selected.device).expand_as(selected)
    indices = torch.zeros(*selected.shape[:-1], n + 1, dtype=torch.long, device=selected.device)
    indices.scatter_(-1, position, columns)
    return count, indices[..., :n].to(torch.int32).contiguous()


def keep_mask_mod(keep: torch.Tensor, q_block: int, kv_block: int, valid: torch.Tensor | None = None):
    """mask_mod that looks the block up in `keep` (B, H, nq, nk) and drops padding keys."""
    if valid is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx // q_block, kv_idx // kv_block]

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx // q_block, kv_idx // kv_block] & valid[kv_idx]

    return mask_mod


def to_block_mask(
    keep: torch.Tensor,
    *,
    q_block: int = 64,
    kv_block: int = 64,
    valid: torch.Tensor | None = None,
    for_backward: bool = False,
) -> BlockMask:
    """FlexAttention BlockMask from a (B, H, nq, nk) block selection.

    Kept blocks without padding are full blocks (no mask_mod in compiled kernels); kept blocks that
    hold padding keys are partial blocks, where the mask_mod drops the padding. `for_backward`
    also builds the transposed (q-block) indices the backward kernel needs.
    """
    keep = keep.contiguous()
    if valid is None:
        full, partial = keep, torch.zeros_like(keep)
    else:
        kv_whole = valid.view(-1, kv_block).all(-1)
        full, partial = keep & kv_whole, keep & ~kv_whole
    full_count, full_indices = compact_indices(full)
    partial_count, partial_indices = compact_indices(partial)
    seq_len = keep.shape[-2] * q_block
    return BlockMask.from_kv_blocks(
        partial_count,
        partial_indices,
        full_count,
        full_indices,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=keep_mask_mod(keep, q_block, kv_block, valid),
        seq_lengths=(seq_len, keep.shape[-1] * kv_block),
        compute_q_blocks=for_backward,
    )


def dense_token_mask(
    keep: torch.Tensor, q_block: int, kv_block: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a (B, H, nq, nk) block selection to a (B, H, S, S) token mask."""
    mask = keep.repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)
    return mask if valid is None else mask & valid


class RecompileLimitError(RuntimeError):
    pass


_compiled_flex = None


def _compiled():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def compiled_flex_attention(q, k, v, block_mask: BlockMask, *, scale: float | None = None, kernel_options=None):
    """flex_attention compiled once per shape; hitting the recompile limit raises instead of going eager."""
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return _compiled()(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise RecompileLimitError(
            "FlexAttention hit dynamo's recompile limit; refusing the eager fallback, which would "
            "compute dense S x S scores. Reduce the number of distinct shapes or raise "
            "torch._dynamo.config.recompile_limit."
        ) from err


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    q_block: int = 64,
    kv_block: int = 64,
    valid: torch.Tensor | None = None,
    backend: Backend = "auto",
    scale: float | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Attention of q, k, v (B, H, S, D) restricted to the kept blocks, softmax renormalised over them.

    backend: "flex" (compiled FlexAttention), "flex_eager" (uncompiled, for checks), "reference"
    (dense token mask through SDPA: any device, supports backward, O(S^2) memory), "auto" (flex on
    CUDA, reference elsewhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "reference"
    if backend == "reference":
        mask = dense_token_mask(keep, q_block, kv_block, valid)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    block_mask = to_block_mask(
        keep, q_block=q_block, kv_block=kv_block, valid=valid, for_backward=torch.is_grad_enabled() and q.requires_grad
    )
    if backend == "flex_eager":
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    return compiled_flex_attention(q, k, v, block_mask, scale=scale, kernel_options=kernel_options)


def padded_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Dense attention in tile order; padding keys masked out when there are any."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if valid is None else valid[None, :], scale=scale)
