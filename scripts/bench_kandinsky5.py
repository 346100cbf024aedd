"""Kandinsky 5 on one GPU: whole-transformer compiled steps (dense, diffusers' built-in NABLA, ours), the
CUDA kernel breakdown of ours vs the built-in, the single flex_attention call of each with the other's block mask or
kernel options (what makes the difference), and the selection cost per attention call.

    OUT=dir K5_LAYERS=4 K5_SECONDS=190 python scripts/bench_kandinsky5.py   # writes $OUT/k5_bench.json as it goes

Stages run in that order and a stage is skipped once K5_SECONDS have passed (one device call, a fixed budget).
The built-in is not run at Lite (head dim 64): diffusers' flex backend does not compile there (docs/benchmarks.md).
"""

import json
import os
import time
import traceback
from dataclasses import asdict

import diffusers
import torch
from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nabla_convert import NablaConfig, apply_nabla, remove_nabla
from nabla_convert.attention import TileLayout, nabla_selection
from nabla_convert.attention.flex import keep_mask_mod, kernel_options_for
from nabla_convert.bench.experiments import kernel_time_breakdown
from nabla_convert.bench.measure import (
    compiled_blocks,
    cuda_ms,
    environment,
    random_transformer,
    transformer_step_rows,
)
from nabla_convert.bench.report import BenchReport
from nabla_convert.models import family_for_arch

NABLA = NablaConfig(threshold=0.9, sta=(11, 3, 3))
PRO, LITE = ("kandinsky5-t2v-pro", (1024, 768), 121), ("kandinsky5-t2v-lite", (768, 512), 241)
BUILTIN_COMPILES = {PRO[0]: True, LITE[0]: False}


