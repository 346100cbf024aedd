"""NABLA under diffusers' context parallelism (Ulysses): N gloo processes against one process, on CPU.

Each worker builds the same tiny transformer of a family (same seed), runs it in one process, then
enables diffusers' context parallelism and runs it again: the output gathered from N ranks must
equal the one-process output. diffusers' own split/gather hooks and Ulysses all-to-all run over gloo.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from conftest import generate
from test_hunyuan_video import inputs as hunyuan_inputs
from test_hunyuan_video import inputs_15 as hunyuan15_inputs
from test_kandinsky5 import inputs as k5_inputs
from test_kandinsky5 import sample as k5_sample
from test_kandinsky5 import tiny_pipeline as k5_pipeline

from nabla_convert import NablaConfig, apply_nabla, convert, load, nabla_disabled
from nabla_convert.attention import TileLayout
from nabla_convert.config import ConfigError, LayerSettings
from nabla_convert.models import family_of
from nabla_convert.models.tiny import (
    tiny_hunyuan_video15_transformer,
    tiny_hunyuan_video_transformer,
    tiny_kandinsky5_transformer,
    tiny_transformer,
    tiny_wan_pipeline,
)


def test_layout_pads_to_the_ulysses_degree():
    # 2x10x12 tokens: 8 tiles of 64 = 512 tokens, which 3 ranks cannot share equally
    assert TileLayout.for_blocks((2, 10, 12), ranks=1).padded_len == 512
    assert TileLayout.for_blocks((2, 10, 12), ranks=3).padded_len == 576
    assert TileLayout.for_blocks((2, 10, 12), (8, 8), 128, 64, ranks=2).padded_len == 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wan(heads: int, config: NablaConfig, layers: int = 2):
    torch.manual_seed(0)
    return apply_nabla(tiny_transformer(num_layers=layers, heads=heads, head_dim=16).eval(), config)


def _wan_inputs(latent_frames: int, height: int, width: int, timestep: torch.Tensor, batch: int = 1):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, 16, latent_frames, height, width, generator=generator)
    text = torch.randn(batch, 8, 32, generator=generator)
    return {"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states": text}


def _k5(heads: int, config: NablaConfig, layers: int = 2):
    return apply_nabla(tiny_kandinsky5_transformer(num_visual_blocks=layers, heads=heads), config)


def _hv(heads: int, config: NablaConfig, **overrides):
    """HunyuanVideo: one dual-stream and two single-stream blocks."""
    return apply_nabla(tiny_hunyuan_video_transformer(heads=heads, **overrides), config)


def _hv15(heads: int, config: NablaConfig):
    return apply_nabla(tiny_hunyuan_video15_transformer(heads=heads), config)


def _parallel(model, cp_plan: dict | None = None, **cp) -> None:
    from diffusers import ContextParallelConfig

    from nabla_convert.attention.parallel import cpu_counts_as_device

    with cpu_counts_as_device():
        model.enable_parallelism(config=ContextParallelConfig(**cp), cp_plan=cp_plan)


@contextmanager
def _counted_all_to_alls() -> Iterator[list[None]]:
    """Every all-to-all diffusers' Ulysses attention sends (q, k, v and the output of one attention call: 4)."""
    calls, send = [], funcol.all_to_all_single

    def counted(*args, **kwargs):
        calls.append(None)
        return send(*args, **kwargs)

    with mock.patch.object(funcol, "all_to_all_single", counted):
        yield calls


def _forward(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def _check_against_one_process(model, kwargs, **cp) -> torch.Tensor:
    single = _forward(model, kwargs)
    with nabla_disabled(model):
        dense = _forward(model, kwargs)
    _parallel(model, **cp)
    with _counted_all_to_alls() as exchanged:
        parallel = _forward(model, kwargs)
    torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-5)
    # the selection is really sparse here: dense attention gives a visibly different output
    assert (dense - single).abs().max() > 1e-3
    # NABLA attends over the whole sequence (one all-to-all exchange per layer; local attention would
    # see 1/N of it and fail the comparison above), every other attention (text, cross) runs locally
    assert len(exchanged) == 4 * len(family_of(model).self_attention(model))
    with nabla_disabled(model):  # dense calls (dense steps, nabla_disabled) run under it too
        torch.testing.assert_close(_forward(model, kwargs), dense, rtol=1e-4, atol=1e-5)
    return parallel


