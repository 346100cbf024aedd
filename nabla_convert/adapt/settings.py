"""What `adapt` trains and how: AdaptSettings (recipe `adapt:` keys and CLI options), checked on construction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from nabla_convert.adapt.losses import LOSSES
from nabla_convert.config import (
    ConfigError,
    check_int,
    check_int_list,
    check_number,
    check_number_list,
)
from nabla_convert.errors import NablaError


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
    data_workers: DataLoader processes reading the latent shards ahead of the step (0: the training process).
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
    data_workers: int = 2
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
        for name in ("lora_rank", "checkpoint_every", "validate_every", "rollout_steps", "data_workers"):
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
