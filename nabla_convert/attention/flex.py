"""Block-sparse attention on a NABLA block mask: FlexAttention and a dense reference.

Facts this module is built around (measured on torch 2.11; docs/benchmarks.md):
- eager flex_attention ignores the block indices, so its BlockMask carries a mask_mod that looks the
  block up; compiled CUDA kernels visit the listed blocks only and get the lightest mask_mod that is
  still exact (none without padding: a captured one slows the kernel even where it is never run);
- after dynamo's recompile limit a compiled frame silently falls back to eager, which materialises
  S x S scores: we compile with dynamic=False and make that fallback an error instead;
- the full and partial index tensors must be distinct tensors (the CPU compile breaks otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nabla_convert.config import BACKENDS

Backend = Literal["auto", "flex", "flex_eager", "reference"]


def compact_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) bool -> (count (...,), indices (..., n)) int32, selected columns first, without a sort."""
    n = selected.shape[-1]
    count = selected.sum(-1, dtype=torch.int32)
    position = torch.where(selected, selected.cumsum(-1) - 1, n)
    columns = torch.arange(n, device=selected.device).expand_as(selected)
    indices = torch.zeros(*selected.shape[:-1], n + 1, dtype=torch.long, device=selected.device)
    indices.scatter_(-1, position, columns)
    return count, indices[..., :n].to(torch.int32).contiguous()


def key_mask(valid: torch.Tensor) -> torch.Tensor:
    """Key validity as an attention mask over (B, H, S_q, S_k): (S,) shared by the batch becomes (1, S), (B, S) (per
    batch item: a text padding mask) becomes (B, 1, 1, S)."""
    return valid[None, :] if valid.dim() == 1 else valid[:, None, None, :]


def _valid_key(valid: torch.Tensor):
    """valid_key(b, kv_idx) for a key validity of shape (S,) or (B, S)."""
    if valid.dim() == 1:
        return lambda b, kv_idx: valid[kv_idx]
    return lambda b, kv_idx: valid[b, kv_idx]


def keep_mask_mod(keep: torch.Tensor, q_block: int, kv_block: int, valid: torch.Tensor | None = None):
    """mask_mod that looks the block up in `keep` (B, H, nq, nk) and drops padding keys (valid: (S,) or (B, S))."""
    if valid is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx // q_block, kv_idx // kv_block]

    else:
        valid_key = _valid_key(valid)

        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx // q_block, kv_idx // kv_block] & valid_key(b, kv_idx)

    return mask_mod


def padding_mask_mod(valid: torch.Tensor):
    """mask_mod that only drops padding keys: enough for compiled kernels, which visit listed blocks alone."""
    valid_key = _valid_key(valid)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid_key(b, kv_idx)

    return mask_mod


def kv_whole_blocks(valid: torch.Tensor | None, kv_block: int, n_kv: int, device: torch.device) -> torch.Tensor:
    """Which key blocks hold no padding token (all of them for an unpadded layout): (nk,), or (B, 1, 1, nk) for a
    per-batch validity (B, S)."""
    if valid is None:
        return torch.ones(n_kv, dtype=torch.bool, device=device)
    if valid.dim() == 2:
        return valid.view(valid.shape[0], 1, 1, -1, kv_block).all(-1)
    return valid.view(-1, kv_block).all(-1)


def joint_validity(
    prefix_valid: torch.Tensor | None,
    prefix_len: int,
    suffix_valid: torch.Tensor | None,
    suffix_len: int | None = None,
) -> torch.Tensor | None:
    """Token validity of a tile-order sequence (padding tokens: prefix_valid (S,), None without padding) followed by
    a dense suffix (text tokens, suffix_valid (B, L), None without one) of `suffix_len` tokens (default L; tokens
    past L are padding): None, (S,) or (B, S + suffix_len).

    Built by gathering, not by cat or pad: inside a compiled graph this tensor is the mask_mod's captured buffer,
    which inductor inlines into the flex template, and cat and pad lower to masked loads that the Triton
    template cannot inline (torch 2.11: "'function' object has no attribute 'graph'").
    """
    if suffix_valid is None:
        return prefix_valid
    length = suffix_valid.shape[-1]
    suffix_len = length if suffix_len is None else suffix_len
    if suffix_len < length:
        raise ValueError(f"a dense suffix of {suffix_len} tokens cannot hold {length} text tokens")
    position = torch.arange(prefix_len + suffix_len, device=suffix_valid.device)
    text = position - prefix_len
    in_text = (text >= 0) & (text < length)
    valid = suffix_valid.bool()[:, text.clamp(0, length - 1)] & in_text
    if prefix_valid is None:
        return valid | (text < 0)
    return torch.where(text < 0, prefix_valid[position.clamp(max=prefix_len - 1)], valid)


