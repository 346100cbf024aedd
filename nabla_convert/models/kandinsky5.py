"""The Kandinsky 5 family (diffusers Kandinsky5Transformer3DModel with the K5 T2V and I2V pipelines).

The transformer embeds visual tokens channels-last, (B, T, H, W, C), runs its text blocks, then its
visual blocks (self-attention with 3-D RoPE, cross-attention to text, feed-forward) on the flattened
tokens, and unflattens them for its output layer. Hooks put tokens into tile order at the same
places its own NABLA path flattens them into "fractal" order, which is the same order when the grid
is a multiple of the 8x8 tile: `visual_embeddings` (record the grid, emit compact tile order),
`visual_rope_embeddings` (the real grid in, RoPE in tile order out) and `out_layer` (back to raster
order). Padding tokens exist only inside self-attention (the shared processor pads q, k, v and
drops them from its output). Each visual block's self-attention gets a NablaAttnProcessor; text blocks
and cross-attention stay dense. The pipeline's own sparse_params (its STA mask for the built-in
NABLA) are dropped: the layer settings say what each layer does.

A checkpoint whose config says attention_type "nabla" carries its settings (attention_P and the
attention_wT/wH/wW window); they are read as the model's NABLA settings with the bf16 selection
that diffusers' built-in K5 NABLA computes, so the same blocks are chosen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from diffusers import Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel, attention_backend
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

from nabla_convert.attention.parallel import gather_sequence
from nabla_convert.config import NablaConfig
from nabla_convert.models import register
from nabla_convert.models.family import FamilyError, ModelFamily
from nabla_convert.models.nabla import NablaModelMixin, StateHook

__all__ = ["Kandinsky5Family", "NablaKandinsky5Transformer3DModel"]

DEFAULT_AXES_DIMS = (16, 24, 24)
FORWARD_ARGS = ("hidden_states", "encoder_hidden_states", "timestep", "pooled_projections")


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Kandinsky 5's RoPE on (B, S, H, D) with its 2x2 rotation matrices, rounded to bf16 as its processor does."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * pairs).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16).type_as(x)


class _StepHook(StateHook):
    """Counts denoising steps and drops the pipeline's sparse_params (the layer settings replace them)."""

    def pre_forward(self, module, *args, **kwargs):
        named = dict(zip(FORWARD_ARGS, args, strict=False)) | kwargs
        self.state.begin_forward(module, named["timestep"], named["hidden_states"].device)
        if len(args) > 7:
            args = (*args[:7], None, *args[8:])
        if "sparse_params" in kwargs:
            kwargs["sparse_params"] = None
        return args, kwargs


class _VisualEmbeddingHook(StateHook):
    """(B, T, H, W, C) visual tokens -> (B, S, 1, 1, C) in compact tile order; records the grid."""

    def post_forward(self, module, output):
        layout = self.state.set_grid(tuple(output.shape[1:4]))
        return layout.to_tiles(output.flatten(1, 3), padded=self.state.padded_stream)[:, :, None, None]


class _RopeHook(StateHook):
    """The real grid goes in (the model passes the tile-order shape); RoPE comes out in compact tile order."""

    def pre_forward(self, module, shape, *args, **kwargs):
        return ((shape[0], *self.state.layout.token_grid), *args), kwargs

    def post_forward(self, module, output):
        return self.state.layout.to_tiles(output.flatten(1, 3), padded=self.state.padded_stream)[:, :, None, None]


class _OutLayerHook(StateHook):
    """Tokens go back from compact tile order to raster order (B, T, H, W, C) before the output layer.

    Under context parallelism each rank's share of the stream is gathered here first.
    """

    def pre_forward(self, module, visual_embed, *args, **kwargs):
        layout, parallel = self.state.layout, self.state.parallel
        tokens = visual_embed.flatten(1, 3)
        if parallel is not None:
            tokens = gather_sequence(tokens, parallel)
        raster = layout.to_raster(tokens).unflatten(1, layout.token_grid)
        return (raster, *args), kwargs


