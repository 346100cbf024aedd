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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from safetensors import safe_open
from tqdm.auto import tqdm

from nabla_convert.adapt.checkpoint import load_checkpoint, save_checkpoint
from nabla_convert.adapt.data import (
    Conditioning,
    DataError,
    LatentDataset,
    TimestepSampler,
    sample_positions,
    split_heldout,
    step_generator,
    take,
    write_latent_shard,
)
from nabla_convert.adapt.losses import LOSSES, DenseTeacher, loss_target, relative_error, velocity, weighted_mse
from nabla_convert.config import (
    CONFIG_KEY,
    ConfigError,
    NablaConfig,
    check_int,
    check_int_list,
    check_number,
    check_number_list,
)
from nabla_convert.convert import transformer_components
from nabla_convert.errors import NablaError
from nabla_convert.flow import add_noise, per_sample_mse, velocity_target
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
from nabla_convert.io import atomic_write_text, read_json, read_prompts
from nabla_convert.models import family_for_class_name, family_of
from nabla_convert.models.family import ModelFamily
from nabla_convert.models.nabla import layer_densities, reset_densities

LORA_FOLDER = "lora"
REPORT_PATH = "nabla_reports/adapt.json"
RESUMABLE_CHANGES = {"checkpoint_every", "validate_every", "keep_checkpoints"}
NOT_COPIED = (".cache", ".git", MARKER)  # parts of CONVERTED the output does not take over (besides the transformer)
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class AdaptError(NablaError, ValueError):
    """Adaptation that cannot start or continue, with a message that says why."""


