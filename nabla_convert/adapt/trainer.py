"""adapt: a short fine-tune of a converted NABLA checkpoint so the sparse model recovers dense quality.

Runs on accelerate: one process on CPU or GPU, or `accelerate launch` (DDP / FSDP, configs in
recipes/accelerate/). The run folder `<out>.run/` holds settings.json, metrics.jsonl (one JSON
object per step and per validation), checkpoints/step-NNNNNN (safetensors + JSON, no pickle: see
checkpoint.py; written to a temp folder and renamed) and, for data-free distillation, rollouts/ (the
teacher-made latent dataset). `resume=True` continues from the newest checkpoint; since every random
draw is a function of (seed, step), the resumed run ends with the weights an uninterrupted run would
have had. A step whose gradient norm is not finite (NaN data, a diverging lr) stops the run before
the weights are updated; the checkpoints written so far are kept.

The output and the run folder must not touch CONVERTED or the data (folders.check_output); links that
leave CONVERTED or the run folder are refused, never followed.

The result at `out` is a converted checkpoint like `convert` writes: the input folder's other
parts copied, the trained transformer saved with save_pretrained (LoRA merged) keeping `_nabla`
with provenance "adaptation", the LoRA adapters also on their own under lora/, and
nabla_reports/adapt.json with the validation before and after.

Recipe `adapt:` keys and CLI options map onto AdaptSettings fields (see its docstring).

On GPU the sparse backward is FlexAttention's: on torch 2.11 it compiles with default kernel
options only for 128x128 blocks (64x64 fails with "No choices to select" unless max-autotune is
on; docs/benchmarks.md "Training step"), so checkpoints meant for training on GPU are best
converted with q_block = kv_block = 128. On CPU the reference backend trains any block size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from safetensors import safe_open
from tqdm.auto import tqdm

from nabla_convert.adapt.checkpoint import load_checkpoint
from nabla_convert.adapt.data import (
    LatentDataset,
    MicroBatches,
    TimestepSampler,
    sample_noise,
    split_heldout,
    take,
    training_loader,
)
from nabla_convert.adapt.losses import DenseTeacher, loss_target, velocity, weighted_mse
from nabla_convert.adapt.rollouts import teacher_rollouts
from nabla_convert.adapt.run import MetricsLog, RunPaths, check_run_folder, run_folder, save_run_checkpoint
from nabla_convert.adapt.settings import AdaptError, AdaptSettings
from nabla_convert.adapt.validation import ValidationSet
from nabla_convert.config import CONFIG_KEY, NablaConfig
from nabla_convert.convert import transformer_components
from nabla_convert.flow import add_noise
from nabla_convert.folders import (
    MARKER,
    check_links,
    check_output,
    name_matcher,
    public_name,
    remove_stale_temps,
    replace_folder,
    sigterm_raises,
    staging,
    weight_digests,
    write_marker,
)
from nabla_convert.io import atomic_write_text, read_json
from nabla_convert.models import family_for_class_name
from nabla_convert.models.family import ModelFamily

LORA_FOLDER = "lora"


REPORT_PATH = "nabla_reports/adapt.json"


NOT_COPIED = (".cache", ".git", MARKER)  # parts of CONVERTED the output does not take over (besides the transformer)


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _component_folder(root: Path, component: str) -> tuple[str, Path]:
    components = transformer_components(root)
    name = "" if "" in components else component
    if name not in components:
        raise AdaptError(f"{root} has no transformer component {component!r} (found: {sorted(components)})")
    folder = components[name][0]
    if CONFIG_KEY not in read_json(folder / "config.json", "model file", dict):
        raise AdaptError(f"{folder} is a dense checkpoint (no {CONFIG_KEY} settings); run convert first")
    return name, folder


def _weights_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in, so the adapted model is saved the same way."""
    shard = next(iter(sorted(folder.glob("*.safetensors"))), None)
    if shard is None:
        raise AdaptError(f"{folder} holds no safetensors weights")
    with safe_open(shard, framework="pt") as f:
        return SAFETENSORS_DTYPES.get(f.get_slice(next(iter(f.keys()))).get_dtype(), torch.float32)


