"""apply_nabla on Wan transformers against dense runs and a raster-order brute-force NABLA reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import generate

from nabla_convert import NablaConfig, apply_nabla, layer_densities, nabla_disabled, remove_nabla
from nabla_convert.config import LayerSettings
from nabla_convert.models.tiny import tiny_transformer, tiny_wan_pipeline


class RasterNablaReference:
    """NABLA applied per layer on raster-order tokens, written from the definition (the NABLA paper, arXiv 2507.13546).

    Tile membership comes from each token's (frame, row, col); pooled maps, sort-and-accumulate
    selection and the STA window are computed in float64 per row. No tile-order permutation.
    """

    def __init__(self, grid: tuple[int, int, int], settings: LayerSettings) -> None:
        self.grid, self.settings = grid, settings

    def token_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        T, H, W = self.grid
        Ht, Wt = math.ceil(H / 8), math.ceil(W / 8)
        t, r, c = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
        tile = ((t * Ht + r // 8) * Wt + c // 8).flatten()
        n = T * Ht * Wt
        one_hot = F.one_hot(tile, n).double()  # (S, n)
        pool = one_hot / one_hot.sum(0, keepdim=True)
        qa = torch.einsum("bhsd,sn->bhnd", q.double(), pool)
        ka = torch.einsum("bhsd,sn->bhnd", k.double(), pool)
        probs = torch.softmax(qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        thresholds = self.settings.thresholds(probs.shape[1])
        for index in torch.cartesian_prod(*(torch.arange(s) for s in probs.shape[:3])):
            b, h, i = index.tolist()
            cumulative = 0.0
            for j in probs[b, h, i].argsort().tolist():
                cumulative += probs[b, h, i, j].item()
                keep[b, h, i, j] = thresholds[h] > 0 and cumulative >= 1 - thresholds[h]
        if self.settings.sta is not None:
            coords = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(Ht), torch.arange(Wt), indexing="ij"), -1)
            coords = coords.reshape(-1, 3)
            half = torch.tensor([w // 2 for w in self.settings.sta])
            keep |= ((coords[:, None] - coords[None]).abs() <= half).all(-1)
        return keep[..., tile, :][..., :, tile]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb

        def rope(x):
            real, imag = x[..., 0::2], x[..., 1::2]
            out = torch.empty_like(x)
            out[..., 0::2] = real * cos[..., 0::2] - imag * sin[..., 1::2]
            out[..., 1::2] = real * sin[..., 1::2] + imag * cos[..., 0::2]
            return out

        q, k, v = (x.transpose(1, 2) for x in (rope(q), rope(k), v))
        mask = self.token_mask(q, k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def raster_reference(transformer, grid, config: NablaConfig):
    reference = copy.deepcopy(transformer)
    for index, block in enumerate(reference.blocks):
        settings = config.layer(index)
        if not settings.dense:
            block.attn1.set_processor(RasterNablaReference(grid, settings))
    return reference


def inputs(latent_shape, seed=0, text_tokens=7, per_token_timestep=False):
    torch.manual_seed(seed)
    x = torch.randn(*latent_shape)
    B, _, F_, H, W = latent_shape
    timestep = torch.full((B,), 700.0)
    if per_token_timestep:
        timestep = torch.rand(B, F_ * (H // 2) * (W // 2)) * 1000
    return x, timestep, torch.randn(B, text_tokens, 32)


CONFIGS = [
    NablaConfig(threshold=0.5, backend="reference"),
    NablaConfig(threshold=0.3, sta=(1, 3, 1), backend="flex_eager"),
    NablaConfig(threshold=0.6, layers={1: LayerSettings(threshold=0.2, sta=(3, 1, 1))}, dense_layers=(0,)),
    NablaConfig(layers={0: LayerSettings(threshold=(0.2, 0.9)), 1: LayerSettings(threshold=(1.0, 0.3), sta=(1, 3, 1))}),
]
LATENTS = [(1, 16, 3, 32, 32), (2, 16, 2, 26, 42), (1, 16, 4, 18, 30)]  # the last two need padding


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("latent_shape", LATENTS)
def test_nabla_transformer_matches_raster_reference(config, latent_shape):
    dense = tiny_transformer().eval()
    grid = (latent_shape[2], latent_shape[3] // 2, latent_shape[4] // 2)
    reference = raster_reference(dense, grid, config)
    sparse = apply_nabla(copy.deepcopy(dense), config)
    x, t, text = inputs(latent_shape)
    with torch.no_grad():
        expected = reference(x, t, text).sample
        got = sparse(x, t, text).sample
        full = dense(x, t, text).sample
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (got - full).abs().max() > 1e-3  # the sparsity is real


@pytest.mark.parametrize("latent_shape", LATENTS)
def test_threshold_one_equals_dense_through_sparse_path(latent_shape):
    dense = tiny_transformer().eval()
    x, t, text = inputs(latent_shape)
    # threshold 1.0 with a huge window goes through block selection and block-sparse attention, keeping all
    sparse = apply_nabla(copy.deepcopy(dense), NablaConfig(threshold=1.0, sta=(99, 99, 99), backend="flex_eager"))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x, t, text).sample, dense(x, t, text).sample, atol=2e-6, rtol=1e-5)


def test_i2v_image_branch_untouched():
    dense = tiny_transformer(image_dim=16).eval()
    config = NablaConfig(threshold=0.4, sta=(1, 1, 1))
    latent_shape = (1, 16, 2, 26, 42)
    reference = raster_reference(dense, (2, 13, 21), config)
    sparse = apply_nabla(copy.deepcopy(dense), config)
    x, t, text = inputs(latent_shape, text_tokens=512)
    image = torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = reference(x, t, text, encoder_hidden_states_image=image).sample
        got = sparse(x, t, text, encoder_hidden_states_image=image).sample
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_ti2v_per_token_timesteps():
    dense = tiny_transformer().eval()
    config = NablaConfig(threshold=0.5)
    latent_shape = (2, 16, 2, 26, 42)
    reference = raster_reference(dense, (2, 13, 21), config)
    sparse = apply_nabla(copy.deepcopy(dense), config)
    x, t, text = inputs(latent_shape, per_token_timestep=True)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x, t, text).sample, reference(x, t, text).sample, atol=2e-5, rtol=1e-4)
        with nabla_disabled(sparse):
            torch.testing.assert_close(sparse(x, t, text).sample, dense(x, t, text).sample, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        ({}, (256, 256)),
        ({}, (208, 336)),
        ({"expand_timesteps": True}, (208, 336)),
        ({"two_transformers": True}, (256, 256)),
    ],
)
def test_threshold_one_pipeline_equals_dense_pipeline(kwargs, size):
    pipe = tiny_wan_pipeline(**kwargs)
    expected = generate(pipe, height=size[0], width=size[1])
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name) is not None:
            apply_nabla(getattr(pipe, name), NablaConfig(threshold=1.0))
    torch.testing.assert_close(generate(pipe, height=size[0], width=size[1]), expected, atol=1e-5, rtol=1e-5)


def test_dense_steps_schedule_in_stock_pipeline():
    pipe = tiny_wan_pipeline()
    apply_nabla(pipe.transformer, NablaConfig(threshold=0.3))
    generate(pipe, steps=2)
    sparse = layer_densities(pipe.transformer)
    assert all(d < 0.9 for d in sparse.values())

    apply_nabla(pipe.transformer, NablaConfig(threshold=0.3, dense_steps=1))
    generate(pipe, steps=2)
    generate(pipe, steps=2)  # a second run starts its schedule again
    mixed = layer_densities(pipe.transformer)
    for layer, density in mixed.items():  # 2 CFG calls dense + 2 sparse per run
        assert density == pytest.approx((1.0 + sparse[layer]) / 2, abs=1e-6)

    dense = tiny_wan_pipeline()
    apply_nabla(pipe.transformer, NablaConfig(threshold=0.3, dense_steps=2))
    torch.testing.assert_close(generate(pipe), generate(dense), atol=1e-5, rtol=1e-5)


def test_remove_nabla_restores_dense_model():
    dense = tiny_transformer().eval()
    model = apply_nabla(copy.deepcopy(dense), NablaConfig(threshold=0.2))
    remove_nabla(model)
    assert "_nabla" not in model.config
    x, t, text = inputs((1, 16, 2, 26, 42))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, dense(x, t, text).sample, atol=0, rtol=0)


def test_grid_beyond_rope_table_is_a_clear_error():
    model = apply_nabla(tiny_transformer(), NablaConfig())
    x, t, text = inputs((1, 16, 1, 160, 32))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model(x, t, text)


def test_config_naming_missing_layers_is_rejected():
    with pytest.raises(ValueError, match="the model has 2"):
        apply_nabla(tiny_transformer(), NablaConfig(dense_layers=(5,)))


def test_per_head_thresholds_must_match_the_head_count():
    config = NablaConfig(layers={1: LayerSettings(threshold=(0.5, 0.6, 0.7))})
    with pytest.raises(ValueError, match="layer 1 has 3 per-head thresholds, the model has 2 heads"):
        apply_nabla(tiny_transformer(), config)


def test_per_head_thresholds_all_one_run_dense():
    layers = {0: LayerSettings(threshold=(1.0, 1.0)), 1: LayerSettings(threshold=(1.0, 0.9))}
    model = apply_nabla(tiny_transformer(), NablaConfig(layers=layers))
    assert [block.attn1.processor.is_dense_now() for block in model.blocks] == [True, False]
