"""The sort-free selection (attention/fast.py, torch path) against a plain sorted reference and the core."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from nabla_convert.attention import TileLayout, nabla_block_mask, to_block_mask
from nabla_convert.attention.fast import cut_values, nabla_selection, select_by_cut
from nabla_convert.attention.flex import dense_token_mask
from nabla_convert.attention.mask import select_by_sorted_cumsum

THRESHOLDS = (0.2, 0.5, 0.7, 0.9, 1.0)


def sorted_selection(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The public NABLA rule written plainly: per row, sort ascending, cumsum, keep cumsum >= 1 - threshold."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    rows = probs.reshape(-1, probs.shape[-1]).double()
    flat = keep.view(-1, probs.shape[-1])
    for r, row in enumerate(rows):
        values, order = row.sort()
        total = 0.0
        for value, column in zip(values.tolist(), order.tolist(), strict=True):
            total += value
            if total >= 1.0 - threshold - 1e-12:
                flat[r, column] = True
    return keep


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_cut_selection_matches_sorted_rule(threshold: float) -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 2, 7, 40) * 2.5, dim=-1)
    assert torch.equal(select_by_cut(probs, threshold), sorted_selection(probs, threshold))


def test_per_head_cut_selection_matches_sorted_rule_head_by_head() -> None:
    torch.manual_seed(5)
    probs = torch.softmax(torch.randn(3, len(THRESHOLDS), 7, 40) * 2.5, dim=-1)
    keep = select_by_cut(probs, torch.tensor(THRESHOLDS))
    for head, threshold in enumerate(THRESHOLDS):
        assert torch.equal(keep[:, head], sorted_selection(probs[:, head], threshold))


def test_cut_value_is_the_smallest_kept_value() -> None:
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(50, 33), dim=-1)
    cut = cut_values(probs, 0.6)
    kept = probs >= cut
    smallest_kept = torch.where(kept, probs, torch.inf).min(-1, keepdim=True).values
    assert torch.equal(cut, smallest_kept)
    assert (torch.where(probs > cut, probs, 0.0).sum(-1) <= 0.6).all()
    assert (torch.where(probs >= cut, probs, 0.0).sum(-1) > 0.6).all()


def test_ties_at_the_cut_are_kept() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2], [0.5, 0.3, 0.1, 0.1]])
    expected = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    assert torch.equal(select_by_cut(probs, 0.5), expected)


def test_threshold_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        select_by_cut(torch.rand(2, 3), 1.5)
    with pytest.raises(ValueError, match="threshold"):
        select_by_cut(torch.rand(2, 3), -0.1)
    assert not select_by_cut(torch.rand(2, 3), 0.0).any()  # threshold 0 keeps no block by mass


GRIDS = [
    # (token grid (T, H, W), q_block, kv_block, sta)
    ((2, 16, 24), 64, 64, None),
    ((3, 16, 16), 64, 64, (3, 1, 1)),
    ((2, 12, 20), 64, 64, None),  # padded to whole tiles
    ((3, 10, 16), 64, 64, (1, 3, 3)),  # padded, with STA
    ((2, 16, 24), 128, 64, None),
    ((3, 14, 16), 128, 64, (3, 3, 3)),  # padded, two-tile query blocks
]


@pytest.mark.parametrize(("token_grid", "q_block", "kv_block", "sta"), GRIDS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_selection_equals_core(token_grid, q_block, kv_block, sta, threshold: float) -> None:
    torch.manual_seed(2)
    layout = TileLayout.for_blocks(token_grid, (8, 8), q_block, kv_block)
    q = torch.randn(2, 3, layout.padded_len, 16) * 3
    k = torch.randn(2, 3, layout.padded_len, 16) * 3
    kwargs = dict(threshold=threshold, grid=layout, sta=sta, q_block=q_block, kv_block=kv_block)
    expected = nabla_block_mask(q, k, **kwargs)
    assert torch.equal(nabla_selection(q, k, **kwargs).keep, expected)


@pytest.mark.parametrize(("token_grid", "q_block", "kv_block", "sta"), GRIDS)
def test_per_head_selection_equals_core(token_grid, q_block, kv_block, sta) -> None:
    torch.manual_seed(6)
    layout = TileLayout.for_blocks(token_grid, (8, 8), q_block, kv_block)
    q, k = (torch.randn(2, 3, layout.padded_len, 16) * 3 for _ in range(2))
    kwargs = dict(threshold=(0.2, 0.9, 1.0), grid=layout, sta=sta, q_block=q_block, kv_block=kv_block)
    assert torch.equal(nabla_selection(q, k, **kwargs).keep, nabla_block_mask(q, k, **kwargs))


@pytest.mark.parametrize("token_grid", [(2, 16, 24), (3, 10, 16)])
def test_index_tensors_equal_core_block_mask(token_grid) -> None:
    torch.manual_seed(3)
    layout = TileLayout.for_blocks(token_grid)
    q, k = (torch.randn(1, 2, layout.padded_len, 16) * 3 for _ in range(2))
    selection = nabla_selection(q, k, threshold=0.6, grid=layout)
    valid = layout.indices().valid if layout.is_padded else None
    expected = to_block_mask(selection.keep, valid=valid)
    got = selection.block_mask()
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_block_mask_attention_equals_masked_sdpa() -> None:
    torch.manual_seed(4)
    layout = TileLayout.for_blocks((2, 10, 16))
    q, k, v = (torch.randn(1, 2, layout.padded_len, 16) for _ in range(3))
    selection = nabla_selection(q, k, threshold=0.5, grid=layout, sta=(1, 1, 1))
    valid = layout.indices().valid
    out = flex_attention(q, k, v, block_mask=selection.block_mask())
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_token_mask(selection.keep, 64, 64, valid))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", (0.3, 0.7, 0.9))
@pytest.mark.parametrize("sta", [(3, 1, 3), (11, 3, 3)])
def test_bf16_precision_equals_the_diffusers_kandinsky5_selection(threshold, sta) -> None:
    """selection_precision "bfloat16" chooses exactly the blocks of diffusers' nablaT_v2 on bf16 q, k."""
    from diffusers import Kandinsky5T2VPipeline
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2

    grid = (3, 4, 5)  # tile grid; 64-token blocks are tiles
    torch.manual_seed(0)
    q, k = (torch.randn(2, 3, 60 * 64, 32).to(torch.bfloat16) * 3 for _ in range(2))
    sta_mask = Kandinsky5T2VPipeline.fast_sta_nabla(*grid, *sta, device="cpu")
    theirs = nablaT_v2(q.transpose(1, 2), k.transpose(1, 2), sta_mask[None, None], thr=threshold).to_dense().bool()
    ours = nabla_selection(q, k, threshold=threshold, grid=grid, sta=sta, precision="bfloat16").keep
    assert torch.equal(ours, theirs)
    assert torch.equal(nabla_block_mask(q, k, threshold=threshold, grid=grid, sta=sta, precision="bfloat16"), theirs)