def _default_shift(root: Path) -> float:
    scheduler_config = root / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        config = read_json(scheduler_config, "scheduler config", dict)
        for key in ("flow_shift", "shift"):
            if isinstance(config.get(key), (int, float)):
                return float(config[key])
    return 3.0


def _lora_config(settings: AdaptSettings, family: ModelFamily):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha or settings.lora_rank,
        target_modules=list(settings.lora_targets or family.lora_targets),
        init_lora_weights=True,
    )


def folder_family(folder: Path) -> ModelFamily:
    """The family of the transformer stored in `folder` (its config.json's class name)."""
    family = family_for_class_name(read_json(folder / "config.json", "model file", dict).get("_class_name"))
    if family is None:
        raise AdaptError(f"{folder} holds no supported transformer")
    return family


def load_student(folder: Path, settings: AdaptSettings, dtype: torch.dtype) -> torch.nn.Module:
    """The NABLA transformer with weights in `dtype` (diffusers keeps its fp32 modules); with LoRA, fp32 adapters."""
    family = folder_family(folder)
    model = family.nabla_class.from_pretrained(folder, torch_dtype=dtype)
    if settings.lora_rank:
        model.requires_grad_(False)
        model.add_adapter(_lora_config(settings, family))
        cast_training_params(model, dtype=torch.float32)
    return model


def _check_finite(grad_norm: torch.Tensor | None, loss: torch.Tensor, step: int, paths: RunPaths) -> None:
    """Stop before a non-finite gradient reaches the weights (the norm is global, so every process stops)."""
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        return
    kept = paths.latest_checkpoint()
    raise AdaptError(
        f"step {step}: the gradient norm is {float(grad_norm) if grad_norm is not None else 'unknown'} "
        f"(loss {float(loss):.4g}): stopped before updating the weights; "
        f"{f'last good checkpoint {kept}' if kept else 'no checkpoint was written yet'}; "
        "check the data for NaN/inf, or lower --lr"
    )


def _fsdp_wrap_blocks(accelerator: Accelerator, family: ModelFamily) -> None:
    """FSDP shards (and checkpoints) the family's transformer blocks one by one, unless the config names others."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = list(family.block_classes)


def _fsdp_checkpoints(accelerator: Accelerator) -> bool:
    """Whether FSDP checkpoints each block itself (recipes/accelerate/fsdp.yaml).

    Under FSDP2, checkpointing must sit inside each sharded block: FSDP casts a block's inputs to
    bf16 in its forward hook but not when the block is recomputed in backward, so diffusers' own
    checkpointing around the block recomputes with fp32 inputs and torch refuses the mismatch.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return accelerator.distributed_type == DistributedType.FSDP and bool(plugin and plugin.activation_checkpointing)


def _mixed_precision(settings: AdaptSettings) -> str:
    if settings.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return settings.mixed_precision


