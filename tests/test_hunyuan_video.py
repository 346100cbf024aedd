"""The HunyuanVideo families on tiny transformers and pipelines built in code: NABLA inside joint text-video
attention against the stock dense model (with its text padding mask) and a brute force on raster tokens."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from cli_pipeline import SHAPE, calibrate_convert_adapt_push_and_eval
from diffusers import HunyuanVideo15Transformer3DModel, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from test_wan import RasterNablaReference

from nabla_convert import NablaConfig, apply_nabla, convert, load
from nabla_convert.attention import BlockSelection, block_sparse_attention
from nabla_convert.attention.flex import dense_suffix_keep, joint_validity
from nabla_convert.config import LayerSettings
from nabla_convert.models import family_for_arch, family_of, family_of_pipeline
from nabla_convert.models.hunyuan_video import NablaHunyuanVideoTransformer3DModel
from nabla_convert.models.nabla import layer_densities
from nabla_convert.models.tiny import (
    tiny_hunyuan_video15_transformer,
    tiny_hunyuan_video_pipeline,
    tiny_hunyuan_video_transformer,
)

TEXT_LENGTHS = (3, 6)  # real text tokens of the two prompts of a batch (of 7): the padding differs per item


def text_mask(lengths: tuple[int, ...], total: int) -> torch.Tensor:
    return (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()


def inputs(grid, seed=0, text_tokens=7):
    """HunyuanVideo forward kwargs for a token grid (T, H, W) (patch 1x2x2), a batch of two prompts."""
    torch.manual_seed(seed)
    T, H, W = grid
    batch = len(TEXT_LENGTHS)
    return {
        "hidden_states": torch.randn(batch, 4, T, 2 * H, 2 * W),
        "timestep": torch.full((batch,), 700.0),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 16),
        "encoder_attention_mask": text_mask(TEXT_LENGTHS, text_tokens),
        "pooled_projections": torch.randn(batch, 8),
        "guidance": torch.full((batch,), 6000.0),
    }


def inputs_15(grid, seed=0):
    """HunyuanVideo 1.5 forward kwargs (patch 1): Qwen text of 7 tokens, ByT5 text of 5, 3 image tokens (T2V: none
    real), a batch of two prompts with different padding."""
    torch.manual_seed(seed)
    batch = len(TEXT_LENGTHS)
    return {
        "hidden_states": torch.randn(batch, 9, *grid),
        "timestep": torch.full((batch,), 700.0),
        "encoder_hidden_states": torch.randn(batch, 7, 16),
        "encoder_attention_mask": text_mask(TEXT_LENGTHS, 7),
        "encoder_hidden_states_2": torch.randn(batch, 5, 8),
        "encoder_attention_mask_2": text_mask((2, 4), 5),
        "image_embeds": torch.zeros(batch, 3, 8),
    }


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


class RasterJointReference(RasterNablaReference):
    """Joint attention on raster tokens with a token-level mask built by hand: the brute-force NABLA mask of test_wan
    on video->video, text keys kept unless they are padding (the stock model's key mask), text rows dense."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        family = family_of(HunyuanVideoTransformer3DModel)
        video, text = family.joint_attention_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        S, L = video[0].shape[2], text[0].shape[2]
        text_keys = (attention_mask[:, 0, 0, S:] if attention_mask.dim() == 4 else attention_mask).bool()
        B, H = video[0].shape[:2]
        keys = text_keys[:, None, None, :]
        mask = torch.cat(
            [
                torch.cat([self.token_mask(video[0], video[1]), keys.expand(B, H, S, L)], dim=-1),
                torch.cat([torch.ones(B, H, L, S, dtype=torch.bool), keys.expand(B, H, L, L)], dim=-1),
            ],
            dim=-2,
        )
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(video, text, strict=True))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return family.joint_attention_out(attn, out[:, :, :S], out[:, :, S:], hidden_states)


def raster_reference(transformer, grid, config: NablaConfig):
    reference = copy.deepcopy(transformer)
    for index, attn in enumerate(family_of(transformer).self_attention(reference)):
        if not config.layer(index).dense:  # dense layers keep the stock processor
            attn.set_processor(RasterJointReference(grid, config.layer(index)))
    return reference


