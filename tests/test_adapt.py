"""adapt on a tiny converted Wan: data format, timestep sampling, distillation, resume, LoRA, outputs.

The tiny model's self-attention is made to matter (sharper q/k, larger output projection), as in
a trained model; with the stock random init attention is near-uniform and contributes ~nothing, so
sparse and dense outputs would agree to 1e-4 and there would be nothing to adapt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file

from nabla_convert import NablaConfig, NablaWanTransformer3DModel, convert, load
from nabla_convert.adapt import AdaptError, AdaptSettings, DataError, LatentDataset, adapt, write_latent_shard
from nabla_convert.adapt.data import MicroBatches, TimestepSampler, sample_positions, training_loader
from nabla_convert.adapt.losses import relative_error, weighted_mse
from nabla_convert.models.tiny import tiny_wan_pipeline

PROMPTS = "a red ball bounces\na blue cube moves left\na green field with the sky\na white circle rotates\n"
TINY = {"latent_shape": (2, 16, 32), "rollout_steps": 3, "text_length": 8, "validation_samples": 2}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapt")
    pipe = tiny_wan_pipeline(0)
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            block.attn1.norm_q.weight.mul_(3)
            block.attn1.norm_k.weight.mul_(3)
            block.attn1.to_out[0].weight.mul_(4)
    pipe.save_pretrained(root / "dense")
    (root / "prompts.txt").write_text(PROMPTS)
    return convert(root / "dense", root / "converted", NablaConfig(threshold=0.3))


def settings(converted: Path, **overrides) -> AdaptSettings:
    return AdaptSettings(prompts=str(converted.parent / "prompts.txt"), warmup_steps=0, **{**TINY, **overrides})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out.parent / f"{out.name}.run" / "metrics.jsonl").read_text().splitlines()]


def dense_vs_sparse_error(sparse: torch.nn.Module, dense: torch.nn.Module) -> float:
    """Relative error of a NABLA transformer against the dense original, on fresh inputs the run never saw."""
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(4, 16, 2, 16, 32, generator=generator)
    embeds = torch.randn(4, 8, 32, generator=generator)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0])
    with torch.no_grad():
        prediction = sparse(latents, timesteps, embeds, return_dict=False)[0]
        reference = dense(latents, timesteps, embeds, return_dict=False)[0]
    return float(relative_error(prediction, reference).mean())


def test_latent_dataset_reads_shards_in_order_and_rejects_mismatches(tmp_path):
    latents, embeds = torch.randn(5, 16, 2, 8, 8), torch.randn(5, 6, 32)
    write_latent_shard(tmp_path / "data" / "a.safetensors", latents[:3], embeds[:3])
    write_latent_shard(tmp_path / "data" / "b.safetensors", latents[3:], embeds[3:])
    dataset = LatentDataset(tmp_path / "data")
    assert len(dataset) == 5 and dataset.latent_shape == (16, 2, 8, 8)
    batch = dataset.batch([4, 0])
    assert torch.equal(batch["latents"], latents[[4, 0]]) and torch.equal(batch["prompt_embeds"], embeds[[4, 0]])
    write_latent_shard(tmp_path / "data" / "c.safetensors", torch.randn(1, 16, 2, 8, 4), torch.randn(1, 6, 32))
    with pytest.raises(DataError, match="per-sample shape"):
        LatentDataset(tmp_path / "data")
    with pytest.raises(DataError, match="same N"):
        write_latent_shard(tmp_path / "x.safetensors", latents, embeds[:2])
    with pytest.raises(DataError, match="no latent shards"):
        LatentDataset(tmp_path / "empty")


def test_sample_order_visits_every_sample_once_per_epoch():
    order = sample_positions(seed=3, size=7, first=0, count=21)
    for epoch in range(3):
        assert sorted(order[epoch * 7 : (epoch + 1) * 7]) == list(range(7))
    assert order[5:9] == sample_positions(seed=3, size=7, first=5, count=4)  # a function of the position alone
    assert order[:7] != order[7:14]


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_timestep_sampler_matches_the_flow_matching_formula(scheme):
    shift = 5.0
    sampler = TimestepSampler(weighting_scheme=scheme, shift=shift)
    sigmas, timesteps = sampler.sample(64, torch.Generator().manual_seed(0))
    u = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=torch.Generator().manual_seed(0)
    )
    raw = 1 - (u * 1000).long() / 1000  # index i of the training schedule has unshifted sigma (1000 - i) / 1000
    expected = shift * raw / (1 + (shift - 1) * raw)
    torch.testing.assert_close(sigmas, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(timesteps, sigmas * 1000, atol=1e-2, rtol=1e-5)
    high = TimestepSampler(shift=shift, sigma_range=(0.9, 1.0)).sample(64, torch.Generator().manual_seed(1))[0]
    assert high.min() >= 0.9


def test_weighted_mse_is_the_sd3_weighting_of_per_sample_mse():
    prediction, target = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(weighted_mse(prediction, target, sigmas, "none"), per_sample.mean())
    torch.testing.assert_close(weighted_mse(prediction, target, sigmas, "sigma_sqrt"), (per_sample / sigmas**2).mean())


def test_settings_reject_bad_input():
    with pytest.raises(AdaptError, match="unknown adapt settings"):
        AdaptSettings.from_dict({"stepz": 3})
    with pytest.raises(AdaptError, match="needs a latent dataset"):
        AdaptSettings(loss="flow")
    assert AdaptSettings.from_dict({"steps": 5, "lr": 1e-3}, lr=None, steps=7).steps == 7


@pytest.mark.slow
def test_distillation_lowers_the_student_teacher_error(converted, tmp_path):
    out = tmp_path / "adapted"
    assert adapt(converted, out, settings(converted, steps=30, lr=1e-3, validate_every=10), progress=False) == out
    log = records(out)
    validations = [r for r in log if r.get("kind") == "validation"]
    assert [r["step"] for r in validations] == [0, 10, 20, 30]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))
    before, after = validations[0]["student_teacher_error"], validations[-1]["student_teacher_error"]
    assert before > 0.05  # the sparse model starts measurably off its dense teacher
    assert after < 0.85 * before

    # Independent of the run's own metric: the saved model is closer to the dense original on unseen inputs.
    dense = WanTransformer3DModel.from_pretrained(converted.parent / "dense" / "transformer")
    original = load(converted / "transformer")
    adapted = load(out / "transformer")
    assert dense_vs_sparse_error(adapted, dense) < 0.9 * dense_vs_sparse_error(original, dense)

    nabla = json.loads((out / "transformer" / "config.json").read_text())["_nabla"]
    assert nabla["threshold"] == 0.3
    adaptation = nabla["provenance"]["adaptation"]
    assert adaptation["steps"] == 30 and adaptation["loss"] == "distill" and adaptation["lora_rank"] == 0
    assert adaptation["student_teacher_error_after"] == pytest.approx(after)
    assert nabla["provenance"]["tool"] == "nabla-convert"  # convert's provenance is kept
    report = json.loads((out / "nabla_reports" / "adapt.json").read_text())
    assert report["summary"]["student_teacher_error_before"] == pytest.approx(before)
    pipe = load(out)
    assert isinstance(pipe.transformer, NablaWanTransformer3DModel)
    assert (out / "vae").is_dir() and (out / "text_encoder").is_dir()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(converted, tmp_path):
    """Stop after 2 of 4 steps (with a checkpoint), resume in a new process via the CLI: same weights as one go.

    Tolerance: exact on CPU in practice (every draw is a function of the step); 1e-6 allowed for thread-order noise.
    """
    plan = settings(converted, steps=4, lr=1e-3, validate_every=0, checkpoint_every=0)
    adapt(converted, tmp_path / "whole", plan, progress=False)
    assert adapt(converted, tmp_path / "split", plan, stop_after=2, progress=False) is None
    assert sorted(p.name for p in (tmp_path / "split.run" / "checkpoints").iterdir()) == ["step-000002"]
    with pytest.raises(AdaptError, match="--resume"):
        adapt(converted, tmp_path / "split", plan, progress=False)

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({"nabla": {"threshold": 0.3}, "adapt": plan.to_dict()}))
    command = "from nabla_convert.cli import main; main()"
    args = ["adapt", str(converted), "--out", str(tmp_path / "split"), "--recipe", str(recipe), "--resume"]
    result = subprocess.run([sys.executable, "-c", command, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote adapted NABLA checkpoint" in result.stdout

    whole = load_file(tmp_path / "whole" / "transformer" / "diffusion_pytorch_model.safetensors")
    split = load_file(tmp_path / "split" / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(converted / "transformer" / "diffusion_pytorch_model.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=0)
    assert any(not torch.equal(whole[name], original[name]) for name in whole)
    steps = [r["step"] for r in records(tmp_path / "split") if "loss" in r]
    assert steps == list(range(1, 5))
    assert [r["loss"] for r in records(tmp_path / "split") if "loss" in r] == pytest.approx(
        [r["loss"] for r in records(tmp_path / "whole") if "loss" in r], rel=1e-5
    )


@pytest.mark.slow
def test_lora_saves_adapters_and_merges_them_into_a_stock_loadable_checkpoint(converted, tmp_path):
    out = tmp_path / "lora"
    adapt(converted, out, settings(converted, steps=3, lr=2e-2, lora_rank=4, validate_every=0), progress=False)
    adapters = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)

    pipe = WanPipeline.from_pretrained(out)  # stock pipeline class; the checkpoint names the NABLA transformer
    merged = pipe.transformer
    assert isinstance(merged, NablaWanTransformer3DModel)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (
        json.loads((out / "transformer" / "config.json").read_text())["_nabla"]["provenance"]["adaptation"]["lora_rank"]
        == 4
    )

    reference = NablaWanTransformer3DModel.from_pretrained(converted / "transformer")
    base = NablaWanTransformer3DModel.from_pretrained(converted / "transformer")
    reference.load_lora_adapter(str(out / "lora"), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    inputs = (torch.randn(2, 16, 2, 16, 32), torch.tensor([800.0, 300.0]), torch.randn(2, 8, 32))
    with torch.no_grad():
        expected = reference(*inputs, return_dict=False)[0]
        got = merged(*inputs, return_dict=False)[0]
        unadapted = base(*inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (expected - unadapted).abs().max() > 1e-4  # the adapters changed the model


@pytest.mark.slow
def test_flow_matching_on_a_latent_dataset(converted, tmp_path):
    generator = torch.Generator().manual_seed(0)
    write_latent_shard(
        tmp_path / "data" / "shard-0.safetensors",
        torch.randn(5, 16, 2, 16, 32, generator=generator),
        torch.randn(5, 8, 32, generator=generator),
    )
    out = tmp_path / "flow"
    plan = settings(converted, steps=2, loss="flow", data=str(tmp_path / "data"), validate_every=0)
    adapt(converted, out, plan, progress=False)
    validations = [r for r in records(out) if r.get("kind") == "validation"]
    assert [r["step"] for r in validations] == [0, 2]
    assert all(r["heldout_loss"] > 0 for r in validations)
    provenance = json.loads((out / "transformer" / "config.json").read_text())["_nabla"]["provenance"]
    assert provenance["adaptation"]["loss"] == "flow"
    assert not (out.parent / "flow.run" / "rollouts").exists()  # a dataset run makes no teacher rollouts


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_with_their_joint_batch(converted, tmp_path):
    """DDP over 2 CPU processes (gloo) with batch 1 each == one process with batch 2: same samples, noise and
    timesteps (drawn per global sample number), gradients averaged over the same 2 samples."""
    plan = settings(converted, steps=4, lr=1e-3, validate_every=0, checkpoint_every=2, batch_size=1)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({"nabla": {"threshold": 0.3}, "adapt": plan.to_dict()}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, "-m", "nabla_convert.cli", "adapt", str(converted), "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "--recipe", str(recipe)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote adapted NABLA checkpoint") == 1  # one line per run, not per process

    adapt(converted, tmp_path / "one", replace(plan, batch_size=2), progress=False)
    ddp = load_file(tmp_path / "ddp" / "transformer" / "diffusion_pytorch_model.safetensors")
    one = load_file(tmp_path / "one" / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(converted / "transformer" / "diffusion_pytorch_model.safetensors")
    # Float summation order differs (gloo all-reduce vs one batch); Adam turns that into update noise where a
    # gradient is ~0, bounded by its step size: lr 1e-3 x 4 steps. Distinct noise or samples differ by ~1e-3.
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-4, rtol=0)
    differences = torch.cat([(ddp[name] - one[name]).abs().flatten() for name in one])
    assert differences.mean() < 1e-7
    assert max((one[name] - original[name]).abs().max() for name in one) > 1e-3  # the runs did train
    ddp_losses = [r["loss"] for r in records(tmp_path / "ddp") if "loss" in r]
    assert len(ddp_losses) == 4  # the metrics log is written once, by the main process
    assert ddp_losses == pytest.approx([r["loss"] for r in records(tmp_path / "one") if "loss" in r], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "ddp.run" / "rollouts").glob("*.safetensors")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]


def test_training_loader_reads_each_micro_batch_of_the_loop_from_worker_processes(tmp_path):
    """The DataLoader (two workers, two shards) yields the rows the loop asks for, step after step, micro-step after
    micro-step, for one process of several; a loader started at a later step (resume) yields the tail."""
    latents, embeds = torch.randn(6, 4, 2, 4, 4), torch.randn(6, 3, 8)
    write_latent_shard(tmp_path / "a.safetensors", latents[:4], embeds[:4])
    write_latent_shard(tmp_path / "b.safetensors", latents[4:], embeds[4:])
    dataset, train = LatentDataset(tmp_path), [0, 1, 2, 4, 5]
    batches = MicroBatches(batch_size=2, grad_accum=2, world=2, rank=1)
    got = list(training_loader(dataset, train, 7, batches, range(0, 4), workers=2))
    wanted = [
        [train[p] for p in sample_positions(7, len(train), batches.first(step, micro), 2)]
        for step in range(4)
        for micro in range(2)
    ]
    assert len(got) == len(wanted) == 8
    for batch, rows in zip(got, wanted, strict=True):
        assert torch.equal(batch["latents"], latents[rows]) and torch.equal(batch["prompt_embeds"], embeds[rows])
    resumed = list(training_loader(dataset, train, 7, batches, range(2, 4)))
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(resumed, got[4:], strict=True))
