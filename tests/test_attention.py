"""The attention core against plain references: brute-force tile order and block selection, dense SDPA."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from nabla_convert.attention import (
    RecompileLimitError,
    TileLayout,
    block_sparse_attention,
    flex,
    nabla_attention,
    nabla_block_mask,
)
from nabla_convert.attention.blockwise import block_partials, combine_blocks
from nabla_convert.attention.flex import compact_indices, to_block_mask

GRIDS = [(2, 16, 16), (3, 12, 20), (1, 9, 15), (2, 8, 24)]  # token grids; the middle two need padding


def brute_tile_order(layout: TileLayout) -> list[tuple[int, int, int] | None]:
    """(frame, row, col) of each tile-order position, None for padding; written as the definition reads."""
    order: list[tuple[int, int, int] | None] = []
    T, Ht, Wt = layout.grid
    for t in range(T):
        for tr in range(Ht):
            for tc in range(Wt):
                for i in range(layout.tile_h):
                    for j in range(layout.tile_w):
                        r, c = tr * layout.tile_h + i, tc * layout.tile_w + j
                        order.append((t, r, c) if r < layout.height and c < layout.width else None)
    return order + [None] * (layout.padded_len - len(order))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block", [64, 128])
def test_tile_order_matches_definition_and_round_trips(grid, block):
    layout = TileLayout(*grid, block=block)
    order = brute_tile_order(layout)
    T, H, W = grid
    x = torch.arange(T * H * W).view(1, -1, 1).float() + 1  # raster value = raster index + 1
    tiles = layout.to_tiles(x)
    expected = [0.0 if p is None else (p[0] * H + p[1]) * W + p[2] + 1.0 for p in order]
    assert tiles.flatten().tolist() == expected
    assert layout.indices().valid.tolist() == [p is not None for p in order]
    assert torch.equal(layout.to_raster(tiles), x)
    assert layout.padded_len % block == 0
    compact = layout.to_tiles(x, padded=False)  # the padded order with its padding tokens left out
    assert compact.flatten().tolist() == [v for v in expected if v != 0.0]
    assert torch.equal(layout.to_raster(compact), x)
    assert torch.equal(layout.pad(compact), tiles)
    assert torch.equal(layout.unpad(tiles), compact)


def test_layout_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="expected 96 tokens"):
        TileLayout(1, 8, 12).to_tiles(torch.zeros(1, 95, 4))


def brute_keep(q, k, layout: TileLayout, threshold, sta, q_block, kv_block):
    """Selection written plainly: float64 pooled means over real tokens, sort each row, accumulate.

    Returns the keep mask and a mask of entries too close to the cut to call (|cumsum - (1-thr)| tiny).
    """
    valid = layout.indices().valid.tolist()
    B, H, S, D = q.shape
    nq, nk = S // q_block, S // kv_block

    def pooled(x, block, i):
        rows = [x[s] for s in range(i * block, (i + 1) * block) if valid[s]]
        return torch.stack(rows).double().mean(0) if rows else None

    keep = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    unsure = torch.zeros_like(keep)
    for b in range(B):
        for h in range(H):
            kp = [pooled(k[b, h], kv_block, j) for j in range(nk)]
            for i in range(nq):
                qp = pooled(q[b, h], q_block, i)
                if qp is None:
                    qp = torch.zeros(D, dtype=torch.float64)
                logits = [(qp @ kj).item() / math.sqrt(D) if kj is not None else -math.inf for kj in kp]
                top = max(logits)
                w = [math.exp(v - top) for v in logits]
                total = sum(w)
                probs = [v / total for v in w]
                cumulative = 0.0
                for j in sorted(range(nk), key=lambda j: probs[j]):
                    cumulative += probs[j]
                    keep[b, h, i, j] = cumulative >= 1 - threshold
                    unsure[b, h, i, j] = abs(cumulative - (1 - threshold)) < 1e-5 and threshold < 1
                if sta is not None:
                    ts = layout.tile_size
                    for j in range(nk):
                        pairs = [
                            (_tile_coord(layout, a), _tile_coord(layout, c))
                            for a in range(i * q_block // ts, (i + 1) * q_block // ts)
                            for c in range(j * kv_block // ts, (j + 1) * kv_block // ts)
                            if a < layout.num_tiles and c < layout.num_tiles
                        ]
                        if any(
                            all(abs(x - y) <= w // 2 for x, y, w in zip(ga, gc, sta, strict=True)) for ga, gc in pairs
                        ):
                            keep[b, h, i, j] = True
                for j in range(nk):
                    if kp[j] is None:
                        keep[b, h, i, j] = False
    return keep, unsure


def _tile_coord(layout: TileLayout, tile: int) -> tuple[int, int, int]:
    _, Ht, Wt = layout.grid
    return tile // (Ht * Wt), (tile // Wt) % Ht, tile % Wt


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("sta", [None, (3, 1, 1)])
@pytest.mark.parametrize("grid", GRIDS)
def test_block_selection_matches_brute_force(threshold, sta, grid):
    torch.manual_seed(zlib.crc32(repr((threshold, sta, grid)).encode()))  # hash(None) differs per process
    layout = TileLayout(*grid)
    q, k = (torch.randn(1, 2, layout.padded_len, 8) * 3 for _ in range(2))
    keep = nabla_block_mask(q, k, threshold=threshold, grid=layout, sta=sta)
    expected, unsure = brute_keep(q, k, layout, threshold, sta, 64, 64)
    assert keep.shape == expected.shape
    assert torch.equal(keep[~unsure], expected[~unsure])
    assert unsure.float().mean() < 0.05


@pytest.mark.parametrize("sta", [None, (3, 1, 1)])
@pytest.mark.parametrize("grid", GRIDS)
def test_per_head_thresholds_match_brute_force_per_head(sta, grid):
    """Head h of a per-head selection is the brute-force selection of head h alone at its own threshold."""
    torch.manual_seed(zlib.crc32(repr((sta, grid)).encode()))
    layout = TileLayout(*grid)
    thresholds = (0.3, 1.0, 0.8)
    q, k = (torch.randn(2, len(thresholds), layout.padded_len, 8) * 3 for _ in range(2))
    keep = nabla_block_mask(q, k, threshold=thresholds, grid=layout, sta=sta)
    for head, threshold in enumerate(thresholds):
        part = slice(head, head + 1)
        expected, unsure = brute_keep(q[:, part], k[:, part], layout, threshold, sta, 64, 64)
        assert torch.equal(keep[:, part][~unsure], expected[~unsure])
        assert unsure.float().mean() < 0.05
    same = nabla_block_mask(q, k, threshold=torch.tensor([0.6] * 3), grid=layout, sta=sta)
    assert torch.equal(same, nabla_block_mask(q, k, threshold=0.6, grid=layout, sta=sta))


@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 12, 20)])
def test_query_blocks_of_two_tiles(grid):
    torch.manual_seed(1)
    layout = TileLayout(*grid, block=128)
    q, k = (torch.randn(2, 1, layout.padded_len, 8) * 3 for _ in range(2))
    keep = nabla_block_mask(q, k, threshold=0.6, grid=layout, sta=(1, 1, 1), q_block=128, kv_block=64)
    expected, unsure = brute_keep(q, k, layout, 0.6, (1, 1, 1), 128, 64)
    assert keep.shape == (2, 1, layout.padded_len // 128, layout.padded_len // 64)
    assert torch.equal(keep[~unsure], expected[~unsure])


def test_tile_grid_tuple_means_unpadded_8x8_tiles():
    q, k = (torch.randn(1, 1, 4 * 64, 8) for _ in range(2))
    by_tuple = nabla_block_mask(q, k, threshold=0.5, grid=(1, 2, 2), sta=(1, 3, 1))
    by_layout = nabla_block_mask(q, k, threshold=0.5, grid=TileLayout(1, 16, 16), sta=(1, 3, 1))
    assert torch.equal(by_tuple, by_layout)


def test_bad_threshold_and_shape_are_clear_errors():
    q = torch.randn(1, 1, 256, 8)
    with pytest.raises(ValueError, match=r"threshold( of head \d)? must be in \[0, 1\]"):
        nabla_block_mask(q, q, threshold=1.5, grid=(1, 2, 2))
    with pytest.raises(ValueError, match="layout"):
        nabla_block_mask(q, q, threshold=0.5, grid=(1, 2, 3))
    with pytest.raises(ValueError, match=r"threshold( of head \d)? must be in \[0, 1\]"):
        nabla_block_mask(q, q, threshold=[0.5, 1.5], grid=(1, 2, 2))
    with pytest.raises(ValueError, match="2 per-head thresholds for scores of shape"):
        nabla_block_mask(q, q, threshold=[0.5, 0.7], grid=(1, 2, 2))


def test_compact_indices_lists_selected_columns_first():
    selected = torch.rand(3, 5, 17) > 0.6
    count, indices = compact_indices(selected)
    for row, n, idx in zip(selected.view(-1, 17), count.view(-1), indices.view(-1, 17), strict=True):
        assert idx[:n].tolist() == row.nonzero().flatten().tolist()


def reference_attention(q, k, v, token_mask):
    """Masked softmax attention written out, float64."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~token_mask, -math.inf)
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def token_mask_of(keep, layout, q_block=64, kv_block=64):
    valid = layout.indices().valid
    mask = keep.repeat_interleave(q_block, -2).repeat_interleave(kv_block, -1)
    return mask & valid


