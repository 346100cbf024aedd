"""The HunyuanVideo families (diffusers HunyuanVideoTransformer3DModel, and HunyuanVideo 1.5's own transformer).

Both are MM-DiTs: every attention is joint, over the video tokens and the text tokens at once.
HunyuanVideo has dual-stream blocks (text through add_q/k/v_proj) and then single-stream blocks
(video and text concatenated, one set of projections); HunyuanVideo 1.5 has dual-stream blocks
only, and a text sequence that is the Qwen, ByT5 and image tokens with the real ones first. Every
joint attention gets a NablaAttnProcessor: NABLA selects the video->video blocks (threshold and STA
per layer), video->text and text->everything stay dense, and text padding keys are masked. It is
one BlockMask over [video in tile order; text] (`BlockSelection.with_dense_suffix`), run by the
same runner as Wan's self-attention.

Tokens are put in tile order once per forward by diffusers hooks: `rope` (record the grid, gather
cos/sin), `x_embedder` (emit tile order) and `proj_out` (back to raster order). Tile order is
frame-major, so HunyuanVideo I2V's token-replace conditioning (the first frame's tokens come
first) holds in tile order too. Text padding rows compute nothing (their output is never read:
padding keys are masked in every layer and the output is the video tokens').

Context parallelism (diffusers `enable_parallelism`, Ulysses): apply_nabla gives the transformer its
own `_cp_plan`, which splits the video stream where the hooks emit it (rope and x_embedder outputs;
padded to a multiple of the degree when needed, as Wan's); the text stays whole on every rank. Joint
attention runs the video through diffusers' all-to-all and the text heads of each rank alongside
(`NablaAttnProcessor.attend_joint`); proj_out's hook gathers. I2V with token replace is refused
under it (its blocks slice the first frame off the stream). See attention/parallel.py.

Pipelines: HunyuanVideo is guidance-distilled (embedded guidance, no CFG batch); its prompts are Llama hidden states
with their mask and a pooled CLIP embedding. HunyuanVideo15Pipeline runs real CFG through its guider, has no step
callback, and encodes prompts as Qwen2.5-VL hidden states and ByT5 embeddings of the quoted glyph text, each with its
mask; its transformer also takes the I2V condition channels and SigLIP image tokens, zeros for text-to-video.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from diffusers import (
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from nabla_convert.config import ConfigError
from nabla_convert.models import register
from nabla_convert.models.family import ModelFamily
from nabla_convert.models.nabla import NablaModelMixin, RasterOutputHook, StateHook, StepHook

__all__ = [
    "HunyuanVideo15Family",
    "HunyuanVideoFamily",
    "NablaHunyuanVideo15Transformer3DModel",
    "NablaHunyuanVideoTransformer3DModel",
]

EMBEDDED_GUIDANCE = 6.0  # HunyuanVideoPipeline's default guidance_scale, embedded (x 1000) by guidance-distilled models


class _RopeHook(StateHook):
    """Records the token grid of this forward; cos/sin (S, D) come out in compact tile order."""

    def pre_forward(self, module, hidden_states, *args, **kwargs):
        _, _, frames, height, width = hidden_states.shape
        grid = (frames // module.patch_size_t, height // module.patch_size, width // module.patch_size)
        if min(grid) < 1:
            raise ValueError(f"latent of shape {tuple(hidden_states.shape)} is smaller than one patch")
        self.state.set_grid(grid)
        return (hidden_states, *args), kwargs

    def post_forward(self, module, output):
        return tuple(self.state.layout.to_tiles(freqs, dim=0, padded=self.state.padded_stream) for freqs in output)


class _PatchHook(StateHook):
    """x_embedder's (B, S, C) raster-order tokens -> tile order (compact, unless the stream carries the padding)."""

    def post_forward(self, module, output):
        return self.state.layout.to_tiles(output, dim=1, padded=self.state.padded_stream)


class _StepHook(StepHook):
    """Begins each forward; refuses HunyuanVideo I2V's token replace under context parallelism.

    Token-replace blocks treat the first `first_frame_num_tokens` tokens of their hidden states as the
    first frame's, which holds for the whole stream but not for a rank's share of it.
    """

    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        if self.state.parallel is not None and module.config.get("image_condition_type") == "token_replace":
            raise ConfigError("HunyuanVideo I2V with token replace does not run under context parallelism")
        return args, kwargs


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def _norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class NablaHunyuanVideoTransformer3DModel(NablaModelMixin, HunyuanVideoTransformer3DModel):
    """A HunyuanVideoTransformer3DModel that applies the NABLA config found in its own config.json on load."""


class NablaHunyuanVideo15Transformer3DModel(NablaModelMixin, HunyuanVideo15Transformer3DModel):
    """A HunyuanVideo15Transformer3DModel that applies the NABLA config found in its own config.json on load."""