def dense_suffix_keep(keep: torch.Tensor, valid: torch.Tensor, q_block: int, kv_block: int) -> torch.Tensor:
    """A block selection (B, H, nq, nk) of a tile-order sequence extended by a dense suffix whose token validity
    is the tail of `valid` (B, S + L): the prefix rows keep every suffix key block holding a real token, the suffix
    rows holding a real token keep every key block holding one, all-padding suffix rows keep nothing."""
    B, H, nq, nk = keep.shape
    real_keys = valid.view(valid.shape[0], -1, kv_block).any(-1)[:, None, None, :]  # (B, 1, 1, nk + nk_s)
    real_rows = valid[:, nq * q_block :].reshape(valid.shape[0], -1, q_block).any(-1)[:, None, :, None]
    prefix = torch.cat([keep, real_keys[..., nk:].expand(B, H, nq, -1)], dim=-1)
    return torch.cat([prefix, (real_keys & real_rows).expand(B, H, -1, -1)], dim=-2)


def _append_suffix(
    count: torch.Tensor, indices: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask index tensors (count (B, H, nq), indices (B, H, nq, nk)) of prefix rows extended by a dense suffix:
    each prefix row also lists the suffix key blocks of `columns` (B, nk + nk_s) bool, and suffix rows (`rows`
    (B, nq_s) bool: rows that compute) list every column. No sort: the suffix ids go after each row's count."""
    B, H, nq, nk = indices.shape
    width = columns.shape[-1]
    extra_count, extra = compact_indices(columns[:, nk:])  # (B,), (B, nk_s), ids local to the suffix
    all_count, every = compact_indices(columns)
    slots = torch.arange(width - nk, device=indices.device)
    extra = torch.where(slots < extra_count[:, None], extra + nk, 0).to(indices.dtype)  # zeros past the count
    out = indices.new_zeros(B, H, nq + rows.shape[-1], width)
    out[..., :nq, :nk] = indices
    out[..., :nq, :].scatter_(-1, (count[..., None] + slots).long(), extra[:, None, None, :].expand(B, H, nq, -1))
    out[..., nq:, :] = (every[:, None, :] * rows[..., None])[:, None]  # rows that compute nothing list nothing
    suffix_count = torch.where(rows, all_count[:, None], 0)[:, None, :].expand(B, H, -1)
    return torch.cat([count + extra_count[:, None, None], suffix_count.to(count.dtype)], dim=-1), out


@dataclass(frozen=True)
class BlockSelection:
    """A block selection and the BlockMask index tensors built from it (no sort).

    keep (B, H, nq, nk) bool; full_* index the kept key blocks without padding tokens (the
    compiled kernel skips the mask_mod there), partial_* the kept blocks that hold padding keys
    (the mask_mod drops them).
    """

    keep: torch.Tensor
    full_count: torch.Tensor
    full_indices: torch.Tensor
    partial_count: torch.Tensor
    partial_indices: torch.Tensor
    q_block: int
    kv_block: int
    valid: torch.Tensor | None

    @classmethod
    def from_keep(
        cls, keep: torch.Tensor, *, q_block: int = 64, kv_block: int = 64, valid: torch.Tensor | None = None
    ) -> BlockSelection:
        whole = kv_whole_blocks(valid, kv_block, keep.shape[-1], keep.device)
        full_count, full_indices = compact_indices(keep & whole)
        partial_count, partial_indices = compact_indices(keep & ~whole)
        return cls(keep, full_count, full_indices, partial_count, partial_indices, q_block, kv_block, valid)

    def with_dense_suffix(self, suffix_valid: torch.Tensor, length: int | None = None) -> BlockSelection:
        """This selection of a tile-order sequence followed by a dense suffix of text tokens (joint attention).

        suffix_valid (B, L) marks real text tokens (False: text padding, never attended to); the suffix has
        `length` tokens (default L; tokens past L are padding), which must divide by the query and key
        blocks. Video rows keep their blocks plus every text key block, text rows keep every key block (rows
        of text padding alone keep none: their output is never read). The BlockMask index tensors are
        extended without recomputing the prefix's (its fused-kernel output is kept).
        """
        q_block, kv_block = self.q_block, self.kv_block
        B, nk = self.keep.shape[0], self.keep.shape[-1]
        length = suffix_valid.shape[-1] if length is None else length
        if length % q_block or length % kv_block:
            raise ValueError(f"a dense suffix of {length} tokens does not divide into {q_block}/{kv_block} blocks")
        suffix_valid = suffix_valid.to(device=self.keep.device, dtype=torch.bool)
        valid = joint_validity(self.valid, nk * kv_block, suffix_valid, length)
        blocks = valid.view(B, -1, kv_block)
        real, whole = blocks.any(-1), blocks.all(-1)
        rows = valid[:, nk * kv_block :].reshape(B, -1, q_block).any(-1)
        full = _append_suffix(self.full_count, self.full_indices, real & whole, rows)
        partial = _append_suffix(self.partial_count, self.partial_indices, real & ~whole, rows)
        keep = dense_suffix_keep(self.keep, valid, q_block, kv_block)
        return BlockSelection(keep, *full, *partial, q_block, kv_block, valid)

    def density(self, real_q_blocks: int, real_kv_blocks: int) -> torch.Tensor:
        """Mean fraction of computed block pairs over the blocks that hold real tokens (0-dim, no sync).

        Counted from the index tensors, so the keep mask need not exist in a compiled graph. Only the
        trailing blocks of a padded layout can be all padding: the first `real_q_blocks` query rows
        count, and the kernels never keep a key block without real tokens.
        """
        kept = (self.full_count + self.partial_count)[..., :real_q_blocks]
        return kept.sum(-1, dtype=torch.float32).mean() / (real_q_blocks * real_kv_blocks)

    def block_mask(self, for_backward: bool = False, compiled: bool = False) -> BlockMask:
        """The FlexAttention BlockMask; `for_backward` adds the transposed indices (one sort, training only).

        Compiled CUDA kernels evaluate the mask_mod only on the listed partial blocks, all kept, so
        there it just drops padding keys (measured 1.2x faster at 1280x720 on H100 than the keep
        lookup), and without padding (no partial blocks) there is none: a captured mask_mod, even
        never evaluated, made the 64x64 kernel 1.36x slower (697 vs 512 ms, K5 Pro call on H200,
        docs/benchmarks.md). Eager flex and inductor's CPU kernel do not skip unlisted blocks, so they
        get the mask_mod that looks the block up.
        """
        nq, nk = self.keep.shape[-2:]
        if compiled:
            mask_mod = None if self.valid is None else padding_mask_mod(self.valid)
        else:
            mask_mod = keep_mask_mod(self.keep, self.q_block, self.kv_block, self.valid)
        return BlockMask.from_kv_blocks(
            self.partial_count,
            self.partial_indices,
            self.full_count,
            self.full_indices,
            BLOCK_SIZE=(self.q_block, self.kv_block),
            mask_mod=mask_mod,
            seq_lengths=(nq * self.q_block, nk * self.kv_block),
            compute_q_blocks=for_backward,
        )


def to_block_mask(
    keep: torch.Tensor,
    *,
    q_block: int = 64,
    kv_block: int = 64,
    valid: torch.Tensor | None = None,
    for_backward: bool = False,
) -> BlockMask:
    """FlexAttention BlockMask from a (B, H, nq, nk) block selection."""
    return BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block, valid=valid).block_mask(for_backward)