def random_case(grid, threshold=0.5, sta=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layout = TileLayout(*grid)
    q, k, v = (torch.randn(2, 2, layout.padded_len, 16, dtype=dtype) for _ in range(3))
    keep = nabla_block_mask(q, k, threshold=threshold, grid=layout, sta=sta)
    return layout, q, k, v, keep


@pytest.mark.parametrize("backend", ["reference", "flex_eager"])
@pytest.mark.parametrize("grid", GRIDS)
def test_block_sparse_attention_matches_masked_reference(backend, grid):
    layout, q, k, v, keep = random_case(grid, 0.6, (1, 3, 3))
    valid = layout.indices().valid
    out = block_sparse_attention(q, k, v, keep, valid=valid if layout.is_padded else None, backend=backend)
    expected = reference_attention(q, k, v, token_mask_of(keep, layout))
    torch.testing.assert_close(out[..., valid, :], expected[..., valid, :], atol=2e-6, rtol=1e-5)


def test_threshold_one_is_dense_attention():
    layout, q, k, v, _ = random_case((2, 16, 16))
    for backend in ("reference", "flex_eager"):
        out = nabla_attention(q, k, v, grid=layout, threshold=1.0, backend=backend)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_bf16_within_bf16_tolerance():
    layout, q, k, v, keep = random_case((3, 12, 20), 0.5, None, dtype=torch.bfloat16)
    valid = layout.indices().valid
    out = block_sparse_attention(q, k, v, keep, valid=valid, backend="flex_eager")
    expected = reference_attention(q.float(), k.float(), v.float(), token_mask_of(keep, layout))
    torch.testing.assert_close(out[..., valid, :].float(), expected[..., valid, :], atol=2e-2, rtol=2e-2)


def test_reference_backend_gradients_equal_dense_masked_autograd():
    layout, q, k, v, keep = random_case((3, 12, 20), 0.5, (1, 1, 1))
    valid = layout.indices().valid
    grad_out = torch.randn_like(q)
    leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, keep, valid=valid, backend="reference")
    (out[..., valid, :] * grad_out.double()[..., valid, :]).sum().backward()
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, token_mask_of(keep, layout))
    (ref[..., valid, :] * grad_out.double()[..., valid, :]).sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-8)


