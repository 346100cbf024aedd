"""NABLA for diffusers Wan transformers (Wan2.1 T2V/I2V, Wan2.2 A14B and TI2V).

Tokens are put in tile order once per forward, at model level, through diffusers hooks at the
same points Wan's context-parallel plan uses: `rope` (record the grid, gather cos/sin),
`patch_embedding` (emit tile order), `condition_embedder` (gather per-token timestep embeddings
of TI2V) and `proj_out` (back to raster order). Every self-attention (`attn1`) gets a
NablaAttnProcessor with its own layer settings; cross-attention and the I2V image branch are
untouched. The token stream is in compact tile order (no padding tokens); grids that are not
multiples of the tile get padding tokens only inside self-attention, where they are never attended
to as keys and their query rows are dropped.

Context parallelism (diffusers `enable_parallelism`, Ulysses): apply_nabla gives the transformer
its own `_cp_plan`, which splits the tile-order stream (rope output, the first block's input) and
gathers it after the last block, so `proj_out` sees the whole stream and the tile-order hooks stay
exact. When the token count does not divide by the Ulysses degree, the stream carries the padding
tokens, padded to a multiple of the degree. Per-token timestep embeddings (TI2V) are split in tile
order by the condition hook. See attention/parallel.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import FrozenDict
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput, ParallelConfig
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from nabla_convert.attention import (
    BlockSelection,
    TileLayout,
    block_sparse_attention,
    nabla_selection,
    padded_dense_attention,
)
from nabla_convert.attention.parallel import (
    context_parallel_config,
    sequence_multiple,
    shard_sequence,
    ulysses_attention,
)
from nabla_convert.config import CONFIG_KEY, ConfigError, LayerSettings, NablaConfig

HOOK_NAMES = ("nabla_step", "nabla_rope", "nabla_patch", "nabla_condition", "nabla_unpatch")


@dataclass
class NablaState:
    """Per-transformer state shared by its hooks and processors during one forward."""

    config: NablaConfig
    num_heads: int  # attention heads per layer: every layer's threshold is a (heads,) tensor
    layout: TileLayout | None = None
    step: int = 0
    last_timestep: float | None = None
    force_dense: bool = False
    dense_phase: bool = False
    parallel: ParallelConfig | None = None
    padded_stream: bool = False  # the token stream holds the padding tokens (context parallel, uneven split)

    @torch.compiler.disable
    def begin_forward(self, timestep: torch.Tensor, processors: list[NablaAttnProcessor], device: torch.device) -> None:
        """Once per transformer forward, always eager (also inside torch.compile(transformer)).

        The step count and timestep are Python numbers that change every step: read here, they never
        become guards of a compiled graph. Processors only see `dense_phase` (a bool, so at most a
        dense and a sparse graph) and their own tensors, which are moved to `device` here.
        """
        self.observe_timestep(timestep)
        self.dense_phase = self.step < self.config.dense_steps
        for processor in processors:
            processor.place(device)

    def observe_timestep(self, timestep: torch.Tensor) -> None:
        """Count denoising steps inside a stock pipeline: timesteps fall within a run; a rise starts a new run.

        CFG calls (cond and uncond at the same timestep) count as one step. For two-expert models
        (Wan2.2 A14B) each transformer counts its own steps.
        """
        t = float(timestep.max())
        if self.last_timestep is None or t > self.last_timestep:
            self.step = 0
        elif t < self.last_timestep:
            self.step += 1
        self.last_timestep = t


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on (B, S, H, D) with cos/sin (1, S, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class NablaAttnProcessor:
    """Self-attention of one Wan block with NABLA block-sparse attention on tile-order tokens.

    torch.compile friendly (`compile_repeated_blocks()` shares one graph between all blocks): what
    differs between layers or calls is held in tensors (threshold, density statistics), never in
    Python numbers the graph would guard on.
    """

    def __init__(self, layer: int, settings: LayerSettings, state: NablaState) -> None:
        self.layer = layer
        self.settings = settings
        self.state = state
        self.always_dense = settings.keeps_all
        # one value per head for every layer (a single threshold repeated): one compiled graph serves all layers
        self.threshold = torch.tensor(settings.thresholds(state.num_heads), dtype=torch.float32)
        self.density_stats = torch.zeros(2)  # sum of per-call block densities, number of calls

    def place(self, device: torch.device) -> None:
        if self.threshold.device != device:
            self.threshold = self.threshold.to(device)
            self.density_stats = self.density_stats.to(device)

    def record_density(self, density: torch.Tensor) -> None:
        self.density_stats.add_(torch.stack([density.detach().float(), density.new_ones((), dtype=torch.float32)]))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("NablaAttnProcessor is for self-attention without an attention mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = ulysses_attention(self.attend_stream, q, k, v, self.state.parallel)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2).type_as(query)))

    def attend_stream(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attend` on the whole token stream (B, H, S, D), compact or padded tile order, in the same order."""
        layout = self.layout()
        if q.shape[2] == layout.padded_len:
            return self.attend(q, k, v)
        q, k, v = (layout.pad(t, dim=2) for t in (q, k, v))
        return layout.unpad(self.attend(q, k, v), dim=2)

    def layout(self) -> TileLayout:
        if self.state.layout is None:
            raise RuntimeError("NABLA processor called outside a NABLA transformer forward (no token layout)")
        return self.state.layout

    def is_dense_now(self) -> bool:
        return self.always_dense or self.state.force_dense or self.state.dense_phase

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, S, D) in padded tile order -> attention output in padded tile order."""
        layout, config = self.layout(), self.state.config
        if self.is_dense_now():
            self.record_density(q.new_ones((), dtype=torch.float32))
            return padded_dense_attention(q, k, v, layout.indices(q.device).valid if layout.is_padded else None)
        selection = self.select(q, k, layout)
        self.record_density(selection.density(layout.real_blocks(config.q_block), layout.real_blocks(config.kv_block)))
        return block_sparse_attention(q, k, v, selection, backend=config.backend)

    def head_thresholds(self, heads: int) -> torch.Tensor:
        """The thresholds of the heads this call sees: all, or under Ulysses this rank's chunk of them.

        diffusers' all-to-all gives rank r the heads [r * ceil(H / degree), ...) (the last chunk shorter when the
        head count does not divide).
        """
        if heads == self.state.num_heads:
            return self.threshold
        cp = self.state.parallel.context_parallel_config
        start = cp._ulysses_local_rank * -(-self.state.num_heads // cp.ulysses_degree)
        return self.threshold.narrow(0, start, heads)

    def select(self, q: torch.Tensor, k: torch.Tensor, layout: TileLayout) -> BlockSelection:
        """This layer's block selection for q, k in tile order (sort-free; fused kernels on CUDA)."""
        config = self.state.config
        return nabla_selection(
            q,
            k,
            threshold=self.head_thresholds(q.shape[1]),
            grid=layout,
            sta=self.settings.sta,
            q_block=config.q_block,
            kv_block=config.kv_block,
        )