class NablaKandinsky5Transformer3DModel(NablaModelMixin, Kandinsky5Transformer3DModel):
    """A Kandinsky5Transformer3DModel that applies the NABLA config found in its own config.json on load."""


class Kandinsky5Family(ModelFamily):
    name = "kandinsky5"
    transformer_classes = (Kandinsky5Transformer3DModel,)
    nabla_class = NablaKandinsky5Transformer3DModel
    pipeline_tags: ClassVar[dict[str, str]] = {
        "Kandinsky5T2VPipeline": "text-to-video",
        "Kandinsky5I2VPipeline": "image-to-video",
    }
    block_classes = ("Kandinsky5TransformerEncoderBlock", "Kandinsky5TransformerDecoderBlock")
    lora_targets = ("to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer")
    layers_key = "num_visual_blocks"
    # Kandinsky5Transformer3DModel configs of the public checkpoints (Lite: head dim 64, Pro: 128).
    archs: ClassVar[dict[str, dict[str, Any]]] = {
        "kandinsky5-t2v-lite": dict(
            in_visual_dim=16, out_visual_dim=16, model_dim=1792, ff_dim=7168, time_dim=512,
            num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24), visual_cond=True,
        ),
        "kandinsky5-t2v-pro": dict(
            in_visual_dim=16, out_visual_dim=16, model_dim=4096, ff_dim=16384, time_dim=1024,
            num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48), visual_cond=True,
        ),
    }  # fmt: skip

    def self_attention(self, transformer):
        return [block.self_attention for block in transformer.visual_transformer_blocks]

    def hook_points(self, transformer):
        return {
            "nabla_step": (transformer, _StepHook),
            "nabla_visual": (transformer.visual_embeddings, _VisualEmbeddingHook),
            "nabla_rope": (transformer.visual_rope_embeddings, _RopeHook),
            "nabla_unpatch": (transformer.out_layer, _OutLayerHook),
        }

    def dense_processor(self):
        return Kandinsky5AttnProcessor()

    def context_parallel_plan(self, transformer):
        """Split the visual stream and its RoPE where they are made, after the tile-order hooks.

        diffusers 0.42.1 gives Kandinsky5Transformer3DModel no plan. The model reshapes the blocks'
        output to the shape it read from visual_embeddings (fractal_unflatten), which is then each
        rank's share, so the gather is in the out-layer hook, which puts the whole stream back in raster
        order. Text (and its blocks) stays whole on every rank; text self-attention and cross-attention
        run locally (`local_attention`). No hook sits on a block: compile_repeated_blocks keeps one graph.
        """
        return {
            # (B, S, 1, 1, C) and (B, S, 1, 1, 1, D/2, 2, 2) out of the tile-order hooks
            "visual_embeddings": {0: ContextParallelInput(split_dim=1, expected_dims=5, split_output=True)},
            "visual_rope_embeddings": {0: ContextParallelInput(split_dim=1, expected_dims=8, split_output=True)},
        }

    def attention_qkv(self, attn, hidden_states, rotary_emb):
        shape = hidden_states.shape[:-1]
        query, key, value = (
            layer(hidden_states).reshape(*shape, attn.num_heads, -1)
            for layer in (attn.to_query, attn.to_key, attn.to_value)
        )
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query, key = apply_rotary(query, rotary_emb), apply_rotary(key, rotary_emb)
        return tuple(t.transpose(1, 2) for t in (query, key, value))

    def attention_out(self, attn, out, hidden_states):
        return attn.out_layer(out.transpose(1, 2).flatten(-2, -1).type_as(hidden_states))

    def attention_shape(self, config):
        head_dim = sum(config.get("axes_dims", DEFAULT_AXES_DIMS))
        return config.get("model_dim", 2048) // head_dim, head_dim

    def native_settings(self, config):
        if config.get("attention_type") != "nabla":
            return None
        window = [config.get(f"attention_w{axis}") for axis in "THW"]
        return NablaConfig(
            threshold=config.get("attention_P"),
            sta=None if None in window else window,
            selection_precision="bfloat16",
            provenance={"settings": "the checkpoint's own attention_type nabla config"},
        )

    @contextmanager
    def builtin_nabla(self, transformer, grid, config) -> Iterator[dict[str, Any]]:
        """diffusers' K5 NABLA as its pipeline runs it: the pipeline's sparse_params (STA mask from its
        fast_sta_nabla, P, fractal order) and every attention on the flex backend, as the K5 docs ask."""
        T, H, W = grid
        if H % 8 or W % 8:
            raise FamilyError(f"diffusers' built-in K5 NABLA needs a token grid of whole 8x8 tiles, got {grid}")
        if config.sta is None or not isinstance(config.threshold, float) or config.threshold <= 0.0:
            raise FamilyError("diffusers' built-in K5 NABLA takes one threshold > 0 and always an STA window")
        device = next(transformer.parameters()).device
        sta_mask = Kandinsky5T2VPipeline.fast_sta_nabla(T, H // 8, W // 8, *config.sta, device=device)
        # set_attention_backend also makes flex diffusers' process-wide default, which reset_attention_backend keeps:
        # the attention_backend context puts the default back
        with attention_backend("flex"):
            transformer.set_attention_backend("flex")
            try:
                yield {"sparse_params": {"sta_mask": sta_mask[None, None], "P": config.threshold, "to_fractal": True}}
            finally:
                transformer.reset_attention_backend()

    def load_text_encoder(self, root, device):
        return Kandinsky5T2VPipeline.from_pretrained(root, transformer=None, vae=None).to(device)

    def encode_prompts(self, pipe, prompts, max_length=512):
        """Qwen2.5-VL hidden states (N, L, D) and the pooled CLIP embedding (N, D2), as the pipeline encodes them."""
        embeds, pooled, _ = pipe.encode_prompt(prompts, max_sequence_length=max_length, device=pipe._execution_device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, transformer, noisy, timesteps, prompt_embeds):
        """noisy (B, T, H, W, C) channels-last; the visual condition (I2V) is empty, as in text-to-video sampling."""
        config = getattr(transformer, "module", transformer).config
        hidden = noisy
        if config.visual_cond:
            hidden = torch.cat([noisy, torch.zeros_like(noisy), noisy.new_zeros(*noisy.shape[:-1], 1)], dim=-1)
        frames, height, width = noisy.shape[1:4]
        text = prompt_embeds["prompt_embeds"].to(noisy.dtype)
        return transformer(
            hidden_states=hidden,
            encoder_hidden_states=text,
            timestep=timesteps.to(noisy.dtype),
            pooled_projections=prompt_embeds["pooled_prompt_embeds"].to(noisy.dtype),
            visual_rope_pos=[
                torch.arange(n // p, device=noisy.device)
                for n, p in zip((frames, height, width), config.patch_size, strict=True)
            ],
            text_rope_pos=torch.arange(text.shape[1], device=noisy.device),
            # the pipeline picks the RoPE scale from the pixel size; the method does not use its instance
            scale_factor=Kandinsky5T2VPipeline._get_scale_factor(
                None, *(n * self.vae_stride[1] for n in (height, width))
            ),
        ).sample

    def sample_shape(self, config, latent_grid):
        return (*latent_grid, config["in_visual_dim"])

    def clean_latents(self, pipe, latents):
        """The pipeline denoises (B, T, H, W, C) latents with the visual condition and its mask appended."""
        return latents[..., : pipe.transformer.config.in_visual_dim]

    def random_inputs(self, transformer, grid, batch, device, dtype):
        config = transformer.config
        patch = config.patch_size
        channels = 2 * config.in_visual_dim + 1 if config.visual_cond else config.in_visual_dim
        latent = (batch, *(g * p for g, p in zip(grid, patch, strict=True)), channels)
        return {
            "hidden_states": torch.randn(latent, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                batch, self.text_tokens, config.in_text_dim, device=device, dtype=dtype
            ),
            "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
            "pooled_projections": torch.randn(batch, config.in_text_dim2, device=device, dtype=dtype),
            "visual_rope_pos": [torch.arange(n, device=device) for n in grid],
            "text_rope_pos": torch.arange(self.text_tokens, device=device),
        }


KANDINSKY5 = register(Kandinsky5Family())
