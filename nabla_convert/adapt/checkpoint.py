"""Resume state of an adapt run without pickle: tensors in safetensors, everything else in JSON.

checkpoints/step-NNNNNN/ holds
  trainable.safetensors  the trainable parameters (the whole student, or its LoRA adapters) by name;
  optimizer.safetensors  each parameter's optimizer state tensors, named "<parameter>/<state>";
  state.json             the step, the optimizer's param groups, the lr scheduler's and (fp16) the grad scaler's state.
Full state dicts are gathered with torch.distributed.checkpoint.state_dict, so one format serves one process, DDP
and FSDP; the main process writes, every process reads. Nothing else in the folder is ever opened: a pickle
planted there, or the accelerate save_state files of an older version, are never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nabla_convert.errors import NablaError

FORMAT = "nabla-convert adapt checkpoint v1"
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"


class CheckpointError(NablaError, ValueError):
    """A checkpoint folder that is not one this module wrote."""


def save_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, step: int, folder: Path
) -> None:
    """Gather the full state (a collective: every process calls this) and write it to `folder` from the main one."""
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not accelerator.is_main_process:
        return
    trainable = {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in model_state.items() if name in trainable}, folder / TRAINABLE)
    tensors = {
        f"{name}/{key}": torch.as_tensor(value).contiguous()
        for name, entries in optimizer_state["state"].items()
        for key, value in entries.items()
    }
    save_file(tensors, folder / OPTIMIZER)
    state = {
        "format": FORMAT,
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    (folder / STATE).write_text(json.dumps(state, indent=1) + "\n")


def load_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, folder: Path
) -> int:
    """Restore what save_checkpoint wrote into the prepared model, optimizer and scheduler; return the step."""
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        state = None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder} is not a nabla-convert checkpoint ({STATE} missing or foreign; an older version wrote "
            "accelerate's pickle files, which are never loaded): remove it to restart from the one before, or from 0"
        )
    optimizer_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, tensor in load_file(folder / OPTIMIZER).items():
        name, entry = key.rsplit("/", 1)
        optimizer_state["state"].setdefault(name, {})[entry] = tensor
    set_state_dict(
        model,
        optimizer,
        model_state_dict=load_file(folder / TRAINABLE),
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])
