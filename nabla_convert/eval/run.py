"""`run_eval`: load two pipeline folders and their inputs, evaluate B against A, write the report."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from nabla_convert.convert import load_pipeline, resolve_model, transformer_components
from nabla_convert.eval.report import write_outputs
from nabla_convert.eval.sampling import EvalError, EvalResult, EvalSettings, HeldOut, evaluate
from nabla_convert.folders import check_output, public_name
from nabla_convert.io import open_safetensors
from nabla_convert.reference import heldout_prompts


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """One prompt per non-empty line; without a path, the reference model's bundled held-out prompts."""
    return heldout_prompts(path)


def load_held_out(path: str | os.PathLike) -> HeldOut:
    """Held-out latents from a safetensors file: tensor "latents" (N, C, F, H, W), metadata "prompts" (JSON list)."""
    path = Path(path)
    with open_safetensors(path, "latent file") as handle:
        if "latents" not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise EvalError(f"{path}: no tensor named 'latents'")
        latents = handle.get_tensor("latents")
        prompts = json.loads((handle.metadata() or {}).get("prompts", "null"))
    if latents.dim() != 5 or not isinstance(prompts, list) or len(prompts) != latents.shape[0]:
        raise EvalError(
            f"{path}: needs latents (N, C, F, H, W) and metadata 'prompts', a JSON list of N captions; "
            f"got latents {tuple(latents.shape)} and {type(prompts).__name__} prompts"
        )
    return HeldOut(list(latents.unbind(0)), [str(p) for p in prompts], path.name)


def pipeline_folder(path: str | os.PathLike) -> Path:
    """A local pipeline folder, or a Hub id downloaded; an error unless it has a model_index.json."""
    folder, _ = resolve_model(path)
    if not (folder / "model_index.json").is_file():
        raise EvalError(f"not a diffusers pipeline folder (no model_index.json): {path}")
    return folder


def run_eval(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prompts_file: str | os.PathLike | None = None,
    seeds: Sequence[int] = (0,),
    settings: EvalSettings | None = None,
    max_samples: int | None = None,
    latents_file: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
    overwrite: bool = False,
) -> EvalResult:
    """Load two pipeline folders, evaluate B against A and write the report files into `out_dir`.

    `out_dir` must not touch the inputs; an existing non-empty one is replaced only with `overwrite`, and only when
    nabla-convert wrote it. The report names each model by its Hub id or folder name, never its local path.
    """
    inputs = {"MODEL_A": path_a, "MODEL_B": path_b, "--prompts file": prompts_file, "--latents file": latents_file}
    check_output(out_dir, inputs, overwrite=overwrite)
    prompts = load_prompts(prompts_file)
    held_out = load_held_out(latents_file) if latents_file is not None else None
    folder_a, folder_b = pipeline_folder(path_a), pipeline_folder(path_b)
    for folder in (folder_a, folder_b):  # a supported transformer in each, checked before the slow loads
        transformer_components(folder)
    pipe_a, pipe_b = (load_pipeline(folder, device=device, dtype=dtype) for folder in (folder_a, folder_b))
    result = evaluate(
        pipe_a,
        pipe_b,
        prompts,
        seeds,
        settings,
        held_out=held_out,
        max_samples=max_samples,
        names=(public_name(path_a), public_name(path_b)),
        progress=progress,
    )
    write_outputs(result, out_dir)
    return result
