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
    SHAPES,
    VOCABULARY,
    ZOOM,
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
    assert len(training_pairs) == len(COLOURS) * len(SHAPES) - len(HELDOUT_PAIRS)  # every other pair is seen
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLOURS) and {s for _, s in HELDOUT_PAIRS} == set(SHAPES)
    assert all((s.objects[0].colour, s.objects[0].shape) in HELDOUT_PAIRS for s in heldout_scenes())


def test_bundled_heldout_prompts_are_the_heldout_scene_captions():
    assert heldout_prompts() == [scene.caption() for scene in heldout_scenes()]


def test_captions_use_the_whole_vocabulary_and_tokenize_without_unknowns():
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_PIPELINE / "tokenizer")
    captions = [s.caption() for s in sample_scenes(1, 0, 2000)] + heldout_prompts()
    assert {w for c in captions for w in c.split()} == set(VOCABULARY)  # every word is used, no other
    assert len(VOCABULARY) >= 90
    ids = tokenizer(captions)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    text_encoder = json.loads((REFERENCE_PIPELINE / "text_encoder" / "config.json").read_text())
    assert text_encoder["vocab_size"] == len(tokenizer) == len(VOCABULARY) + 3  # a row per word and special token


def _single(
    motion: str,
    detail: str = "",
    speed: str = "",
    shape: str = "square",
    zoom: str = "",
    hollow: bool = False,
    start: tuple[float, float] = (0.5, 0.5),
) -> Scene:
    obj = SceneObject("red", shape, "big", motion, detail, speed, start, (0.0, 0.0), 0.0, hollow)
    return Scene((obj,), "black", "", (0.0,) * 6, zoom)


def _red_mask(video: torch.Tensor) -> torch.Tensor:
    """(T, H, W) mask of the red object in one rendered clip (3, T, H, W) in [-1, 1], found by colour."""
    rgb = (video + 1) / 2
    return (rgb[0] > 0.8) & (rgb[1] < 0.3)


def _red_pixels(scene: Scene, frames: int = 9) -> torch.Tensor:
    """(frames, 64, 64) mask of the red object of `scene`."""
    return _red_mask(render([scene], frames, 64, 64)[0])


def _centroids(red: torch.Tensor) -> torch.Tensor:
    """(frames, 2) mean (x, y) pixel of each frame's mask."""
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    area = red.flatten(1).sum(1)
    return torch.stack([(red * xs).flatten(1).sum(1) / area, (red * ys).flatten(1).sum(1) / area], dim=1)


def test_render_draws_the_captioned_colour_and_motion():
    clip = render([_single("moves", "left", "quickly")], 9, 64, 64)[0]
    centroid_x = _centroids(_red_mask(clip))[:, 0]
    assert centroid_x[8] < centroid_x[0] - 10  # moved left by 0.6 frame widths: about 38 pixels
    video = (clip + 1) / 2  # (3, T, H, W) in [0, 1]
    assert torch.allclose(video[:, 0, 32, 30], torch.tensor(COLOURS["red"]), atol=1e-6)
    assert video[:, 0, 2, 60].max() < 0.15  # black background far from the object


def test_turns_changes_colour_and_grows_changes_area():
    turning = (render([_single("turns", "blue")], 9, 64, 64)[0] + 1) / 2
    assert torch.allclose(turning[:, -1, 32, 32], torch.tensor(COLOURS["blue"]), atol=1e-6)
    growing = (render([_single("grows", shape="circle")], 9, 64, 64)[0] + 1) / 2
    area = (growing[0] > 0.8).flatten(1).sum(1)
    assert area[-1] > 4 * area[0]  # radius 0.6 -> 1.4 of the base: area x 5.4


def test_zoom_magnifies_the_whole_frame_by_ZOOM():
    still = _red_pixels(_single("stays", "still")).flatten(1).sum(1).float()
    zoom_in = _red_pixels(_single("stays", "still", zoom="in")).flatten(1).sum(1).float()
    zoom_out = _red_pixels(_single("stays", "still", zoom="out")).flatten(1).sum(1).float()
    assert zoom_in[0] == still[0] and zoom_out[-1] == still[-1]
    torch.testing.assert_close(zoom_in[-1] / still[-1], torch.tensor(ZOOM**2), rtol=0.05, atol=0)
    torch.testing.assert_close(zoom_out[0] / still[0], torch.tensor(ZOOM**2), rtol=0.05, atol=0)


def test_opacity_motions_hide_and_show_the_same_drawing():
    still = _red_pixels(_single("stays", "still"), 33)
    fades, appears, blinks = (_red_pixels(_single(m), 33) for m in ("fades", "appears", "blinks"))
    assert torch.equal(fades[0], still[0]) and not fades[-1].any()
    assert not appears[0].any() and torch.equal(appears[-1], still[-1])
    shown = blinks.flatten(1).any(1)
    assert 6 <= (~shown).sum() <= 16 and torch.equal(blinks[shown], still[shown])  # off a third of the time


def test_hollow_shapes_are_outlines_of_the_solid_ones():
    for shape in ("square", "heart", "crescent"):
        solid = _red_pixels(_single("stays", "still", shape=shape))[0]
        hollow = _red_pixels(_single("stays", "still", shape=shape, hollow=True))[0]
        assert not (hollow & ~solid).any()  # inside the solid shape
        assert 0.3 * solid.sum() < hollow.sum() < 0.8 * solid.sum()  # less its shrunk copy (0.62^2 of the area)
    assert not _red_pixels(_single("stays", "still", hollow=True))[0, 32, 32]  # the centre shows the background


def test_paths_of_falling_jumping_circling_and_zigzagging_objects():
    fall = _centroids(_red_pixels(_single("falls", start=(0.5, 0.25)), 17))
    steps = fall[1:, 1] - fall[:-1, 1]
    assert (steps >= 0).all() and steps[-4:].sum() > 3 * steps[:4].sum()  # always down, accelerating
    torch.testing.assert_close(fall[-1, 1] - fall[0, 1], torch.tensor(0.5 * 64), atol=1, rtol=0)  # FALL_DISTANCE
    jump = _centroids(_red_pixels(_single("jumps"), 17))
    assert (jump[:, 1] <= jump[0, 1] + 0.5).all() and jump[:, 1].min() < jump[0, 1] - 8  # hops up from its line
    circle = _centroids(_red_pixels(_single("circles"), 17))
    centre = torch.tensor([31.5, 31.5])
    torch.testing.assert_close(circle[-1], circle[0], atol=0.6, rtol=0)  # one full turn
    radius = (circle - centre).norm(dim=1)
    assert (radius - radius.mean()).abs().max() < 1.5 and radius.mean() > 6  # CIRCLE_RADIUS x 64 = 9 pixels
    zigzag = _centroids(_red_pixels(_single("zigzags", "right"), 33))
    assert (zigzag[1:, 0] > zigzag[:-1, 0]).all()  # steadily right
    turns = ((zigzag[2:, 1] - zigzag[1:-1, 1]) * (zigzag[1:-1, 1] - zigzag[:-2, 1]) < 0).sum()
    assert 4 <= turns <= 6  # three up-down strokes


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
    red = _red_mask(square[0])
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
