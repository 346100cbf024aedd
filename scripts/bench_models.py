"""Compiled NABLA on one GPU, in one process: kernel options, attention calls, whole models eager and compiled, a pipeline.

Sections (run in this order; pick with --only):
- smoke: a small NABLA transformer compiled with compile_repeated_blocks(fullgraph=True) equals eager, no recompile;
- kernels: flex forward kernel options at 80,640 padded tokens, head dim 128 and 64; the fastest is used for the
  rest of the run (nabla_convert.attention.flex.TUNED_KERNEL_OPTIONS);
- attention: mask build, sparse flex and dense cuDNN per call (14B 720p, 1.3B 480p);
- joint: one joint text-video attention call (HunyuanVideo 720p, HunyuanVideo 1.5 480p): dense unmasked, dense
  with the stock key-padding mask, NABLA with the dense text suffix;
- models: full Wan2.1-1.3B 480p, Wan2.1-14B 480p, 640p and 720p (--models; also HunyuanVideo 720p x 129 and
  HunyuanVideo 1.5 480p x 121, --layers truncates): dense vs NABLA, eager and compile_repeated_blocks(),
  at thresholds 0.1 and 0.05 (random weights: density ~ threshold); --profile adds kernel time by category;
  after the 14B 720p rows, a stock WanPipeline run on that model (a few steps with CFG plus VAE decode), NABLA and
  dense, compiled blocks.

Results go to OUT/bench_models.json and OUT/bench_models.md after every section, so a run stopped by a time limit
keeps what it finished. Usage: python scripts/bench_models.py --out DIR [--only smoke,kernels,attention,models] [--models 14b-720]
[--pipeline-steps 2] [--budget-s 560]
"""

from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel

from nabla_convert.attention import block_sparse_attention, flex
from nabla_convert.bench.experiments import (
    best_kernel_options,
    kernel_option_rows,
    kernel_time_breakdown,
)
from nabla_convert.bench.measure import (
    attention_rows,
    compiled_blocks,
    cuda_ms,
    environment,
    random_qkv,
    random_transformer,
    require_cuda,
    transformer_step_rows,
)
from nabla_convert.bench.report import BenchReport
from nabla_convert.config import NablaConfig
from nabla_convert.models import family_for_arch
from nabla_convert.models.nabla import apply_nabla, remove_nabla
from nabla_convert.models.tiny import tiny_transformer
from nabla_convert.models.wan import WAN

SECTIONS = ("smoke", "kernels", "attention", "joint", "models")
NABLA = NablaConfig(threshold=0.1, q_block=128, kv_block=64)
THRESHOLDS = (0.1, 0.05)
MODELS = {  # --models key: (arch, resolution, frames, reps)
    "1.3b-480": ("wan2.1-t2v-1.3b", (832, 480), 81, 3),
    "14b-480": ("wan2.1-t2v-14b", (832, 480), 81, 2),
    "14b-640": ("wan2.1-t2v-14b", (1280, 640), 81, 2),  # no padding: what the padded 720p grid costs
    "14b-720": ("wan2.1-t2v-14b", (1280, 720), 81, 2),
    "hv-720": ("hunyuan-video-t2v", (1280, 720), 129, 2),  # HunyuanVideo's 720p 129-frame shape
    "hv15-480": ("hunyuan-video-1.5-t2v", (848, 480), 121, 2),  # HunyuanVideo 1.5's default (480p) shape
}
# cuDNN first for bf16 attention; the others stay allowed (the pipeline's float32 VAE attention needs them)
SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def pipeline_seconds(
    transformer: torch.nn.Module,
    resolution: tuple[int, int],
    frames: int,
    steps: int,
    *,
    vae: torch.nn.Module | None = None,
    guidance_scale: float = 5.0,
) -> dict[str, float]:
    """Wall seconds of one stock WanPipeline call (`total_s`) and of its VAE decode inside it (`decode_s`).

    `steps` denoising steps with CFG, then VAE decode to numpy. Text encoding is left out (random
    prompt embeddings, 512 x text_dim); the VAE is the given one or a float32 AutoencoderKLWan of the
    Wan2.1 config with random weights.
    """
    device = next(transformer.parameters()).device
    if vae is None:
        vae = AutoencoderKLWan().to(device, torch.float32).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WAN.bare_pipeline(transformer)
    pipe.register_modules(vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, WAN.text_tokens, transformer.config.text_dim)
    embeds = [torch.randn(shape, device=device, generator=generator, dtype=transformer.dtype) for _ in range(2)]
    width, height = resolution

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    decode, decode_s = vae.decode, [0.0]

    def timed_decode(*args, **kwargs):
        start = now()
        out = decode(*args, **kwargs)
        decode_s[0] += now() - start
        return out

    vae.decode = timed_decode
    try:
        start = now()
        with torch.no_grad():
            pipe(
                prompt_embeds=embeds[0],
                negative_prompt_embeds=embeds[1],
                height=height,
                width=width,
                num_frames=frames,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="np",
            )
        total_s = now() - start
    finally:
        del vae.decode
    return {"total_s": total_s, "decode_s": decode_s[0]}


