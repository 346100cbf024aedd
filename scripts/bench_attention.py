"""GPU check and timing of the NABLA attention core (selection, mask and sparse kernel); writes JSON and Markdown to --out.

1. Compiled flex on a NABLA mask equals masked SDPA at >= 16k tokens (padded grid, STA, bf16), and
   the fast selection equals the reference selection at the Wan2.1-14B 720p shape.
2. Mask build (fast and reference) and sparse attention at densities 0.05-0.3 against dense SDPA
   in the same run: Wan2.1-14B 720p cropped (67,200 tokens) and uncropped (80,640 padded), 1.3B 480p.
3. Block sizes 64x64, 128x64, 128x128: forward and forward+backward.
4. Compile policy: compiles over a simulated 50-step x 40-layer run; cold vs cached compile time.

Usage: python scripts/bench_attention.py --out DIR [--quick] [--only checks,tables,block_sizes,compiles]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from nabla_convert.attention import TileLayout, fast, to_block_mask
from nabla_convert.attention.fast import nabla_selection
from nabla_convert.attention.flex import (
    compiled_flex_attention,
    dense_token_mask,
    enable_compile_cache,
    kernel_options_for,
)
from nabla_convert.bench.experiments import block_size_rows, compile_counts, selection_agreement
from nabla_convert.bench.measure import (
    attention_rows,
    cuda_ms,
    environment,
    forced_keep,
    random_qkv,
    require_cuda,
    sparse_attention_ms,
)
from nabla_convert.bench.report import BenchReport
from nabla_convert.io import atomic_write_text

WAN14B_720P_CROPPED = (21, 40, 80)  # 81 frames at 1280x640 (the public code crops to multiples of 128 px)
WAN14B_720P = (21, 45, 80)  # 81 frames at 1280x720: 45 token rows pad to 48 (6 tiles)
WAN13B_480P = (21, 30, 52)  # 81 frames at 832x480: pads to 32x56


def flex_matches_masked_sdpa(token_grid=(5, 45, 80), heads: int = 8) -> dict:
    """Compiled flex vs SDPA with the expanded token mask, bf16, padded grid with STA."""
    layout = TileLayout.for_blocks(token_grid, (8, 8), 128, 64)
    q, k, v = random_qkv(1, heads, layout.padded_len)
    selection = nabla_selection(q, k, threshold=0.5, grid=layout, sta=(3, 3, 3), q_block=128, kv_block=64)
    out = compiled_flex_attention(q, k, v, selection.block_mask(), kernel_options=kernel_options_for(128, 64))
    mask = dense_token_mask(selection.keep, 128, 64, layout.indices("cuda").valid)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    real = layout.indices("cuda").valid
    error = (out.float() - expected)[:, :, real].abs().max().item()
    return {"tokens": layout.num_tokens, "padded": layout.padded_len, "heads": heads, "max_abs_error": error}


def cached_compile_seconds(token_grid, heads: int) -> dict:
    """First-call time of compiled flex after dynamo.reset(): served from inductor's on-disk cache."""
    layout = TileLayout.for_blocks(token_grid, (8, 8), 128, 64)
    q, k, v = random_qkv(1, heads, layout.padded_len)
    mask = nabla_selection(q, k, threshold=0.7, grid=layout, q_block=128, kv_block=64).block_mask()
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled_flex_attention(q, k, v, mask, kernel_options=kernel_options_for(128, 64))
    torch.cuda.synchronize()
    return {"cached_first_call_s": time.perf_counter() - start}


def mask_breakdown(token_grid, heads: int) -> dict:
    """Where the fast mask build spends its time: pooling, the pooled matmul, the selection kernel."""
    layout = TileLayout.for_blocks(token_grid, (8, 8), 128, 64)
    q, k, _ = random_qkv(1, heads, layout.padded_len)
    valid = layout.indices("cuda").valid if layout.is_padded else None
    qa, _ = fast._pool(q, 128, valid)
    ka, _ = fast._pool(k, 64, valid)
    full = nabla_selection(q, k, threshold=0.7, grid=layout, q_block=128, kv_block=64)
    return {
        "pool_q_ms": cuda_ms(lambda: fast._pool(q, 128, valid)),
        "pool_k_ms": cuda_ms(lambda: fast._pool(k, 64, valid)),
        "matmul_ms": cuda_ms(lambda: torch.matmul(qa, ka.transpose(-1, -2))),
        "selection_ms": cuda_ms(lambda: nabla_selection(q, k, threshold=0.7, grid=layout, q_block=128, kv_block=64)),
        "with_block_mask_ms": cuda_ms(lambda: full.block_mask()),
    }