def test_block_mask_carries_the_selection():
    layout, *_, keep = random_case((3, 12, 20), 0.4, None)
    valid = layout.indices().valid
    block_mask = to_block_mask(keep, valid=valid)
    dense = block_mask.to_dense()  # partial + full blocks as the kernel sees them
    assert torch.equal(dense.bool(), keep)
    kv_whole = valid.view(-1, 64).all(-1)
    assert torch.equal(block_mask.full_kv_num_blocks, (keep & kv_whole).sum(-1).int())


@pytest.mark.parametrize("grid", [(2, 16, 16), (3, 12, 20)])
def test_compiled_block_mask_lists_the_selection_and_masks_only_padding(grid):
    """The BlockMask for compiled CUDA kernels (which visit listed blocks only): the kept blocks, and a mask_mod
    that drops padding keys; without padding every kept block is full and no mask_mod is captured at all."""
    from torch.nn.attention.flex_attention import noop_mask

    layout, *_, keep = random_case(grid, 0.4, (1, 3, 3))
    valid = layout.indices().valid if layout.is_padded else None
    block_mask = flex.BlockSelection.from_keep(keep, valid=valid).block_mask(compiled=True)
    assert torch.equal(block_mask.to_dense().bool(), keep)
    S = layout.padded_len
    b, h, q_idx, kv_idx = (torch.zeros(S, dtype=torch.long),) * 3 + (torch.arange(S),)
    expected = torch.ones(S, dtype=torch.bool) if valid is None else valid
    assert torch.equal(torch.broadcast_to(block_mask.mask_mod(b, h, q_idx, kv_idx), (S,)), expected)
    if valid is None:
        assert block_mask.mask_mod is noop_mask
        assert int(block_mask.kv_num_blocks.sum()) == 0


