"""Performer: the implied matrix against its explicit construction from the paper's feature maps,
chunked causal prefix sums against the per-step loop, and the statistics of the estimator."""
import math

import numpy as np
import pytest

from effattn.attention import performer
from effattn.gradcheck import check_gradients


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def phi_paper(x, w, kernel):
    """The paper's feature maps, unstabilised (x already scaled by d^-1/4)."""
    u = x @ w.T
    sq = 0.5 * (x * x).sum(-1, keepdims=True)
    m = w.shape[0]
    if kernel == "positive":
        return np.exp(u - sq) / math.sqrt(m)
    if kernel == "hyperbolic":
        return np.exp(-sq) / math.sqrt(2 * m) * np.concatenate([np.exp(u), np.exp(-u)], -1)
    return np.exp(sq) / math.sqrt(m) * np.concatenate([np.sin(u), np.cos(u)], -1)


def explicit(q, k, v, w, kernel, causal=False, key_mask=None):
    d = q.shape[-1]
    a = phi_paper(q * d ** -0.25, w, kernel) @ np.swapaxes(phi_paper(k * d ** -0.25, w, kernel), -1, -2)
    if causal:
        a = np.tril(a)
    if key_mask is not None:
        a = a * key_mask[..., None, :]
    W = a / a.sum(-1, keepdims=True)
    return W @ v, W


@pytest.mark.parametrize("kernel", performer.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_weights_match_explicit_construction(kernel, causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 13, 4)) for _ in range(3))
    w = performer.draw_features(rng, 10, 4)
    km = rng.random((2, 1, 13)) > 0.3
    km[..., 0] = True
    ref, W = explicit(q, k, v, w, kernel, causal, km)
    for chunk in (1, 4, 13, 100):
        out, cache = performer.forward(q, k, v, features=w, kernel=kernel, causal=causal, key_mask=km, chunk=chunk)
        np.testing.assert_allclose(out, ref, atol=1e-10)
        np.testing.assert_allclose(performer.weights(cache), W, atol=1e-10)
    np.testing.assert_allclose(performer.loop(q, k, v, features=w, kernel=kernel, causal=causal, key_mask=km), ref, atol=1e-10)


@pytest.mark.parametrize("kernel", performer.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_every_kernel(kernel, causal):
    rng = np.random.default_rng(1)
    inputs = {x: rng.standard_normal((1, 2, 7, 3)) for x in "qkv"}
    feats = performer.draw_features(rng, 5, 3, heads=2)    # one draw per head
    km = rng.random((1, 1, 7)) > 0.3
    km[..., 0] = True
    config = {"features": feats, "kernel": kernel, "causal": causal, "chunk": 3, "key_mask": km}
    errors = check_gradients(performer.forward, performer.backward, inputs, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_estimate_approaches_softmax_as_features_grow():
    """Mean error over draws shrinks about as 1/sqrt(m) (fitted log-log slope near -1/2; heavier
    tails of the log-normal features make it a little slower for larger inputs)."""
    rng = np.random.default_rng(2)
    n, d = 24, 8
    q, k, v = (rng.standard_normal((1, 1, n, d)) * 0.3 for _ in range(3))
    exact = softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(d))
    ms = (16, 64, 256, 1024)
    err = []
    for m in ms:
        e = [np.abs(performer.weights(performer.forward(q, k, v, features=performer.draw_features(
            rng, m, d, orthogonal=False))[1]) - exact).mean() for _ in range(30)]
        err.append(np.mean(e))
    slope = np.polyfit(np.log(ms), np.log(err), 1)[0]
    assert -0.6 < slope < -0.38, (err, slope)
    assert all(a > b for a, b in zip(err, err[1:]))


def test_positive_features_never_give_negative_weights():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 15, 4)) * 2 for _ in range(3))
    for causal in (False, True):
        _, cache = performer.forward(q, k, v, features=performer.draw_features(rng, 8, 4), causal=causal)
        W = performer.weights(cache)
        assert W.min() >= 0 and np.allclose(W.sum(-1), 1)
    _, cache = performer.forward(q, k, v, features=performer.draw_features(rng, 8, 4), kernel="trig")
    assert performer.weights(cache).min() < 0                # the trigonometric estimator does


def test_draw_features():
    rng = np.random.default_rng(4)
    w = performer.draw_features(rng, 12, 5, norms="fixed")
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), math.sqrt(5))
    block = w[:5] / math.sqrt(5)
    np.testing.assert_allclose(block @ block.T, np.eye(5), atol=1e-12)    # orthogonal within a block
    block = w[5:10] / math.sqrt(5)
    np.testing.assert_allclose(block @ block.T, np.eye(5), atol=1e-12)
    w = performer.draw_features(rng, 4000, 5)                # resampled norms: chi(5) distributed
    norms = np.linalg.norm(w, axis=1)
    assert abs(np.mean(norms ** 2) - 5) < 0.3
    assert performer.draw_features(rng, 7, 3, heads=4).shape == (4, 7, 3)
    with pytest.raises(ValueError, match="norms"):
        performer.draw_features(rng, 7, 3, norms="bad")


def test_causal_key_stabiliser_does_not_leak_and_stays_finite():
    """Outputs before t are bit-for-bit unchanged when a huge key arrives at t (no sequence-wide max)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 20, 4)) for _ in range(3))
    w = performer.draw_features(rng, 8, 4)
    out, _ = performer.forward(q, k, v, features=w, causal=True, chunk=8)
    k2 = k.copy()
    k2[..., 10, :] = 50.0
    out2, _ = performer.forward(q, k2, v, features=w, causal=True, chunk=8)
    assert np.array_equal(out[..., :10, :], out2[..., :10, :])
    assert np.isfinite(out2).all()
    out3, _ = performer.forward(q, k * 1e3, v, features=w)   # non-causal: global key max keeps it finite
    assert np.isfinite(out3).all()


@pytest.mark.parametrize("kernel", performer.KERNELS)
def test_features_are_unbiased_estimators_of_the_softmax_kernel(kernel):
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal(4) * 0.5, rng.standard_normal(4) * 0.5
    w = performer.draw_features(rng, 200000, 4, orthogonal=False)
    est = performer.random_features(x[None], w, kernel) @ performer.random_features(y[None], w, kernel).T
    assert abs(est[0, 0] / math.exp(x @ y) - 1) < 0.02


def test_causal_keys_cannot_overflow_in_float32_for_large_d():
    """Keys placed right on a feature direction give the largest possible feature exp(|w|^2/2);
    the data-free causal shift keeps it finite in float32 even for d = 256."""
    rng = np.random.default_rng(7)
    d, n = 256, 6
    w = performer.draw_features(rng, 32, d)
    k = np.repeat(w[:1] * d ** 0.25, n, axis=0)[None, None]          # x = k / d^(1/4) = w_1
    q, v = rng.standard_normal((1, 1, n, d)), rng.standard_normal((1, 1, n, 3))
    out32, _ = performer.forward(q.astype("float32"), k.astype("float32"), v.astype("float32"),
                                 features=w.astype("float32"), causal=True)
    out64, _ = performer.forward(q, k, v, features=w, causal=True)
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, out64, rtol=1e-3, atol=1e-4)
