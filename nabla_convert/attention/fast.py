"""NABLA block selection without a sort: per-row cut-value search, fused on the GPU.

The reference (`mask.nabla_block_mask`) sorts every row of the pooled map. A sort cannot meet the
2 ms budget at 67k tokens x 40 heads (docs/benchmarks.md), but the selection needs no order, only the cut:
an entry of value v is kept iff the mass of the entries strictly larger than v is at most the
threshold. That mass only falls as v grows, so the kept set is {p >= c} for one cut value c per
row, found by bisection over the bit patterns of non-negative float32 (whose integer order is
their numeric order). Entries tied with the cut are kept, as in the reference; the only possible
differences are float rounding of the mass right at the cut.

On CUDA with Triton, `nabla_selection` runs as: one pooling kernel per input (Q, K read once),
the pooled map's matmul (cuBLAS, float32), and one kernel per query-block row that does the
softmax, the cut search, the STA union and the compaction into the BlockMask's index tensors.
Elsewhere the same selection runs as torch ops (the path the CPU tests check).
"""

from __future__ import annotations

import math

import torch

from nabla_convert.attention.flex import BlockSelection, kv_whole_blocks
from nabla_convert.attention.mask import (
    PRECISIONS,
    Threshold,
    Window,
    block_scores,
    checked_layout,
    compose_mask,
    head_thresholds,
    pool_blocks,
    real_blocks,
    select_by_sorted_cumsum,
    sta_block_mask,
)
from nabla_convert.attention.tiling import TileLayout
from nabla_convert.config import check_threshold

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None

ONE_BITS = 0x3F800000  # float32 1.0: probabilities lie in [0, 1]
SEARCH_STEPS = 31  # bisection over [0, ONE_BITS] converges in ceil(log2(ONE_BITS + 1)) = 30 steps


def cut_values(probs: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Per row of probs (..., n), the smallest c with sum(p for p > c) <= threshold, shape (..., 1).

    Bisection over float32 bit patterns in [0, 1]; `probs >= cut` is the NABLA selection (below a
    threshold of 1). A per-head threshold (H,) needs probs (B, H, rows, n).
    """
    probs = probs.float()
    limit = head_thresholds(threshold, probs)
    lo = torch.zeros((*probs.shape[:-1], 1), dtype=torch.int32, device=probs.device)
    hi = torch.full_like(lo, ONE_BITS)
    for _ in range(SEARCH_STEPS):
        mid = lo + (hi - lo) // 2
        mass = torch.where(probs > mid.view(torch.float32), probs, 0.0).sum(-1, keepdim=True)
        fits = mass <= limit
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid + 1)
    return hi.view(torch.float32)


def select_by_cut(probs: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Same selection as `mask.select_by_mass` (ties at the cut kept), by a cut-value search instead of a sort.

    `threshold` may be a tensor (0-dim, or (H,) per head): a compiled graph then serves every threshold without a
    recompile. Threshold 0 keeps nothing, 1 everything (tensor ops, no branch on the value).
    """
    if not isinstance(threshold, torch.Tensor):
        check_threshold(threshold)
    limit = head_thresholds(threshold, probs)
    return (probs >= cut_values(probs, threshold)) & (limit > 0.0) | (limit >= 1.0)


def fast_path_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def nabla_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    threshold: Threshold,
    grid: TileLayout | tuple[int, int, int],
    sta: Window | None = None,
    q_block: int = 64,
    kv_block: int = 64,
    precision: str = "float32",
) -> BlockSelection:
    """NABLA selection of q, k (B, H, S, D) in tile order, with its BlockMask index tensors.

    Same arguments and selection as `nabla_block_mask` (up to float rounding of the mass at the
    cut). Fused Triton kernels on CUDA, torch ops elsewhere. `threshold` is one number, or one per head (H,). A
    tensor `threshold` (on q's
    device) keeps the value out of torch.compile's guards. Under torch.compile the pooling is left
    to inductor, which can fuse it with the RoPE/projection work that produced q and k. A float
    threshold 0 is the STA window alone (`sta_selection`, no scores computed); a tensor threshold
    never decides that (callers with a static STA-only flag call `sta_selection`). Precision
    "bfloat16" runs the references' bf16 arithmetic in torch ops.
    """
    if not isinstance(threshold, torch.Tensor):
        check_threshold(threshold)
        if not isinstance(threshold, (list, tuple)) and threshold <= 0.0:
            return sta_selection(q, k, grid=grid, sta=sta, q_block=q_block, kv_block=kv_block)
    layout = checked_layout(q, k, grid, q_block, kv_block)
    valid = layout.indices(q.device).valid if layout.is_padded else None
    sta_blocks = sta_block_mask(layout, sta, q_block, kv_block, q.device) if sta is not None else None
    if precision == "float32" and fast_path_available(q.device):
        if torch.compiler.is_compiling():
            (qa, _), (ka, kv_counts) = pool_blocks(q, q_block, valid), pool_blocks(k, kv_block, valid)
        else:
            (qa, _), (ka, kv_counts) = _pool(q, q_block, valid), _pool(k, kv_block, valid)
        return _triton_selection(qa, ka, kv_counts, threshold, valid, sta_blocks, q_block, kv_block)
    probs, kv_real = block_scores(q, k, q_block, kv_block, valid, PRECISIONS[precision])
    keep = (select_by_sorted_cumsum if precision == "bfloat16" else select_by_cut)(probs, threshold)
    keep = compose_mask(keep, sta_blocks, kv_real)
    return BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block, valid=valid)


