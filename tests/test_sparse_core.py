"""The shared gather / attend / scatter machinery of nn/sparse.py."""
import numpy as np

from effattn.gradcheck import numerical_gradient, rel_error
from effattn.nn import sparse

rng = np.random.default_rng(0)


def test_gather_scatter_are_adjoint_with_repeats():
    x = rng.standard_normal((2, 3, 6, 4))
    for idx in (rng.integers(0, 6, (5, 3)), rng.integers(0, 6, (2, 3, 5, 3))):
        g = sparse.gather_rows(x, idx)
        assert g.shape == (2, 3, 5, 3, 4)
        y = rng.standard_normal(g.shape)
        # <gather(x), y> == <x, scatter(y)>: scatter is the exact adjoint, repeats included
        np.testing.assert_allclose((g * y).sum(), (x * sparse.scatter_rows(y, idx, 6)).sum())


def test_attend_with_bias_and_lse_gradients():
    qb, kb, vb = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 6, 2))
    bias = rng.standard_normal((2, 3, 4, 6))
    allowed = rng.random((2, 3, 4, 6)) > 0.3
    allowed[0, 0, 0] = False
    dout, dlse = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 4))

    def f():
        out, lse, _ = sparse.attend_forward(qb, kb, vb, allowed, 0.7, bias)
        return np.concatenate([out, np.where(np.isfinite(lse), lse, 0.0)[..., None]], -1)

    _, _, cache = sparse.attend_forward(qb, kb, vb, allowed, 0.7, bias)
    g = sparse.attend_backward(dout, cache, dlse)
    up = np.concatenate([dout, dlse[..., None]], -1)
    for name, arr in (("q", qb), ("k", kb), ("v", vb), ("bias", bias)):
        assert rel_error(g[name], numerical_gradient(f, arr, up)) < 1e-8, name


def test_dense_from_groups_and_group_mask():
    q_idx = np.array([[0, 1], [2, 3]])
    k_idx = np.array([[0, 1, 1], [2, 3, 0]])
    pb = rng.random((1, 2, 2, 3))
    w = sparse.dense_from_groups(pb, q_idx, k_idx, 4, 4)
    assert w.shape == (1, 4, 4)
    np.testing.assert_allclose(w[0, 0, 1], pb[0, 0, 0, 1] + pb[0, 0, 0, 2])  # repeated key adds up
    allowed = sparse.group_mask(q_idx, k_idx, 4, 3, causal=True, key_mask=np.array([True, False, True]))
    assert allowed.shape == (2, 2, 3)
    assert not allowed[1, 1, 1]          # key position 3 >= m
    assert not allowed[0, 0, 1]          # key 1 masked, and in the future of query 0
    assert allowed[1, 0, 2] and not allowed[0, 1, 1]


def test_pad_and_round_up():
    x = np.ones((2, 5, 3))
    assert sparse.pad_axis(x, 8).shape == (2, 8, 3) and sparse.pad_axis(x, 5) is x
    assert sparse.round_up(5, 4) == 8 and sparse.round_up(8, 4) == 8
    assert sparse.broadcast_shapes((2, 1, 3), (4, 3)) == (2, 4, 3)


def test_index_add_sums_repeated_indices_like_add_at():
    """The NumPy fast paths (sparse one-hot product, bincount) against ``np.add.at`` itself."""
    from effattn.nn.sparse import index_add, index_add_weighted

    rng = np.random.default_rng(0)
    idx = rng.integers(0, 9, (6, 5))                       # many repeats
    for shape in ((30, 4), (30,), (30, 2, 3)):
        vals = rng.standard_normal((30,) + shape[1:])
        want = np.zeros((9,) + shape[1:])
        np.add.at(want, idx.reshape(-1), vals)
        got = index_add(np.zeros_like(want), idx, vals)
        assert np.abs(got - want).max() < 1e-13, shape
    w, g = rng.standard_normal((6, 5)), rng.standard_normal((6, 4))
    want = np.zeros((9, 4))
    np.add.at(want, idx.reshape(-1), (w[..., None] * g[:, None, :]).reshape(30, 4))
    assert np.abs(index_add_weighted(np.zeros((9, 4)), idx, w, g) - want).max() < 1e-13
    out = np.ones((9, 4), np.float32)                      # in place, adds to what is there, keeps the dtype
    index_add(out, idx, np.ones((30, 4), np.float32))
    assert out.dtype == np.float32 and out.sum() == 36 + 30 * 4
