"""The probe: at the sampled steps, every candidate's block density and attention-output error, measured from the
same post-RoPE q and k inside a dense self-attention processor (so the pipeline follows its dense trajectory).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from nabla_convert.attention import (
    TileLayout,
    block_density,
    select_by_mass,
    sta_block_mask,
)
from nabla_convert.attention.blockwise import block_partials, combine_blocks
from nabla_convert.attention.flex import dense_suffix_keep, joint_validity, key_mask
from nabla_convert.attention.mask import block_scores, compose_mask, real_blocks
from nabla_convert.calibrate.plan import CalibrationError, Candidate, spread
from nabla_convert.config import (
    LayerSettings,
    NablaConfig,
)
from nabla_convert.models.nabla import NablaAttnProcessor

SCORE_BUDGET = 1 << 27  # float32 score elements per head chunk (512 MiB), bounds the error computation's memory


class Probe:
    """Accumulates one transformer's measurements for the current (sample, step)."""

    def __init__(
        self, config: NablaConfig, candidates: Sequence[Candidate], num_layers: int, num_heads: int, query_blocks: int
    ) -> None:
        self.config = config
        self.candidates = list(candidates)
        self.thresholds = sorted({c.threshold for c in self.candidates})
        self.query_blocks = query_blocks
        self.num_layers, self.num_heads = num_layers, num_heads
        self.map_layers = set(spread(4, num_layers))
        self.map_heads = spread(2, num_heads)
        self.maps: dict[int, torch.Tensor] = {}
        self.active = False
        self.capture_maps = False
        self.sample = self.step = 0
        self._reset()

    def _reset(self) -> None:
        self.calls = [0] * self.num_layers
        self.local_step: int | None = None
        self.density: list[torch.Tensor | float] = [0.0] * self.num_layers
        self.err_num: list[torch.Tensor | float] = [0.0] * self.num_layers
        self.err_den: list[torch.Tensor | float] = [0.0] * self.num_layers

    def start(self, sample: int, step: int, active: bool, capture_maps: bool = False) -> None:
        self._reset()
        self.sample, self.step, self.active, self.capture_maps = sample, step, active, capture_maps

    def _query_blocks(self, layer: int, layout: TileLayout, device: torch.device) -> torch.Tensor:
        """Sampled query block indices: uniform without replacement among blocks holding real tokens."""
        real = real_blocks(layout, self.config.q_block, "cpu").nonzero().flatten()
        key = f"{self.sample}:{self.step}:{layer}:{self.calls[layer]}".encode()
        generator = torch.Generator().manual_seed(zlib.crc32(key))
        chosen = real[torch.randperm(real.numel(), generator=generator)[: self.query_blocks]]
        return chosen.sort().values.to(device)

    @torch.no_grad()
    def measure(
        self,
        layer: int,
        local_step: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TileLayout,
        text_valid: torch.Tensor | None = None,
    ) -> None:
        """Density and sampled-row output error of every candidate for one attention call.

        With `text_valid` (B, L) the tokens past the video are text padded to whole blocks (joint attention, as
        NablaAttnProcessor.attend): the candidates select among the video blocks, text keys always count, and
        the error is over video rows.
        """
        q_block, kv_block = self.config.q_block, self.config.kv_block
        B, H, S, D = q.shape
        valid = layout.indices(q.device).valid if layout.is_padded else None
        n = layout.padded_len
        probs, kv_real = block_scores(q[:, :, :n], k[:, :, :n], q_block, kv_block, valid)
        if self.capture_maps and layer in self.map_layers and layer not in self.maps:
            self.maps[layer] = probs[0, self.map_heads].float().cpu()
        selected = {t: select_by_mass(probs, t) for t in self.thresholds}
        windows = {c.sta: sta_block_mask(layout, c.sta, q_block, kv_block, q.device) for c in self.candidates if c.sta}
        keeps = [compose_mask(selected[c.threshold], windows.get(c.sta), kv_real) for c in self.candidates]
        density = torch.stack(
            [torch.stack([block_density(keep[:, h], layout, q_block, kv_block) for h in range(H)]) for keep in keeps]
        )

        key_valid = joint_validity(valid, n, text_valid, S - n)
        if text_valid is not None:
            keeps = [dense_suffix_keep(keep, key_valid, q_block, kv_block) for keep in keeps]
            kv_real = key_valid.view(B, -1, kv_block).any(-1)[:, None, None, :]
        blocks = self._query_blocks(layer, layout, q.device)
        rows = (blocks[:, None] * q_block + torch.arange(q_block, device=q.device)).flatten()
        row_valid = (valid[rows] if valid is not None else torch.ones_like(rows, dtype=torch.bool)).float()
        err_num = q.new_zeros((len(keeps), H), dtype=torch.float32)
        err_den = q.new_zeros((H,), dtype=torch.float32)
        chunk = max(1, SCORE_BUDGET // (B * rows.numel() * S))
        for h0 in range(0, H, chunk):
            heads = slice(h0, h0 + chunk)
            scores = (q[:, heads, rows].float() @ k[:, heads].float().transpose(-1, -2)) / math.sqrt(D)
            if key_valid is not None:
                scores = scores.masked_fill(~key_mask(key_valid), float("-inf"))
            partials = block_partials(scores, v[:, heads].float(), kv_block)
            del scores
            dense = combine_blocks(*partials, kv_real.expand(B, partials[0].shape[1], rows.numel(), -1))
            err_den[heads] = (dense.square().sum(-1) * row_valid).sum((0, 2))
            for index, keep in enumerate(keeps):
                out = combine_blocks(*partials, keep[:, heads][:, :, blocks].repeat_interleave(q_block, dim=2))
                err_num[index, heads] = ((out - dense).square().sum(-1) * row_valid).sum((0, 2))
        self.density[layer] = self.density[layer] + density
        self.err_num[layer] = self.err_num[layer] + err_num
        self.err_den[layer] = self.err_den[layer] + err_den
        self.calls[layer] += 1
        if self.local_step is None:
            self.local_step = local_step

    def take(self) -> dict[str, Any] | None:
        """This step's record (CPU, float64), or None when nothing was measured."""
        if not any(self.calls):
            return None
        missing = [i for i, calls in enumerate(self.calls) if calls == 0]
        if missing:
            raise CalibrationError(f"layers {missing} were not called during step {self.step}")
        record = {
            "sample": self.sample,
            "step": self.step,
            "local_step": self.local_step,
            "density": torch.stack([d / c for d, c in zip(self.density, self.calls, strict=True)]).double().cpu(),
            "err_num": torch.stack(self.err_num).double().cpu(),
            "err_den": torch.stack(self.err_den).double().cpu(),
        }
        self._reset()
        return record


class MeasuringProcessor(NablaAttnProcessor):
    """Dense self-attention (so the dense trajectory is followed) that measures every candidate on the same q, k."""

    def __init__(self, layer: int, settings: LayerSettings, state: Any, probe: Probe) -> None:
        super().__init__(layer, settings, state)
        self.probe = probe

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.probe.active:
            self.probe.measure(self.layer, self.state.step, q, k, v, self.layout(), text_valid)
        return self.attend_dense(q, k, v, text_valid)