def attention_inputs(arch: str, resolution: tuple[int, int], frames: int):
    """q, k, v (B, H, S, D) as both processors pass them (head-major views of (B, S, H, D)), layout, STA mask."""
    family = family_for_arch(arch)
    heads, head_dim = family.attention_shape(family.archs[arch])
    grid = family.token_grid(resolution, frames)
    layout = TileLayout.for_blocks(grid, (8, 8), 64, 64)
    q, k, v = (
        torch.randn(1, layout.padded_len, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for _ in range(3)
    )
    T, H, W = grid
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(T, H // 8, W // 8, *NABLA.sta, device="cuda")[None, None]
    return q, k, v, layout, sta


def selection_row(arch: str, resolution: tuple[int, int], frames: int) -> dict:
    q, k, _, layout, sta = attention_inputs(arch, resolution, frames)

    def ours(precision: str):
        return nabla_selection(q, k, threshold=0.9, grid=layout, sta=NABLA.sta, precision=precision)

    def theirs():
        return nablaT_v2(q.transpose(1, 2), k.transpose(1, 2), sta, thr=0.9)

    row = {"arch": arch, "grid": layout.token_grid, "heads": q.shape[1], "head_dim": q.shape[-1]}
    for precision in ("float32", "bfloat16"):
        row[f"ours_{precision}_ms"] = cuda_ms(lambda p=precision: ours(p).block_mask(), 5)
    row["builtin_nablaT_v2_ms"] = cuda_ms(theirs, 5)
    dense = theirs().to_dense().bool()
    row["bf16_agree_builtin"] = float((ours("bfloat16").keep == dense).float().mean())
    row["f32_agree_builtin"] = float((ours("float32").keep == dense).float().mean())
    return row


def flex_call_rows(arch: str, resolution: tuple[int, int], frames: int) -> dict:
    """One compiled flex_attention call at the model's shape: each block mask with each side's kernel options."""
    q, k, v, layout, sta = attention_inputs(arch, resolution, frames)
    selection = nabla_selection(q, k, threshold=0.9, grid=layout, sta=NABLA.sta)
    masks = {
        "ours": selection.block_mask(compiled=True),
        "ours + keep-lookup mask_mod (before the fix)": BlockMask.from_kv_blocks(
            selection.partial_count, selection.partial_indices, selection.full_count, selection.full_indices,
            BLOCK_SIZE=64, mask_mod=keep_mask_mod(selection.keep, 64, 64), compute_q_blocks=False,
        ),
        "built-in": nablaT_v2(q.transpose(1, 2), k.transpose(1, 2), sta, thr=0.9),
    }  # fmt: skip
    ours_options = kernel_options_for(64, 64, q.shape[-1])
    options = {
        "ours": ours_options,
        "built-in": {"BLOCK_M": 64},
        "ours + num_warps 4": ours_options | {"num_warps": 4},
        "ours + USE_TMA": ours_options | {"USE_TMA": True},
    }
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = {}
    cases = [("ours", "ours"), ("built-in", "built-in"), ("ours", "built-in"), ("built-in", "ours")]
    cases += [
        ("ours + keep-lookup mask_mod (before the fix)", "ours"),
        ("ours", "ours + num_warps 4"),
        ("ours", "ours + USE_TMA"),
    ]
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for mask, option in cases:
            try:
                rows[f"{mask} mask, {option} options"] = cuda_ms(
                    lambda m=masks[mask], o=options[option]: compiled(q, k, v, block_mask=m, kernel_options=o), 3
                )
            except Exception as err:
                rows[f"{mask} mask, {option} options"] = f"fails: {type(err).__name__}: {str(err)[:200]}"
    rows["density"] = {"ours": float(selection.keep.float().mean()), "built-in": float(masks["built-in"].sparsity())}
    return rows


def profile_rows(model, arch: str, resolution: tuple[int, int], frames: int) -> dict:
    """Kernel time of one compiled forward, ours and the built-in (graphs of the step rows reused)."""
    family = family_for_arch(arch)
    grid = family.token_grid(resolution, frames, family.patch_size(model.config))
    inputs = family.random_inputs(model, grid, 1, model.device, model.dtype)

    def forward(**extra):
        with torch.no_grad():
            return model(**inputs, **extra, return_dict=False)[0]

    result = {}
    with compiled_blocks(model, reset=False):
        with family.builtin_nabla(model, grid, NABLA) as extra:
            forward(**extra)
            result["built-in"] = kernel_time_breakdown(lambda: forward(**extra), top=10)
        apply_nabla(model, NABLA)
        forward()
        result["ours"] = kernel_time_breakdown(forward, top=10)
        remove_nabla(model)
    return result


def main() -> None:
    out, layers = os.environ["OUT"], int(os.environ.get("K5_LAYERS", "4"))
    deadline = time.time() + float(os.environ.get("K5_SECONDS", "1e9"))
    results = {"environment": environment() | {"diffusers": diffusers.__version__}, "layers": layers}

    def stage(name: str, fn) -> None:
        if time.time() > deadline:
            results[name] = "skipped: out of time"
        else:
            try:
                results[name] = fn()
            except Exception:
                results[name] = traceback.format_exc()
        with open(f"{out}/k5_bench.json", "w") as stream:
            json.dump(results, stream, indent=2, default=str)
        print(name, json.dumps(results[name], default=str)[:3000], flush=True)
        torch.cuda.empty_cache()

    models = {}

    def steps(arch: str, resolution: tuple[int, int], frames: int) -> dict:
        family = family_for_arch(arch)
        models[arch] = random_transformer(family, family.archs[arch], layers)
        rows = transformer_step_rows(
            family, arch, family.archs[arch], resolution, frames, NABLA, [None], model=models[arch],
            compiled=(True,), builtin=(True,) if BUILTIN_COMPILES[arch] else (), reps=3,
        )  # fmt: skip
        table = BenchReport(results["environment"], {"arch": arch}, steps=rows).table()
        return {"rows": [asdict(r) | {"speedup": r.speedup} for r in rows], "table": table}

    stage("steps_pro", lambda: steps(*PRO))
    stage("profile_pro", lambda: profile_rows(models[PRO[0]], *PRO))
    models.clear()
    stage("flex_call_pro", lambda: flex_call_rows(*PRO))
    stage("steps_lite", lambda: steps(*LITE))
    models.clear()
    stage("selection", lambda: [selection_row(*PRO), selection_row(*LITE)])


if __name__ == "__main__":
    main()
