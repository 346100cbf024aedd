"""`nabla-convert adapt`: the Click layer over nabla_convert.adapt.adapt (works under `accelerate launch`)."""

from __future__ import annotations

from pathlib import Path

import click
from accelerate import PartialState

from nabla_convert.adapt import AdaptSettings, adapt, run_folder
from nabla_convert.options import CommaList
from nabla_convert.recipes import load_recipe


@click.command("adapt")
@click.argument("converted", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder (created at the end).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: recipe, else 1000).")
@click.option("--recipe", help="Recipe YAML (its `adapt:` section), or the name of one in recipes/.")
@click.option("--loss", type=click.Choice(["distill", "flow"]), help="distill (default) or flow (needs --data).")
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    help="Latent dataset: folder of safetensors shards with latents + prompt_embeds.",
)
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Prompt file (one per line) for teacher rollouts when there is no --data.",
)
@click.option(
    "--latent-shape",
    type=CommaList(int, count=3, minimum=1, separators="x", example="21,60,104"),
    help="Rollout latent F,H,W (default 21,60,104 = 480p 81 frames).",
)
@click.option("--lora-rank", type=click.IntRange(min=0), help="LoRA rank (0 = full fine-tune).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per process and micro-step.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-steps per optimizer step.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Checkpoint every N steps (0: never).")
@click.option("--validate-every", type=click.IntRange(min=0), help="Validate every N steps (0: start and end only).")
@click.option("--data-workers", type=click.IntRange(min=0), help="Processes reading the data ahead of the step [2].")
@click.option("--seed", type=int, help="Seed of every random draw (data order, noise, timesteps).")
@click.option("--component", help="Transformer of a two-transformer pipeline to adapt (transformer_2).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT.run from its newest checkpoint.")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop after N steps with a checkpoint (then --resume).")
def adapt_command(converted, out, recipe, resume, stop_after, **options) -> None:
    """Fine-tune the NABLA transformer of CONVERTED so it matches its dense self, and write OUT.

    Checkpoints, metrics.jsonl and settings live in OUT.run/. OUT is a converted checkpoint (loads
    with the stock pipeline's from_pretrained or nabla_convert.load) with "adaptation" provenance; LoRA
    adapters are also saved on their own in OUT/lora/. Several GPUs: `accelerate launch
    --config_file recipes/accelerate/ddp.yaml -m nabla_convert.cli adapt ...`.
    """
    plan = load_recipe(recipe).adapt if recipe else {}
    for name in ("data", "prompts"):
        options[name] = str(options[name]) if options[name] else None
    settings = AdaptSettings.from_dict(plan, **options)
    written = adapt(converted, out, settings, resume=resume, stop_after=stop_after)
    if not PartialState().is_main_process:  # one line per run, not per GPU
        return
    if written is None:
        click.echo(f"stopped with a checkpoint in {run_folder(out)}; continue with --resume")
    else:
        click.echo(f"wrote adapted NABLA checkpoint to {written}")
