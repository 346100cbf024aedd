"""NABLA under diffusers' context parallelism (Ulysses): N gloo processes against one process, on CPU.

Each worker builds the same tiny Wan transformer (same seed), runs it in one process, then enables
diffusers' context parallelism and runs it again: the output gathered from N ranks must equal the
one-process output. diffusers' own split/gather hooks and Ulysses all-to-all run over gloo.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import generate

from nabla_convert import NablaConfig, apply_nabla, convert, load, nabla_disabled
from nabla_convert.attention import TileLayout
from nabla_convert.config import ConfigError, LayerSettings
from nabla_convert.models.tiny import tiny_transformer, tiny_wan_pipeline


def test_layout_pads_to_the_ulysses_degree():
    # 2x10x12 tokens: 8 tiles of 64 = 512 tokens, which 3 ranks cannot share equally
    assert TileLayout.for_blocks((2, 10, 12), ranks=1).padded_len == 512
    assert TileLayout.for_blocks((2, 10, 12), ranks=3).padded_len == 576
    assert TileLayout.for_blocks((2, 10, 12), (8, 8), 128, 64, ranks=2).padded_len == 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(heads: int, config: NablaConfig):
    torch.manual_seed(0)
    return apply_nabla(tiny_transformer(num_layers=2, heads=heads, head_dim=16).eval(), config)


def _inputs(latent_frames: int, height: int, width: int, batch: int = 1):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, 16, latent_frames, height, width, generator=generator)
    text = torch.randn(batch, 8, 32, generator=generator)
    return hidden, text


def _parallel(model, **cp) -> None:
    from diffusers import ContextParallelConfig

    from nabla_convert.attention.parallel import cpu_counts_as_device

    with cpu_counts_as_device():
        model.enable_parallelism(config=ContextParallelConfig(**cp))


def _check_against_one_process(model, hidden, timestep, text, **cp) -> torch.Tensor:
    with torch.no_grad():
        single = model(hidden, timestep, text, return_dict=False)[0]
        with nabla_disabled(model):
            dense = model(hidden, timestep, text, return_dict=False)[0]
    _parallel(model, **cp)
    with torch.no_grad():
        parallel = model(hidden, timestep, text, return_dict=False)[0]
    torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-5)
    # the selection is really sparse here: dense attention gives a visibly different output
    assert (dense - single).abs().max() > 1e-3
    return parallel


def _worker(rank: int, world: int, port: int, checkpoint: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if world == 2:
            _two_ranks(checkpoint)
        else:
            _three_ranks()
    finally:
        dist.destroy_process_group()


def _two_ranks(checkpoint: Path) -> None:
    # the README's way: a converted checkpoint, loaded, then diffusers' enable_parallelism; CFG pipeline,
    # 240x208 video -> 15x13 token grid (padded to 16x16)
    pipe = load(checkpoint)
    single = generate(pipe, height=240, width=208)
    _parallel(pipe.transformer, ulysses_degree=2)
    torch.testing.assert_close(generate(pipe, height=240, width=208), single, rtol=1e-4, atol=1e-5)

    mixed = NablaConfig(
        threshold=0.5, q_block=128, kv_block=64, layers={1: LayerSettings(threshold=0.3, sta=(1, 3, 3))}
    )
    # 1x20x20 token grid: rows and columns padded to 24, 9 tiles (odd: the split falls inside a tile),
    # padded to 640 tokens by the 128-token query blocks; batch 2 as in a CFG call
    model = _model(4, mixed)
    hidden, text = _inputs(1, 40, 40, batch=2)
    _check_against_one_process(model, hidden, torch.tensor([700, 700]), text, ulysses_degree=2)
    layout = model._nabla_state.layout
    assert (layout.num_tokens, layout.padded_len) == (400, 640)

    # Wan2.2 TI2V: one timestep per raster token; 2x12x10 grid padded to 2x16x16
    model = _model(4, NablaConfig(threshold=0.4))
    hidden, text = _inputs(2, 24, 20)
    timestep = torch.randint(1, 1000, (1, 2 * 12 * 10), generator=torch.Generator().manual_seed(2))
    _check_against_one_process(model, hidden, timestep, text, ulysses_degree=2)

    with pytest.raises(ConfigError, match="apply NABLA first"):
        apply_nabla(model, NablaConfig(threshold=0.5))

    model = _model(4, NablaConfig(threshold=0.5))
    _parallel(model, ring_degree=2)
    with pytest.raises(ValueError, match="ring attention"), torch.no_grad():
        model(hidden, torch.tensor([500]), text)


def _three_ranks() -> None:
    # 2x10x11 grid = 220 tokens, which 3 ranks cannot share: the stream carries the padding tokens,
    # 8 tiles = 512 padded to 576 so that 3 ranks get 192 each
    hidden, text = _inputs(2, 20, 22)
    config = NablaConfig(threshold=0.5, sta=(1, 3, 3))
    model = _model(6, config)
    _check_against_one_process(model, hidden, torch.tensor([300]), text, ulysses_degree=3)
    assert model._nabla_state.layout.padded_len == 576

    # 5 heads over 3 ranks through diffusers' "Ulysses anything" (it pads the heads)
    model = _model(5, config)
    _check_against_one_process(model, hidden, torch.tensor([300]), text, ulysses_degree=3, ulysses_anything=True)

    model = _model(4, config)
    _parallel(model, ulysses_degree=3)
    with pytest.raises(ValueError, match="ulysses_anything"), torch.no_grad():
        model(hidden, torch.tensor([300]), text)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_matches_one_process(world, tmp_path):
    checkpoint = tmp_path / "nabla"
    if world == 2:
        tiny_wan_pipeline().save_pretrained(tmp_path / "dense")
        convert(tmp_path / "dense", checkpoint, NablaConfig(threshold=0.5, sta=(1, 3, 3)))
    mp.spawn(_worker, args=(world, _free_port(), checkpoint), nprocs=world)
