"""The reference model's data generator and shipped pipeline folder."""

from __future__ import annotations

import torch

from nabla_convert.reference import (
    HEIGHT,
    NUM_FRAMES,
    REFERENCE_PIPELINE,
    WIDTH,
    heldout_prompts,
    heldout_scenes,
)
from nabla_convert.reference.flow import flow_matching_loss, latent_coverage
from nabla_convert.reference.scenes import (
    COLOURS,
    HELDOUT_PAIRS,
    VOCABULARY,
    Scene,
    SceneObject,
    render,
    sample_scene,
    sample_scenes,
)


def test_scenes_are_deterministic_by_seed_and_index():
    first = sample_scenes(3, 10, 4)
    assert first == sample_scenes(3, 10, 4)
    assert first != sample_scenes(4, 10, 4)
    assert torch.equal(render(first[:2], 5, 32, 32), render(sample_scenes(3, 10, 2), 5, 32, 32))


def test_heldout_pairs_never_appear_in_training_and_lead_heldout_scenes():
    training_pairs = {(o.colour, o.shape) for s in sample_scenes(0, 0, 3000) for o in s.objects}
    assert not training_pairs & HELDOUT_PAIRS
    assert len(training_pairs) == len(COLOURS) * 10 - len(HELDOUT_PAIRS)  # every other pair is seen
    assert all((s.objects[0].colour, s.objects[0].shape) in HELDOUT_PAIRS for s in heldout_scenes())


def test_bundled_heldout_prompts_are_the_heldout_scene_captions():
    assert heldout_prompts() == [scene.caption() for scene in heldout_scenes()]


def test_captions_use_the_vocabulary_and_tokenize_without_unknowns():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_PIPELINE / "tokenizer")
    captions = [s.caption() for s in sample_scenes(1, 0, 200)] + heldout_prompts()
    assert {w for c in captions for w in c.split()} <= set(VOCABULARY)
    ids = tokenizer(captions)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)


def _single(motion: str, detail: str = "", speed: str = "", shape: str = "square") -> Scene:
    obj = SceneObject("red", shape, "big", motion, detail, speed, (0.5, 0.5), (0.0, 0.0), 0.0)
    return Scene((obj,), "black", "", (0.0,) * 6)


def test_render_draws_the_captioned_colour_and_motion():
    video = (render([_single("moves", "left", "quickly")], 9, 64, 64)[0] + 1) / 2  # (3, T, H, W) in [0, 1]
    red = (video[0] > 0.8) & (video[1] < 0.3)
    columns = torch.arange(64).float()
    centroid_x = [(red[t].float().sum(0) * columns).sum() / red[t].sum() for t in (0, 8)]
    assert centroid_x[1] < centroid_x[0] - 10  # moved left by 0.6 frame widths: about 38 pixels
    assert torch.allclose(video[:, 0, 32, 30], torch.tensor(COLOURS["red"]), atol=1e-6)
    assert video[:, 0, 2, 60].max() < 0.15  # black background far from the object


def test_turns_changes_colour_and_grows_changes_area():
    turning = (render([_single("turns", "blue")], 9, 64, 64)[0] + 1) / 2
    assert torch.allclose(turning[:, -1, 32, 32], torch.tensor(COLOURS["blue"]), atol=1e-6)
    growing = (render([_single("grows", shape="circle")], 9, 64, 64)[0] + 1) / 2
    area = (growing[0] > 0.8).flatten(1).sum(1)
    assert area[-1] > 4 * area[0]  # radius 0.6 -> 1.4 of the base: area x 5.4


def test_shipped_pipeline_geometry_and_size():
    import json

    files = [p for p in REFERENCE_PIPELINE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    assert max(p.stat().st_size for p in files) <= 15 * 10**6
    transformer = json.loads((REFERENCE_PIPELINE / "transformer" / "config.json").read_text())
    vae = json.loads((REFERENCE_PIPELINE / "vae" / "config.json").read_text())
    latent_frames = (NUM_FRAMES - 1) // 2 ** sum(vae["temperal_downsample"]) + 1
    spatial = 2 ** len(vae["temperal_downsample"]) * transformer["patch_size"][1]
    assert latent_frames * (HEIGHT // spatial) * (WIDTH // spatial) == 2304
    assert len(vae["latents_mean"]) == vae["z_dim"] == transformer["in_channels"]


def test_heldout_scene_sampling_differs_from_training_stream():
    assert sample_scene(0, 0, heldout=True) != sample_scene(0, 0)


def test_bundled_training_prompts_are_training_captions():
    from nabla_convert.reference import PROMPTS_TRAIN, TRAIN_SEED

    prompts = heldout_prompts(PROMPTS_TRAIN)
    assert prompts == [s.caption() for s in sample_scenes(TRAIN_SEED, 0, len(prompts))]
    assert not any(f"{colour} {shape}" in p for p in prompts for colour, shape in HELDOUT_PAIRS)


def test_coverage_marks_the_object_pixels_and_leaves_the_frames_unchanged():
    scenes = sample_scenes(3, 0, 2)
    frames, coverage = render(scenes, 9, 64, 64, coverage=True)
    assert torch.equal(frames, render(scenes, 9, 64, 64))
    assert coverage.shape == (2, 9, 64, 64) and coverage.amax(dim=(1, 2, 3)).min() == 1  # every clip has objects
    square, square_coverage = render([_single("stays", "still")], 9, 64, 64, coverage=True)
    assert square_coverage.shape == (1, 9, 64, 64) and 0 <= square_coverage.min() <= square_coverage.max() <= 1
    red = ((square[0, 0] + 1) / 2 > 0.8) & ((square[0, 1] + 1) / 2 < 0.3)  # the red square, found by colour
    assert torch.equal(square_coverage[0] > 0.5, red)


def test_latent_coverage_takes_the_most_covered_pixel_of_each_causal_latent_cell():
    coverage = torch.rand(2, 9, 16, 24)
    cells = latent_coverage(coverage)
    assert cells.shape == (2, 1, 3, 2, 3)
    groups = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # the causal VAE: frame 0 alone, then 4 frames per latent frame
    for b in range(2):
        for t, frames in enumerate(groups):
            for i in range(2):
                for j in range(3):
                    block = coverage[b, frames, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
                    assert cells[b, 0, t, i, j] == block.max()


def test_weighted_flow_matching_loss_is_the_weighted_mean_of_the_squared_error():
    class Oracle(torch.nn.Module):  # predicts a fixed velocity, whatever the input
        dtype = torch.float32

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            return (prediction,)

    latents, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    prediction = torch.randn(2, 4, 3, 4, 4)
    sigmas, embeds = torch.tensor([0.3, 0.8]), torch.zeros(2, 5, 8)
    error = (prediction - (noise - latents)) ** 2
    plain = flow_matching_loss(Oracle(), latents, embeds, sigmas, noise)
    torch.testing.assert_close(plain, error.mean(dim=(1, 2, 3, 4)))
    ones = flow_matching_loss(Oracle(), latents, embeds, sigmas, noise, torch.ones(2, 1, 3, 4, 4))
    torch.testing.assert_close(ones, plain)
    weight = 1 + 4 * (torch.rand(2, 1, 3, 4, 4) > 0.7).float()
    weighted = flow_matching_loss(Oracle(), latents, embeds, sigmas, noise, weight)
    for b in range(2):
        w = weight[b].expand(4, -1, -1, -1)
        torch.testing.assert_close(weighted[b], (w * error[b]).sum() / w.sum())