def sta_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    grid: TileLayout | tuple[int, int, int],
    sta: Window | None,
    q_block: int = 64,
    kv_block: int = 64,
) -> BlockSelection:
    """The STA window alone (NABLA threshold 0, the official `sta-wT-wH-wW` mode): no scores computed."""
    if sta is None:
        raise ValueError("threshold 0 keeps no block by mass; give an STA window (STA only)")
    layout = checked_layout(q, k, grid, q_block, kv_block)
    valid = layout.indices(q.device).valid if layout.is_padded else None
    sta_blocks = sta_block_mask(layout, sta, q_block, kv_block, q.device)
    keep = (sta_blocks & real_blocks(layout, kv_block, q.device)).expand(q.shape[0], q.shape[1], -1, -1)
    return BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block, valid=valid)


def _triton_selection(
    qa: torch.Tensor,
    ka: torch.Tensor,
    kv_counts: torch.Tensor,
    threshold: Threshold,
    valid: torch.Tensor | None,
    sta_blocks: torch.Tensor | None,
    q_block: int,
    kv_block: int,
) -> BlockSelection:
    """Selection from the float32 pooled qa, ka (B, H, n, D): pooled map, then one Triton kernel per row."""
    B, H, _, D = qa.shape
    device = qa.device
    logits = torch.matmul(qa, ka.transpose(-1, -2))
    nq, nk = logits.shape[-2:]
    kv_real = (kv_counts > 0).to(torch.int8)
    kv_whole = kv_whole_blocks(valid, kv_block, nk, device).to(torch.int8)
    # int8, not bool: inductor cannot lower the int8 -> bool view of a kernel output (torch.iinfo(torch.bool))
    keep = torch.empty(B, H, nq, nk, dtype=torch.int8, device=device)
    full_count = torch.empty(B, H, nq, dtype=torch.int32, device=device)
    partial_count = torch.empty_like(full_count)
    full_indices = torch.empty(B, H, nq, nk, dtype=torch.int32, device=device)
    partial_indices = torch.empty_like(full_indices)
    sta_rows = kv_real if sta_blocks is None else sta_blocks.to(torch.int8).contiguous()
    limits = head_thresholds(threshold, logits).expand(H, 1, 1).contiguous()  # one float32 per head
    _select_kernel[(B * H * nq,)](
        logits,
        sta_rows,
        kv_real,
        kv_whole,
        keep,
        full_count,
        full_indices,
        partial_count,
        partial_indices,
        limits,
        H,
        nq,
        nk,
        math.sqrt(D),
        HAS_STA=sta_blocks is not None,
        BLOCK_K=triton.next_power_of_2(nk),
        ONE=ONE_BITS,
        STEPS=SEARCH_STEPS,
        num_warps=8,
    )
    return BlockSelection(
        keep.ne(0), full_count, full_indices, partial_count, partial_indices, q_block, kv_block, valid
    )