class HunyuanJointFamily(ModelFamily):
    """What HunyuanVideo and HunyuanVideo 1.5 share: joint attention in every block, hooks, shapes."""

    default_heads: ClassVar[int]  # the transformer class's defaults, for configs that leave them out
    default_patch: ClassVar[int]
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def self_attention(self, transformer):
        blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", ())]
        return [block.attn for block in blocks]

    def hook_points(self, transformer):
        return {
            "nabla_step": (transformer, _StepHook),
            "nabla_rope": (transformer.rope, _RopeHook),
            "nabla_patch": (transformer.x_embedder, _PatchHook),
            "nabla_unpatch": (transformer.proj_out, RasterOutputHook),
        }

    def context_parallel_plan(self, transformer):
        """Split the video stream where the tile-order hooks emit it: x_embedder's tokens (B, S, C), rope's cos and
        sin (S, D). diffusers 0.42.1 gives neither class a plan.

        The text stays whole on every rank (its token refiner and embedders run on every rank, its attention
        locally); joint attention appends it to the video after the all-to-all. proj_out's hook gathers. The model's
        attention mask is built from the local video length and the text mask, and only its text part is read
        (`text_validity`). No hook sits on a block: compile_repeated_blocks keeps one graph.
        """
        rope_split = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        return {
            "rope": {0: rope_split, 1: rope_split},
            "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        }

    def attention_qkv(self, attn, hidden_states, rotary_emb):
        raise ValueError(f"{self.name}: every attention is joint with the text; called without text")

    def attention_out(self, attn, out, hidden_states):
        raise ValueError(f"{self.name}: every attention is joint with the text; called without text")

    def joint_attention_qkv(self, attn, hidden_states, encoder_hidden_states, rotary_emb):
        """As the stock processors: video through to_q/k/v, q/k norms and RoPE; text through add_q/k/v_proj and the
        added norms in dual-stream blocks, through to_q/k/v and the same norms in single-stream blocks (no RoPE)."""
        video = [_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        video[0], video[1] = _norm(attn.norm_q, video[0]), _norm(attn.norm_k, video[1])
        if rotary_emb is not None:
            video[0], video[1] = (apply_rotary_emb(t, rotary_emb, sequence_dim=1) for t in video[:2])
        if attn.add_q_proj is not None:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            norms = (attn.norm_added_q, attn.norm_added_k)
        else:
            projections, norms = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        text = [_heads(proj(encoder_hidden_states), attn.heads) for proj in projections]
        text[0], text[1] = _norm(norms[0], text[0]), _norm(norms[1], text[1])
        return tuple(t.transpose(1, 2) for t in video), tuple(t.transpose(1, 2) for t in text)

    def joint_attention_out(self, attn, video, text, hidden_states):
        video, text = (t.transpose(1, 2).flatten(2).type_as(hidden_states) for t in (video, text))
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text

    def text_validity(self, attention_mask, length):
        """HunyuanVideo masks keys with (B, 1, 1, video + text); HunyuanVideo 1.5 passes the text mask (B, L)."""
        if attention_mask is None:
            raise ValueError(f"{self.name}: joint attention without the text padding mask")
        mask = attention_mask.flatten(1) if attention_mask.dim() == 4 else attention_mask
        return mask[:, -length:].bool()

    def attention_shape(self, config):
        return config.get("num_attention_heads", self.default_heads), config.get("attention_head_dim", 128)

    def patch_size(self, config):
        spatial = config.get("patch_size", self.default_patch)
        return (config.get("patch_size_t", 1), spatial, spatial)


class HunyuanVideoFamily(HunyuanJointFamily):
    name = "hunyuan-video"
    transformer_classes = (HunyuanVideoTransformer3DModel,)
    nabla_class = NablaHunyuanVideoTransformer3DModel
    pipeline_tags: ClassVar[dict[str, str]] = {
        "HunyuanVideoPipeline": "text-to-video",
        "HunyuanVideoImageToVideoPipeline": "image-to-video",
        "HunyuanSkyreelsImageToVideoPipeline": "image-to-video",
    }
    block_classes = (
        "HunyuanVideoTransformerBlock",
        "HunyuanVideoSingleTransformerBlock",
        "HunyuanVideoTokenReplaceTransformerBlock",
        "HunyuanVideoTokenReplaceSingleTransformerBlock",
    )
    # HunyuanVideoTransformer3DModel config of hunyuanvideo-community/HunyuanVideo (13B): 20 dual-stream and 40
    # single-stream blocks, 24 heads of 128.
    archs: ClassVar[dict[str, dict[str, Any]]] = {
        "hunyuan-video-t2v": dict(
            num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40,
            patch_size=2, patch_size_t=1, text_embed_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        ),
    }  # fmt: skip
    text_tokens = 256  # the pipeline's max_sequence_length
    default_heads, default_patch = 24, 2

    def dense_processor(self):
        return HunyuanVideoAttnProcessor2_0()

    def num_layers(self, config):
        """Every dual-stream block, then every single-stream block, is one NABLA layer."""
        return super().num_layers(config) + config.get("num_single_layers", 40)

    def with_layers(self, config, layers):
        """`layers` blocks in the model's proportion of dual- to single-stream blocks (1:2 for HunyuanVideo)."""
        dual, single = config.get("num_layers", 20), config.get("num_single_layers", 40)
        kept = round(layers * dual / (dual + single))
        return {**config, "num_layers": kept, "num_single_layers": layers - kept}

    def random_inputs(self, transformer, grid, batch, device, dtype):
        """Random latents; text of `text_tokens` tokens of which the first half are real (the rest padding)."""
        config = transformer.config
        latent = (batch, config.in_channels, *(g * p for g, p in zip(grid, self.patch_size(config), strict=True)))
        mask = torch.zeros(batch, self.text_tokens, dtype=torch.long, device=device)
        mask[:, : self.text_tokens // 2] = 1
        inputs = {
            "hidden_states": torch.randn(latent, device=device, dtype=dtype),
            "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                batch, self.text_tokens, config.text_embed_dim, device=device, dtype=dtype
            ),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, device=device, dtype=dtype),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), EMBEDDED_GUIDANCE * 1000, device=device, dtype=dtype)
        return inputs

    def load_text_encoder(self, root, device):
        return HunyuanVideoPipeline.from_pretrained(root, transformer=None, vae=None).to(device)

    def encode_prompts(self, pipe, prompts, max_length=256):
        """Llama hidden states (N, L, D) with their padding mask (N, L) and the pooled CLIP embedding (N, D2)."""
        embeds, pooled, mask = pipe.encode_prompt(
            prompts, device=pipe._execution_device, max_sequence_length=max_length
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}

    def velocity(self, transformer, noisy, timesteps, prompt_embeds):
        """noisy (B, C, T, H, W); guidance-distilled models get the pipeline's default embedded guidance (6.0)."""
        config = getattr(transformer, "module", transformer).config
        guidance = None
        if config.guidance_embeds:
            guidance = noisy.new_full((noisy.shape[0],), EMBEDDED_GUIDANCE * 1000)
        return transformer(
            hidden_states=noisy,
            timestep=timesteps.to(noisy.dtype),
            encoder_hidden_states=prompt_embeds["prompt_embeds"].to(noisy.dtype),
            encoder_attention_mask=prompt_embeds["prompt_attention_mask"],
            pooled_projections=prompt_embeds["pooled_prompt_embeds"].to(noisy.dtype),
            guidance=guidance,
        ).sample


