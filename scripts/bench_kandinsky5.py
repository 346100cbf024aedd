"""Kandinsky 5 on one GPU (issue 17): selection cost per attention call (ours float32, ours bf16 option, diffusers'
nablaT_v2), then compiled whole-transformer steps (dense, diffusers' built-in NABLA, ours) at Lite 10 s and Pro.

    OUT=dir K5_LAYERS=4 python scripts/bench_kandinsky5.py     # writes $OUT/k5_bench.json as it goes
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

from nabla_convert import NablaConfig
from nabla_convert.attention import TileLayout, nabla_selection
from nabla_convert.bench import BenchReport, cuda_ms, environment, transformer_step_rows
from nabla_convert.models import family_for_arch

NABLA = NablaConfig(threshold=0.9, sta=(11, 3, 3))
SHAPES = [("kandinsky5-t2v-lite", (768, 512), 241), ("kandinsky5-t2v-pro", (1024, 768), 121)]


def selection_row(arch: str, resolution: tuple[int, int], frames: int) -> dict:
    family = family_for_arch(arch)
    heads, head_dim = family.attention_shape(family.archs[arch])
    grid = family.token_grid(resolution, frames)
    layout = TileLayout.for_blocks(grid, (8, 8), 64, 64)
    q, k = (torch.randn(1, layout.padded_len, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    T, H, W = grid
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(T, H // 8, W // 8, *NABLA.sta, device="cuda")[None, None]

    def ours(precision: str):
        return nabla_selection(qt, kt, threshold=0.9, grid=layout, sta=NABLA.sta, precision=precision)

    row = {"arch": arch, "grid": grid, "heads": heads, "head_dim": head_dim}
    for precision in ("float32", "bfloat16"):
        row[f"ours_{precision}_ms"] = cuda_ms(lambda p=precision: ours(p).block_mask(), 5)
    row["builtin_nablaT_v2_ms"] = cuda_ms(lambda: nablaT_v2(q, k, sta, thr=0.9), 5)
    theirs = nablaT_v2(q, k, sta, thr=0.9).to_dense().bool()
    row["bf16_agree_builtin"] = float((ours("bfloat16").keep == theirs).float().mean())
    row["f32_agree_builtin"] = float((ours("float32").keep == theirs).float().mean())
    row["density_builtin"] = float(theirs.float().mean())
    return row


def main() -> None:
    out, layers = os.environ["OUT"], int(os.environ.get("K5_LAYERS", "4"))
    results = {"environment": environment() | {"diffusers": diffusers.__version__}, "layers": layers}
    results |= {"selection": [], "steps": {}, "tables": {}}

    def save() -> None:
        with open(f"{out}/k5_bench.json", "w") as stream:
            json.dump(results, stream, indent=2, default=str)

    start = time.time()
    for shape in SHAPES:
        results["selection"].append(selection_row(*shape))
        save()
        print(results["selection"][-1], flush=True)
    for arch, resolution, frames in SHAPES:
        family = family_for_arch(arch)
        try:
            rows = transformer_step_rows(
                family, arch, family.archs[arch], resolution, frames, NABLA, [None],
                layers=layers, compiled=(True,), builtin=(True,), reps=3,
            )  # fmt: skip
            results["steps"][arch] = [asdict(r) | {"speedup": r.speedup} for r in rows]
            settings = {"arch": arch, "resolution": resolution, "frames": frames}
            results["tables"][arch] = BenchReport(results["environment"], settings, steps=rows).table()
            print(results["tables"][arch], flush=True)
        except Exception:
            results["steps"][arch] = traceback.format_exc()
            print(results["steps"][arch], flush=True)
        save()
        torch.cuda.empty_cache()
        print(arch, "done", time.time() - start, flush=True)


if __name__ == "__main__":
    main()