def adapt(
    converted: str | os.PathLike,
    out: str | os.PathLike,
    settings: AdaptSettings,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> Path | None:
    """Fine-tune the NABLA transformer of `converted` and write the adapted checkpoint to `out`.

    `stop_after` ends this call after that many steps with a checkpoint (continue with
    resume=True), for time-limited jobs; the call then returns None instead of the output path.
    """
    root, out = Path(converted), Path(out)
    if not root.is_dir():
        raise AdaptError(f"converted checkpoint folder not found: {root}")
    paths = RunPaths(run_folder(out))
    inputs = {"CONVERTED folder": root, "--data": settings.data, "--prompts file": settings.prompts}
    check_output(out, inputs, overwrite=None)
    check_output(paths.root, inputs, overwrite=None, reuse="adapt")
    check_links(root, "CONVERTED", name_matcher(NOT_COPIED))
    component, folder = _component_folder(root, settings.component)
    check_run_folder(paths, settings, resume)
    with sigterm_raises():
        return _train(root, out, component, folder, paths, settings, resume, stop_after, progress)


def _train(
    root: Path,
    out: Path,
    component: str,
    folder: Path,
    paths: RunPaths,
    settings: AdaptSettings,
    resume: bool,
    stop_after: int | None,
    progress: bool,
) -> Path | None:

    mixed_precision = _mixed_precision(settings)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=settings.grad_accum)
    set_seed(settings.seed)
    if accelerator.is_main_process:
        write_marker(paths.root, "adapt")
        remove_stale_temps(paths.checkpoints)
        atomic_write_text(paths.settings, json.dumps(settings.to_dict(), indent=2) + "\n")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)

    family = folder_family(folder)
    _fsdp_wrap_blocks(accelerator, family)
    student = load_student(folder, settings, half if settings.lora_rank else torch.float32).to(accelerator.device)
    if settings.gradient_checkpointing and not _fsdp_checkpoints(accelerator):
        student.enable_gradient_checkpointing()
    frozen = None
    if not settings.lora_rank:
        frozen = family.transformer_classes[0].from_pretrained(folder, torch_dtype=half)
        frozen.requires_grad_(False).eval()
        frozen.to(accelerator.device)
    teacher = DenseTeacher(student, frozen)
    sampler = TimestepSampler(
        settings.weighting_scheme,
        settings.logit_mean,
        settings.logit_std,
        settings.mode_scale,
        settings.shift if settings.shift is not None else _default_shift(root),
        settings.sigma_range,
    )

    if settings.data:
        dataset = LatentDataset(settings.data)
    else:
        teacher_rollouts(
            root,
            teacher,
            settings,
            sampler,
            family.sample_shape(student.config, settings.latent_shape),
            accelerator,
            paths.rollouts,
            progress,
        )
        dataset = LatentDataset(paths.rollouts)
    train, heldout = split_heldout(len(dataset), settings.heldout_fraction)
    validation = ValidationSet.build(dataset, heldout, settings, sampler, teacher, accelerator)

    trainable = [p for p in student.parameters() if p.requires_grad]  # FSDP re-maps them in prepare
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = settings.warmup_steps if settings.warmup_steps is not None else settings.steps // 20
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup * accelerator.num_processes,
        num_training_steps=settings.steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    checkpoint = paths.latest_checkpoint() if resume else None
    step = load_checkpoint(accelerator, model, optimizer, lr_scheduler, checkpoint) if checkpoint is not None else 0
    log = MetricsLog(paths.metrics, accelerator.is_main_process, step if checkpoint is not None else None)
    unwrapped = accelerator.unwrap_model(model)

    def validate() -> dict[str, float]:
        record = {"step": step, "kind": "validation", **validation.evaluate(unwrapped, settings, accelerator)}
        log.write(record)
        return record

    before = validate() if step == 0 else None
    last_step = settings.steps if stop_after is None else min(settings.steps, step + stop_after)
    bar = tqdm(
        total=settings.steps,
        initial=step,
        desc="adapt",
        disable=not (progress and accelerator.is_local_main_process),
    )
    micro_batches = MicroBatches(
        settings.batch_size, settings.grad_accum, accelerator.num_processes, accelerator.process_index
    )
    loader = training_loader(
        dataset,
        train,
        settings.seed,
        micro_batches,
        range(step, last_step),
        workers=settings.data_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches = iter(loader)
    with bar:  # closed (its line ended) also when a step fails, so the error gets its own line
        while step < last_step:
            started = time.perf_counter()
            total_loss = torch.zeros((), device=accelerator.device)
            for micro in range(settings.grad_accum):
                with accelerator.accumulate(model):
                    first = micro_batches.first(step, micro)
                    batch = next(batches)
                    noise, sigmas, timesteps = sample_noise(settings.seed, first, batch["latents"].shape, sampler)
                    latents, noise = (t.to(accelerator.device) for t in (batch["latents"], noise))
                    embeds = take(dataset.conditioning(batch), slice(None), accelerator.device)
                    timesteps = timesteps.to(accelerator.device)
                    noisy = add_noise(latents, noise, sigmas)
                    with accelerator.autocast():
                        target = loss_target(settings.loss, teacher, latents, noise, noisy, timesteps, embeds)
                    prediction = velocity(model, noisy, timesteps, embeds)
                    loss = weighted_mse(prediction, target, sigmas, settings.weighting_scheme)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                        _check_finite(grad_norm, loss.detach(), step + 1, paths)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                    total_loss += loss.detach() / settings.grad_accum
            step += 1
            mean_loss = float(accelerator.reduce(total_loss, "mean"))
            log.write(
                {
                    "step": step,
                    "loss": mean_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "seconds": time.perf_counter() - started,
                }
            )
            bar.set_postfix(loss=f"{mean_loss:.4g}")
            bar.update(1)
            if settings.validate_every and step % settings.validate_every == 0 and step < settings.steps:
                validate()
            every = settings.checkpoint_every
            if (every and step % every == 0) or step == last_step < settings.steps:
                save_run_checkpoint(accelerator, paths, model, optimizer, lr_scheduler, step, settings.keep_checkpoints)
    if step < settings.steps:
        return None
    after = validate()
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        first_record = json.loads(paths.metrics.read_text().splitlines()[0])
        write_adapted(root, component, folder, out, settings, full_state, before or first_record, after)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _stale(root: Path, folder: Path, name: str, component: str) -> bool:
    """Parts of the input not carried over: the retrained transformer, VCS/cache folders and the input's marker, the
    old eval report."""
    if name in NOT_COPIED:
        return True
    return (folder == root and name == component) or (folder == root / "nabla_reports" and name == "eval.json")


def write_adapted(
    root: Path,
    component: str,
    folder: Path,
    out: Path,
    settings: AdaptSettings,
    state_dict: dict[str, torch.Tensor],
    before: dict[str, Any],
    after: dict[str, Any],
) -> Path:
    """Write the adapted checkpoint: other parts of `root` copied, the transformer re-saved, atomically."""
    model = load_student(folder, settings, _weights_dtype(folder))
    model.load_state_dict(state_dict)
    with staging(out) as work:
        staged = work / "out"
        if component:
            shutil.copytree(
                root, staged, ignore=lambda d, names: [n for n in names if _stale(root, Path(d), n, component)]
            )
        if settings.lora_rank:
            model.save_lora_adapter(staged / LORA_FOLDER)
            model.fuse_lora()
            model.unload_lora()
        summary = {
            "steps": settings.steps,
            "loss": settings.loss,
            "lora_rank": settings.lora_rank,
            "lr": settings.learning_rate,
            "batch_size": settings.batch_size * settings.grad_accum,
            "seed": settings.seed,
            "data": public_name(settings.data)
            if settings.data
            else f"teacher rollouts ({settings.rollout_steps} steps)",
            "student_teacher_error_before": before["student_teacher_error"],
            "student_teacher_error_after": after["student_teacher_error"],
            "heldout_loss_before": before["heldout_loss"],
            "heldout_loss_after": after["heldout_loss"],
        }
        nabla = NablaConfig.from_dict(dict(model.config[CONFIG_KEY])).with_provenance(adaptation=summary)
        model.register_to_config(**{CONFIG_KEY: nabla.to_dict()})
        model.save_pretrained(staged / component if component else staged)
        report = {"summary": summary, "validation": {"before": before, "after": after}}
        atomic_write_text(staged / REPORT_PATH, json.dumps(report, indent=2) + "\n")
        write_marker(staged, "adapt", weight_digests(staged))
        replace_folder(staged, out)
    return out
