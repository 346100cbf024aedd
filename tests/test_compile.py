"""NABLA transformers under torch.compile as diffusers users apply it, against the same model run eagerly.

`compile_repeated_blocks()` must give one graph that every block shares (thresholds differ per
layer), no graph break inside a block (fullgraph=True), and no recompile across steps, CFG halves
or a second expert; `torch.compile(transformer)` must agree with eager too.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from nabla_convert import NablaConfig, apply_nabla, layer_densities
from nabla_convert.attention import BlockSelection, TileLayout, block_density, nabla_block_mask
from nabla_convert.config import LayerSettings
from nabla_convert.models.tiny import tiny_transformer

# 20x20 latent -> token grid 3x10x10: padded to 2x2 tiles of 8x8 per frame
LATENT = (1, 16, 3, 20, 20)
TIMESTEPS = (900, 900, 800, 700)  # CFG: two calls per timestep, then two more steps


def nabla_model(num_layers: int, seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_transformer(num_layers=num_layers).eval()
    return apply_nabla(model, NablaConfig(backend="flex", **config))


def run(model, hidden, text) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(hidden, torch.tensor([t]), text, return_dict=False)[0] for t in TIMESTEPS]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(LATENT, generator=generator), torch.randn(1, 8, 32, generator=generator)


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_never_recompile() -> None:
    hidden, text = inputs()
    layers = {1: LayerSettings(0.3), 2: LayerSettings(0.8)}
    model = nabla_model(3, threshold=0.5, layers=layers)
    expert = nabla_model(3, seed=1, threshold=0.5, layers=layers)  # Wan2.2 A14B: a second transformer
    expected = run(model, hidden, text) + run(expert, hidden, text)
    expected_densities = layer_densities(model)
    apply_nabla(model, model._nabla_state.config)  # fresh density statistics
    apply_nabla(expert, expert._nabla_state.config)
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True)
    expert.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        first = model(hidden, torch.tensor([TIMESTEPS[0]]), text, return_dict=False)[0]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [first, *run(model, hidden, text)[1:], *run(expert, hidden, text)]
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    densities = layer_densities(model)
    assert densities.keys() == expected_densities.keys()
    for layer, density in expected_densities.items():
        assert densities[layer] == pytest.approx(density, rel=1e-6)


@pytest.mark.slow
def test_compiled_transformer_equals_eager() -> None:
    hidden, text = inputs()
    model = nabla_model(1, threshold=0.5, dense_steps=1)  # step 0 dense, then sparse: both graphs checked
    expected = run(model, hidden, text)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    for out, ref in zip(run(compiled, hidden, text), expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_density_from_index_counts_equals_block_density() -> None:
    layout = TileLayout.for_blocks((3, 10, 20), (8, 8), 128, 64)
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, layout.padded_len, 16, generator=generator) for _ in range(2))
    keep = nabla_block_mask(q, k, threshold=0.4, grid=layout, q_block=128, kv_block=64)
    selection = BlockSelection.from_keep(keep, q_block=128, kv_block=64, valid=layout.indices().valid)
    density = selection.density(layout.real_blocks(128), layout.real_blocks(64))
    torch.testing.assert_close(density, block_density(keep, layout, 128, 64))
