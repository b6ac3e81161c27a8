"""Nyströmformer against the paper's equations written out with loops, the iterative
pseudo-inverse against numpy's, and convergence to softmax with m = N landmarks."""
import math

import numpy as np
import pytest

from effattn.attention import nystromformer as ny
from effattn.gradcheck import check_gradients


def softmax(s, mask=None):
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    z = e.sum(-1, keepdims=True)
    return e / np.where(z > 0, z, 1)


def landmarks_loop(x, m, mask=None):
    """Segment j = positions i with floor(i m / N) = j; mean over the unmasked ones (0 if none)."""
    n = x.shape[-2]
    out = np.zeros(x.shape[:-2] + (m, x.shape[-1]))
    for j in range(m):
        idx = [i for i in range(n) if (i * m) // n == j]
        w = np.ones(x.shape[:-1]) if mask is None else np.broadcast_to(mask, x.shape[:-1]).astype(float)
        w = w[..., idx]
        out[..., j, :] = (w[..., None] * x[..., idx, :]).sum(-2) / np.maximum(w.sum(-1), 1)[..., None]
    return out


def pinv_iter(a, iters):
    z = np.swapaxes(a, -1, -2) / (a.sum(-2).max(-1)[..., None, None] * a.sum(-1).max(-1)[..., None, None])
    eye = np.eye(a.shape[-1])
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def explicit(q, k, v, m, iters, conv_w=None, key_mask=None):
    d = q.shape[-1]
    self_attention = q.shape[-2] == k.shape[-2]
    qt, kt = landmarks_loop(q, m, key_mask if self_attention else None), landmarks_loop(k, m, key_mask)
    tr = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    F = softmax(q @ tr(kt) / math.sqrt(d))
    A = softmax(qt @ tr(kt) / math.sqrt(d))
    B = softmax(qt @ tr(k) / math.sqrt(d), None if key_mask is None else key_mask[..., None, :])
    out = F @ pinv_iter(A, iters) @ (B @ v)
    if conv_w is not None:
        vm = v if key_mask is None else v * key_mask[..., None]
        n, kern = v.shape[-2], conv_w.shape[-1]
        for i in range(n):
            for t in range(kern):
                j = i + t - kern // 2
                if 0 <= j < n:
                    out[..., i, :] += conv_w[:, t, None] * vm[..., j, :]
    return out


@pytest.mark.parametrize("n,m", [(12, 4), (13, 5), (7, 7), (9, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_equations(n, m, masked):
    rng = np.random.default_rng(n * m)
    q, k, v = (rng.standard_normal((2, 2, n, 4)) for _ in range(3))
    conv_w = rng.standard_normal((2, 3)) / 3
    km = rng.random((2, 1, n)) > 0.3 if masked else None
    out, cache = ny.forward(q, k, v, conv_w=conv_w, landmarks=m, iterations=6, conv_kernel=3, key_mask=km)
    np.testing.assert_allclose(out, explicit(q, k, v, m, 6, conv_w, km), atol=1e-10)
    np.testing.assert_allclose(ny.weights(cache) @ v, out, atol=1e-10)


def test_padded_queries_never_reach_a_real_output():
    """Both landmark sets are means over real positions: what sits at a padded position (in q,
    k or v) changes no real row (the fault of issue 12: q there moved real rows by 2.08)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 16, 4)) for _ in range(3))
    km = np.ones((1, 1, 16), bool)
    km[..., 3] = False
    out, _ = ny.forward(q, k, v, key_mask=km, landmarks=4)
    for x in (q, k, v):
        x2 = x.copy()
        x2[..., 3, :] += 10
        args = [x2 if y is x else y for y in (q, k, v)]
        out2, _ = ny.forward(*args, key_mask=km, landmarks=4)
        np.testing.assert_array_equal(out2[..., km[0, 0], :], out[..., km[0, 0], :])


def test_even_conv_kernel_and_cross_lengths():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 10, 3)) for _ in range(3))
    w = rng.standard_normal((2, 4))
    out, cache = ny.forward(q, k, v, conv_w=w, landmarks=3, conv_kernel=4)
    np.testing.assert_allclose(out, explicit(q, k, v, 3, 6, w), atol=1e-10)
    q2 = rng.standard_normal((1, 2, 6, 3))
    out, _ = ny.forward(q2, k, v, landmarks=3)                # N = 6 queries, M = 10 keys
    np.testing.assert_allclose(out, explicit(q2, k, v, 3, 6), atol=1e-10)


def test_iterative_pinv_converges_to_pseudo_inverse():
    rng = np.random.default_rng(2)
    a = softmax(rng.standard_normal((3, 6, 6)))
    z, _ = ny.pinv_forward(a, 30)
    np.testing.assert_allclose(z, np.linalg.pinv(a), atol=1e-8)


def test_converges_to_softmax_with_m_equal_n():
    rng = np.random.default_rng(3)
    n, d = 16, 8
    q, k, v = (rng.standard_normal((1, 2, n, d)) for _ in range(3))
    ref = softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(d)) @ v
    err = [np.abs(ny.forward(q, k, v, landmarks=n, iterations=it)[0] - ref).max() for it in (2, 6, 40)]
    assert err[0] > err[2] and err[2] < 1e-8, err


def test_gradients_with_mask_and_conv():
    rng = np.random.default_rng(4)
    inputs = {x: rng.standard_normal((2, 2, 11, 3)) for x in "qkv"}
    inputs["conv_w"] = rng.standard_normal((2, 5)) / 5
    km = rng.random((2, 1, 11)) > 0.3
    km[..., 0] = True
    config = {"landmarks": 4, "iterations": 4, "conv_kernel": 5, "key_mask": km}
    errors = check_gradients(ny.forward, ny.backward, inputs, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_errors():
    rng = np.random.default_rng(5)
    q = k = v = rng.standard_normal((1, 2, 6, 3))
    with pytest.raises(ValueError, match="causal"):
        ny.forward(q, k, v, landmarks=2, causal=True)
    with pytest.raises(ValueError, match="landmarks"):
        ny.forward(q, k, v, landmarks=7)
    with pytest.raises(ValueError, match="conv"):
        ny.forward(q, k, v, conv_w=rng.standard_normal((2, 3)), landmarks=2)
    with pytest.raises(ValueError, match="conv_w"):
        ny.forward(q, k, v, conv_w=rng.standard_normal((3, 3)), landmarks=2, conv_kernel=3)


def test_dense_reference_with_mask_conv_and_ragged_segments():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 2, 13, 4)) for _ in range(3))
    w = rng.standard_normal((2, 5)) / 5
    km = rng.random((2, 1, 13)) > 0.3
    out, _ = ny.forward(q, k, v, conv_w=w, landmarks=5, conv_kernel=5, key_mask=km, iterations=4)
    ref = ny.reference(q, k, v, conv_w=w, landmarks=5, conv_kernel=5, key_mask=km, iterations=4)
    np.testing.assert_allclose(ref, out, atol=1e-10)


def test_scale_is_checked_and_explicit_default_scale_is_the_same():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 8, 4)) for _ in range(3))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            ny.forward(q, k, v, landmarks=2, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            ny.reference(q, k, v, landmarks=2, scale=bad)
    out, _ = ny.forward(q, k, v, landmarks=2)
    np.testing.assert_array_equal(ny.forward(q, k, v, landmarks=2, scale=0.5)[0], out)
    np.testing.assert_allclose(ny.forward(q, k, v, landmarks=2, scale=0.3)[0],
                               ny.reference(q, k, v, landmarks=2, scale=0.3), atol=1e-10)