class _StepHook(ModelHook):
    def __init__(self, state: NablaState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.state.begin_forward(timestep, nabla_processors(module), hidden_states.device)
        self.state.parallel = context_parallel_config(module)
        return args, kwargs


class _RopeHook(ModelHook):
    """Records the token grid of this forward and returns cos/sin in compact tile order."""

    def __init__(self, state: NablaState) -> None:
        super().__init__()
        self.state = state

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
        config, state = self.state.config, self.state
        ranks = sequence_multiple(state.parallel)
        state.padded_stream = math.prod(grid) % ranks != 0
        state.layout = TileLayout.for_blocks(
            grid, config.tile, config.q_block, config.kv_block, ranks if state.padded_stream else 1
        )
        return (hidden_states, *args), kwargs

    def post_forward(self, module, output):
        cos, sin = output
        layout, padded = self.state.layout, self.state.padded_stream
        return layout.to_tiles(cos, padded=padded), layout.to_tiles(sin, padded=padded)


class _PatchHook(ModelHook):
    """patch_embedding's (B, C, F, H, W) output -> (B, C, S, 1, 1) in compact tile order.

    The model then flattens and transposes it to (B, S, C) as it would the raster grid. Compact:
    padding tokens exist only inside self-attention (the processor pads q, k, v and drops them from
    its output), so projections, cross-attention and FFN never compute them (6.7% of the tokens at
    1280x720).
    """

    def __init__(self, state: NablaState) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        tokens = self.state.layout.to_tiles(output.flatten(2), dim=2, padded=self.state.padded_stream)
        return tokens[..., None, None]


class _ConditionHook(ModelHook):
    """Per-token timestep embeddings (Wan2.2 TI2V) follow the tokens into tile order.

    Under context parallelism the blocks' per-token modulation (`timestep_proj`) is split like the
    tokens; `temb` stays whole for the output norm, which runs after the gather.
    """

    def __init__(self, state: NablaState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.per_token = kwargs.get("timestep_seq_len") is not None
        return args, kwargs

    def post_forward(self, module, output):
        if not self.per_token:
            return output
        temb, timestep_proj, *rest = output
        layout, padded, parallel = self.state.layout, self.state.padded_stream, self.state.parallel
        timestep_proj = layout.to_tiles(timestep_proj, padded=padded)
        if parallel is not None:
            timestep_proj = shard_sequence(timestep_proj, parallel)
        return (layout.to_tiles(temb, padded=padded), timestep_proj, *rest)


class _UnpatchHook(ModelHook):
    """proj_out's output goes back from compact tile order to raster order before the model unpatchifies."""

    def __init__(self, state: NablaState) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module, output):
        return self.state.layout.to_raster(output)


def _hook_points(transformer: WanTransformer3DModel) -> dict[str, tuple[torch.nn.Module, type[ModelHook]]]:
    return {
        "nabla_step": (transformer, _StepHook),
        "nabla_rope": (transformer.rope, _RopeHook),
        "nabla_patch": (transformer.patch_embedding, _PatchHook),
        "nabla_condition": (transformer.condition_embedder, _ConditionHook),
        "nabla_unpatch": (transformer.proj_out, _UnpatchHook),
    }


def context_parallel_plan(transformer: WanTransformer3DModel) -> dict[str, Any]:
    """Wan's `_cp_plan` for NABLA: the same split points, but the gather moves from proj_out to the last block.

    rope's cos/sin are split after the rope hook put them in tile order (apply_nabla runs before
    enable_parallelism, so the split hook wraps ours); the first block's input is tile order
    already. Gathering the last block's output instead of proj_out's lets proj_out's hook see the
    whole sequence to put it back in raster order. The timestep is not split at the model input
    (raster order there): the condition hook splits per-token embeddings in tile order.
    """
    rope_split = ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)
    return {
        "rope": {0: rope_split, 1: rope_split},
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        f"blocks.{len(transformer.blocks) - 1}": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _check_not_parallel(transformer: WanTransformer3DModel, action: str) -> None:
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ConfigError(
            f"cannot {action} a transformer that already runs in parallel: apply NABLA first, then call "
            "enable_parallelism (or from_pretrained(..., parallel_config=...) of a converted checkpoint)"
        )


def apply_nabla(transformer: WanTransformer3DModel, config: NablaConfig) -> WanTransformer3DModel:
    """Rewrite a Wan transformer in place to NABLA attention with `config`; returns it.

    Applying again replaces the previous settings. The config is recorded in the model's config
    (key `_nabla`), so save_pretrained writes a self-describing checkpoint.
    """
    if not isinstance(transformer, WanTransformer3DModel):
        raise ConfigError(f"apply_nabla expects a WanTransformer3DModel, got {type(transformer).__name__}")
    if not isinstance(config, NablaConfig):
        raise ConfigError(f"apply_nabla expects a NablaConfig, got {type(config).__name__}")
    config.check_num_layers(len(transformer.blocks))
    config.check_num_heads(transformer.config.num_attention_heads)
    _check_not_parallel(transformer, "apply NABLA to")
    remove_nabla(transformer)
    state = NablaState(config, transformer.config.num_attention_heads)
    for name, (module, hook_cls) in _hook_points(transformer).items():
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook_cls(state), name)
    for index, block in enumerate(transformer.blocks):
        block.attn1.set_processor(NablaAttnProcessor(index, config.layer(index), state))
    transformer._nabla_state = state
    transformer._cp_plan = context_parallel_plan(transformer)
    transformer.register_to_config(**{CONFIG_KEY: config.to_dict()})
    return transformer


