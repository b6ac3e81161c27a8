"""Every forward/backward pair of nn/functional against central finite differences."""
import numpy as np
import pytest

from effattn.gradcheck import numerical_gradient, rel_error
from effattn.nn import functional as F

rng = np.random.default_rng(0)


def fd(f, x, dout):
    return numerical_gradient(f, x, dout)


def test_linear():
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    y, cache = F.linear_forward(x, W, b)
    np.testing.assert_allclose(y, np.einsum("bnd,de->bne", x, W) + b)
    dy = rng.standard_normal(y.shape)
    g = F.linear_backward(dy, cache)
    for name, arr in (("x", x), ("W", W), ("b", b)):
        assert rel_error(g[name], fd(lambda: F.linear_forward(x, W, b)[0], arr, dy)) < 1e-8


@pytest.mark.parametrize("masked", [False, True])
def test_softmax(masked):
    s = rng.standard_normal((2, 3, 5))
    mask = rng.random((2, 3, 5)) > 0.4 if masked else None
    if masked:
        mask[0, 0] = False  # a fully masked row
    p, cache, lse = F.softmax_forward(s, mask)
    ref = np.exp(s) * (1 if mask is None else mask)
    z = ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, np.divide(ref, z, out=np.zeros_like(ref), where=z > 0), atol=1e-15)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(lse[..., 0], np.log(z[..., 0]))
    dp = rng.standard_normal(p.shape)
    dlse = rng.standard_normal(lse.shape)
    ds = F.softmax_backward(dp, cache, dlse)

    def f():
        pp, _, ll = F.softmax_forward(s, mask)
        return np.concatenate([pp, np.where(np.isfinite(ll), ll, 0.0)], -1)

    num = fd(f, s, np.concatenate([dp, dlse], -1))
    assert rel_error(ds, num) < 1e-8
    if masked:
        assert np.all(p[0, 0] == 0) and np.all(ds[0, 0] == 0)
    assert np.isfinite(ds).all()


def test_softmax_stable_with_huge_logits():
    s = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    p, _, _ = F.softmax_forward(s)
    assert p.dtype == np.float32 and np.isfinite(p).all() and p[0, 0] == 1.0


def test_log_softmax_and_cross_entropy():
    logits = rng.standard_normal((3, 4, 6))
    targets = rng.integers(0, 6, (3, 4))
    targets[0, 1] = -100
    loss, cache = F.cross_entropy_forward(logits, targets)
    valid = targets != -100
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0][valid].mean()
    assert abs(loss - ref) < 1e-12
    g = F.cross_entropy_backward(cache)
    num = fd(lambda: np.array(F.cross_entropy_forward(logits, targets)[0]), logits, np.array(1.0))
    assert rel_error(g, num) < 1e-8
    assert np.all(g[0, 1] == 0)
    lp, lcache = F.log_softmax_forward(logits)
    d = rng.standard_normal(lp.shape)
    assert rel_error(F.log_softmax_backward(d, lcache), fd(lambda: F.log_softmax_forward(logits)[0], logits, d)) < 1e-8


def test_cross_entropy_all_ignored_is_zero():
    loss, cache = F.cross_entropy_forward(rng.standard_normal((2, 3)), np.array([-100, -100]))
    assert loss == 0.0 and np.all(F.cross_entropy_backward(cache) == 0)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(affine):
    x = rng.standard_normal((2, 3, 5))
    gamma, beta = (rng.standard_normal(5), rng.standard_normal(5)) if affine else (None, None)
    y, cache = F.layer_norm_forward(x, gamma, beta)
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, xhat * gamma + beta if affine else xhat, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    g = F.layer_norm_backward(dy, cache)
    f = lambda: F.layer_norm_forward(x, gamma, beta)[0]  # noqa: E731
    assert rel_error(g["x"], fd(f, x, dy)) < 1e-8
    if affine:
        assert rel_error(g["gamma"], fd(f, gamma, dy)) < 1e-8
        assert rel_error(g["beta"], fd(f, beta, dy)) < 1e-8


@pytest.mark.parametrize("name", ["gelu", "relu", "elu"])
def test_activations(name):
    x = rng.standard_normal((4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the kink
    fwd, bwd = getattr(F, f"{name}_forward"), getattr(F, f"{name}_backward")
    y, cache = fwd(x)
    dy = rng.standard_normal(y.shape)
    assert rel_error(bwd(dy, cache), fd(lambda: fwd(x)[0], x, dy)) < 1e-8


def test_gelu_matches_erf_form():
    from scipy.special import erf

    x = np.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    assert np.abs(F.gelu_forward(x)[0] - exact).max() < 1e-3  # the tanh approximation


def test_dropout():
    x = rng.standard_normal((1000,))
    y, cache = F.dropout_forward(x, 0.25, np.random.default_rng(1))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.75)
    assert 0.2 < 1 - kept.mean() < 0.3
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(F.dropout_backward(dy, cache), dy * kept / 0.75)
    assert F.dropout_forward(x, 0.0, None)[0] is x
    with pytest.raises(ValueError, match="p"):
        F.dropout_forward(x, 1.0, np.random.default_rng(1))


def test_embedding_repeated_ids_accumulate():
    table = rng.standard_normal((7, 3))
    ids = np.array([[1, 1, 4], [6, 1, 0]])
    out, cache = F.embedding_forward(ids, table)
    np.testing.assert_array_equal(out, table[ids])
    dout = rng.standard_normal(out.shape)
    g = F.embedding_backward(dout, cache)
    assert rel_error(g, fd(lambda: F.embedding_forward(ids, table)[0], table, dout)) < 1e-8
    np.testing.assert_allclose(g[1], dout[0, 0] + dout[0, 1] + dout[1, 1])


def test_sinusoidal_positions():
    pe = F.sinusoidal_positions(10, 6, np, dtype="float32")
    assert pe.shape == (10, 6) and pe.dtype == np.float32
    np.testing.assert_allclose(pe[3, 2], np.sin(3 / 10000 ** (2 / 6)), rtol=1e-6)
    np.testing.assert_allclose(pe[3, 3], np.cos(3 / 10000 ** (2 / 6)), rtol=1e-6)
    assert F.sinusoidal_positions(4, 5, np).shape == (4, 5)


def test_float32_stays_float32():
    x = rng.standard_normal((2, 3)).astype(np.float32)
    _, cache = F.cross_entropy_forward(x, np.array([0, 1]))
    assert F.cross_entropy_backward(cache).dtype == np.float32
    y, cache = F.gelu_forward(x)
    assert y.dtype == np.float32 and F.gelu_backward(y, cache).dtype == np.float32


def test_mlp_with_sliced_output():
    x = rng.standard_normal((2, 3, 4))
    W1, b1, W2, b2 = rng.standard_normal((4, 5)), rng.standard_normal(5), rng.standard_normal((5, 7)), rng.standard_normal(7)
    y, cache = F.mlp_forward(x, W1, b1, W2, b2, width=6)
    np.testing.assert_allclose(y, (np.maximum(x @ W1 + b1, 0) @ W2 + b2)[..., :6])
    dy = rng.standard_normal(y.shape)
    g = F.mlp_backward(dy, cache)
    f = lambda: F.mlp_forward(x, W1, b1, W2, b2, width=6)[0]  # noqa: E731
    for name, arr in (("x", x), ("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
        assert rel_error(g[name], fd(f, arr, dy)) < 1e-8, name
    assert np.all(g["W2"][:, 6] == 0) and g["b2"][6] == 0
