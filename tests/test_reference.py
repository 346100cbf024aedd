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
