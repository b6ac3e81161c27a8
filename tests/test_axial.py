"""Axial attention: per-query rule oracle, rows/columns as reshaped full attention, the union.

Oracles: the keys of each query written as a Python loop over grid cells,
full attention applied to the explicitly reshaped (rows, cols) grid, dense
attention masked by the rule, and central finite differences.
"""
import numpy as np
import pytest
from test_contract import decode

import effattn
from effattn.attention import axial
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn.image import default_image_shape
from effattn.registry import Case

FULL = effattn.get("full")


def oracle_mask(n, rows, cols, axis, causal):
    """For each query i at cell (i // cols, i % cols): the keys sharing its row / its column."""
    m = np.zeros((n, n), bool)
    for i in range(n):
        ri, ci = divmod(i, cols)
        for j in range(n):
            rj, cj = divmod(j, cols)
            in_row, in_col = ri == rj, ci == cj
            ok = {"row": in_row, "column": in_col, "both": in_row or in_col}[axis]
            m[i, j] = ok and (j <= i or not causal)
    return m


def qkv(rng, b, h, n, d=4, dv=3):
    return rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("axis", ["row", "column", "both"])
def test_fast_path_equals_dense_masked_by_rule(axis, causal):
    rng = np.random.default_rng(0)
    for n, shape in ((5, None), (12, (3, 4)), (23, None), (30, (4, 8)), (17, (17, 1)), (17, (1, 17))):
        rows, cols = shape or default_image_shape(n)
        mask = oracle_mask(n, rows, cols, axis, causal)
        assert np.array_equal(axial.build_pattern(n, shape=(rows, cols), axis=axis, causal=causal), mask)
        if shape is None:
            assert np.array_equal(axial.build_pattern(n, axis=axis, causal=causal), mask)
        q, k, v = qkv(rng, 2, 2, n)
        km = rng.random((2, 1, n)) > 0.3
        km[..., 0] = True
        for key_mask in (None, km):
            out, cache = axial.forward(q, k, v, causal=causal, key_mask=key_mask, shape=shape, axis=axis)
            ref, _ = FULL.forward(q, k, v, mask=mask, key_mask=key_mask)
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12, err_msg=f"n={n} shape={shape}")
            np.testing.assert_allclose(axial.weights(cache) @ v, out, rtol=0, atol=1e-12)


def test_rows_and_columns_are_full_attention_on_the_reshaped_grid():
    rng = np.random.default_rng(1)
    r, c = 4, 6
    q, k, v = qkv(rng, 2, 3, r * c)
    grid = lambda x: x.reshape(2, 3, r, c, x.shape[-1])  # noqa: E731  (B, H, r, c, d): rows are groups
    for causal in (False, True):
        out, _ = axial.forward(q, k, v, shape=(r, c), axis="row", causal=causal)
        ref, _ = FULL.forward(grid(q), grid(k), grid(v), causal=causal)
        np.testing.assert_allclose(out, ref.reshape(out.shape), atol=1e-12)
        out, _ = axial.forward(q, k, v, shape=(r, c), axis="column", causal=causal)
        col = lambda x: grid(x).swapaxes(-3, -2)  # noqa: E731  (B, H, c, r, d): columns are groups
        ref, _ = FULL.forward(col(q), col(k), col(v), causal=causal)
        np.testing.assert_allclose(out, ref.swapaxes(-3, -2).reshape(out.shape), atol=1e-12)


def test_both_is_the_union_of_row_and_column_under_one_softmax():
    n, shape = 20, (4, 5)
    for causal in (False, True):
        row = axial.build_pattern(n, shape=shape, axis="row", causal=causal)
        col = axial.build_pattern(n, shape=shape, axis="column", causal=causal)
        both = axial.build_pattern(n, shape=shape, axis="both", causal=causal)
        assert np.array_equal(both, row | col)
        assert np.array_equal(row & col, np.eye(n, dtype=bool))     # they share only the query itself
        assert both.sum(1).max() <= shape[0] + shape[1] - 1


def test_three_dimensional_grid():
    rng = np.random.default_rng(2)
    n, shape = 50, (3, 4, 5)
    q, k, v = qkv(rng, 1, 2, n)
    coords = np.stack(np.unravel_index(np.arange(n), shape), 1)    # (N, 3)
    for axis in (0, 1, 2, (0, 2), "both"):
        axes = (0, 1, 2) if axis == "both" else np.atleast_1d(axis)
        mask = np.zeros((n, n), bool)
        for a in axes:
            others = [b for b in range(3) if b != a]
            mask |= (coords[:, None, others] == coords[None, :, others]).all(-1)
        for causal in (False, True):
            out, _ = axial.forward(q, k, v, shape=shape, axis=axis, causal=causal)
            ref, _ = FULL.forward(q, k, v, mask=mask, causal=causal)
            np.testing.assert_allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("axis", ["row", "column", "both"])
