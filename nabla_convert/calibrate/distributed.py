"""Data-parallel calibration: the samples (prompt x seed) shared over the processes of `accelerate launch` / `torchrun`.

The samples still to measure are dealt out in rounds of one per process, in sample order: process p runs the p-th
sample of each round. Process 0 therefore runs the first sample left (sample 0 of a fresh run, whose pooled block
maps the report plots) and has work in every round. At every measured step all processes exchange that step's
records with accelerate's collectives (sizes padded, then an all-gather; tensors, no pickle) and insert them into
their stats in sample order. A sample's records depend on its seed alone, not on the process that measured them,
so the merged stats are those of one process on the same samples, bit for bit.

Only process 0 writes, and only inside --out: it rewrites the stats file after every exchanged step, as one process
does after every step. The stats file is the only state: a killed run resumes from it like a one-process run, with
any number of processes (samples measured at every step are kept, the others are measured again).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nabla_convert.errors import DeviceError

RECORD_NUMBERS = ("sample", "step", "local_step")
RECORD_TENSORS = ("density", "err_num", "err_den")


def launched_processes() -> int:
    """How many processes this launch started (`accelerate launch` and `torchrun` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Processes:
    """This process's place among the calibrating processes; one process exchanges nothing."""

    index: int = 0
    count: int = 1

    @classmethod
    def launched(cls, device: str) -> tuple[Processes, str]:
        """The processes of this launch and the device this one calibrates on (each process takes its own GPU)."""
        if launched_processes() <= 1:
            return cls(), device
        if device not in ("auto", "cuda", "cpu"):
            raise DeviceError(
                f"--device {device} with {launched_processes()} processes: each process takes its own GPU; "
                "give auto, cuda or cpu"
            )
        if device == "cuda" and not torch.cuda.is_available():
            raise DeviceError("device 'cuda' is not usable on this machine (no CUDA GPU); give auto or cpu")
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        if state.num_processes != launched_processes():  # each process would take itself for the only one
            raise DeviceError(
                f"accelerate was set up for {state.num_processes} process(es) before this launch of "
                f"{launched_processes()}; start calibrate in fresh processes"
            )
        return cls(state.process_index, state.num_processes), str(state.device)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def rounds(self, todo: Sequence[int]) -> list[list[int]]:
        """`todo` (ascending sample indices) in rounds of one sample per process."""
        return [list(todo[start : start + self.count]) for start in range(0, len(todo), self.count)]

    def pick(self, round_: Sequence[int]) -> int | None:
        """This process's sample of a round, or None when the round is shorter than the process count."""
        return round_[self.index] if self.index < len(round_) else None

    def wait(self) -> None:
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def exchange(
        self, records: dict[str, list[dict[str, Any]]], shapes: dict[str, dict[str, tuple[int, ...]]]
    ) -> dict[str, list[dict[str, Any]]]:
        """Every process's records of one step per component (process order), from this process's `records`.

        `shapes[component][key]` is the shape of one record's tensor `key`, for a process that has no record.
        """
        if self.count == 1:
            return records
        from accelerate import PartialState
        from accelerate.utils import gather, pad_across_processes

        device = PartialState().device
        names = list(shapes)
        counts = gather(torch.tensor([len(records.get(name, [])) for name in names], device=device))
        counts = counts.view(self.count, len(names)).cpu()
        merged: dict[str, list[dict[str, Any]]] = {}
        for column, name in enumerate(names):
            if counts[:, column].max() == 0:
                continue
            local = records.get(name, [])
            packed = {
                "numbers": torch.tensor([[r[k] for k in RECORD_NUMBERS] for r in local], dtype=torch.int64),
                **{
                    key: torch.stack([r[key] for r in local])
                    if local
                    else torch.zeros((0, *shapes[name][key]), dtype=torch.float64)
                    for key in RECORD_TENSORS
                },
            }
            packed["numbers"] = packed["numbers"].view(-1, len(RECORD_NUMBERS))
            padded = pad_across_processes({key: value.to(device) for key, value in packed.items()})
            rows = padded["numbers"].shape[0]
            everyone = {key: value.cpu() for key, value in gather(padded).items()}
            merged[name] = [
                {
                    **dict(zip(RECORD_NUMBERS, everyone["numbers"][process * rows + row].tolist(), strict=True)),
                    **{key: everyone[key][process * rows + row] for key in RECORD_TENSORS},
                }
                for process in range(self.count)
                for row in range(int(counts[process, column]))
            ]
        return merged


ONE_PROCESS = Processes()