GRIDS = [(2, 8, 16), (2, 5, 11), (3, 12, 10)]  # the last two need padding
DENSE_CONFIGS = [NablaConfig(threshold=1.0), NablaConfig(threshold=1.0, sta=(1, 1, 1), backend="flex_eager")]


@pytest.mark.parametrize("config", DENSE_CONFIGS, ids=["dense-path", "sparse-path-all-blocks"])
@pytest.mark.parametrize("grid", GRIDS)
def test_threshold_one_equals_stock_dense_with_text_padding(grid, config):
    dense = tiny_hunyuan_video_transformer()
    sparse = apply_nabla(copy.deepcopy(dense), config)
    kwargs = inputs(grid)
    reference = run(dense, kwargs)
    assert reference.shape == kwargs["hidden_states"].shape
    torch.testing.assert_close(run(sparse, kwargs), reference, rtol=1e-5, atol=1e-5)


CONFIGS = [
    NablaConfig(threshold=0.5),
    NablaConfig(threshold=0.3, sta=(1, 3, 1), backend="flex_eager"),
    NablaConfig(threshold=0.6, layers={2: LayerSettings(threshold=0.0, sta=(3, 1, 1))}, dense_layers=(0,)),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("grid", GRIDS)
def test_sparse_equals_brute_force(config, grid):
    dense = tiny_hunyuan_video_transformer()
    reference = raster_reference(dense, grid, config)
    sparse = apply_nabla(copy.deepcopy(dense), config)
    kwargs = inputs(grid)
    expected = run(reference, kwargs)
    torch.testing.assert_close(run(sparse, kwargs), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(dense, kwargs), expected, atol=1e-3)  # the sparsity shows


def test_image_to_video_token_replace_blocks():
    """HunyuanVideo I2V (image_condition_type "token_replace": the first frame's tokens get their own modulation,
    sliced as hidden_states[:, :first_frame_num_tokens]) keeps working in tile order, which is frame-major: threshold
    1.0 equals the stock dense model and a sparse config equals the brute force, on a padded grid."""
    dense = tiny_hunyuan_video_transformer(image_condition_type="token_replace")
    assert type(dense.transformer_blocks[0]).__name__ == "HunyuanVideoTokenReplaceTransformerBlock"
    grid, config = (3, 12, 10), CONFIGS[1]
    kwargs = inputs(grid)
    torch.testing.assert_close(
        run(apply_nabla(copy.deepcopy(dense), DENSE_CONFIGS[1]), kwargs), run(dense, kwargs), rtol=1e-5, atol=1e-5
    )
    expected = run(raster_reference(dense, grid, config), kwargs)
    torch.testing.assert_close(run(apply_nabla(copy.deepcopy(dense), config), kwargs), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(dense, kwargs), expected, atol=1e-3)  # the sparsity shows


def test_text_padding_is_never_attended():
    """What stands in the padded text positions changes nothing; what stands in the real ones does."""
    model = apply_nabla(tiny_hunyuan_video_transformer(), NablaConfig(threshold=0.4, sta=(1, 3, 3)))
    kwargs = inputs((2, 5, 11))
    expected = run(model, kwargs)
    padded = ~kwargs["encoder_attention_mask"].bool()
    noisy = kwargs["encoder_hidden_states"].masked_fill(padded[..., None], 100.0)
    torch.testing.assert_close(run(model, {**kwargs, "encoder_hidden_states": noisy}), expected)
    changed = kwargs["encoder_hidden_states"].masked_fill(~padded[..., None], 1.0)
    assert not torch.allclose(run(model, {**kwargs, "encoder_hidden_states": changed}), expected, atol=1e-3)


def test_dense_suffix_selection_equals_the_recomputed_one_and_its_token_mask():
    """with_dense_suffix extends a padded video selection's index tensors without recomputing them: they equal
    BlockSelection.from_keep on the joint keep, and attention equals SDPA with the token mask built by hand."""
    torch.manual_seed(0)
    B, H, n, L, D = 2, 3, 256, 128, 8
    video_valid = torch.arange(n) % 96 < 80  # padding tokens inside the video part
    keep = torch.rand(B, H, n // 64, n // 64) < 0.5
    keep &= video_valid.view(-1, 64).any(-1)
    suffix = text_mask((70, 3), L).bool()  # one suffix block of padding alone in the second item
    selection = BlockSelection.from_keep(keep, valid=video_valid).with_dense_suffix(suffix)
    valid = torch.cat([video_valid.expand(B, -1), suffix], dim=-1)
    recomputed = BlockSelection.from_keep(dense_suffix_keep(keep, valid, 64, 64), valid=valid)
    # the text as the model gives it (70 tokens), padded to whole blocks by the selection: the same selection
    unpadded = BlockSelection.from_keep(keep, valid=video_valid).with_dense_suffix(suffix[:, :70], L)
    for name in ("keep", "full_count", "full_indices", "partial_count", "partial_indices", "valid"):
        torch.testing.assert_close(getattr(selection, name), getattr(recomputed, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(unpadded, name), getattr(recomputed, name), rtol=0, atol=0)
    q, k, v = (torch.randn(B, H, n + L, D) for _ in range(3))
    token_keep = keep.repeat_interleave(64, -2).repeat_interleave(64, -1) & video_valid
    rows_real = suffix.view(B, -1, 64).any(-1).repeat_interleave(64, -1)  # suffix rows of padding alone: nothing
    mask = torch.cat(
        [
            torch.cat([token_keep, suffix[:, None, None, :].expand(B, H, n, L)], dim=-1),
            (valid[:, None, None, :] & rows_real[:, None, :, None]).expand(B, H, L, n + L),
        ],
        dim=-2,
    )
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num()
    for backend in ("reference", "flex_eager"):
        out = block_sparse_attention(q, k, v, selection, backend=backend)
        torch.testing.assert_close(out.nan_to_num(), expected, rtol=1e-5, atol=1e-5)


def test_joint_validity_is_gathered_not_concatenated():
    """The joint key validity is the compiled mask_mod's captured buffer: inductor inlines it into the Triton flex
    template, which cannot inline the masked loads that cat and pad lower to (measured on H200, torch 2.11: the
    compiled HunyuanVideo block failed to lower). It must equal the concatenation, built without cat or pad."""
    from torch.fx.experimental.proxy_tensor import make_fx

    video_valid = torch.arange(256) % 96 < 80
    text = text_mask((70, 3), 100).bool()
    expected = torch.cat([video_valid.expand(2, -1), F.pad(text, (0, 28))], dim=-1)
    torch.testing.assert_close(joint_validity(video_valid, 256, text, 128), expected, rtol=0, atol=0)
    unpadded_video = torch.cat([torch.ones(2, 256, dtype=torch.bool), F.pad(text, (0, 28))], dim=-1)
    torch.testing.assert_close(joint_validity(None, 256, text, 128), unpadded_video, rtol=0, atol=0)
    graph = make_fx(lambda prefix, text: joint_validity(prefix, 256, text, 128))(video_valid, text).graph
    ops = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert "aten.index.Tensor" in ops and not {op for op in ops if "cat" in op or "pad" in op}, ops


def test_hunyuan_video_15_threshold_one_and_brute_force():
    """HunyuanVideo 1.5 through the same adapter shape: its text mask (B, L), Qwen + ByT5 + image tokens."""
    dense = tiny_hunyuan_video15_transformer()
    grid = (2, 5, 11)
    kwargs = inputs_15(grid)
    expected_dense = run(dense, kwargs)
    for config in DENSE_CONFIGS:
        torch.testing.assert_close(run(apply_nabla(copy.deepcopy(dense), config), kwargs), expected_dense)
    config = NablaConfig(threshold=0.4, sta=(1, 3, 1))
    expected = run(raster_reference(dense, grid, config), kwargs)
    torch.testing.assert_close(run(apply_nabla(copy.deepcopy(dense), config), kwargs), expected)
    assert not torch.allclose(expected_dense, expected, atol=1e-3)


def test_layers_presets_and_token_grids():
    hv, hv15 = family_for_arch("hunyuan-video-t2v"), family_for_arch("hunyuan-video-1.5-t2v")
    assert hv.num_layers(hv.archs["hunyuan-video-t2v"]) == 60
    assert hv.attention_shape(hv.archs["hunyuan-video-t2v"]) == (24, 128)
    assert hv.token_grid((1280, 720), 129, hv.patch_size(hv.archs["hunyuan-video-t2v"])) == (33, 45, 80)
    assert hv.with_layers(hv.archs["hunyuan-video-t2v"], 6) | {} == {
        **hv.archs["hunyuan-video-t2v"],
        "num_layers": 2,
        "num_single_layers": 4,
    }
    assert hv15.num_layers(hv15.archs["hunyuan-video-1.5-t2v"]) == 54
    assert hv15.token_grid((848, 480), 121, hv15.patch_size(hv15.archs["hunyuan-video-1.5-t2v"])) == (31, 30, 53)
    model = tiny_hunyuan_video_transformer()
    apply_nabla(model, NablaConfig(threshold=0.5))
    assert len(family_of(model).self_attention(model)) == 3  # 1 dual-stream + 2 single-stream blocks


@pytest.mark.parametrize("make", [tiny_hunyuan_video_transformer, tiny_hunyuan_video15_transformer])
def test_bench_inputs_run_a_nabla_model(make):
    model = make()
    family = family_of(model)
    apply_nabla(model, NablaConfig(threshold=0.3))
    kwargs = family.random_inputs(model, (3, 16, 16), 1, "cpu", torch.float32)
    out = run(model, kwargs)
    assert out.shape[2:] == kwargs["hidden_states"].shape[2:] and torch.isfinite(out).all()
    assert 0 < min(layer_densities(model).values()) < 1


def test_save_convert_and_stock_reload(tmp_path):
    dense = tiny_hunyuan_video_transformer()
    dense.save_pretrained(tmp_path / "dense")
    config = NablaConfig(threshold=0.4, sta=(1, 3, 3), dense_layers=(0,))
    out = convert(tmp_path / "dense", tmp_path / "nabla", config)
    model = load(out)
    assert isinstance(model, NablaHunyuanVideoTransformer3DModel)
    stock = HunyuanVideoTransformer3DModel.from_pretrained(out)  # the dense model, unchanged weights
    kwargs = inputs((2, 5, 11))
    torch.testing.assert_close(run(stock, kwargs), run(dense, kwargs), rtol=0, atol=0)
    expected = run(raster_reference(dense, (2, 5, 11), config), kwargs)
    torch.testing.assert_close(run(model, kwargs), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "again")
    again = NablaHunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(run(again, kwargs), run(model, kwargs), rtol=0, atol=0)


def test_hunyuan_video_15_convert_and_stock_reload(tmp_path):
    dense = tiny_hunyuan_video15_transformer()
    dense.save_pretrained(tmp_path / "dense")
    config = NablaConfig(threshold=0.4, sta=(1, 3, 1))
    model = load(convert(tmp_path / "dense", tmp_path / "nabla", config))
    stock = HunyuanVideo15Transformer3DModel.from_pretrained(tmp_path / "nabla")
    kwargs = inputs_15((2, 5, 11))
    torch.testing.assert_close(run(stock, kwargs), run(dense, kwargs), rtol=0, atol=0)
    torch.testing.assert_close(run(model, kwargs), run(raster_reference(dense, (2, 5, 11), config), kwargs))


def hunyuan_video15_pipeline_folder(folder):
    """A stock HunyuanVideo15Pipeline folder: tiny transformer and VAE; no text encoders, which the stages that
    refuse the family never load."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)
    components = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    HunyuanVideo15Pipeline(
        transformer=tiny_hunyuan_video15_transformer(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        guider=ClassifierFreeGuidance(),
        **components,
    ).save_pretrained(folder)
    return folder


def test_hunyuan_video_15_pipeline_stages_are_refused_in_one_line(tmp_path):
    """calibrate, adapt and eval refuse a HunyuanVideo 1.5 pipeline (transformer-level support only) before
    loading it: one "Error:" line, exit code 1, nothing written; convert still works."""
    from click.testing import CliRunner

    from nabla_convert.cli import main

    dense = hunyuan_video15_pipeline_folder(tmp_path / "dense")
    converted = convert(dense, tmp_path / "nabla", NablaConfig(threshold=0.5))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball moves left\na blue cube\n")
    commands = {
        "calibrate": [
            "calibrate",
            str(dense),
            "--prompts",
            str(prompts),
            "--target-density",
            "0.5",
            "-o",
            str(tmp_path / "cal"),
        ],
        "adapt": ["adapt", str(converted), "--prompts", str(prompts), "--out", str(tmp_path / "adapted")],
        "eval": ["eval", str(dense), str(converted), "--prompts", str(prompts), "--out", str(tmp_path / "eval")],
    }
    for stage, args in commands.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.output == (
            f"Error: {stage} does not support hunyuan-video-1.5 checkpoints yet (supported at the transformer level"
            " only: no prompt encoding or denoising call)\n"
        )
        assert not any((tmp_path / name).exists() for name in ("cal", "adapted", "eval"))


def sample(pipe):
    return pipe(
        ["a red ball moves left", "a blue cube"],
        height=128,
        width=176,  # token grid 2 x 8 x 11: padded
        num_frames=5,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_converted_pipeline_reloads_in_stock_hunyuan_video_pipeline(tmp_path):
    """Stock HunyuanVideoPipeline.from_pretrained of the converted folder samples as the brute force does."""
    tiny_hunyuan_video_pipeline().save_pretrained(tmp_path / "dense")
    config = NablaConfig(threshold=0.5, sta=(1, 3, 3))
    out = convert(tmp_path / "dense", tmp_path / "nabla", config)
    stock = HunyuanVideoPipeline.from_pretrained(out)
    assert isinstance(stock.transformer, NablaHunyuanVideoTransformer3DModel)
    assert family_of_pipeline(stock).name == "hunyuan-video"
    stock.set_progress_bar_config(disable=True)
    reference = HunyuanVideoPipeline.from_pretrained(tmp_path / "dense")
    reference.set_progress_bar_config(disable=True)
    dense = sample(reference)
    reference.transformer = raster_reference(reference.transformer, (2, 8, 11), config)
    expected = sample(reference)
    torch.testing.assert_close(sample(stock), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dense, expected, atol=1e-3)


def test_denoising_call_matches_the_stock_pipeline_step():
    """family.velocity (prompt embeddings, their padding mask, pooled CLIP, embedded guidance) is what the stock
    pipeline applies: one Euler step from sigma 1 to 0 moves x by -velocity."""
    pipe = tiny_hunyuan_video_pipeline()
    family = family_of(pipe.transformer)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 16, 22)
    stepped = pipe(
        "a red ball moves left", height=128, width=176, num_frames=5, num_inference_steps=1, sigmas=[1.0],
        max_sequence_length=16, latents=x, output_type="latent",
    ).frames  # fmt: skip
    with torch.no_grad():
        conditioning = family.encode_prompts(pipe, ["a red ball moves left"], max_length=16)
        velocity = family.velocity(pipe.transformer, x, torch.tensor([1000.0]), conditioning)
    torch.testing.assert_close(x - stepped, velocity, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pipeline_calibrate_convert_adapt_push_and_eval(tmp_path):
    """A tiny HunyuanVideoPipeline through calibrate -> convert -> adapt (2 LoRA steps on teacher rollouts) ->
    push --dry-run -> eval against the dense pipeline; stock HunyuanVideoPipeline generates with NABLA."""
    from nabla_convert.eval.sampling import nabla_transformers

    tiny_hunyuan_video_pipeline().save_pretrained(tmp_path / "dense")
    out = calibrate_convert_adapt_push_and_eval(
        tmp_path / "dense", tmp_path, calibrate_guidance=6.0, eval_guidance=6.0, repo_id="me/hunyuan-nabla"
    )
    pipe = HunyuanVideoPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        "a red ball moves left", height=SHAPE["height"], width=SHAPE["width"], num_frames=SHAPE["frames"],
        num_inference_steps=2, max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert video.shape == (1, 5, 3, 128, 176) and torch.isfinite(video).all()
    densities = layer_densities(nabla_transformers(pipe)["transformer"])
    assert set(densities) == {0, 1, 2} and max(densities.values()) < 0.9
