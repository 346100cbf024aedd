"""The Kandinsky 5 family on tiny transformers built in code: dense parity, brute force, diffusers' built-in NABLA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from cli_pipeline import SHAPE, calibrate_convert_adapt_push_and_eval
from diffusers import Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel
from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
from test_wan import RasterNablaReference

from nabla_convert import NablaConfig, apply_nabla, convert, load
from nabla_convert.config import LayerSettings
from nabla_convert.models import family_for_arch, family_of
from nabla_convert.models.kandinsky5 import NablaKandinsky5Transformer3DModel
from nabla_convert.models.nabla import NablaAttnProcessor, set_processors
from nabla_convert.models.tiny import tiny_kandinsky5_transformer


def inputs(grid, batch=1, seed=0, text_tokens=5):
    """Forward kwargs for a token grid (T, H, W); latents are (B, T, 2H, 2W, C) channels-last."""
    torch.manual_seed(seed)
    T, H, W = grid
    return {
        "hidden_states": torch.randn(batch, T, 2 * H, 2 * W, 4),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 16),
        "timestep": torch.full((batch,), 700.0),
        "pooled_projections": torch.randn(batch, 8),
        "visual_rope_pos": [torch.arange(n) for n in grid],
        "text_rope_pos": torch.arange(text_tokens),
    }


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


class RasterK5Reference(RasterNablaReference):
    """The brute-force NABLA reference of test_wan on raster tokens, with Kandinsky 5's projections and RoPE
    (the adapter's own, which the threshold-1 test checks against the stock processor)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        family = family_for_arch("kandinsky5-t2v-lite")
        q, k, v = family.attention_qkv(attn, hidden_states, rotary_emb)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.token_mask(q, k))
        return family.attention_out(attn, out, hidden_states)


GRIDS = [(2, 8, 16), (2, 5, 11), (3, 12, 10)]  # the last two need padding


@pytest.mark.parametrize("grid", GRIDS)
def test_threshold_one_equals_dense(grid):
    dense = tiny_kandinsky5_transformer()
    sparse = apply_nabla(copy.deepcopy(dense), NablaConfig(threshold=1.0, sta=(1, 1, 1)))
    kwargs = inputs(grid, batch=2)
    reference = run(dense, kwargs)
    assert reference.shape == kwargs["hidden_states"].shape
    torch.testing.assert_close(run(sparse, kwargs), reference, rtol=1e-4, atol=1e-4)  # q, k rounded to bf16 (K5 RoPE)