def partial_block_cost(token_grid, heads: int, density: float = 0.1) -> dict:
    """Sparse ms on a padded grid: keep&valid mask_mod (core), valid-only mask_mod, and padding ignored.

    Compiled kernels evaluate mask_mod only on partial blocks, all of which are kept, so a
    valid-only mask_mod gives the same result there; "padding ignored" is the speed bound.
    """
    layout = TileLayout.for_blocks(token_grid, (8, 8), 128, 64)
    q, k, v = random_qkv(1, heads, layout.padded_len)
    keep = forced_keep(layout, 1, heads, density, 128, 64)
    valid = layout.indices("cuda").valid
    core = to_block_mask(keep, q_block=128, kv_block=64, valid=valid)  # keep-lookup mask_mod

    def valid_only(b, h, q_idx, kv_idx):
        return valid[kv_idx]

    light = BlockMask.from_kv_blocks(
        core.kv_num_blocks,
        core.kv_indices,
        core.full_kv_num_blocks,
        core.full_kv_indices,
        BLOCK_SIZE=(128, 64),
        mask_mod=valid_only,
        seq_lengths=core.seq_lengths,
        compute_q_blocks=False,
    )
    no_padding = to_block_mask(keep, q_block=128, kv_block=64)
    out_core = compiled_flex_attention(q, k, v, core, kernel_options=kernel_options_for(128, 64))
    out_light = compiled_flex_attention(q, k, v, light, kernel_options=kernel_options_for(128, 64))
    return {
        "partial_blocks_share": float(core.kv_num_blocks.sum() / (core.kv_num_blocks + core.full_kv_num_blocks).sum()),
        "core_mask_mod_ms": sparse_attention_ms(q, k, v, core, 128, 64)[0],
        "valid_only_mask_mod_ms": sparse_attention_ms(q, k, v, light, 128, 64)[0],
        "padding_ignored_ms": sparse_attention_ms(q, k, v, no_padding, 128, 64)[0],
        "valid_only_max_diff": (out_core - out_light)[:, :, valid].abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="one shape, two densities, no backward")
    parser.add_argument("--only", help="comma-separated sections: checks, tables, block_sizes, compiles (default: all)")
    args = parser.parse_args()
    require_cuda()
    cache = enable_compile_cache()
    env = environment()
    print(env, "inductor cache:", cache, flush=True)
    densities = (0.05, 0.1) if args.quick else (0.05, 0.1, 0.2, 0.3)
    results: dict = {"environment": env, "errors": {}}
    report = BenchReport(env, {"script": "scripts/bench_attention.py", "densities": list(densities)})

    def section(name, fn):
        start = time.perf_counter()
        try:
            value = fn()
            results[name] = value
            print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
            return value
        except Exception:
            results["errors"][name] = traceback.format_exc()
            print(f"[{name}] FAILED\n{results['errors'][name]}", flush=True)
            return None

    wanted = set(args.only.split(",")) if args.only else {"checks", "tables", "block_sizes", "compiles"}
    if "checks" in wanted:
        section("flex_vs_sdpa", flex_matches_masked_sdpa)
        section("mask_breakdown_67200", lambda: mask_breakdown(WAN14B_720P_CROPPED, 40))
        section("partial_blocks_80640", lambda: partial_block_cost(WAN14B_720P, 40))
        section("partial_blocks_1.3b_480p", lambda: partial_block_cost(WAN13B_480P, 12))
        section("selection_agreement_thr0.7", lambda: selection_agreement(WAN14B_720P_CROPPED, 40, 0.7))
        section("selection_agreement_thr0.5_sta", lambda: selection_agreement(WAN14B_720P, 40, 0.5, (11, 5, 5)))
    shapes = [(WAN14B_720P_CROPPED, 40), (WAN14B_720P, 40), (WAN13B_480P, 12)]
    for grid, heads in shapes[:1] if args.quick else shapes if "tables" in wanted else []:
        rows = section(f"attention_{grid}", lambda grid=grid, heads=heads: attention_rows(grid, heads, densities))
        report.attention += rows or []
        print(report.table(), flush=True)
    if "block_sizes" in wanted:
        rows = section("block_sizes", lambda: block_size_rows(WAN14B_720P_CROPPED, 40, 0.1, backward=not args.quick))
        report.block_sizes = rows or []
    if "compiles" in wanted:
        counts = section("compiles", lambda: compile_counts(WAN13B_480P, 12, steps=50, layers=40))
        cached = section("cached_compile", lambda: cached_compile_seconds(WAN13B_480P, 12))
        report.compiles = {**(counts or {}), **(cached or {})}
    args.out.mkdir(parents=True, exist_ok=True)
    results["report"] = report.to_json()
    atomic_write_text(args.out / "attention.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(args.out / "attention.md", report.table() + "\n")
    print(report.table())
    print(json.dumps({k: v for k, v in results.items() if k != "report"}, indent=2, default=str))


if __name__ == "__main__":
    main()