def _pool(x: torch.Tensor, block: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean of x (B, H, S, D) over blocks of real tokens, reading x once (any strides, last dim dense)."""
    B, H, S, D = x.shape
    if S % block:
        raise ValueError(f"sequence length {S} is not a multiple of the block size {block}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = S // block
    weights = torch.ones(S, dtype=torch.float32, device=x.device) if valid is None else valid.to(torch.float32)
    counts = weights.view(n, block).sum(-1)
    out = torch.empty(B, H, n, D, dtype=torch.float32, device=x.device)
    _pool_kernel[(B * H, n)](
        x, weights, counts, out, H, x.stride(0), x.stride(1), x.stride(2), BLOCK=block, D=D, num_warps=4
    )
    return out, counts


if triton is not None:

    @triton.jit
    def _pool_kernel(
        x_ptr, w_ptr, count_ptr, out_ptr, H, stride_b, stride_h, stride_s, BLOCK: tl.constexpr, D: tl.constexpr
    ):
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        tokens = blk * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, D)
        base = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
        x = tl.load(base + tokens[:, None].to(tl.int64) * stride_s + dims[None, :]).to(tl.float32)
        w = tl.load(w_ptr + tokens)
        total = tl.sum(x * w[:, None], axis=0)
        count = tl.maximum(tl.load(count_ptr + blk), 1.0)
        n_blocks = tl.num_programs(1)
        tl.store(out_ptr + (bh.to(tl.int64) * n_blocks + blk) * D + dims, total / count)

    @triton.jit
    def _compact_row(selected, cols, n_cols, count_ptr, indices_ptr, row):
        """Write the selected columns of one row first, in column order, zeros after; and their count."""
        flags = selected.to(tl.int32)
        position = tl.cumsum(flags, 0) - 1
        count = tl.sum(flags, 0)
        row_ptr = indices_ptr + row.to(tl.int64) * n_cols
        tl.store(row_ptr + position, cols, mask=selected)
        tl.store(row_ptr + cols, tl.zeros_like(cols), mask=(cols >= count) & (cols < n_cols))
        tl.store(count_ptr + row, count)

    @triton.jit
    def _select_kernel(
        logits_ptr,
        sta_ptr,
        kv_real_ptr,
        kv_whole_ptr,
        keep_ptr,
        full_count_ptr,
        full_indices_ptr,
        partial_count_ptr,
        partial_indices_ptr,
        threshold_ptr,
        H,
        nq,
        nk,
        sqrt_d,
        HAS_STA: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ONE: tl.constexpr,
        STEPS: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_K)
        inside = cols < nk
        real = tl.load(kv_real_ptr + cols, mask=inside, other=0) != 0
        row_offset = row.to(tl.int64) * nk
        logits = tl.load(logits_ptr + row_offset + cols, mask=inside & real, other=float("-inf")) / sqrt_d
        exps = tl.exp(logits - tl.max(logits, 0))
        probs = exps / tl.sum(exps, 0)
        threshold = tl.load(threshold_ptr + (row // nq) % H)  # this row's head
        lo = tl.full((), 0, tl.int32)
        hi = tl.full((), ONE, tl.int32)
        for _ in range(STEPS):
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(probs > mid.to(tl.float32, bitcast=True), probs, 0.0), 0)
            fits = mass <= threshold
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid + 1)
        cut = tl.where(threshold >= 1.0, 0.0, hi.to(tl.float32, bitcast=True))  # a threshold of 1 keeps all
        cut = tl.where(threshold > 0.0, cut, 2.0)  # 0 keeps none: probabilities are at most 1
        keep = probs >= cut
        if HAS_STA:
            keep = keep | (tl.load(sta_ptr + (row % nq).to(tl.int64) * nk + cols, mask=inside, other=0) != 0)
        keep = keep & real & inside
        tl.store(keep_ptr + row_offset + cols, keep.to(tl.int8), mask=inside)
        whole = tl.load(kv_whole_ptr + cols, mask=inside, other=0) != 0
        _compact_row(keep & whole, cols, nk, full_count_ptr, full_indices_ptr, row)
        _compact_row(keep & ~whole, cols, nk, partial_count_ptr, partial_indices_ptr, row)