CONFIGS = [
    NablaConfig(threshold=0.5),
    NablaConfig(threshold=0.3, sta=(1, 3, 1), backend="flex_eager"),
    NablaConfig(threshold=0.6, layers={1: LayerSettings(threshold=0.0, sta=(3, 1, 1))}),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("grid", GRIDS)
def test_sparse_equals_brute_force(config, grid):
    dense = tiny_kandinsky5_transformer()
    reference = copy.deepcopy(dense)
    for index, block in enumerate(reference.visual_transformer_blocks):
        block.self_attention.set_processor(RasterK5Reference(grid, config.layer(index)))
    sparse = apply_nabla(copy.deepcopy(dense), config)
    kwargs = inputs(grid)
    expected = run(reference, kwargs)
    torch.testing.assert_close(run(sparse, kwargs), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(run(dense, kwargs), expected, atol=1e-3)  # the sparsity shows


def builtin_selections(precision: str, sharpen: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer call: (our selection, diffusers' nablaT_v2 as K5 runs it, nablaT_v2 run in float64) on the same q, k.

    Both see the same post-RoPE q, k; K5's RoPE rounds them to bf16, and a bf16 model (how K5 runs) hands nablaT_v2
    bf16 tensors, so it pools, softmaxes, sorts and sums in bf16. The same function given the same (bf16-valued)
    q, k in float64 is the built-in's selection rule without its bf16 arithmetic. The model has Lite's head dim (64);
    `sharpen` scales its q/k norms: 1 leaves the near-uniform pooled maps of random tiny weights, 8 makes them peaked
    as a trained model's are.
    """
    P, window, grid = 0.7, (3, 1, 3), (4, 32, 32)
    model = tiny_kandinsky5_transformer(
        axes_dims=(16, 24, 24),
        attention_type="nabla",
        attention_P=P,
        attention_wT=window[0],
        attention_wH=window[1],
        attention_wW=window[2],
    )
    for block in model.visual_transformer_blocks:
        block.self_attention.query_norm.weight.data.mul_(sharpen)
        block.self_attention.key_norm.weight.data.mul_(sharpen)
    config = family_of(model).native_settings(model.config)
    assert (config.threshold, config.sta, config.selection_precision) == (P, window, "bfloat16")
    apply_nabla(model, NablaConfig.from_dict({**config.to_dict(), "selection_precision": precision}))
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(grid[0], grid[1] // 8, grid[2] // 8, *window, device="cpu")
    found = []

    class Recording(NablaAttnProcessor):
        def select(self, q, k, layout):
            selection = super().select(q, k, layout)
            theirs = [
                nablaT_v2(*(t.transpose(1, 2).to(dtype) for t in (q, k)), sta[None, None], thr=P).to_dense().bool()
                for dtype in (torch.bfloat16, torch.float64)
            ]
            found.append((selection.keep, *theirs))
            return selection

    set_processors(model, lambda index, old: Recording(index, old.settings, old.state))
    run(model, inputs(grid, batch=2))
    return found


def agreement(pairs) -> float:
    agree = sum(int((a == b).sum()) for a, b in pairs)
    total = sum(b.numel() for _, b in pairs)
    assert total > 0
    return agree / total


@pytest.mark.parametrize("sharpen", [1.0, 8.0])
def test_float32_selection_is_the_builtin_rule_without_its_bf16_arithmetic(sharpen):
    """Every block pair where the float32 selection differs from the built-in comes from the built-in's bf16
    arithmetic (measured on flat maps: bf16 softmax output alone moves 179, bf16 sort + cumsum alone 186, bf16 pooling
    alone 51 of 32,768 pairs; q/k rounding is common to both): against nablaT_v2 run in float64 on the same q, k,
    the float32 selection agrees on >= 99.9% (measured: all) of pairs. Against the built-in as run, it agrees on
    >= 99.9% on peaked maps; on the flat maps of random tiny weights only ~99.45%, the pairs where bf16 moved the
    built-in's own cut."""
    found = builtin_selections("float32", sharpen)
    assert agreement([(ours, exact) for ours, _, exact in found]) >= 0.999
    as_run = agreement([(ours, builtin) for ours, builtin, _ in found])
    if sharpen > 1:
        assert as_run >= 0.999
    moved_by_bf16 = agreement([(builtin, exact) for _, builtin, exact in found])
    assert as_run == pytest.approx(moved_by_bf16, abs=1e-3)


def test_selection_equals_builtin_nabla_with_bf16_option():
    for sharpen in (1.0, 8.0):
        assert agreement([(ours, builtin) for ours, builtin, _ in builtin_selections("bfloat16", sharpen)]) == 1.0


def test_save_convert_and_stock_reload(tmp_path):
    dense = tiny_kandinsky5_transformer()
    dense.save_pretrained(tmp_path / "dense")
    config = NablaConfig(threshold=0.4, sta=(1, 3, 3), dense_layers=(0,))
    out = convert(tmp_path / "dense", tmp_path / "nabla", config)
    model = load(out)
    assert isinstance(model, NablaKandinsky5Transformer3DModel)
    assert model._nabla_state.config.dense_layers == (0,)
    stock = Kandinsky5Transformer3DModel.from_pretrained(out)  # the dense model, unchanged weights
    kwargs = inputs((2, 5, 11))
    torch.testing.assert_close(run(stock, kwargs), run(dense, kwargs))
    expected = run(apply_nabla(copy.deepcopy(dense), config), kwargs)
    torch.testing.assert_close(run(model, kwargs), expected)
    model.save_pretrained(tmp_path / "again")
    again = NablaKandinsky5Transformer3DModel.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(run(again, kwargs), expected)


def test_native_nabla_config_is_read_by_convert(tmp_path):
    model = tiny_kandinsky5_transformer(
        attention_type="nabla", attention_P=0.9, attention_wT=11, attention_wH=3, attention_wW=3
    )
    model.save_pretrained(tmp_path / "k5")
    converted = load(convert(tmp_path / "k5", tmp_path / "nabla", None))
    settings = converted._nabla_state.config
    assert (settings.threshold, settings.sta, settings.selection_precision) == (0.9, (11, 3, 3), "bfloat16")


def test_bench_presets_and_token_grids():
    lite, pro = (family_for_arch(name) for name in ("kandinsky5-t2v-lite", "kandinsky5-t2v-pro"))
    assert lite.attention_shape(lite.archs["kandinsky5-t2v-lite"]) == (28, 64)
    assert pro.attention_shape(pro.archs["kandinsky5-t2v-pro"]) == (32, 128)
    assert lite.token_grid((768, 512), 121) == (31, 32, 48)
    assert pro.token_grid((1024, 768), 121) == (31, 48, 64)


def tiny_pipeline(transformer):
    """A Kandinsky5T2VPipeline with only its transformer and scheduler (prompts given as embeddings, latents out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = Kandinsky5T2VPipeline(
        transformer=transformer,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe):
    torch.manual_seed(3)
    return pipe(
        prompt_embeds_qwen=torch.randn(1, 5, 16),
        prompt_embeds_clip=torch.randn(1, 8),
        prompt_cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
        height=128,
        width=176,  # token grid 3 x 8 x 11: padded
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_converted_pipeline_reloads_with_stock_diffusers_and_matches_brute_force(tmp_path):
    """visual_cond latents, the pipeline's own sparse_params (dropped by the hooks) and padding, end to end."""
    native = dict(attention_type="nabla", attention_P=0.9, attention_wT=3, attention_wH=1, attention_wW=1)
    tiny_pipeline(tiny_kandinsky5_transformer(visual_cond=True, **native)).save_pretrained(tmp_path / "dense")
    config = NablaConfig(threshold=0.5, sta=(1, 3, 3))
    out = convert(tmp_path / "dense", tmp_path / "nabla", config)
    absent = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    stock = Kandinsky5T2VPipeline.from_pretrained(out, **absent)
    assert isinstance(stock.transformer, NablaKandinsky5Transformer3DModel)
    stock.set_progress_bar_config(disable=True)
    reference = tiny_pipeline(Kandinsky5Transformer3DModel.from_pretrained(tmp_path / "dense" / "transformer"))
    reference.transformer.register_to_config(attention_type="regular")  # its built-in NABLA would crop nothing here
    for block in reference.transformer.visual_transformer_blocks:
        block.self_attention.set_processor(RasterK5Reference((3, 8, 11), config.layer(0)))
    expected = sample(reference)
    torch.testing.assert_close(sample(stock), expected, rtol=1e-4, atol=1e-4)
    dense = tiny_pipeline(Kandinsky5Transformer3DModel.from_pretrained(tmp_path / "dense" / "transformer"))
    dense.transformer.register_to_config(attention_type="regular")
    assert not torch.allclose(sample(dense), expected, atol=1e-3)


def test_bench_inputs_run_a_nabla_model():
    """The random inputs `bench` times a Kandinsky 5 step with (channels-last latents, visual_cond) fit the model."""
    model = tiny_kandinsky5_transformer(visual_cond=True)
    family = family_of(model)
    apply_nabla(model, NablaConfig(threshold=0.9, sta=(11, 3, 3)))
    kwargs = family.random_inputs(model, (3, 8, 12), 1, "cpu", torch.float32)
    with torch.no_grad():
        out = model(**kwargs).sample
    assert out.shape == (1, 3, 16, 24, 4)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_pipeline_calibrate_convert_push_and_stock_generation(tmp_path):
    """A tiny Kandinsky5T2VPipeline (Qwen2.5-VL, CLIP, HunyuanVideo VAE) through calibrate -> convert -> adapt
    (2 LoRA steps on teacher rollouts) -> push --dry-run -> eval against the dense pipeline; stock
    Kandinsky5T2VPipeline.from_pretrained generates with NABLA at the calibrated density."""
    from nabla_convert.eval.sampling import nabla_transformers
    from nabla_convert.models.nabla import layer_densities
    from nabla_convert.models.tiny import tiny_kandinsky5_pipeline

    tiny_kandinsky5_pipeline().save_pretrained(tmp_path / "dense")
    out = calibrate_convert_adapt_push_and_eval(
        tmp_path / "dense", tmp_path, calibrate_guidance=1.0, eval_guidance=3.0, repo_id="me/k5-nabla"
    )
    pipe = Kandinsky5T2VPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        "a red ball moves left",
        height=SHAPE["height"],
        width=SHAPE["width"],
        num_frames=SHAPE["frames"],
        num_inference_steps=2,
        guidance_scale=3.0,
        max_sequence_length=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 3, 128, 176) and torch.isfinite(video).all()
    densities = layer_densities(nabla_transformers(pipe)["transformer"])
    assert set(densities) == {0, 1} and max(densities.values()) < 0.9


def test_denoising_call_matches_the_stock_pipeline_step():
    """family.velocity (channels-last latents, visual condition, RoPE positions and scale, both text embeddings)
    is what the stock pipeline applies: one Euler step from sigma 1 to 0 moves x by -velocity."""
    from nabla_convert.models.tiny import tiny_kandinsky5_pipeline

    pipe = tiny_kandinsky5_pipeline()
    family = family_of(pipe.transformer)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 22, 4)
    condition = torch.cat([torch.zeros_like(x), torch.zeros(1, 2, 16, 22, 1)], dim=-1)
    stepped = pipe(
        "a red ball moves left", height=128, width=176, num_frames=5, num_inference_steps=1, guidance_scale=1.0,
        max_sequence_length=16, latents=torch.cat([x, condition], dim=-1), output_type="latent",
    ).frames  # fmt: skip
    with torch.no_grad():
        conditioning = family.encode_prompts(pipe, ["a red ball moves left"], max_length=16)
        velocity = family.velocity(pipe.transformer, x, torch.tensor([1000.0]), conditioning)
    torch.testing.assert_close(x - stepped, velocity, rtol=1e-4, atol=1e-4)


def test_bench_times_diffusers_builtin_nabla_through_the_family():
    """bench's built-in row calls the dense K5 model with the pipeline's sparse_params on the flex backend; a shape the
    built-in cannot run is a row with its error, not a crash. Wan has no built-in NABLA."""
    from nabla_convert.bench.measure import transformer_step_rows
    from nabla_convert.bench.report import BenchReport

    model = tiny_kandinsky5_transformer(visual_cond=True)
    family = family_of(model)
    config = NablaConfig(threshold=0.7, sta=(3, 1, 1))
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("sparse_params")), with_kwargs=True
    )
    rows = transformer_step_rows(
        family, "tiny", {}, (256, 128), 9, config, [None], model=model, builtin=(False,), reps=1
    )
    assert [r.implementation for r in rows] == ["diffusers built-in", "nabla-convert"]
    assert all(r.error is None and r.nabla_ms > 0 for r in rows)
    builtin_calls = [c for c in calls if c is not None]
    assert builtin_calls and all(c["P"] == 0.7 and c["to_fractal"] for c in builtin_calls)
    expected_sta = Kandinsky5T2VPipeline.fast_sta_nabla(3, 1, 2, 3, 1, 1, device="cpu")  # 3 x 8 x 16 tokens
    assert torch.equal(builtin_calls[0]["sta_mask"][0, 0], expected_sta)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert all(p.processor._attention_backend is None for p in family.self_attention(model))  # backends restored
    assert _AttentionBackendRegistry.get_active_backend()[0] == "native"  # diffusers' process-wide default too
    padded = transformer_step_rows(
        family, "tiny", {}, (176, 128), 9, config, [None], model=model, builtin=(False,), reps=1
    )
    assert (
        padded[0].error.startswith("FamilyError")
        and "fails: FamilyError" in BenchReport({"card": "cpu", "torch": "", "date": ""}, {}, steps=padded).table()
    )
    assert not family_for_arch("wan2.1-t2v-1.3b").has_builtin_nabla() and family.has_builtin_nabla()