def test_threshold_zero_is_the_sta_window_alone() -> None:
    """Pure STA (the official sta-wT-wH-wW mode): the kept blocks are exactly the window, padding keys dropped."""
    layout = TileLayout.for_blocks((3, 20, 28))  # padded: 3 x 3 x 4 tiles
    torch.manual_seed(1)
    q, k = (torch.randn(1, 2, layout.padded_len, 16) for _ in range(2))
    keep = nabla_selection(q, k, threshold=0.0, grid=layout, sta=(3, 1, 3)).keep
    coords = torch.cartesian_prod(*(torch.arange(n) for n in layout.grid))
    window = ((coords[:, None] - coords[None]).abs() <= torch.tensor([1, 0, 1])).all(-1)
    assert torch.equal(keep, window.expand_as(keep))
    assert torch.equal(nabla_block_mask(q, k, threshold=0.0, grid=layout, sta=(3, 1, 3)), keep)
    with pytest.raises(ValueError, match="STA window"):
        nabla_selection(q, k, threshold=0.0, grid=layout)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_tensor_threshold_selects_as_the_float(threshold: float, precision: str) -> None:
    """A 0-dim tensor threshold (the compiled processor's) keeps the same blocks as the float, 0 and 1 included."""
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(2, 3, 5, 7) * 3, dim=-1)
    if precision == "bfloat16":
        probs = probs.to(torch.bfloat16)
    select = select_by_sorted_cumsum if precision == "bfloat16" else select_by_cut
    expected = (
        sorted_selection(probs.float(), threshold) if threshold > 0 else torch.zeros_like(probs, dtype=torch.bool)
    )
    if precision == "float32":
        assert torch.equal(select(probs, threshold), expected)
    assert torch.equal(select(probs, torch.tensor(threshold)), select(probs, threshold))


def test_sta_only_layer_is_a_static_flag() -> None:
    """A threshold-0 layer with a window runs the window alone through its flag, though its threshold is a tensor."""
    from nabla_convert.config import LayerSettings, NablaConfig
    from nabla_convert.models.nabla import NablaAttnProcessor, NablaState
    from nabla_convert.models.wan import WAN

    layout = TileLayout.for_blocks((3, 20, 28))
    torch.manual_seed(3)
    q, k = (torch.randn(1, 2, layout.padded_len, 16) for _ in range(2))
    settings = LayerSettings(threshold=0.0, sta=(3, 1, 3))
    processor = NablaAttnProcessor(0, settings, NablaState(NablaConfig(threshold=0.5), WAN, num_heads=2))
    assert processor.sta_only and not LayerSettings(threshold=0.3, sta=(3, 1, 3)).sta_only
    keep = processor.select(q, k, layout).keep
    assert torch.equal(keep, nabla_block_mask(q, k, threshold=0.0, grid=layout, sta=(3, 1, 3)))