def dense_token_mask(
    keep: torch.Tensor, q_block: int, kv_block: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a (B, H, nq, nk) block selection to a (B, H, S, S) token mask."""
    mask = keep.repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)
    return mask if valid is None else mask & key_mask(valid)


class RecompileLimitError(RuntimeError):
    pass


class FlexKernelError(RuntimeError):
    """No FlexAttention kernel compiles for these mask blocks on this torch and card."""


# One process may honestly see several shapes and block sizes, forward and backward; past this
# many compiles of flex_attention something is recompiling per call, and we stop instead.
FLEX_RECOMPILE_LIMIT = 64
_compiled_flex = None


# Forward kernel options measured best on Hopper (H200, torch 2.11, bf16, 80,640 padded tokens x 40 heads,
# density 0.1; scripts/bench_models.py's kernel sweep, docs/benchmarks.md), by (q_block, kv_block, head_dim), on
# top of the tiles `kernel_options_for` picks. TMA loads: 32.97 -> 30.71 ms at head dim 128, 18.10 -> 17.81 at 64;
# other stage and warp counts were slower or within noise. Inductor drops USE_TMA where the card cannot use it.
TUNED_KERNEL_OPTIONS: dict[tuple[int, int, int], dict[str, int | bool]] = {
    (128, 64, 128): {"USE_TMA": True},
    (128, 64, 64): {"USE_TMA": True},
}


def kernel_options_for(q_block: int, kv_block: int, head_dim: int = 128) -> dict[str, int | bool]:
    """Forward flex kernel options: tiles that divide the mask blocks, plus the tuned Hopper settings.

    A kernel tile must divide the mask block along its axis, so 64-token query blocks need
    BLOCK_M = 64 (measured 2.2x slower than 128x64 on H100). Backward has no such override on
    torch 2.11: its default tiles (64, 128, 128, 64) need 128x128 mask blocks, other sizes need
    max-autotune (measured: "No choices" for 64x64 and 128x64 without it).
    """
    tiles = {"fwd_BLOCK_M": min(128, q_block), "fwd_BLOCK_N": min(64, kv_block)}
    return {**tiles, **TUNED_KERNEL_OPTIONS.get((q_block, kv_block, head_dim), {})}


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn on inductor's persistent FX-graph and autograd caches in a directory that outlives /tmp.

    A second process (or a later run) then loads compiled flex kernels instead of rebuilding them.
    An existing TORCHINDUCTOR_CACHE_DIR wins over `cache_dir`.
    """
    default = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nabla-convert" / "inductor"
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path


def _compiled():
    global _compiled_flex
    if _compiled_flex is None:
        enable_compile_cache()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def compiled_flex_attention(q, k, v, block_mask: BlockMask, *, scale: float | None = None, kernel_options=None):
    """flex_attention compiled once per shape; hitting the recompile limit raises instead of going eager.

    Inside a graph that torch.compile is already tracing (a compiled transformer block), flex_attention
    is called as is: it becomes part of that graph, with the mask build in front of it.
    """
    if torch.compiler.is_compiling():
        if not q.is_cuda:  # inductor's CPU flex template needs 4-D buffers, not views of the 5-D RoPE output
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=FLEX_RECOMPILE_LIMIT):
            return _compiled()(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        if "NoValidChoicesError" not in repr(err):
            raise
        q_block, kv_block = block_mask.BLOCK_SIZE
        raise FlexKernelError(
            f"torch {torch.__version__} has no FlexAttention kernel for {q_block}x{kv_block} mask blocks here "
            "(the backward's default tiles need 128x128 blocks; other sizes need max-autotune): convert models "
            "meant for training with q_block=128, kv_block=128"
        ) from err
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise RecompileLimitError(
            f"FlexAttention hit the recompile limit ({FLEX_RECOMPILE_LIMIT}); refusing the eager fallback, "
            "which would compute dense S x S scores. Reduce the number of distinct shapes or raise "
            "nabla_convert.attention.flex.FLEX_RECOMPILE_LIMIT."
        ) from err


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: torch.Tensor | BlockSelection,
    *,
    q_block: int = 64,
    kv_block: int = 64,
    valid: torch.Tensor | None = None,
    backend: Backend = "auto",
    scale: float | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Attention of q, k, v (B, H, S, D) restricted to the kept blocks, softmax renormalised over them.

    `selection` is a (B, H, nq, nk) keep mask (with q_block, kv_block and the token validity
    `valid` of a padded layout), or a BlockSelection that carries them. backend: "flex" (compiled
    FlexAttention), "flex_eager" (uncompiled, for checks), "reference" (dense token mask through
    SDPA: any device, supports backward, O(S^2) memory), "auto" (flex on CUDA, reference elsewhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "reference"
    if isinstance(selection, torch.Tensor):
        selection = BlockSelection.from_keep(selection, q_block=q_block, kv_block=kv_block, valid=valid)
    if backend == "reference":
        mask = dense_token_mask(selection.keep, selection.q_block, selection.kv_block, selection.valid)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    for_backward = torch.is_grad_enabled() and q.requires_grad
    if backend == "flex_eager":
        return flex_attention(q, k, v, block_mask=selection.block_mask(for_backward), scale=scale)
    block_mask = selection.block_mask(for_backward, compiled=q.is_cuda)
    if kernel_options is None and q.is_cuda:
        kernel_options = kernel_options_for(selection.q_block, selection.kv_block, q.shape[-1])
    return compiled_flex_attention(q, k, v, block_mask, scale=scale, kernel_options=kernel_options)


def padded_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Dense attention in tile order; padding keys (valid (S,) or (B, S)) masked out when there are any."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if valid is None else key_mask(valid), scale=scale)
