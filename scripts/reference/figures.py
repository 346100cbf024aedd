"""Figures and numbers of docs/reference_model.md, made on CPU from training logs and the shipped pipeline.

python scripts/reference/figures.py loss --vae VAE_LOG.json ... --dit DIT_LOG.json ...
python scripts/reference/figures.py samples [--count 4 --steps 12 --guidance 5]
python scripts/reference/figures.py locality [--layers 0 2 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from nabla_convert.io import atomic_write
from nabla_convert.reference import (
    HEIGHT,
    NUM_FRAMES,
    RECOMMENDED_GUIDANCE,
    RECOMMENDED_STEPS,
    REFERENCE_PIPELINE,
    WIDTH,
    heldout_prompts,
    heldout_videos,
)

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "img" / "reference"
SHOWN_FRAMES = (0, 8, 16, 24, 32)


def save_figure(fig, name: str) -> Path:
    """Write through a temporary file so an interrupted run leaves no half image."""
    path = atomic_write(IMAGES / name, lambda tmp: fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight"))
    plt.close(fig)
    return path


def load_reference():
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(REFERENCE_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plot_stages(ax, paths: list[str], key: str) -> list[str]:
    """One curve per training stage (a GPU call), against clips seen (steps x batch x processes), continued across
    stages so one- and many-GPU stages share the axis; returns the cards the stages ran on."""
    offset, cards = 0, []
    for stage, path in enumerate(paths):
        record = json.loads(Path(path).read_text())
        per_step = record["batch"] * record.get("processes", 1)
        seen = [(offset + r["step"] * per_step) / 1000 for r in record["log"]]
        label = Path(path).parent.name
        if record.get("object_weight"):  # a different objective: object cells weighted 1 + W
            label += f" (objects x{1 + record['object_weight']:g})"
        ax.semilogy(seen, [r[key] for r in record["log"]], lw=0.8, color=f"C{stage}", label=label)
        offset += record["steps"] * per_step
        if record["card"] not in cards:
            cards.append(record["card"])
    ax.legend(fontsize=7)
    return cards


def cmd_loss(args: argparse.Namespace) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    cards = plot_stages(left, args.vae, "mse")
    left.set(
        title=f"VAE reconstruction MSE ({', '.join(cards)})",
        xlabel="clips seen (thousands)",
        ylabel="MSE, pixels in [-1, 1]",
    )
    plot_stages(right, args.dit, "smooth")
    right.set(title="DiT flow-matching loss (smoothed)", xlabel="clips seen (thousands)", ylabel="loss")
    print(save_figure(fig, "loss.png"))


def to_image(video: torch.Tensor, frame: int) -> np.ndarray:
    return ((video[:, frame].permute(1, 2, 0).float().clamp(-1, 1) + 1) / 2).numpy()


def cmd_samples(args: argparse.Namespace) -> None:
    """Generated held-out clips next to the rendered ground truth of the same captions."""
    pipe = load_reference()
    prompts, truth = heldout_videos(args.count)
    assert prompts == heldout_prompts()[: args.count]
    fig, axes = plt.subplots(2 * args.count, len(SHOWN_FRAMES), figsize=(2 * len(SHOWN_FRAMES), 4.3 * args.count))
    seconds = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        video = pipe(
            prompt,
            height=HEIGHT,
            width=WIDTH,
            num_frames=NUM_FRAMES,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(i),
            output_type="pt",
        ).frames[0]  # (T, 3, H, W) in [0, 1]
        seconds.append(time.perf_counter() - start)
        generated = video.permute(1, 0, 2, 3) * 2 - 1
        for row, clip, label in ((2 * i, generated, "generated"), (2 * i + 1, truth[i], "rendered truth")):
            for col, frame in enumerate(SHOWN_FRAMES):
                axes[row, col].imshow(to_image(clip, frame))
                axes[row, col].set_xticks([])
                axes[row, col].set_yticks([])
            axes[row, 0].set_ylabel(label, fontsize=8)
        axes[2 * i, 0].set_title(prompt, fontsize=8, loc="left")
    print(save_figure(fig, "heldout_samples.png"))
    print(json.dumps({"steps": args.steps, "guidance": args.guidance, "seconds_per_sample": seconds}))


def attention_probabilities(pipe, layers: list[int]) -> dict[int, torch.Tensor]:
    """Self-attention probabilities (heads, S, S) of the given layers on one held-out clip at noise level 0.5."""
    import diffusers.models.transformers.transformer_wan as wan

    from nabla_convert.reference.flow import normalise_latents

    captured, calls = {}, iter(range(10**6))
    original = wan.dispatch_attention_fn

    def recording(query, key, value, **kwargs):
        index = next(calls)
        layer, is_self = divmod(index, 2)
        if is_self == 0 and layer in layers:  # each block calls attn1 (self) then attn2 (cross)
            scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) / query.shape[-1] ** 0.5
            captured[layer] = scores.softmax(dim=-1)[0]
        return original(query, key, value, **kwargs)

    prompts, videos = heldout_videos(1)
    with torch.no_grad():
        latents = normalise_latents(pipe.vae, videos)
        embeds, _ = pipe.encode_prompt(prompts[0], do_classifier_free_guidance=False)
        noisy = 0.5 * latents + 0.5 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        wan.dispatch_attention_fn = recording
        try:
            pipe.transformer(noisy, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds)
        finally:
            wan.dispatch_attention_fn = original
    return captured


def cmd_locality(args: argparse.Namespace) -> None:
    """Attention mass against frame distance and spatial (Chebyshev) token distance, per layer, vs uniform."""
    pipe = load_reference()
    probabilities = attention_probabilities(pipe, args.layers)
    grid = (NUM_FRAMES - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16
    t, h, w = (c.reshape(-1) for c in torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"))
    frame_distance = (t[:, None] - t[None]).abs()
    space_distance = torch.maximum((h[:, None] - h[None]).abs(), (w[:, None] - w[None]).abs())
    bins = frame_distance * grid[1] + space_distance  # (S, S) cell index into a (frames x space) table
    cells = grid[0] * grid[1]
    uniform = torch.bincount(bins.reshape(-1), minlength=cells).float().reshape(grid[0], grid[1]) / bins.numel()
    near = (frame_distance <= 1) & (space_distance <= 2)
    fig, axes = plt.subplots(1, len(args.layers) + 1, figsize=(3.6 * (len(args.layers) + 1), 3.2))
    summary = {"uniform_near_mass": near.float().mean().item()}
    for ax, layer in zip(axes, args.layers, strict=False):
        probs = probabilities[layer].mean(dim=0)  # average over heads: (S, S)
        mass = torch.bincount(bins.reshape(-1), weights=probs.reshape(-1), minlength=cells).reshape(grid[0], grid[1])
        mass = mass / probs.shape[0]
        summary[f"layer{layer}_near_mass"] = probs[near].sum().item() / probs.shape[0]
        image = ax.imshow(mass.numpy(), cmap="magma", norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=1), aspect="auto")
        ax.set(title=f"layer {layer}", xlabel="spatial token distance", ylabel="frame distance (latent)")
    axes[-1].imshow(uniform.numpy(), cmap="magma", norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=1), aspect="auto")
    axes[-1].set(title="uniform attention", xlabel="spatial token distance")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention mass per query")
    print(save_figure(fig, "attention_locality.png"))
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    loss = sub.add_parser("loss")
    loss.add_argument("--vae", nargs="+", required=True, help="vae_log.json of each VAE stage, in order")
    loss.add_argument("--dit", nargs="+", required=True, help="dit_log.json of each DiT stage, in order")
    samples = sub.add_parser("samples")
    samples.add_argument("--count", type=int, default=4)
    samples.add_argument("--steps", type=int, default=RECOMMENDED_STEPS)
    samples.add_argument("--guidance", type=float, default=RECOMMENDED_GUIDANCE)
    locality = sub.add_parser("locality")
    locality.add_argument("--layers", type=int, nargs="+", default=[0, 2, 5])
    args = parser.parse_args()
    {"loss": cmd_loss, "samples": cmd_samples, "locality": cmd_locality}[args.command](args)


if __name__ == "__main__":
    main()
