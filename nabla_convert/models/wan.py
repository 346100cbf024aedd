"""The Wan family (diffusers WanTransformer3DModel: Wan2.1 T2V/I2V, Wan2.2 A14B and TI2V).

Tokens are put in tile order once per forward, at model level, through diffusers hooks at the
same points Wan's context-parallel plan uses: `rope` (record the grid, gather cos/sin),
`patch_embedding` (emit tile order), `condition_embedder` (gather per-token timestep embeddings
of TI2V) and `proj_out` (back to raster order). Every self-attention (`attn1`) gets a
NablaAttnProcessor with its own layer settings; cross-attention and the I2V image branch are
untouched. The token stream is in compact tile order (no padding tokens); grids that are not
multiples of the tile get padding tokens only inside self-attention (the shared processor pads
q, k, v), where they are never attended to as keys and their query rows are dropped.

Context parallelism (diffusers `enable_parallelism`, Ulysses): apply_nabla gives the transformer
its own `_cp_plan`, which splits the tile-order stream where the hooks emit it (rope and
patch_embedding outputs); the `proj_out` hook gathers it before putting it back in raster order, so
the tile-order hooks stay exact. When the token count does not divide by the Ulysses degree, the stream carries the padding
tokens, padded to a multiple of the degree. Per-token timestep embeddings (TI2V) are split in tile
order by the condition hook. See attention/parallel.py.

Checkpoints in the official Wan layout (sharded diffusion_pytorch_model*.safetensors of WanModel,
as the published NABLA fine-tunes ship) are imported through diffusers' own single-file key
converter (`import_native`).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from nabla_convert.attention.parallel import shard_sequence
from nabla_convert.io import atomic_write_text, read_json, rename_safetensors, safetensors_header
from nabla_convert.models import register
from nabla_convert.models.family import FamilyError, ModelFamily
from nabla_convert.models.nabla import NablaAttnProcessor, NablaModelMixin, RasterOutputHook, StateHook, StepHook

__all__ = ["NablaAttnProcessor", "NablaWanTransformer3DModel", "WanFamily"]

WEIGHTS_PATTERN = "diffusion_pytorch_model*.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# official WanModel config key -> diffusers WanTransformer3DModel config key, checked against --base
NATIVE_ARCHITECTURE = {
    "num_layers": "num_layers",
    "num_heads": "num_attention_heads",
    "ffn_dim": "ffn_dim",
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "freq_dim": "freq_dim",
}


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on (B, S, H, D) with cos/sin (1, S, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class _RopeHook(StateHook):
    """Records the token grid of this forward and returns cos/sin in compact tile order."""

    def pre_forward(self, module, hidden_states, *args, **kwargs):
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = module.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        if max(grid) > module.max_seq_len:
            raise ValueError(
                f"latent token grid {grid} exceeds the model's rope_max_seq_len {module.max_seq_len}; "
                "use a smaller resolution or frame count"
            )
        if min(grid) < 1:
            raise ValueError(
                f"latent of shape {tuple(hidden_states.shape)} is smaller than one patch {module.patch_size}"
            )
        self.state.set_grid(grid)
        return (hidden_states, *args), kwargs

    def post_forward(self, module, output):
        cos, sin = output
        layout, padded = self.state.layout, self.state.padded_stream
        return layout.to_tiles(cos, padded=padded), layout.to_tiles(sin, padded=padded)


class _PatchHook(StateHook):
    """patch_embedding's (B, C, F, H, W) output -> (B, C, S, 1, 1) in compact tile order.

    The model then flattens and transposes it to (B, S, C) as it would the raster grid. Compact:
    padding tokens exist only inside self-attention, so projections, cross-attention and FFN never
    compute them (6.7% of the tokens at 1280x720).
    """

    def post_forward(self, module, output):
        tokens = self.state.layout.to_tiles(output.flatten(2), dim=2, padded=self.state.padded_stream)
        return tokens[..., None, None]


class _ConditionHook(StateHook):
    """Per-token timestep embeddings (Wan2.2 TI2V) follow the tokens into tile order.

    Under context parallelism both are split like the tokens: the blocks' modulation
    (`timestep_proj`) and the output norm's (`temb`), which runs before the gather.
    """

    def pre_forward(self, module, *args, **kwargs):
        self.per_token = kwargs.get("timestep_seq_len") is not None
        return args, kwargs

    def post_forward(self, module, output):
        if not self.per_token:
            return output
        temb, timestep_proj, *rest = output
        layout, padded, parallel = self.state.layout, self.state.padded_stream, self.state.parallel
        temb, timestep_proj = (layout.to_tiles(t, padded=padded) for t in (temb, timestep_proj))
        if parallel is not None:
            temb, timestep_proj = (shard_sequence(t, parallel) for t in (temb, timestep_proj))
        return (temb, timestep_proj, *rest)


class NablaWanTransformer3DModel(NablaModelMixin, WanTransformer3DModel):
    """A WanTransformer3DModel that applies the NABLA config found in its own config.json on load.

    Stock `WanPipeline.from_pretrained` builds it when model_index.json names it; stock
    `WanTransformer3DModel.from_pretrained` of the same folder still loads the dense model.
    """


class WanFamily(ModelFamily):
    name = "wan"
    transformer_classes = (WanTransformer3DModel,)
    nabla_class = NablaWanTransformer3DModel
    pipeline_tags: ClassVar[dict[str, str]] = {
        "WanPipeline": "text-to-video",
        "WanImageToVideoPipeline": "image-to-video",
        "WanVideoToVideoPipeline": "video-to-video",
    }
    block_classes = ("WanTransformerBlock",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # WanTransformer3DModel configs of the public Wan2.1 T2V checkpoints (their transformer/config.json).
    archs: ClassVar[dict[str, dict[str, Any]]] = {
        "wan2.1-t2v-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        "wan2.1-t2v-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    }

    def self_attention(self, transformer):
        return [block.attn1 for block in transformer.blocks]

    def hook_points(self, transformer):
        return {
            "nabla_step": (transformer, StepHook),
            "nabla_rope": (transformer.rope, _RopeHook),
            "nabla_patch": (transformer.patch_embedding, _PatchHook),
            "nabla_condition": (transformer.condition_embedder, _ConditionHook),
            "nabla_unpatch": (transformer.proj_out, RasterOutputHook),
        }

    def dense_processor(self):
        return WanAttnProcessor()

    def context_parallel_plan(self, transformer):
        """Wan's `_cp_plan` for NABLA: split where the tile-order hooks emit the stream; proj_out's hook gathers.

        rope's cos/sin and patch_embedding's tokens are split after our hooks put them in tile order
        (apply_nabla runs before enable_parallelism, so diffusers' split hooks wrap ours). No hook sits
        on a block, so compile_repeated_blocks keeps one graph. The timestep is not split at the model
        input (raster order there): the condition hook splits per-token embeddings in tile order.
        """
        rope_split = ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)
        return {
            "rope": {0: rope_split, 1: rope_split},
            # (B, C, S, 1, 1) out of the patch hook
            "patch_embedding": {0: ContextParallelInput(split_dim=2, expected_dims=5, split_output=True)},
        }

    def attention_qkv(self, attn, hidden_states, rotary_emb):
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        return tuple(t.transpose(1, 2) for t in (query, key, value))

    def attention_out(self, attn, out, hidden_states):
        out = out.transpose(1, 2).flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))

    def attention_shape(self, config):
        return config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)

    def random_inputs(self, transformer, grid, batch, device, dtype):
        patch = transformer.config.patch_size
        latent = (batch, transformer.config.in_channels, *(g * p for g, p in zip(grid, patch, strict=True)))
        return {
            "hidden_states": torch.randn(latent, device=device, dtype=dtype),
            "timestep": torch.full((batch,), 500, device=device),
            "encoder_hidden_states": torch.randn(
                batch, self.text_tokens, transformer.config.text_dim, device=device, dtype=dtype
            ),
        }

    def denoiser_for(self, pipe, timestep):
        """Wan2.2 A14B switches from `transformer` to `transformer_2` below boundary_ratio."""
        boundary_ratio = pipe.config.get("boundary_ratio")
        transformer_2 = getattr(pipe, "transformer_2", None)
        if boundary_ratio is None or transformer_2 is None:
            return pipe.transformer
        boundary = boundary_ratio * pipe.scheduler.config.num_train_timesteps
        return pipe.transformer if timestep >= boundary else transformer_2

    def bare_pipeline(self, transformer):
        """A WanPipeline with Wan2.1's UniPC flow scheduler (shift 3)."""
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)

    def load_text_encoder(self, root, device):
        return WanPipeline.from_pretrained(root, transformer=None, transformer_2=None, vae=None).to(device)

    def encode_prompts(self, pipe, prompts, max_length=512):
        embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=max_length, device=pipe._execution_device
        )
        return embeds

    def is_native(self, root):
        config = root / "config.json"
        return (
            config.is_file()
            and read_json(config, "model file", dict).get("_class_name") == "WanModel"
            and any(root.glob(WEIGHTS_PATTERN))
        )

    def import_native(self, root, base, out):
        """Official WanModel shards -> diffusers shards, keys renamed by diffusers' own single-file converter.

        Tensors are never loaded: each shard is copied with a renamed header (`rename_safetensors`), so a
        14B checkpoint streams through in bounded memory and stays bit-exact. Every renamed tensor must
        exist in the --base transformer with the same shape, and every base tensor must be supplied.
        """
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        native = read_json(root / "config.json", "model file", dict)
        dense = read_json(base / "config.json", "model file", dict)
        architecture = {key: dense.get(key) for key in NATIVE_ARCHITECTURE.values()}
        architecture["dim"] = dense.get("num_attention_heads", 0) * dense.get("attention_head_dim", 0)
        for native_key, key in {**NATIVE_ARCHITECTURE, "dim": "dim"}.items():
            if native_key in native and native[native_key] != architecture[key]:
                raise FamilyError(
                    f"{root}: {native_key} {native[native_key]} differs from the base's {key} {architecture[key]}"
                )
        expected = {}
        for shard in sorted(base.glob(WEIGHTS_PATTERN)):
            header, _ = safetensors_header(shard)
            expected.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
        weight_map, plans = {}, []
        for shard in sorted(root.glob(WEIGHTS_PATTERN)):
            header, _ = safetensors_header(shard)
            keys = [key for key in header if key != "__metadata__"]
            # the converter renames a dict's keys; with each key as its own value it returns new name -> old name
            names = {old: new for new, old in convert_wan_transformer_to_diffusers({k: k for k in keys}).items()}
            if len(names) != len(keys) or set(names) != set(keys):
                raise FamilyError(f"{shard.name}: its tensors need more than renaming (Wan-Animate?); not supported")
            for old, new in names.items():
                if new not in expected:
                    raise FamilyError(f"{shard.name}: tensor {old} ({new}) is not in the base transformer")
                if header[old]["shape"] != expected[new]:
                    raise FamilyError(f"{shard.name}: {old} has shape {header[old]['shape']}, the base {expected[new]}")
                weight_map[new] = shard.name
            plans.append((shard, names))
        missing = sorted(set(expected) - set(weight_map))
        if missing:
            raise FamilyError(f"{root} lacks {len(missing)} tensors of the base transformer, e.g. {missing[0]}")
        for stale in [*out.glob(WEIGHTS_PATTERN), out / WEIGHTS_INDEX]:
            stale.unlink(missing_ok=True)
        for shard, names in plans:
            rename_safetensors(shard, out / shard.name, names)
        if len(plans) > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(out / WEIGHTS_INDEX, json.dumps(index, indent=2) + "\n")

    def velocity(self, transformer, noisy, timesteps, prompt_embeds):
        return transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=prompt_embeds.to(noisy.dtype),
            return_dict=False,
        )[0]


WAN = register(WanFamily())