class HunyuanVideo15Family(HunyuanJointFamily):
    """HunyuanVideo 1.5: dual-stream blocks only; the text is Qwen2.5-VL, ByT5 and image tokens (real ones first)."""

    name = "hunyuan-video-1.5"
    transformer_classes = (HunyuanVideo15Transformer3DModel,)
    nabla_class = NablaHunyuanVideo15Transformer3DModel
    pipeline_tags: ClassVar[dict[str, str]] = {
        "HunyuanVideo15Pipeline": "text-to-video",
        "HunyuanVideo15ImageToVideoPipeline": "image-to-video",
    }
    block_classes = ("HunyuanVideo15TransformerBlock",)
    # HunyuanVideo15Transformer3DModel config of the 480p and 720p T2V checkpoints (8.3B): 54 blocks, 16 heads of 128.
    archs: ClassVar[dict[str, dict[str, Any]]] = {
        "hunyuan-video-1.5-t2v": dict(
            in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
            patch_size=1, patch_size_t=1, text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
            task_type="t2v",
        ),
    }  # fmt: skip
    vae_stride = (4, 16, 16)
    default_heads, default_patch = 16, 1
    required_components = ("vae",)  # HunyuanVideo15Pipeline.__init__ reads the VAE's config
    # the pipeline's text lengths: Qwen2.5-VL tokens, ByT5 tokens, image (SigLIP) tokens (all padding for T2V)
    text_lengths = (1000, 256, 729)

    def dense_processor(self):
        return HunyuanVideo15AttnProcessor2_0()

    def random_inputs(self, transformer, grid, batch, device, dtype):
        """Random latents (with the I2V condition channels empty, as T2V runs); a quarter of the Qwen and ByT5
        tokens are real, no image tokens (T2V)."""
        config = transformer.config
        latent = (batch, config.in_channels, *(g * p for g, p in zip(grid, self.patch_size(config), strict=True)))
        qwen, byt5, image = self.text_lengths

        def real_first(length: int) -> torch.Tensor:
            mask = torch.zeros(batch, length, dtype=torch.long, device=device)
            mask[:, : length // 4] = 1
            return mask

        return {
            "hidden_states": torch.randn(latent, device=device, dtype=dtype),
            "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, qwen, config.text_embed_dim, device=device, dtype=dtype),
            "encoder_attention_mask": real_first(qwen),
            "encoder_hidden_states_2": torch.randn(batch, byt5, config.text_embed_2_dim, device=device, dtype=dtype),
            "encoder_attention_mask_2": real_first(byt5),
            "image_embeds": torch.zeros(batch, image, config.image_embed_dim, device=device, dtype=dtype),
        }

    def run_pipeline(self, pipe, *, guidance, on_step_end, **kwargs):
        """HunyuanVideo15Pipeline takes its CFG scale from its guider and calls back no step: for this call its guider
        is one at `guidance` and its scheduler's step reports the new latents to `on_step_end`."""
        with _guided(pipe, guidance), _step_callback(pipe, on_step_end):
            return pipe(**kwargs)

    def load_text_encoder(self, root, device):
        """The pipeline without its transformer (its constructor reads the VAE's config, so the VAE stays)."""
        return HunyuanVideo15Pipeline.from_pretrained(root, transformer=None).to(device)

    def encode_prompts(self, pipe, prompts, max_length=1000):
        """As the pipeline encodes prompts: Qwen2.5-VL hidden states (N, L, D) of `max_length` tokens (the pipeline's
        1000) and their mask (N, L); ByT5 embeddings of the prompt's quoted glyph text (N, 256, D2) and their mask
        (zeros, all masked, for a prompt without quoted text)."""
        device = pipe._execution_device
        qwen, qwen_mask = pipe._get_mllm_prompt_embeds(
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            prompt=prompts,
            device=device,
            tokenizer_max_length=max_length,
            system_message=pipe.system_message,
            crop_start=pipe.prompt_template_encode_start_idx,
        )
        names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
        encoded = pipe.encode_prompt(
            prompts, device=device, batch_size=len(prompts), prompt_embeds=qwen, prompt_embeds_mask=qwen_mask
        )
        return dict(zip(names, encoded, strict=True))

    def velocity(self, transformer, noisy, timesteps, prompt_embeds):
        """noisy (B, C, T, H, W), the latents alone; as the text-to-video pipeline calls the transformer, the image
        condition channels and their mask are zeros and so are the image (SigLIP) tokens."""
        config = getattr(transformer, "module", transformer).config
        batch, image_tokens = noisy.shape[0], self.text_lengths[2]
        condition = noisy.new_zeros(batch, config.in_channels - noisy.shape[1], *noisy.shape[2:])
        return transformer(
            hidden_states=torch.cat([noisy, condition], dim=1),
            timestep=timesteps.to(noisy.dtype),
            encoder_hidden_states=prompt_embeds["prompt_embeds"].to(noisy.dtype),
            encoder_attention_mask=prompt_embeds["prompt_embeds_mask"],
            encoder_hidden_states_2=prompt_embeds["prompt_embeds_2"].to(noisy.dtype),
            encoder_attention_mask_2=prompt_embeds["prompt_embeds_mask_2"],
            image_embeds=noisy.new_zeros(batch, image_tokens, config.image_embed_dim),
        ).sample

    def sample_shape(self, config, latent_grid):
        """The latents alone (the VAE's channels, the transformer's output); `velocity` appends the condition."""
        return (config["out_channels"], *latent_grid)


@contextmanager
def _guided(pipe: Any, guidance: float) -> Iterator[None]:
    """The pipeline's guider at CFG scale `guidance` inside the block."""
    guider = pipe.guider
    pipe.guider = guider.new(guidance_scale=guidance)
    try:
        yield
    finally:
        pipe.guider = guider


@contextmanager
def _step_callback(pipe: Any, on_step_end: Callable[..., dict]) -> Iterator[None]:
    """Inside the block, each scheduler step reports (pipe, step, timestep, {"latents": new latents})."""
    scheduler = pipe.scheduler
    step, steps = scheduler.step, itertools.count()

    def reporting_step(model_output, timestep, sample, *args, **kwargs):
        output = step(model_output, timestep, sample, *args, **kwargs)
        on_step_end(pipe, next(steps), timestep, {"latents": output[0]})
        return output

    scheduler.step = reporting_step
    try:
        yield
    finally:
        del scheduler.step


HUNYUAN_VIDEO = register(HunyuanVideoFamily())
HUNYUAN_VIDEO_15 = register(HunyuanVideo15Family())
