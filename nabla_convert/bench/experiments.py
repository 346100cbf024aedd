"""Benchmark experiments the GPU scripts run (scripts/bench_attention.py, bench_models.py), not `nabla-convert bench`:
selection agreement, block sizes, recompiles, FlexAttention kernel options, a kernel-time breakdown, pipeline runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from nabla_convert.attention import BlockSelection, TileLayout, nabla_block_mask, nabla_selection
from nabla_convert.attention.flex import compiled_flex_attention, kernel_options_for
from nabla_convert.bench.measure import (
    block_mask_for,
    cuda_ms,
    error_line,
    forced_keep,
    random_qkv,
    sparse_attention_ms,
)

BLOCK_SIZES = ((64, 64), (128, 64), (128, 128))


def selection_agreement(token_grid_, heads: int, threshold: float, sta=None, q_block: int = 128, kv_block: int = 64):
    """Fast vs reference selection on the same q, k: differing block pairs and their share."""
    layout = TileLayout.for_blocks(token_grid_, (8, 8), q_block, kv_block)
    q, k, _ = random_qkv(1, heads, layout.padded_len)
    q, k = q * 4, k * 4  # peakier pooled maps than unit noise, so the cut falls inside the rows
    kwargs = dict(threshold=threshold, grid=layout, sta=sta, q_block=q_block, kv_block=kv_block)
    fast = nabla_selection(q, k, **kwargs).keep
    reference = nabla_block_mask(q, k, **kwargs)
    differing = int((fast != reference).sum())
    return {"differing_blocks": differing, "blocks": fast.numel(), "density": float(reference.float().mean())}


@dataclass
class BlockSizeRow:
    q_block: int
    kv_block: int
    density: float
    forward_ms: float
    forward_backward_ms: float | None
    compile_forward_s: float
    compile_backward_s: float | None
    error: str | None = None


def block_size_rows(
    token_grid_: tuple[int, int, int],
    heads: int,
    density: float,
    sizes=BLOCK_SIZES,
    backward: bool = True,
    reps: int = 3,
) -> list[BlockSizeRow]:
    """Forward and forward+backward flex time of each (q_block, kv_block) at one forced density.

    Each size is a new graph (fwd and bwd); dynamo is reset first so earlier shapes in the same
    process do not count towards its recompile limit.
    """
    torch._dynamo.reset()
    rows = []
    for q_block, kv_block in tqdm(sizes, desc="block sizes", leave=False):
        layout = TileLayout.for_blocks(token_grid_, (8, 8), q_block, kv_block)
        keep = forced_keep(layout, 1, heads, density, q_block, kv_block)
        q, k, v = random_qkv(1, heads, layout.padded_len)
        forward_ms, first_ms = sparse_attention_ms(
            q, k, v, block_mask_for(keep, layout, q_block, kv_block), q_block, kv_block, reps=reps
        )
        row = BlockSizeRow(q_block, kv_block, density, forward_ms, None, max(0.0, first_ms - forward_ms) / 1e3, None)
        if backward:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            try:
                both_ms, first_both = sparse_attention_ms(
                    q, k, v, block_mask_for(keep, layout, q_block, kv_block, True), q_block, kv_block, True, reps
                )
                row.forward_backward_ms = both_ms
                row.compile_backward_s = max(0.0, first_both - both_ms) / 1e3
            except Exception as err:  # a kernel config the card cannot build is a result, not a crash
                row.error = error_line(err)
        rows.append(row)
    return rows


def compile_counts(
    token_grid_: tuple[int, int, int],
    heads: int,
    steps: int = 50,
    layers: int = 40,
    q_block: int = 128,
    kv_block: int = 64,
) -> dict[str, Any]:
    """Simulate a denoising run: steps x layers compiled flex calls, each with a fresh NABLA mask.

    Starts from a reset dynamo (the inductor cache may still serve the kernel) and returns
    dynamo's frame/graph counters, recompiles and the wall time of the run; every call gets a new
    selection (thresholds cycle from 0.3 to 0.9), the shapes stay fixed.
    """
    from torch._dynamo.utils import counters

    layout = TileLayout.for_blocks(token_grid_, (8, 8), q_block, kv_block)
    q, k, v = random_qkv(1, heads, layout.padded_len)
    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="simulated run", leave=False):
        for layer in range(layers):
            threshold = 0.3 + 0.6 * ((step * layers + layer) % 7) / 6
            block_mask = nabla_selection(q, k, threshold=threshold, grid=layout, q_block=q_block, kv_block=kv_block)
            compiled_flex_attention(
                q, k, v, block_mask.block_mask(), kernel_options=kernel_options_for(q_block, kv_block)
            )
    torch.cuda.synchronize()
    return {
        "calls": steps * layers,
        "frames_compiled": int(counters["frames"]["ok"]),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": int(sum(counters["recompiles"].values())),
        "run_s": time.perf_counter() - start,
    }


# Forward flex settings tried on top of `kernel_options_for` (inductor's Hopper default for bf16 is
# 128x64 tiles, 3 stages, 8 warps at head dim 128; 4 warps at 64).
KERNEL_CANDIDATES: tuple[dict[str, int | bool], ...] = (
    {},
    {"num_stages": 2},
    {"num_stages": 4},
    {"num_warps": 4},
    {"num_warps": 8},
    {"USE_TMA": True},
    {"USE_TMA": True, "num_stages": 4},
    {"USE_TMA": True, "num_warps": 4},
)


@dataclass
class KernelRow:
    tokens: int
    padded_tokens: int
    heads: int
    head_dim: int
    q_block: int
    kv_block: int
    density: float
    options: str
    sparse_ms: float | None
    error: str | None = None


def kernel_option_rows(
    token_grid_: tuple[int, int, int],
    heads: int,
    density: float,
    *,
    head_dim: int = 128,
    q_block: int = 128,
    kv_block: int = 64,
    candidates: Sequence[dict[str, int | bool]] = KERNEL_CANDIDATES,
    reps: int = 5,
) -> list[KernelRow]:
    """Compiled flex forward ms of each kernel-option candidate on one forced selection, as the runtime calls it.

    A last row, "padding ignored", lists every kept block as full (no mask_mod anywhere): the time
    a padded layout would take if partial blocks cost what full ones do (its output is not NABLA's).
    """
    layout = TileLayout.for_blocks(token_grid_, (8, 8), q_block, kv_block)
    q, k, v = random_qkv(1, heads, layout.padded_len, head_dim)
    keep = forced_keep(layout, 1, heads, density, q_block, kv_block)
    valid = layout.indices("cuda").valid if layout.is_padded else None
    real_mask = BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block, valid=valid).block_mask(
        compiled=True
    )
    bound_mask = BlockSelection.from_keep(keep, q_block=q_block, kv_block=kv_block).block_mask(compiled=True)
    base = kernel_options_for(q_block, kv_block, head_dim)
    trials = [(json.dumps(c, sort_keys=True), {**base, **c}, real_mask) for c in candidates]
    trials.append(("padding ignored", base, bound_mask))
    rows = []
    for label, options, block_mask in tqdm(trials, desc=f"kernel options hd{head_dim}", leave=False):
        row = KernelRow(layout.num_tokens, layout.padded_len, heads, head_dim, q_block, kv_block, density, label, None)
        try:
            row.sparse_ms = cuda_ms(
                lambda options=options, mask=block_mask: compiled_flex_attention(q, k, v, mask, kernel_options=options),
                reps,
            )
        except Exception as err:  # an option the card or torch cannot build is a result, not a crash
            row.error = error_line(err)
        rows.append(row)
    return rows


def best_kernel_options(rows: Sequence[KernelRow]) -> dict[str, int | bool]:
    """The fastest candidate's extra options (padding-ignored bound excluded)."""
    timed = [r for r in rows if r.sparse_ms is not None and r.options != "padding ignored"]
    return json.loads(min(timed, key=lambda r: r.sparse_ms).options)


KERNEL_CATEGORIES = (  # (category, substrings of CUDA kernel names), first match wins
    ("sparse attention (flex)", ("flex_attention", "triton_tem")),
    ("NABLA mask (pool, select)", ("_select_kernel", "_pool_kernel")),
    ("dense attention (cuDNN/flash)", ("cudnn", "fmha", "flash", "sdpa", "attention")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "wgmma")),
    ("fused elementwise/reductions (inductor)", ("triton_",)),
)


def kernel_time_breakdown(fn: Callable[[], Any], top: int = 12) -> dict[str, Any]:
    """CUDA kernel time of one fn() call by category (KERNEL_CATEGORIES) and its `top` kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [
        (event.key, event.device_time_total / 1e3) for event in prof.key_averages() if event.device_time_total > 0
    ]
    categories: dict[str, float] = {}
    for name, ms in kernels:
        lowered = name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in lowered for k in keys)), "other")
        categories[category] = categories.get(category, 0.0) + ms
    kernels.sort(key=lambda item: -item[1])
    return {
        "total_ms": sum(ms for _, ms in kernels),
        "categories_ms": dict(sorted(categories.items(), key=lambda item: -item[1])),
        "top_kernels_ms": [[name[:120], ms] for name, ms in kernels[:top]],
    }
