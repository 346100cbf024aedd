"""The embedded reference model: a small Wan text-to-video pipeline trained on procedural scenes.

Its attention learned real, mostly local structure, so NABLA density and quality measured on it mean something.
`REFERENCE_PIPELINE` is a stock diffusers WanPipeline folder; the held-out prompts name colour-shape pairs that the
model never saw in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nabla_convert.errors import InputFileError
from nabla_convert.io import read_prompts

if TYPE_CHECKING:  # the scene generator needs torch; the constants here serve command-line defaults without it
    from nabla_convert.reference.scenes import Scene

REFERENCE_PIPELINE = Path(__file__).parent / "pipeline"
PROMPTS_TRAIN = Path(__file__).parent / "prompts_train.txt"  # captions of the first training clips (calibration)
PROMPTS_HELDOUT = Path(__file__).parent / "prompts_heldout.txt"
HEIGHT, WIDTH, NUM_FRAMES = 256, 256, 33  # latents 16 x 9 x 32 x 32; 9 x 16 x 16 = 2,304 video tokens
TRAIN_SEED, HELDOUT_SEED, HELDOUT_COUNT = 7, 1234, 32
RECOMMENDED_STEPS, RECOMMENDED_GUIDANCE = 12, 5.0


def default_model() -> str:
    """The embedded reference pipeline, used when a command's MODEL is omitted."""
    if not (REFERENCE_PIPELINE / "model_index.json").is_file():
        raise InputFileError(f"no MODEL given and the embedded reference model is missing at {REFERENCE_PIPELINE}")
    return str(REFERENCE_PIPELINE)


def heldout_scenes(count: int = HELDOUT_COUNT) -> list[Scene]:
    """The scenes whose captions are prompts_heldout.txt, in order."""
    from nabla_convert.reference.scenes import sample_scenes

    return sample_scenes(HELDOUT_SEED, 0, count, heldout=True)


def heldout_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts of a file (one per line, blank lines skipped); the bundled held-out set when no path is given."""
    return read_prompts(path or PROMPTS_HELDOUT)


def heldout_videos(count: int = HELDOUT_COUNT, device: str = "cpu"):
    """(prompts, videos) of the held-out scenes: videos (count, 3, NUM_FRAMES, HEIGHT, WIDTH) in [-1, 1]."""
    from nabla_convert.reference.scenes import render

    scenes = heldout_scenes(count)
    return [scene.caption() for scene in scenes], render(scenes, NUM_FRAMES, HEIGHT, WIDTH, device)


__all__ = [
    "HEIGHT",
    "NUM_FRAMES",
    "PROMPTS_HELDOUT",
    "PROMPTS_TRAIN",
    "RECOMMENDED_GUIDANCE",
    "RECOMMENDED_STEPS",
    "REFERENCE_PIPELINE",
    "TRAIN_SEED",
    "WIDTH",
    "default_model",
    "heldout_prompts",
    "heldout_scenes",
    "heldout_videos",
]
