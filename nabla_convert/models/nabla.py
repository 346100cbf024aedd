"""The family-independent half of a NABLA transformer: per-forward state, the attention processor, apply/remove.

`apply_nabla` looks the transformer's family up in the registry; the family says which modules are
self-attention, how q, k, v come out of them, and where diffusers hooks put tokens into tile order
(and back). Everything else (layer settings, dense steps, selection, block-sparse attention,
density bookkeeping) is the same for every family and lives here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import FrozenDict
from diffusers.hooks import HookRegistry, ModelHook

from nabla_convert.attention import (
    BlockSelection,
    TileLayout,
    block_sparse_attention,
    nabla_selection,
    padded_dense_attention,
    sta_selection,
)
from nabla_convert.attention.flex import joint_validity
from nabla_convert.attention.parallel import (
    context_parallel_config,
    gather_heads,
    gather_sequence,
    local_heads,
    sequence_multiple,
    ulysses_attention,
)
from nabla_convert.config import CONFIG_KEY, ConfigError, LayerSettings, NablaConfig

if TYPE_CHECKING:
    from diffusers.models._modeling_parallel import ParallelConfig

    from nabla_convert.models.family import ModelFamily


@dataclass
class NablaState:
    """Per-transformer state shared by its hooks and processors during one forward."""

    config: NablaConfig
    family: ModelFamily
    num_heads: int  # attention heads per layer: every layer's threshold is a (heads,) tensor
    layout: TileLayout | None = None
    step: int = 0
    last_timestep: float | None = None
    force_dense: bool = False
    dense_phase: bool = False
    parallel: ParallelConfig | None = None
    padded_stream: bool = False  # the token stream holds the padding tokens (context parallel, uneven split)
    local_attention: list[torch.nn.Module] = field(default_factory=list)  # the family's local_attention

    @torch.compiler.disable
    def begin_forward(self, transformer: torch.nn.Module, timestep: torch.Tensor, device: torch.device) -> None:
        """Once per transformer forward, always eager (also inside torch.compile(transformer)).

        The step count and timestep are Python numbers that change every step: read here, they never
        become guards of a compiled graph. Processors only see `dense_phase` (a bool, so at most a
        dense and a sparse graph) and their own tensors, which are moved to `device` here. The
        transformer's context-parallel config (diffusers `enable_parallelism`) is read here too, and
        cleared from the family's local attention modules (enable_parallelism gave it to every processor).
        """
        self.observe_timestep(timestep)
        self.dense_phase = self.step < self.config.dense_steps
        self.parallel = context_parallel_config(transformer)
        if self.parallel is not None:
            for attn in self.local_attention:
                if getattr(attn.processor, "_parallel_config", None) is not None:
                    attn.processor._parallel_config = None
        for processor in nabla_processors(transformer):
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

    def set_grid(self, grid: tuple[int, int, int]) -> TileLayout:
        """Record the token grid (frames, height, width) of this forward; returns its tile layout.

        The token stream is compact (no padding tokens) unless context parallelism splits it across
        ranks and its length does not divide by the Ulysses degree: then it carries the padding
        tokens, padded to a multiple of the degree (`padded_stream`).
        """
        config = self.config
        ranks = sequence_multiple(self.parallel)
        self.padded_stream = math.prod(grid) % ranks != 0
        self.layout = TileLayout.for_blocks(
            grid, config.tile, config.q_block, config.kv_block, ranks if self.padded_stream else 1
        )
        return self.layout


class NablaAttnProcessor:
    """Self-attention of one layer with NABLA block-sparse attention on tile-order tokens.

    The family turns the attention module's input into q, k, v (B, H, S, D) post-RoPE and the
    attention output back into the module's output; the processor decides dense or sparse. The
    token stream is in compact tile order: padding tokens (grids that are not multiples of the
    tile) exist only here, between the padding of q, k, v and the unpadding of the output. Under
    context parallelism (Ulysses) attention runs inside diffusers' all-to-all (`ulysses_attention`)
    on the whole stream of this rank's heads.

    torch.compile friendly (`compile_repeated_blocks()` shares one graph between all blocks): what
    differs between layers or calls is held in tensors (threshold, density statistics), never in
    Python numbers the graph would guard on; dense and STA-only layers are static flags.
    """

    def __init__(self, layer: int, settings: LayerSettings, state: NablaState) -> None:
        self.layer = layer
        self.settings = settings
        self.state = state
        self.always_dense = settings.keeps_all
        self.sta_only = settings.sta_only
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
        rotary_emb: Any = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Self-attention of the video tokens, or joint attention of video and text tokens (`encoder_hidden_states`
        given: MM-DiT blocks such as HunyuanVideo's, the text padding in `attention_mask`)."""
        family = self.state.family
        rotary_emb = rotary_emb if rotary_emb is not None else image_rotary_emb
        if encoder_hidden_states is not None:
            video, text = family.joint_attention_qkv(attn, hidden_states, encoder_hidden_states, rotary_emb)
            text_valid = family.text_validity(attention_mask, encoder_hidden_states.shape[1])
            video_out, text_out = self.attend_joint(video, text, text_valid)
            return family.joint_attention_out(attn, video_out, text_out, hidden_states)
        if attention_mask is not None:
            raise ValueError("NablaAttnProcessor takes an attention mask only for the text of joint attention")
        q, k, v = family.attention_qkv(attn, hidden_states, rotary_emb)
        out = ulysses_attention(self.attend_stream, q, k, v, self.state.parallel)
        return family.attention_out(attn, out, hidden_states)

    def attend_stream(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attend` on the whole token stream (B, H, S, D), compact or padded tile order, in the same order."""
        return self.like_stream(self.attend(*(self.padded(t) for t in (q, k, v))), q)

    def attend_joint(
        self, video: tuple[torch.Tensor, ...], text: tuple[torch.Tensor, ...], text_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of video q, k, v (B, H, S, D) in tile order and text q, k, v (B, H, L, D) with the text
        padding mask text_valid (B, L): one sequence [padded video; text padded to whole blocks] where NABLA selects
        the video->video blocks and the rest stays dense. Returns the video and the text outputs.

        Under context parallelism (Ulysses) the video is this rank's share of the stream and the text is whole on
        every rank: diffusers' all-to-all gives the joint attention the whole stream of this rank's heads, the text of
        the same heads is appended, and the text output of every head comes back by an all-gather over heads.
        """
        layout, config, parallel = self.layout(), self.state.config, self.state.parallel
        length = text_valid.shape[1]
        pad = -length % math.lcm(config.q_block, config.kv_block)
        text_out = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            heads, n = q.shape[1], layout.padded_len
            q_joint, k_joint, v_joint = (
                torch.cat([self.padded(x), F.pad(local_heads(t, parallel, heads), (0, 0, 0, pad))], dim=2)
                for x, t in zip((q, k, v), text, strict=True)
            )
            out = self.attend(q_joint, k_joint, v_joint, text_valid=text_valid)
            text_out.append(out[:, :, n : n + length])
            return self.like_stream(out[:, :, :n], q)

        video_out = ulysses_attention(attend, *video, parallel)
        return video_out, gather_heads(text_out[0], parallel, self.state.num_heads)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The token stream x (B, H, S, D) in padded tile order (as it is when the stream carries the padding)."""
        layout = self.layout()
        return x if x.shape[2] == layout.padded_len else layout.pad(x, dim=2)

    def like_stream(self, out: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """The attention output in padded tile order -> the order of the token stream it came from."""
        return out if stream.shape[2] == out.shape[2] else self.layout().unpad(out, dim=2)

    def layout(self) -> TileLayout:
        if self.state.layout is None:
            raise RuntimeError("NABLA processor called outside a NABLA transformer forward (no token layout)")
        return self.state.layout

    def is_dense_now(self) -> bool:
        return self.always_dense or self.state.force_dense or self.state.dense_phase

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q, k, v (B, H, S, D) in padded tile order -> attention output in padded tile order.

        With `text_valid` (B, L) the tokens past the video are text (joint attention), padded to whole blocks
        (those past L are padding): they attend and are attended to densely, text padding keys never; NABLA
        selects among the video blocks only.
        """
        layout, config = self.layout(), self.state.config
        if self.is_dense_now():
            self.record_density(q.new_ones((), dtype=torch.float32))
            return self.attend_dense(q, k, v, text_valid)
        n = layout.padded_len
        selection = self.select(q[:, :, :n], k[:, :, :n], layout)
        self.record_density(selection.density(layout.real_blocks(config.q_block), layout.real_blocks(config.kv_block)))
        if text_valid is not None:
            selection = selection.with_dense_suffix(text_valid, q.shape[2] - n)
        return block_sparse_attention(q, k, v, selection, backend=config.backend)

    def attend_dense(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense attention over the same padded tile-order sequence as `attend`: padding keys (video and text) never
        attended to."""
        layout = self.layout()
        video_valid = layout.indices(q.device).valid if layout.is_padded else None
        valid = joint_validity(video_valid, layout.padded_len, text_valid, q.shape[2] - layout.padded_len)
        return padded_dense_attention(q, k, v, valid)

    def head_thresholds(self, heads: int) -> torch.Tensor:
        """The thresholds of the heads this call sees: all, or under Ulysses this rank's chunk (`local_heads`)."""
        return local_heads(self.threshold, self.state.parallel, heads, dim=0)

    def select(self, q: torch.Tensor, k: torch.Tensor, layout: TileLayout) -> BlockSelection:
        """This layer's block selection for q, k in padded tile order (sort-free; fused kernels on CUDA)."""
        config = self.state.config
        if self.sta_only:
            return sta_selection(
                q, k, grid=layout, sta=self.settings.sta, q_block=config.q_block, kv_block=config.kv_block
            )
        return nabla_selection(
            q,
            k,
            threshold=self.head_thresholds(q.shape[1]),
            grid=layout,
            sta=self.settings.sta,
            q_block=config.q_block,
            kv_block=config.kv_block,
            precision=config.selection_precision,
        )


class StateHook(ModelHook):
    """A diffusers hook that shares the transformer's NablaState (the base of every family's hooks)."""

    def __init__(self, state: NablaState) -> None:
        super().__init__()
        self.state = state


class StepHook(StateHook):
    """Begins each transformer forward (step count, dense phase, device) on a model whose forward takes
    hidden_states and timestep first (Wan, HunyuanVideo)."""

    def pre_forward(self, module, *args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.state.begin_forward(module, timestep, hidden_states.device)
        return args, kwargs


class RasterOutputHook(StateHook):
    """A module's (B, S, C) output goes back from compact tile order to raster order (the model then unpatchifies).

    Under context parallelism each rank's share is gathered here first (put it on the narrowest tensor per token,
    e.g. proj_out's output: patch volume x output channels).
    """

    def post_forward(self, module, output):
        if self.state.parallel is not None:
            output = gather_sequence(output, self.state.parallel)
        return self.state.layout.to_raster(output)


def apply_nabla(transformer: torch.nn.Module, config: NablaConfig | None = None) -> torch.nn.Module:
    """Rewrite a transformer of a registered family in place to NABLA attention with `config`; returns it.

    Without a config, the model's own NABLA settings are used (Kandinsky 5's attention_type "nabla").
    Applying again replaces the previous settings. The config is recorded in the model's config
    (key `_nabla`), so save_pretrained writes a self-describing checkpoint.
    """
    from nabla_convert.models import family_of

    family = family_of(transformer)
    if config is None:
        config = family.native_settings(transformer.config)
        if config is None:
            raise ConfigError(f"{type(transformer).__name__} has no NABLA settings of its own; give a NablaConfig")
    if not isinstance(config, NablaConfig):
        raise ConfigError(f"apply_nabla expects a NablaConfig, got {type(config).__name__}")
    attention = family.self_attention(transformer)
    config.check_num_layers(len(attention))
    config.check_num_heads(family.num_heads(transformer))
    _check_not_parallel(transformer, "apply NABLA to")
    remove_nabla(transformer)
    state = NablaState(
        config, family, family.num_heads(transformer), local_attention=family.local_attention(transformer)
    )
    for name, (module, hook_cls) in family.hook_points(transformer).items():
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook_cls(state), name)
    for index, attn in enumerate(attention):
        attn.set_processor(NablaAttnProcessor(index, config.layer(index), state))
    transformer._nabla_state = state
    plan = family.context_parallel_plan(transformer)
    if plan is not None:
        transformer._cp_plan = plan
    transformer.register_to_config(**{CONFIG_KEY: config.to_dict()})
    return transformer


def remove_nabla(transformer: torch.nn.Module) -> torch.nn.Module:
    """Undo apply_nabla: dense processors, no reordering hooks."""
    state = getattr(transformer, "_nabla_state", None)
    if state is None:
        return transformer
    _check_not_parallel(transformer, "remove NABLA from")
    for name, (module, _) in state.family.hook_points(transformer).items():
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
    for attn in state.family.self_attention(transformer):
        attn.set_processor(state.family.dense_processor())
    transformer._nabla_state = None
    if "_cp_plan" in vars(transformer):
        del transformer._cp_plan  # back to the class's plan
    transformer._internal_dict = FrozenDict({k: v for k, v in transformer._internal_dict.items() if k != CONFIG_KEY})
    return transformer


def _check_not_parallel(transformer: torch.nn.Module, action: str) -> None:
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ConfigError(
            f"cannot {action} a transformer that already runs in parallel: apply NABLA first, then call "
            "enable_parallelism (or from_pretrained(..., parallel_config=...) of a converted checkpoint)"
        )


def set_processors(transformer: torch.nn.Module, make: Any) -> list[Any]:
    """Give self-attention layer i the processor make(i, current processor); returns the previous processors."""
    attention = nabla_state(transformer).family.self_attention(transformer)
    previous = [attn.processor for attn in attention]
    for index, attn in enumerate(attention):
        attn.set_processor(make(index, previous[index]))
    return previous


def nabla_state(transformer: torch.nn.Module) -> NablaState:
    state = getattr(transformer, "_nabla_state", None)
    if state is None:
        raise ValueError(f"{type(transformer).__name__} has no NABLA attention; run apply_nabla first")
    return state


class NablaModelMixin:
    """Mixin of a family's NABLA class: applies the NABLA config found in its own config.json on load.

    Stock `Pipeline.from_pretrained` builds the NABLA class when model_index.json names it; the
    stock dense class loading the same folder still gets the dense model.
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
    processors = (attn.processor for attn in nabla_state(transformer).family.self_attention(transformer))
    return [processor for processor in processors if isinstance(processor, NablaAttnProcessor)]


def layer_densities(transformer: torch.nn.Module) -> dict[int, float]:
    """Mean block density of each self-attention layer since the last reset (1.0 for dense calls)."""
    densities = {}
    for processor in nabla_processors(transformer):
        total, calls = processor.density_stats.tolist()
        if calls:
            densities[processor.layer] = total / calls
    return dict(sorted(densities.items()))


def reset_densities(transformer: torch.nn.Module) -> None:
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