@pytest.mark.slow
def test_compiled_flex_matches_reference_and_refuses_eager_fallback(monkeypatch):
    layout, q, k, v, keep = random_case((3, 12, 20), 0.5, (1, 3, 3))
    valid = layout.indices().valid
    expected = reference_attention(q, k, v, token_mask_of(keep, layout))
    for threshold in (0.5, 0.8):  # a second mask on the same shape must not recompile
        keep = nabla_block_mask(q, k, threshold=threshold, grid=layout)
        expected = reference_attention(q, k, v, token_mask_of(keep, layout))
        out = block_sparse_attention(q, k, v, keep, valid=valid, backend="flex")
        torch.testing.assert_close(out[..., valid, :], expected[..., valid, :], atol=2e-6, rtol=1e-5)
    monkeypatch.setattr(flex, "FLEX_RECOMPILE_LIMIT", 1)
    _, q2, k2, v2, keep2 = random_case((2, 8, 24), 0.5)
    with pytest.raises(RecompileLimitError, match="refusing the eager fallback"):
        block_sparse_attention(q2, k2, v2, keep2, backend="flex")


@pytest.mark.parametrize("padded", [False, True])
def test_block_partials_combine_to_masked_sdpa(padded):
    """Any set of kept key blocks, from the partials alone, equals SDPA with those blocks (and padding) masked."""
    torch.manual_seed(0)
    B, H, S, D, kv_block = 2, 3, 256, 16, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    valid = torch.arange(S) < (S - 40 if padded else S)  # the last key block is partly padding
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~valid, float("-inf"))
    partials = block_partials(scores, v, kv_block)
    keep = torch.rand(B, H, S, S // kv_block) < 0.5
    keep[..., 0] = True  # every row keeps a block with real keys
    mask = keep.repeat_interleave(kv_block, dim=-1) & valid
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(combine_blocks(*partials, keep), expected)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=valid.expand(S, S))
    torch.testing.assert_close(combine_blocks(*partials, torch.ones_like(keep)), dense)