def remove_nabla(transformer: WanTransformer3DModel) -> WanTransformer3DModel:
    """Undo apply_nabla: dense processors, no reordering hooks."""
    if getattr(transformer, "_nabla_state", None) is None:
        return transformer
    _check_not_parallel(transformer, "remove NABLA from")
    for name, (module, _) in _hook_points(transformer).items():
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
    for block in transformer.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    transformer._nabla_state = None
    del transformer._cp_plan  # back to the class's plan
    transformer._internal_dict = FrozenDict({k: v for k, v in transformer._internal_dict.items() if k != CONFIG_KEY})
    return transformer


def nabla_state(transformer: torch.nn.Module) -> NablaState:
    state = getattr(transformer, "_nabla_state", None)
    if state is None:
        raise ValueError(f"{type(transformer).__name__} has no NABLA attention; run apply_nabla first")
    return state


class NablaWanTransformer3DModel(WanTransformer3DModel):
    """A WanTransformer3DModel that applies the NABLA config found in its own config.json on load.

    Stock `WanPipeline.from_pretrained` builds it when model_index.json names it; stock
    `WanTransformer3DModel.from_pretrained` of the same folder still loads the dense model.
    """

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        result = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        model = result[0] if return_unused_kwargs else result
        settings = model.config.get(CONFIG_KEY)
        if settings is not None:
            apply_nabla(model, NablaConfig.from_dict(dict(settings)))
        return result


def nabla_processors(transformer: torch.nn.Module) -> list[NablaAttnProcessor]:
    """The NABLA processors the self-attention layers hold now (also subclasses swapped in by bench or calibrate)."""
    processors = (block.attn1.processor for block in transformer.blocks)
    return [processor for processor in processors if isinstance(processor, NablaAttnProcessor)]


def layer_densities(transformer: torch.nn.Module) -> dict[int, float]:
    """Mean block density of each self-attention layer since the last reset (1.0 for dense calls)."""
    nabla_state(transformer)
    densities = {}
    for processor in nabla_processors(transformer):
        total, calls = processor.density_stats.tolist()
        if calls:
            densities[processor.layer] = total / calls
    return dict(sorted(densities.items()))


def reset_densities(transformer: torch.nn.Module) -> None:
    nabla_state(transformer)
    for processor in nabla_processors(transformer):
        processor.density_stats.zero_()


@contextmanager
def nabla_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """Run a NABLA transformer with dense attention inside the block (e.g. as its own dense teacher)."""
    state = nabla_state(transformer)
    previous, state.force_dense = state.force_dense, True
    try:
        yield
    finally:
        state.force_dense = previous
