"""NABLA under diffusers' context parallelism (Ulysses), for any model family.

diffusers splits a model's token sequence across ranks (`ContextParallelConfig`,
`ModelMixin.enable_parallelism` and the model's `_cp_plan`). Ulysses then exchanges Q, K and V
with one all-to-all so that each rank holds the whole sequence for H/N heads, runs attention, and
exchanges the output back. NABLA selects key blocks per head from the whole sequence, so it runs
unchanged inside that exchange: `ulysses_attention` hands diffusers' own Ulysses templates
(`TemplatedUlyssesAttention`, or `TemplatedUlyssesAnythingAttention` for uneven splits) a forward
op that runs NABLA. No communication is written here.

The sequence a family adapter splits is already in tile order, padded when needed so that it
divides by the Ulysses degree (`sequence_multiple`): every rank gets an equal share, and after the
all-to-all each rank sees exactly the single-GPU tile-order sequence (plus at most degree-1 padding
tiles). With `ulysses_anything=True` the head count need not divide by the degree (diffusers pads heads).

What a family gives (models/family.py), with no code here: `context_parallel_plan`, the `_cp_plan`
whose split hooks wrap its tile-order hooks (split_output on the modules that emit the stream and
everything indexed by its tokens, e.g. RoPE); a gather (`gather_sequence`) in the hook that returns
tokens to raster order, or a `ContextParallelOutput` in the plan before it; and, if the default is
wrong, `local_attention`, the attention modules that run on each rank's own tokens (text, cross-attention).

Joint text-video attention (MM-DiT families such as HunyuanVideo) needs nothing more from a family: the
text is whole on every rank and is not split; after the all-to-all each rank appends the text of its own
heads (`local_heads`) to the whole video stream of those heads, runs the same joint attention as one
process, and the text output of every head comes back by an all-gather over heads (`gather_heads`).

Ring attention is not supported. It splits the key axis: each rank attends its queries to one key
chunk at a time and merges partial results by their log-sum-exp. A NABLA row keeps the smallest set
of key blocks holding a share of the softmax mass over *all* key blocks of the row, which no rank can
compute from its own chunk; diffusers' ring template calls the attention op once per chunk without
saying which chunk it is. Use Ulysses (its degree must divide the head count, or set
`ulysses_anything=True`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder
from diffusers.models._modeling_parallel import ParallelConfig
from diffusers.models.attention_dispatch import TemplatedUlyssesAnythingAttention, TemplatedUlyssesAttention

RING_UNSUPPORTED = (
    "NABLA cannot run under ring attention (ring_degree > 1): ring attention splits the key axis, and a NABLA row "
    "selects key blocks by their share of the whole row's softmax mass; use ContextParallelConfig(ulysses_degree=N)"
)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def context_parallel_config(model: torch.nn.Module) -> ParallelConfig | None:
    """The model's diffusers parallel config when context parallelism is on (None otherwise).

    Raises ValueError for the strategies NABLA cannot run under (ring attention).
    """
    config = getattr(model, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return None
    if config.context_parallel_config.ring_degree > 1:
        raise ValueError(RING_UNSUPPORTED)
    return config


def sequence_multiple(config: ParallelConfig | None) -> int:
    """What the padded sequence must divide by: the Ulysses degree, so that every rank gets an equal share.

    Also under `ulysses_anything` (which would accept uneven shares): equal shares keep every
    collective even (gloo cannot gather uneven tensors), and cost at most degree-1 padding tiles.
    """
    return 1 if config is None else config.context_parallel_config.ulysses_degree


def shard_sequence(x: torch.Tensor, config: ParallelConfig, dim: int = 1) -> torch.Tensor:
    """This rank's share of a full sequence along `dim`, split exactly as diffusers' split hooks split it."""
    cp = config.context_parallel_config
    if cp.ulysses_anything:
        return PartitionAnythingSharder.shard_anything(x, dim, cp._flattened_mesh)
    return EquipartitionSharder.shard(x, dim, cp._flattened_mesh)


def gather_sequence(x: torch.Tensor, config: ParallelConfig, dim: int = 1) -> torch.Tensor:
    """The full sequence along `dim` from every rank's share, gathered as diffusers' gather hooks gather it."""
    cp = config.context_parallel_config
    if cp.ulysses_anything:
        return PartitionAnythingSharder.unshard_anything(x, dim, cp._flattened_mesh)
    return EquipartitionSharder.unshard(x, dim, cp._flattened_mesh)


def local_heads(x: torch.Tensor, config: ParallelConfig | None, heads: int, dim: int = 1) -> torch.Tensor:
    """This rank's `heads` of x, which holds every head along `dim`, as diffusers' Ulysses all-to-all deals them.

    Rank r holds the heads [r * ceil(H / degree), ...), the last rank fewer when the degree does not
    divide H (`ulysses_anything` pads heads at the end). Without context parallelism: x.
    """
    if config is None:
        return x
    cp = config.context_parallel_config
    return x.narrow(dim, cp._ulysses_local_rank * -(-x.shape[dim] // cp.ulysses_degree), heads)


def gather_heads(x: torch.Tensor, config: ParallelConfig | None, num_heads: int, dim: int = 1) -> torch.Tensor:
    """Every head along `dim` from each rank's `local_heads` chunk (the inverse; without context parallelism: x).

    Each chunk is padded to ceil(H / degree) heads first, so that the all-gather is even (gloo cannot
    gather uneven tensors) and the padding lands after the last real head, where it is cut off.
    """
    if config is None:
        return x
    chunk = -(-num_heads // config.context_parallel_config.ulysses_degree)
    x = F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, chunk - x.shape[dim]))
    return gather_sequence(x, config, dim).narrow(dim, 0, num_heads)


def ulysses_attention(
    attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ParallelConfig | None
) -> torch.Tensor:
    """`attend` over the whole sequence for this rank's tokens: q, k, v (B, H, S_local, D) -> (B, H, S_local, D).

    `attend` takes q, k, v (B, H, S, D) and returns (B, H, S, D). Without context parallelism it
    gets the tensors as they are; with it, diffusers' Ulysses all-to-all first gives it the whole
    sequence for this rank's heads, and its output goes back to this rank's tokens. Inference only.
    """
    if config is None:
        return attend(q, k, v)
    cp = config.context_parallel_config
    if cp.ring_degree > 1:
        raise ValueError(RING_UNSUPPORTED)
    heads = q.shape[1]
    if heads % cp.ulysses_degree and not cp.ulysses_anything:
        raise ValueError(
            f"{heads} attention heads do not split over ulysses_degree={cp.ulysses_degree}; "
            "use a degree that divides the head count or ContextParallelConfig(..., ulysses_anything=True)"
        )

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, **_):
        if return_lse:
            raise ValueError("NABLA attention does not return the log-sum-exp")
        return attend(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)

    def backward_op(ctx, grad_out, *args, **kwargs):
        raise NotImplementedError("NABLA under context parallelism is inference-only (no backward)")

    template = TemplatedUlyssesAnythingAttention if cp.ulysses_anything else TemplatedUlyssesAttention
    query, key, value = (t.transpose(1, 2) for t in (q, k, v))  # diffusers' layout (B, S, H, D)
    out = template.apply(query, key, value, None, 0.0, False, None, False, False, forward_op, backward_op, config)
    return out.transpose(1, 2)


@contextmanager
def cpu_counts_as_device() -> Iterator[None]:
    """Let diffusers set up context parallelism on a CPU-only machine (gloo), e.g. for tests.

    diffusers 0.42.1 places rank r on `device_type:(r % torch.accelerator.device_count())`, a division
    by zero when the accelerator is the CPU; inside this block the CPU counts as one device. Nothing
    else changes: the mesh, hooks and collectives are diffusers' and torch's own.
    """
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield
