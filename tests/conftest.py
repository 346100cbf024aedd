from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def links_small_files(monkeypatch):
    """convert hard-links weight files of any size, as it does a large model's shards (the tiny models' files are
    below LINK_MIN_BYTES, so convert would copy them)."""
    monkeypatch.setattr(importlib.import_module("nabla_convert.convert"), "LINK_MIN_BYTES", 0)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A dense tiny WanPipeline saved to disk (transformer sharded to check that sharding survives)."""
    from nabla_convert.models.tiny import tiny_wan_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    pipe = tiny_wan_pipeline(seed=0)
    pipe.save_pretrained(path)
    pipe.transformer.save_pretrained(path / "transformer", max_shard_size="100KB")
    return path


def generate(pipe, seed: int = 0, height: int = 256, width: int = 256, num_frames: int = 9, steps: int = 2):
    """Two CFG steps to latents: the comparison every pipeline test uses."""
    return pipe(
        "a red ball moves left",
        negative_prompt="blue cube",
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=3.0,
        output_type="latent",
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
    ).frames
