"""ModelFamily: what nabla-convert needs to know about one family of video transformers.

A family module subclasses it, fills in the class attributes and methods, and registers one
instance with `nabla_convert.models.register`. Methods without a default must be given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from nabla_convert.config import ConfigError, NablaConfig
from nabla_convert.models import TRANSFORMER_COMPONENTS


class FamilyError(ConfigError):
    """A family that does not support what was asked of it (e.g. prompt encoding for adapt), with a one-line message."""


class ModelFamily(ABC):
    """What nabla-convert knows about one family. Attention-level methods must be given by every family;
    pipeline-level ones (bare_pipeline, load_text_encoder, encode_prompts, velocity) raise FamilyError
    until a family gives them, which is what calibrate from embeddings, adapt and eval need."""

    name: ClassVar[str]
    transformer_classes: ClassVar[tuple[type, ...]]  # dense diffusers classes; subclasses are found too
    nabla_class: ClassVar[type]  # subclass that applies its config's `_nabla` settings on load
    pipeline_tags: ClassVar[dict[str, str]]  # pipeline class name -> Hub pipeline tag
    block_classes: ClassVar[tuple[str, ...]]  # blocks to shard (FSDP) and checkpoint one by one
    lora_targets: ClassVar[tuple[str, ...]]  # attention projections adapt puts LoRA adapters on
    archs: ClassVar[dict[str, dict[str, Any]]]  # bench presets: constructor kwargs of public checkpoints
    layers_key: ClassVar[str] = "num_layers"  # config key of the number of NABLA layers
    vae_stride: ClassVar[tuple[int, int, int]] = (4, 8, 8)  # latent frames, height, width per pixel
    text_tokens: ClassVar[int] = 512  # text length of a benchmark step
    # pipeline components the pipeline class cannot be built without, loaded even by stages that do not use them
    required_components: ClassVar[tuple[str, ...]] = ()

    def class_names(self) -> set[str]:
        return {cls.__name__ for cls in self.transformer_classes} | {self.nabla_class.__name__}

    # --- attention --------------------------------------------------------------------------------
    @abstractmethod
    def self_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention modules that get NABLA, in layer order (text and cross attention stay dense)."""
        ...

    @abstractmethod
    def hook_points(self, transformer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, type[ModelHook]]]:
        """Hook name -> (module, hook class taking the NablaState) that put tokens in tile order and back."""
        ...

    @abstractmethod
    def dense_processor(self) -> Any:
        """The stock processor remove_nabla puts back."""
        ...

    @abstractmethod
    def attention_qkv(self, attn: Any, hidden_states: torch.Tensor, rotary_emb: Any) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, H, S, D), post-RoPE, of a self-attention module's input, as the stock processor makes them."""
        ...

    @abstractmethod
    def attention_out(self, attn: Any, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The module's output from the attention output (B, H, S, D)."""
        ...

    # --- joint text-video attention (MM-DiT families: text and video in one attention) ------------------
    def joint_attention_qkv(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, rotary_emb: Any
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Video q, k, v (B, H, S, D), post-RoPE, and text q, k, v (B, H, L, D) of a joint attention module's input."""
        raise FamilyError(f"{self.name}: its self-attention takes no text (no joint text-video attention)")

    def joint_attention_out(
        self, attn: Any, video: torch.Tensor, text: torch.Tensor, hidden_states: torch.Tensor
    ) -> Any:
        """The joint attention module's output from the video (B, H, S, D) and text (B, H, L, D) attention outputs."""
        raise FamilyError(f"{self.name}: its self-attention takes no text (no joint text-video attention)")

    def text_validity(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
        """(B, L) bool, False at text padding, from the attention mask the model gives its joint attention."""
        raise FamilyError(f"{self.name}: its self-attention takes no text (no joint text-video attention)")

    # --- context parallelism (diffusers enable_parallelism, Ulysses) ------------------------------------
    def context_parallel_plan(self, transformer: torch.nn.Module) -> dict[str, Any] | None:
        """The `_cp_plan` apply_nabla gives the transformer for diffusers' context parallelism (None: the class's).

        A plan for NABLA splits the token stream *after* the tile-order hooks (diffusers' split hooks,
        registered later by enable_parallelism, wrap ours: a `split_output` split sees our hook's
        output), splits everything indexed by visual token that the blocks get (RoPE, per-token
        modulation), and gathers before the hook that returns tokens to raster order. The stream's
        length divides by the Ulysses degree (`NablaState.set_grid` pads it when needed), so the
        splits are even. Tensors every rank holds whole (text) are not split.
        """
        return None

    def local_attention(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """Attention modules that run on each rank's own tokens under context parallelism, with no all-to-all.

        enable_parallelism gives every attention processor the parallel config; the NABLA transformer
        clears it in these at each forward. Default: every attention module other than `self_attention`
        (text self-attention and cross-attention, whose keys every rank holds whole: an all-to-all
        would give each rank the same keys N times, the same result at N times the cost).
        """
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention, MochiAttention

        attention_classes = (Attention, MochiAttention, AttentionModuleMixin)  # the classes enable_parallelism visits
        sparse = {id(module) for module in self.self_attention(transformer)}
        return [m for m in transformer.modules() if isinstance(m, attention_classes) and id(m) not in sparse]

    def num_heads(self, transformer: torch.nn.Module) -> int:
        return self.attention_shape(transformer.config)[0]

    @abstractmethod
    def attention_shape(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """(heads, head dim) of self-attention, from a transformer config (missing keys: the class defaults)."""
        ...

    def num_layers(self, config: Mapping[str, Any]) -> int:
        """Self-attention layers that get NABLA, from a transformer config."""
        value = config.get(self.layers_key)
        if not isinstance(value, int):
            raise ConfigError(f"the transformer config has no integer {self.layers_key}")
        return value

    def with_layers(self, config: Mapping[str, Any], layers: int) -> dict[str, Any]:
        """A transformer config like `config` with `layers` NABLA layers (a shorter model for benchmarks)."""
        return {**config, self.layers_key: layers}

    def native_settings(self, config: Mapping[str, Any]) -> NablaConfig | None:
        """NABLA settings a checkpoint's own config carries (None: it has none)."""
        return None

    def builtin_nabla(
        self, transformer: torch.nn.Module, grid: tuple[int, int, int], config: NablaConfig
    ) -> AbstractContextManager[dict[str, Any]]:
        """The family's own NABLA in diffusers (bench compares against it): inside the context, the dense transformer
        runs it at `config`'s threshold and window when called with the extra forward kwargs the context gives."""
        raise FamilyError(f"{self.name}: diffusers has no built-in NABLA for this family")

    def has_builtin_nabla(self) -> bool:
        return type(self).builtin_nabla is not ModelFamily.builtin_nabla

    # --- shapes -----------------------------------------------------------------------------------
    def token_grid(
        self, resolution: tuple[int, int], frames: int, patch: tuple[int, int, int] = (1, 2, 2)
    ) -> tuple[int, int, int]:
        """Latent token grid (T, H, W) the transformer sees for `frames` frames at `resolution` (width, height)."""
        stride_t, stride_h, stride_w = self.vae_stride
        if frames < 1 or (frames - 1) % stride_t:
            raise ValueError(f"frames must be {stride_t}k+1 (1, {1 + stride_t}, ...), got {frames}")
        width, height = resolution
        latent = ((frames - 1) // stride_t + 1, height // stride_h, width // stride_w)
        return (latent[0] // patch[0], latent[1] // patch[1], latent[2] // patch[2])

    def patch_size(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        return tuple(config.get("patch_size", (1, 2, 2)))

    @abstractmethod
    def random_inputs(
        self, transformer: torch.nn.Module, grid: tuple[int, int, int], batch: int, device: Any, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Forward kwargs of one denoising call at token grid `grid` with random latents and text (bench)."""
        ...

    # --- pipelines --------------------------------------------------------------------------------
    def transformers(self, pipe: Any) -> dict[str, torch.nn.Module]:
        """The pipeline's transformers of this family by component name."""
        return {name: t for name in TRANSFORMER_COMPONENTS if (t := getattr(pipe, name, None)) is not None}

    def denoiser_for(self, pipe: Any, timestep: float) -> torch.nn.Module:
        """The transformer the pipeline uses at `timestep`."""
        return pipe.transformer

    def sample_shape(self, config: Mapping[str, Any], latent_grid: tuple[int, int, int]) -> tuple[int, ...]:
        """Shape of one latent sample that `velocity` takes, for latent frames, height and width `latent_grid`."""
        return (config["in_channels"], *latent_grid)

    def clean_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's latents during denoising (what its step callback sees) as `velocity` takes x_0."""
        return latents

    def run_pipeline(self, pipe: Any, *, guidance: float, on_step_end: Callable[..., dict], **kwargs: Any) -> Any:
        """Sample with the pipeline (`kwargs`: its own arguments: prompt, height, ...) at CFG scale `guidance`, calling
        `on_step_end(pipe, step, timestep, {"latents": latents})` after every denoising step, as diffusers'
        callback_on_step_end (it returns {}; setting `pipe._interrupt` skips the remaining steps)."""
        return pipe(
            **kwargs,
            guidance_scale=guidance,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )

    def bare_pipeline(self, transformer: torch.nn.Module) -> Any:
        """A pipeline around a bare transformer (no text encoder, no VAE) for calibration from embeddings."""
        raise FamilyError(f"{self.name}: bare_pipeline is not supported for this family yet")

    def calibrates_from_embeddings(self) -> bool:
        """Whether calibrate can run the family's pipeline on a prompt-embeddings file (prompt_embeds alone): the
        families that give `bare_pipeline`; the others' pipelines take more conditioning (masks, pooled text)."""
        return type(self).bare_pipeline is not ModelFamily.bare_pipeline

    def load_text_encoder(self, root: Path, device: torch.device) -> Any:
        """A pipeline of `root` that can only encode prompts."""
        raise FamilyError(f"{self.name}: load_text_encoder is not supported for this family yet")

    def encode_prompts(self, pipe: Any, prompts: list[str], max_length: int = 512) -> Any:
        """Text conditioning of prompts as `velocity` takes it (a tensor or a dict of tensors with batch first)."""
        raise FamilyError(f"{self.name}: encode_prompts is not supported for this family yet")

    def velocity(
        self, transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: Any
    ) -> torch.Tensor:
        """One denoising call: the flow-matching velocity (noise - x_0) of latents at `timesteps` (0-1000), in the
        latent layout the family's pipeline denoises, with `encode_prompts`' conditioning. `transformer` may be
        wrapped for distributed training (its `.module` is the model)."""
        raise FamilyError(f"{self.name}: velocity is not supported for this family yet")

    def is_native(self, root: Path) -> bool:
        """Whether `root` holds a transformer checkpoint in the family's own (non-diffusers) layout."""
        return False

    def import_native(self, root: Path, base: Path, out: Path) -> None:
        """Write the weights of the native checkpoint at `root` into the diffusers transformer folder `out`,
        which already holds the config.json of `base`, the dense diffusers transformer of the same architecture."""
        raise FamilyError(f"{self.name}: importing checkpoints in the family's own layout is not supported")