def smoke(report: BenchReport) -> None:
    """Compiled NABLA blocks (fullgraph) equal eager on the GPU and do not recompile over steps."""
    from torch._dynamo.utils import counters

    with torch.device("cuda"):
        model = tiny_transformer(num_layers=3, heads=4, head_dim=64).to(torch.bfloat16).eval()
    apply_nabla(model, replace(NABLA, threshold=0.5))
    hidden = torch.randn(1, 16, 5, 90, 120, device="cuda", dtype=torch.bfloat16)  # grid 5x45x60: padded
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)

    def run(t: int) -> torch.Tensor:
        with torch.no_grad():
            return model(hidden, torch.tensor([t], device="cuda"), text, return_dict=False)[0].float()

    expected = [run(t) for t in (900, 900, 800)]
    counters.clear()
    with compiled_blocks(model, fullgraph=True):
        got = [run(900)]
        with torch.compiler.set_stance("fail_on_recompile"):
            got += [run(t) for t in (900, 800)]
    report.compiles["smoke_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    report.compiles["smoke_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    report.compiles["smoke_graph_breaks"] = int(sum(counters["graph_break"].values()))


def kernels(report: BenchReport) -> None:
    grid = WAN.token_grid((1280, 720), 81)
    for head_dim, heads in ((128, 40), (64, 40)):
        rows = kernel_option_rows(grid, heads, 0.1, head_dim=head_dim)
        report.kernels += rows
        best = best_kernel_options(rows)
        flex.TUNED_KERNEL_OPTIONS[(128, 64, head_dim)] = best
        report.compiles[f"tuned_hd{head_dim}"] = str(best)


def attention(report: BenchReport) -> None:
    torch._dynamo.reset()
    report.attention += attention_rows(WAN.token_grid((1280, 720), 81), 40, (0.05, 0.1), reference_mask=False)
    report.attention += attention_rows(WAN.token_grid((832, 480), 81), 12, (0.05, 0.1), reference_mask=False)


def joint(report: BenchReport) -> None:
    """One joint text-video attention call at HunyuanVideo 720p x 129 and HunyuanVideo 1.5 480p x 121 (the text
    lengths and padding of the families' random inputs): dense SDPA without a mask (cuDNN), dense SDPA with the
    stock models' boolean key-padding mask (what diffusers runs), NABLA (selection + dense text suffix + flex)."""
    torch._dynamo.reset()
    for key in ("hv-720", "hv15-480"):
        report.compiles[f"joint_{key}"] = joint_call_row(key)
        write(report)
        torch.cuda.empty_cache()


def joint_call_row(key: str) -> dict[str, float]:
    from nabla_convert.attention import TileLayout, nabla_selection

    arch, resolution, frames, _ = MODELS[key]
    family = family_for_arch(arch)
    config = family.archs[arch]
    heads, head_dim = family.attention_shape(config)
    grid = family.token_grid(resolution, frames, family.patch_size(config))
    text = family.text_tokens if key == "hv-720" else sum(family.text_lengths)
    real_text = text // 2 if key == "hv-720" else sum(n // 4 for n in family.text_lengths[:2])
    layout = TileLayout.for_blocks(grid, NABLA.tile, NABLA.q_block, NABLA.kv_block)
    tokens = layout.num_tokens + text
    q, k, v = random_qkv(1, heads, tokens, head_dim)
    key_valid = torch.arange(tokens, device="cuda") < layout.num_tokens + real_text
    mask = key_valid[None, None, None, :]
    row = {"tokens": tokens, "padded_video": layout.padded_len, "text": text, "real_text": real_text}
    with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        row["dense_cudnn_no_mask_ms"] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        row["dense_stock_masked_ms"] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    pad = -text % 128
    n = layout.padded_len
    video = slice(0, layout.num_tokens)
    jq, jk, jv = (
        torch.cat([layout.pad(t[:, :, video], dim=2), F.pad(t[:, :, layout.num_tokens :], (0, 0, 0, pad))], 2)
        for t in (q, k, v)
    )
    suffix = F.pad(key_valid[None, layout.num_tokens :], (0, pad))
    for threshold in (0.1, 0.2):
        limit = torch.full((heads,), threshold, device="cuda")

        def select(limit: torch.Tensor = limit):
            selection = nabla_selection(
                jq[:, :, :n], jk[:, :, :n], threshold=limit, grid=layout, q_block=128, kv_block=64
            )
            return selection, selection.with_dense_suffix(suffix)

        alone, selection = select()
        row[f"thr{threshold:g}_video_density"] = float(alone.density(layout.real_blocks(128), layout.real_blocks(64)))
        row[f"thr{threshold:g}_mask_ms"] = cuda_ms(select)
        row[f"thr{threshold:g}_sparse_ms"] = cuda_ms(
            lambda selection=selection: block_sparse_attention(jq, jk, jv, selection, backend="flex")
        )
    return row


def models(report: BenchReport, deadline: float, args: argparse.Namespace) -> None:
    """Step rows of each selected model, then (--profile) kernel time by category and (14B 720p) the pipeline."""
    modes = [mode == "compiled" for mode in args.modes.split(",") if mode in ("eager", "compiled")]
    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    for key in args.models.split(","):
        arch, resolution, frames, reps = MODELS[key]
        if time.monotonic() > deadline:
            report.compiles[f"skipped_{key}"] = "time budget"
            continue
        family = family_for_arch(arch)
        model = random_transformer(family, family.archs[arch], args.layers)
        if modes:
            report.steps += transformer_step_rows(
                family,
                arch,
                family.archs[arch],
                resolution,
                frames,
                NABLA,
                (),
                thresholds=thresholds,
                reps=reps,
                compiled=modes,
                model=model,
            )
            write(report)
        if args.profile:
            profiles(report, model, key)
            write(report)
        if args.pipeline_steps and key == "14b-720":
            pipeline(report, model, resolution, args.pipeline_steps)
        del model
        torch.cuda.empty_cache()


def one_step(model: torch.nn.Module, key: str):
    """A function running one no-grad forward of `model` on its family's random inputs at model `key`'s shape."""
    arch, resolution, frames, _ = MODELS[key]
    family = family_for_arch(arch)
    grid = family.token_grid(resolution, frames, family.patch_size(model.config))
    inputs = family.random_inputs(model, grid, 1, "cuda", torch.bfloat16)

    def forward():
        with torch.no_grad():
            model(**inputs, return_dict=False)

    return forward


def profiles(report: BenchReport, model: torch.nn.Module, key: str) -> None:
    """Kernel time by category of one compiled step, dense and NABLA at each threshold (reuses compiled graphs)."""
    forward = one_step(model, key)
    with compiled_blocks(model, reset=False), sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        remove_nabla(model)
        forward()
        report.compiles[f"profile_{key}_dense_compiled"] = kernel_time_breakdown(forward)
        for threshold in THRESHOLDS:
            apply_nabla(model, replace(NABLA, threshold=threshold))
            forward()
            report.compiles[f"profile_{key}_nabla_thr{threshold:g}_compiled"] = kernel_time_breakdown(forward)
        remove_nabla(model)


def pipeline(report: BenchReport, model: torch.nn.Module, resolution: tuple[int, int], steps: int) -> None:
    """Stock WanPipeline with compiled blocks (graphs warmed by one forward each): NABLA first, so it also pays
    the VAE's first call, then dense; each timed as a whole."""
    forward = one_step(model, "14b-720")
    name = f"Wan2.1-14B {resolution[0]}x{resolution[1]}x81, {steps} steps CFG 5 + VAE decode, compiled blocks"
    with compiled_blocks(model, reset=False), sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        remove_nabla(model)
        forward()
        apply_nabla(model, NABLA)
        forward()
        nabla = pipeline_seconds(model, resolution, 81, steps)
        report.pipelines.append({"name": f"{name}, NABLA thr 0.1", **nabla})
        write(report)
        remove_nabla(model)
        dense = pipeline_seconds(model, resolution, 81, steps)
    report.pipelines.append({"name": f"{name}, dense cuDNN", **dense})
    report.pipelines.append({"name": "speedup (whole run)", "total_s": dense["total_s"] / nabla["total_s"]})


OUT: Path = Path(".")


def write(report: BenchReport) -> None:
    report.write(OUT / "bench_models.json")
    (OUT / "bench_models.md").write_text(report.table() + "\n")


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget-s", type=float, default=560.0, help="start no model after this many seconds")
    parser.add_argument("--models", default="1.3b-480,14b-480,14b-720", help=f"comma-separated of {','.join(MODELS)}")
    parser.add_argument("--layers", type=int, help="blocks of each model (default: all; HunyuanVideo keeps 1:2)")
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="NABLA thresholds of step rows")
    parser.add_argument("--modes", default="eager,compiled", help="step rows: eager,compiled, one of them, or none")
    parser.add_argument("--profile", action="store_true", help="kernel time by category of each compiled step")
    parser.add_argument("--pipeline-steps", type=int, default=2, help="pipeline run on the 14b-720 model; 0: none")
    args = parser.parse_args()
    require_cuda()
    flex.enable_compile_cache()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    report = BenchReport(environment(), {"nabla": NABLA.to_dict(), "thresholds": list(THRESHOLDS)})
    for name in args.only.split(","):
        start = time.monotonic()
        try:
            if name == "models":
                models(report, deadline, args)
            else:
                {"smoke": smoke, "kernels": kernels, "attention": attention, "joint": joint}[name](report)
        except Exception:  # one failed section must not lose the others
            report.compiles[f"error_{name}"] = traceback.format_exc(limit=4)[-1500:]
            traceback.print_exc()
        report.compiles[f"section_{name}_s"] = round(time.monotonic() - start, 1)
        write(report)
        print(report.table(), flush=True)


if __name__ == "__main__":
    main()