def _worker(rank: int, world: int, port: int, job: str, checkpoints: dict[str, Path]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        jobs = {"two": _two_ranks, "three": _three_ranks, "compiled": _compiled, "hunyuan": _hunyuan_two_ranks}
        jobs[job](checkpoints)
    finally:
        dist.destroy_process_group()


def _two_ranks(checkpoints: dict[str, Path]) -> None:
    # the README's way: a converted checkpoint, loaded, then diffusers' enable_parallelism.
    # Wan: CFG pipeline, 240x208 video -> 15x13 token grid (padded to 16x16)
    pipe = load(checkpoints["wan"])
    single = generate(pipe, height=240, width=208)
    _parallel(pipe.transformer, ulysses_degree=2)
    torch.testing.assert_close(generate(pipe, height=240, width=208), single, rtol=1e-4, atol=1e-5)
    # Kandinsky 5 (transformer only, prompts as embeddings): visual_cond latents, the pipeline's sparse_params
    # (dropped), 3x8x11 grid (padded)
    pipe = load(
        checkpoints["kandinsky5"],
        **dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")),
    )
    pipe.set_progress_bar_config(disable=True)
    single = k5_sample(pipe)
    _parallel(pipe.transformer, ulysses_degree=2)
    torch.testing.assert_close(k5_sample(pipe), single, rtol=1e-4, atol=1e-5)

    mixed = NablaConfig(  # layer 0: per-head thresholds, each rank selects with its own heads' values
        threshold=0.5,
        q_block=128,
        kv_block=64,
        layers={0: LayerSettings(threshold=(0.2, 0.9, 0.4, 1.0)), 1: LayerSettings(threshold=0.3, sta=(1, 3, 3))},
    )
    # 1x20x20 token grid: rows and columns padded to 24, 9 tiles (odd: the split falls inside a tile),
    # padded to 640 tokens by the 128-token query blocks; batch 2 as in a CFG call
    model = _wan(4, mixed)
    _check_against_one_process(model, _wan_inputs(1, 40, 40, torch.tensor([700, 700]), batch=2), ulysses_degree=2)
    layout = model._nabla_state.layout
    assert (layout.num_tokens, layout.padded_len) == (400, 640)
    # Kandinsky 5, 1x5x11 grid: 55 tokens do not split over 2 ranks, so the stream carries its padding
    model = _k5(4, mixed)
    _check_against_one_process(model, k5_inputs((1, 5, 11), batch=2), ulysses_degree=2)
    assert model._nabla_state.padded_stream

    # Wan2.2 TI2V: one timestep per raster token; 2x12x10 grid padded to 2x16x16
    model = _wan(4, NablaConfig(threshold=0.4))
    timestep = torch.randint(1, 1000, (1, 2 * 12 * 10), generator=torch.Generator().manual_seed(2))
    kwargs = _wan_inputs(2, 24, 20, timestep)
    _check_against_one_process(model, kwargs, ulysses_degree=2)

    with pytest.raises(ConfigError, match="apply NABLA first"):
        apply_nabla(model, NablaConfig(threshold=0.5))

    for model in (_wan(4, NablaConfig(threshold=0.5)), _k5(4, NablaConfig(threshold=0.5))):
        _parallel(model, ring_degree=2)
        inputs = k5_inputs((1, 5, 11)) if family_of(model).name == "kandinsky5" else kwargs
        with pytest.raises(ValueError, match="ring attention"):
            _forward(model, inputs)


def _three_ranks(checkpoints: dict[str, Path]) -> None:
    # 2x10x11 grid = 220 tokens, which 3 ranks cannot share: the stream carries the padding tokens,
    # 8 tiles = 512 padded to 576 so that 3 ranks get 192 each
    config = NablaConfig(threshold=0.5, sta=(1, 3, 3))
    per_head = replace(config, layers={1: LayerSettings(threshold=(0.2, 0.9, 0.4, 1.0, 0.3))})
    for build, kwargs in (
        (_wan, _wan_inputs(2, 20, 22, torch.tensor([300]))),
        (_k5, k5_inputs((2, 10, 11))),
        (_hv, hunyuan_inputs((2, 10, 11))),
    ):
        model = build(6, config)
        _check_against_one_process(model, kwargs, ulysses_degree=3)
        assert model._nabla_state.layout.padded_len == 576

        # 5 heads over 3 ranks through diffusers' "Ulysses anything" (it pads the heads), per-head thresholds
        _check_against_one_process(build(5, per_head), kwargs, ulysses_degree=3, ulysses_anything=True)

        model = build(4, config)
        _parallel(model, ulysses_degree=3)
        with pytest.raises(ValueError, match="ulysses_anything"):
            _forward(model, kwargs)


def _compiled(checkpoints: dict[str, Path]) -> None:
    # compile_repeated_blocks under context parallelism: one graph for all blocks of a class (no split or
    # gather hook on a block), no graph break, no recompile over steps, equal to the eager one-process output. The
    # aot_eager backend traces what inductor would get (the all-to-all inside the graph) without its
    # codegen, which test_compile covers on one process.
    from torch._dynamo.utils import counters

    config = NablaConfig(threshold=0.5, sta=(1, 3, 3), backend="flex")
    for model, kwargs in (
        (_wan(4, config), _wan_inputs(2, 20, 22, torch.tensor([700]))),
        (_k5(4, config), k5_inputs((2, 10, 11))),
    ):
        steps = [dict(kwargs, timestep=torch.full_like(kwargs["timestep"], t)) for t in (700, 600)]
        expected = [_forward(model, step) for step in steps]
        _parallel(model, ulysses_degree=2)
        torch._dynamo.reset()
        counters.clear()
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        got = [_forward(model, steps[0])]
        with torch.compiler.set_stance("fail_on_recompile"):
            got += [_forward(model, step) for step in steps[1:]]
        for out, ref in zip(got, expected, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == len(model._repeated_blocks)  # one per block class
        assert not counters["graph_break"]


def _hunyuan_two_ranks(checkpoints: dict[str, Path]) -> None:
    # joint text-video attention: the video split across ranks, the text whole on every rank with its padding
    # differing per batch item. Per-head thresholds (each rank selects with its own heads' values, and its text
    # output heads are gathered) and an always-dense layer
    config = NablaConfig(
        threshold=0.4,
        sta=(1, 3, 3),
        layers={0: LayerSettings(threshold=(0.2, 0.9, 0.4, 0.3))},
        dense_layers=(2,),
    )
    # 3x5x11 grid: 165 tokens do not split over 2 ranks (the stream carries its padding); 2x5x11 splits compact
    for grid in ((3, 5, 11), (2, 5, 11)):
        model = _hv(4, config)
        _check_against_one_process(model, hunyuan_inputs(grid), ulysses_degree=2)
        assert model._nabla_state.padded_stream == (grid[0] == 3)
    model = _hv15(4, replace(config, dense_layers=()))
    _check_against_one_process(model, hunyuan15_inputs((3, 5, 11)), ulysses_degree=2)

    # I2V token replace: its blocks slice the first frame off the stream, which a rank's share is not
    model = _hv(4, config, image_condition_type="token_replace")
    kwargs = hunyuan_inputs((2, 5, 11))
    _forward(model, kwargs)  # one process: runs
    _parallel(model, ulysses_degree=2)
    with pytest.raises(ConfigError, match="token replace does not run under context parallelism"):
        _forward(model, kwargs)


def _spawn(job: str, world: int, checkpoints: dict[str, Path] | None = None) -> None:
    mp.spawn(_worker, args=(world, _free_port(), job, checkpoints or {}), nprocs=world)


@pytest.mark.slow
def test_context_parallel_matches_one_process_on_two_ranks(tmp_path):
    config = NablaConfig(threshold=0.5, sta=(1, 3, 3))
    tiny_wan_pipeline().save_pretrained(tmp_path / "wan")
    k5_pipeline(tiny_kandinsky5_transformer(visual_cond=True)).save_pretrained(tmp_path / "kandinsky5")
    checkpoints = {name: convert(tmp_path / name, tmp_path / f"{name}-nabla", config) for name in ("wan", "kandinsky5")}
    _spawn("two", 2, checkpoints)


@pytest.mark.slow
def test_context_parallel_matches_one_process_on_three_ranks():
    _spawn("three", 3)


@pytest.mark.slow
def test_compiled_blocks_under_context_parallelism():
    _spawn("compiled", 2)


@pytest.mark.slow
def test_hunyuan_video_joint_attention_matches_one_process_on_two_ranks():
    _spawn("hunyuan", 2)