def test_gradients(axis):
    rng = np.random.default_rng(3)
    for causal in (False, True):
        q, k, v = qkv(rng, 1, 2, 11, d=3, dv=2)
        km = rng.random((1, 2, 11)) > 0.3
        km[..., 0] = True
        errors = check_gradients(axial.forward, axial.backward, {"q": q, "k": k, "v": v},
                                 {"causal": causal, "key_mask": km, "shape": (3, 4), "axis": axis}, rng=rng)
        assert max(errors.values()) < 1e-7, errors


def test_default_shape_and_bad_configuration():
    for n in (1, 2, 5, 16, 17, 47, 1000, 2048):
        r, c = default_image_shape(n)
        assert r * c >= n and r * c - n < c and abs(r - c) <= 1
    q = np.ones((1, 1, 10, 2))
    for bad in ((3, 3), (0, 10), (-1, 5), 10, ()):
        with pytest.raises(ValueError, match="shape"):
            axial.forward(q, q, q, shape=bad)
    for bad in ("diagonal", 2, (0, 0), True):
        with pytest.raises(ValueError, match="axis"):
            axial.forward(q, q, q, shape=(2, 5), axis=bad)


def test_score_entries_grow_like_n_sqrt_n():
    def entries(n):
        q = np.zeros((1, 1, n, 2))
        _, cache = axial.forward(q, q, q, causal=True)
        return sum(a.p.size for a in cache.union.attends)

    assert np.log(entries(16384) / entries(1024)) / np.log(16) < 1.6


def test_figures(tmp_path):
    paths = FIGURES["axial"](str(tmp_path), np.random.default_rng(0))
    assert [p.split("/")[-1] for p in paths] == ["axial_grid.png", "axial_masks.png"]
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------- decoding
def stepped(q, k, v, prompt, key_mask=None, **config):
    """Prefill + token-by-token steps (the contract's driver): out and the state sizes."""
    return decode(effattn.get("axial"), Case(inputs={"q": q, "k": k, "v": v}, config=config), key_mask, prompt)


@pytest.mark.parametrize("shape,axis,ragged", [((7, 9), "row", 0), ((7, 9), "column", 0), ((7, 9), "both", 0),
                                              ((7, 9), "both", 4), ((3, 4, 5), (0, 2), 0), ((3, 4, 5), 1, 0)])
def test_decoding_keeps_exactly_the_keys_a_later_query_reaches(shape, axis, ragged):
    """Stepping equals the causal forward (padded grids and key masks included), and on a full
    grid the window holds exactly the keys some later cell of their lines reads -- counted from
    build_pattern: the current row for axis="row" (at most c - 1 keys), every earlier key for the
    column axis of a 2-D grid (each column stays reachable until the last row)."""
    n = int(np.prod(shape)) - ragged
    b, heads, d, dv = 2, 2, 4, 3
    rng = np.random.default_rng(n)
    q, k, v = qkv(rng, b, heads, n, d, dv)
    km = np.broadcast_to(rng.random((b, 1, n)) > 0.3, (b, heads, n))
    cfg = {"shape": shape, "axis": axis}
    want, _ = axial.forward(q, k, v, causal=True, key_mask=km, **cfg)
    for prompt in (1, shape[-1] + 2, n - 1):
        got, sizes = stepped(q, k, v, prompt, km, **cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        rows = [s // (b * heads * (d + dv + 1)) for s in sizes]
        if not ragged:
            pat = axial.build_pattern(n, causal=True, xp=np, **cfg)
            assert rows == [int(pat[t:, :t].any(axis=0).sum()) for t in range(prompt, n + 1)]
        if axis == "row":
            assert max(rows) <= shape[-1] - 1
        if axis == "column" and len(shape) == 2:
            assert rows[:n - shape[-1] - prompt] == list(range(prompt, n - shape[-1]))   # t keys up to the last row


def test_decoding_stops_at_the_last_cell_and_needs_the_grid():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 1, 7)
    state = axial.init_state(lead=(1, 1), d=4, dv=3, shape=(2, 3), axis="both")
    with pytest.raises(ValueError, match="^q brings 7"):
        axial.prefill(q, k, v, state)
    out, state = axial.prefill(q[..., :6, :], k[..., :6, :], v[..., :6, :], state)
    with pytest.raises(ValueError, match="^q_t brings 1 token"):
        axial.step(q[..., 6, :], k[..., 6, :], v[..., 6, :], state)
    with pytest.raises(ValueError, match="^shape must be given"):
        axial.init_state(lead=(1, 1), d=4, dv=3)
    with pytest.raises(ValueError, match="^axis"):
        axial.init_state(lead=(1, 1), d=4, dv=3, shape=(2, 3), axis="diagonal")
