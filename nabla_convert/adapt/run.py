"""The run folder `<out>.run/` of an adapt run: its paths, the settings a resume must keep, metrics.jsonl, and the
rotation of checkpoints (each built in a temp folder and renamed into place; the format is checkpoint.py's).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from nabla_convert.adapt.checkpoint import save_checkpoint
from nabla_convert.adapt.settings import AdaptError, AdaptSettings
from nabla_convert.folders import check_links, replace_folder, staging
from nabla_convert.io import atomic_write_text

RESUMABLE_CHANGES = {"checkpoint_every", "validate_every", "keep_checkpoints", "data_workers"}


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step-*")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None


def run_folder(out: str | os.PathLike) -> Path:
    """Where a run writing `out` keeps its checkpoints, metrics and settings."""
    out = Path(out)
    return out.with_name(out.name + ".run")


class MetricsLog:
    """metrics.jsonl of the run; on resume, records past the checkpoint (lost with the kill) are dropped."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_at]
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        elif enabled:
            atomic_write_text(path, "")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def check_run_folder(paths: RunPaths, settings: AdaptSettings, resume: bool) -> None:
    check_links(paths.root, "the run folder")
    checkpoint = paths.latest_checkpoint()
    if checkpoint is not None and not resume:
        raise AdaptError(f"{paths.root} already holds checkpoints; pass --resume to continue, or remove it")
    if resume and paths.settings.is_file():
        before = json.loads(paths.settings.read_text())
        now = settings.to_dict()
        changed = sorted(
            k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES
        )
        if changed:
            raise AdaptError(f"cannot resume {paths.root} with changed settings {changed}; use the original ones")


def save_run_checkpoint(
    accelerator: Accelerator, paths: RunPaths, model, optimizer, lr_scheduler, step: int, keep: int
):
    """The run's state at `step`, built in a temp folder and renamed into place; checkpoints beyond `keep` removed."""
    final = paths.checkpoints / f"step-{step:06d}"
    if not accelerator.is_main_process:
        save_checkpoint(accelerator, model, optimizer, lr_scheduler, step, final)  # joins the gather; writes nothing
    else:
        with staging(final) as work:
            save_checkpoint(accelerator, model, optimizer, lr_scheduler, step, work / final.name)
            replace_folder(work / final.name, final)
        for old in sorted(paths.checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