@dataclass(frozen=True)
class AdaptSettings:
    """What `adapt` trains and how; recipe `adapt:` sections use these names.

    loss: "distill" (match the dense teacher's velocity) or "flow" (flow matching on `data`).
    data: latent dataset folder (format in adapt/data.py); without it, distillation runs on
        teacher rollouts: `prompts` (text file, one per line) encoded by the checkpoint's text
        encoder, `rollout_steps` Euler steps of the dense teacher from noise of `latent_shape`
        (latent frames, height, width), without guidance.
    lr: AdamW learning rate (default 1e-4 with LoRA, 1e-5 for a full fine-tune); warmup_steps
        (default steps // 20) then `lr_scheduler` (diffusers.optimization names) to zero.
    lora_rank: 0 = full fine-tune; >0 = peft LoRA of that rank (alpha = rank unless given) on
        `lora_targets` (default: the family's attention projections), and the frozen base is the teacher.
    batch_size per process and micro-step, grad_accum micro-steps per step.
    weighting_scheme / logit_mean / logit_std / mode_scale: timestep density and loss weight as in
        diffusers' SD3 scripts; shift: flow shift (default: the checkpoint's scheduler config);
        sigma_range: the noise levels trained (one expert of a two-transformer model).
    checkpoint_every, validate_every: in steps (0 = only at the end); keep_checkpoints newest kept.
    validation_samples: held-out samples (last heldout_fraction of the data) validated on.
    mixed_precision: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16" or "no".
    component: which transformer of a pipeline folder to adapt (e.g. transformer_2).
    """

    steps: int = 1000
    loss: str = "distill"
    data: str | None = None
    prompts: str | None = None
    latent_shape: tuple[int, int, int] = (21, 60, 104)
    rollout_steps: int = 20
    text_length: int = 512
    lr: float | None = None
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    batch_size: int = 1
    grad_accum: int = 1
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None
    sigma_range: tuple[float, float] = (0.0, 1.0)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 100
    validation_samples: int = 4
    heldout_fraction: float = 0.1
    seed: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True
    component: str = "transformer"

    def __post_init__(self) -> None:
        try:
            self.check_types()
        except ConfigError as err:
            raise AdaptError(f"adapt settings: {err}") from None
        if self.loss not in LOSSES:
            raise AdaptError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "flow" and not self.data:
            raise AdaptError("flow matching needs a latent dataset (--data)")
        if self.lr is not None and self.lr <= 0:
            raise AdaptError(f"lr must be positive, got {self.lr}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise AdaptError(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise AdaptError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def check_types(self) -> None:
        """Refuse values of the wrong type (a recipe's "10" steps, true for a float) instead of coercing them."""
        positive = ("steps", "batch_size", "grad_accum", "validation_samples", "keep_checkpoints", "text_length")
        for name in positive:
            check_int(getattr(self, name), name, minimum=1)
        for name in ("lora_rank", "checkpoint_every", "validate_every", "rollout_steps"):
            check_int(getattr(self, name), name, minimum=0)
        check_int(self.seed, "seed")
        if self.warmup_steps is not None:
            check_int(self.warmup_steps, "warmup_steps", minimum=0)
        for name in ("weight_decay", "max_grad_norm", "logit_mean", "logit_std", "mode_scale", "heldout_fraction"):
            check_number(getattr(self, name), name)
        for name in ("lr", "lora_alpha", "shift"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name)
        shape = check_int_list(self.latent_shape, "latent_shape", minimum=1)
        if len(shape) != 3:
            raise ConfigError(f"latent_shape must be three integers F, H, W, got {self.latent_shape!r}")
        sigmas = check_number_list(self.sigma_range, "sigma_range")
        if len(sigmas) != 2:
            raise ConfigError(f"sigma_range must be two numbers, got {self.sigma_range!r}")
        targets = self.lora_targets
        if targets is not None and (
            not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets)
        ):
            raise ConfigError(f"lora_targets must be a list of module names, got {self.lora_targets!r}")
        for name in ("loss", "lr_scheduler", "weighting_scheme", "mixed_precision", "component"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be text, got {getattr(self, name)!r}")
        for name in ("data", "prompts"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a path, got {getattr(self, name)!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        object.__setattr__(self, "latent_shape", shape)
        object.__setattr__(self, "sigma_range", sigmas)
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @classmethod
    def from_dict(cls, plan: dict[str, Any], /, **overrides: Any) -> AdaptSettings:
        """Settings from a recipe's `adapt:` mapping, then `overrides` that are not None (CLI options)."""
        known = {f.name for f in fields(cls)}
        unknown = set(plan) - known
        if unknown:
            raise AdaptError(f"unknown adapt settings {sorted(unknown)}; known: {sorted(known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if plan.keys() & given.keys():  # a recipe value an option replaces must still be valid
            cls(**{**given, **plan})
        return cls(**{**plan, **given})

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora_rank else 1e-5)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step-*")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None


def run_folder(out: str | os.PathLike) -> Path:
    """Where a run writing `out` keeps its checkpoints, metrics and settings."""
    out = Path(out)
    return out.with_name(out.name + ".run")


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


def teacher_rollouts(
    root: Path,
    teacher: DenseTeacher,
    settings: AdaptSettings,
    sampler: TimestepSampler,
    sample_shape: tuple[int, ...],
    accelerator: Accelerator,
    folder: Path,
    progress: bool = True,
) -> None:
    """A latent dataset made by the dense teacher: prompts encoded, then Euler steps from noise.

    Each process makes one contiguous share of the prompts into its own shard, so the dataset is the
    same for any process count; done.json marks completion, so a resumed run reuses it.
    """
    if (folder / "done.json").is_file():
        return
    if not settings.prompts:
        raise AdaptError("distillation without --data needs prompts to make teacher rollouts (--prompts FILE)")
    try:
        prompts = read_prompts(settings.prompts)
    except FileNotFoundError as err:
        raise AdaptError(str(err)) from None
    if len(prompts) < 2:
        raise AdaptError(f"{settings.prompts} needs at least 2 prompts (one is held out), found {len(prompts)}")
    if not (root / "text_encoder").is_dir():
        raise AdaptError(f"{root} has no text_encoder to encode prompts; pass a latent dataset with --data")
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(prompts) < world:
        raise AdaptError(
            f"{settings.prompts} has {len(prompts)} prompts for {world} processes; give each one at least one"
        )
    mine = range(len(prompts) * rank // world, len(prompts) * (rank + 1) // world)  # shards in prompt order
    family = family_of(teacher.student)
    encoder = family.load_text_encoder(root, device)
    embeds = family.encode_prompts(encoder, [prompts[i] for i in mine], settings.text_length)
    del encoder
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sampler.shift)
    latents = []
    for row, index in enumerate(
        tqdm(mine, desc="teacher rollouts", disable=not (progress and accelerator.is_local_main_process))
    ):
        x = torch.randn((1, *sample_shape), generator=step_generator(settings.seed, -2, index)).to(device)
        scheduler.set_timesteps(settings.rollout_steps, device=device)
        for t in scheduler.timesteps:
            with accelerator.autocast():
                v = teacher(x, t.expand(1), take(embeds, slice(row, row + 1)))
            x = scheduler.step(v.float(), t, x).prev_sample
        latents.append(x.cpu())
    write_latent_shard(folder / f"shard-{accelerator.process_index:05d}.safetensors", torch.cat(latents), embeds)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(folder / "done.json", json.dumps({"prompts": len(prompts)}) + "\n")
    accelerator.wait_for_everyone()


@dataclass
class ValidationSet:
    """Fixed held-out samples, noise and noise levels (spread over the range), with cached teacher velocities."""

    latents: torch.Tensor
    conditioning: Conditioning
    noise: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    teacher: torch.Tensor

    @classmethod
    def build(cls, dataset, heldout, settings, sampler, teacher, accelerator) -> ValidationSet:
        count = settings.validation_samples
        batch = dataset.batch([heldout[i % len(heldout)] for i in range(count)])
        noise = torch.randn(batch["latents"].shape, generator=step_generator(settings.seed, -3))
        sigmas, timesteps = sampler.at((torch.arange(count) + 0.5) / count)
        noisy = add_noise(batch["latents"], noise, sigmas)
        conditioning = dataset.conditioning(batch)
        outputs = []
        for chunk in range(0, count, settings.batch_size):
            part = slice(chunk, chunk + settings.batch_size)
            inputs = (
                *(t[part].to(accelerator.device) for t in (noisy, timesteps)),
                take(conditioning, part, accelerator.device),
            )
            with accelerator.autocast():
                prediction = teacher(*inputs)
            outputs.append(prediction.float().cpu())
        return cls(batch["latents"], conditioning, noise, sigmas, timesteps, torch.cat(outputs))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, settings: AdaptSettings, accelerator: Accelerator) -> dict[str, float]:
        """Student-vs-teacher relative error, held-out loss of the training objective, mean block density."""
        reset_densities(model)
        errors, losses = [], []
        noisy = add_noise(self.latents, self.noise, self.sigmas)
        for chunk in range(0, len(self.latents), settings.batch_size):
            part = slice(chunk, chunk + settings.batch_size)
            device = accelerator.device
            inputs = (*(t[part].to(device) for t in (noisy, self.timesteps)), take(self.conditioning, part, device))
            with accelerator.autocast():
                prediction = velocity(model, *inputs).float().cpu()
            flow = velocity_target(self.latents[part], self.noise[part])
            target = self.teacher[part] if settings.loss == "distill" else flow
            errors.append(relative_error(prediction, self.teacher[part]))
            losses.append(per_sample_mse(prediction, target))
        densities = layer_densities(model)
        return {
            "student_teacher_error": float(torch.cat(errors).mean()),
            "heldout_loss": float(torch.cat(losses).mean()),
            "density": sum(densities.values()) / max(len(densities), 1),
        }


class MetricsLog:
    """metrics.jsonl of the run; on resume, records past the checkpoint (lost with the kill) are dropped."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_at]
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        elif enabled:
            atomic_write_text(path, "")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _check_run_folder(paths: RunPaths, settings: AdaptSettings, resume: bool) -> None:
    check_links(paths.root, "the run folder")
    checkpoint = paths.latest_checkpoint()
    if checkpoint is not None and not resume:
        raise AdaptError(f"{paths.root} already holds checkpoints; pass --resume to continue, or remove it")
    if resume and paths.settings.is_file():
        before = json.loads(paths.settings.read_text())
        now = settings.to_dict()
        changed = sorted(
            k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES
        )
        if changed:
            raise AdaptError(f"cannot resume {paths.root} with changed settings {changed}; use the original ones")


def _save_checkpoint(accelerator: Accelerator, paths: RunPaths, model, optimizer, lr_scheduler, step: int, keep: int):
    """The run's state at `step`, built in a temp folder and renamed into place; checkpoints beyond `keep` removed."""
    final = paths.checkpoints / f"step-{step:06d}"
    if not accelerator.is_main_process:
        save_checkpoint(accelerator, model, optimizer, lr_scheduler, step, final)  # joins the gather; writes nothing
    else:
        with staging(final) as work:
            save_checkpoint(accelerator, model, optimizer, lr_scheduler, step, work / final.name)
            replace_folder(work / final.name, final)
        for old in sorted(paths.checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


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


def sample_noise(
    seed: int, first: int, shape: torch.Size, sampler: TimestepSampler
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, sigmas, timesteps) of the samples numbered first, first + 1, ... of the run.

    Each sample draws from its own generator keyed by its global number, so N processes with batch b
    draw exactly what one process with batch N * b draws: the run does not depend on the GPU count.
    """
    generators = [step_generator(seed, first + i) for i in range(shape[0])]
    noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
    sigmas, timesteps = (torch.cat(t) for t in zip(*(sampler.sample(1, g) for g in generators), strict=True))
    return noise, sigmas, timesteps


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
    family = folder_family(folder)
    if not family.supports_training():
        raise AdaptError(f"adapt does not support {family.name} checkpoints yet (no denoising call for training)")
    _check_run_folder(paths, settings, resume)
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
    world, rank = accelerator.num_processes, accelerator.process_index
    with bar:  # closed (its line ended) also when a step fails, so the error gets its own line
        while step < last_step:
            started = time.perf_counter()
            total_loss = torch.zeros((), device=accelerator.device)
            for micro in range(settings.grad_accum):
                with accelerator.accumulate(model):
                    first = ((step * settings.grad_accum + micro) * world + rank) * settings.batch_size
                    positions = sample_positions(settings.seed, len(train), first, settings.batch_size)
                    batch = dataset.batch([train[p] for p in positions])
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
                _save_checkpoint(accelerator, paths, model, optimizer, lr_scheduler, step, settings.keep_checkpoints)
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


__all__ = ["AdaptError", "AdaptSettings", "DataError", "adapt", "run_folder", "write_adapted"]
