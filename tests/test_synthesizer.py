"""Dense and Random Synthesizers: what they read, the paper's formula per token, the
factorized ranks, causality and the N < N_max slicing. Oracles: per-token loops of the
paper's equations and finite differences."""
import numpy as np
import pytest

import effattn
from effattn.attention import synthesizer as syn
from effattn.gradcheck import check_gradients

DENSE = effattn.get("synthesizer_dense")
RANDOM = effattn.get("synthesizer_random")


def softmax_rows(a, allowed):
    a = np.where(allowed, a, -np.inf)
    m = a.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(a - m)
    z = e.sum(-1, keepdims=True)
    return e / np.where(z > 0, z, 1)


def qkv(rng, n=9, d=4, heads=2, batch=2):
    return tuple(rng.standard_normal((batch, heads, n, d)) for _ in range(3))


def test_random_synthesizer_ignores_q_and_k():
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    params, _ = RANDOM.setup(rng, n=9, d=4, heads=2)
    out, cache = RANDOM.forward(q, k, v, **params)
    out2, _ = RANDOM.forward(rng.standard_normal(q.shape) * 100, rng.standard_normal(k.shape), v, **params)
    assert np.array_equal(out, out2)
    g = RANDOM.backward(rng.standard_normal(out.shape), cache)
    assert np.all(g["q"] == 0) and np.all(g["k"] == 0)
    # the oracle: softmax(R) v, per head
    W = softmax_rows(params["R"], True)
    np.testing.assert_allclose(out, W[None] @ v, atol=1e-12)


def test_dense_depends_only_on_q_and_v_and_matches_per_token_formula():
    rng = np.random.default_rng(1)
    n, d = 9, 4
    q, k, v = qkv(rng, n=n, d=d)
    params, _ = DENSE.setup(rng, n=n, d=d, heads=2)
    out, cache = DENSE.forward(q, k, v, **params)
    out2, _ = DENSE.forward(q, rng.standard_normal(k.shape) * 50, v, **params)
    assert np.array_equal(out, out2)
    # B_i = W2^T ReLU(W1^T x_i + b1) + b2, token by token
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    ref = np.zeros_like(out)
    for idx in np.ndindex(*q.shape[:-2]):
        B = np.stack([W2.T @ np.maximum(W1.T @ q[idx][i] + b1, 0) + b2 for i in range(n)])
        ref[idx] = softmax_rows(B, True) @ v[idx]
    np.testing.assert_allclose(out, ref, atol=1e-12)
    # a token's row depends only on that token: changing q_j changes only row j
    q3 = q.copy()
    q3[..., 4, :] += 1.0
    out3, _ = DENSE.forward(q3, k, v, **params)
    changed = ~np.all(out3 == out, axis=-1)
    assert changed[..., 4].all() and not np.delete(changed, 4, axis=-1).any()


def test_shorter_inputs_use_the_first_columns():
    rng = np.random.default_rng(2)
    n_max, n, d = 12, 7, 4
    q, k, v = qkv(rng, n=n, d=d)
    pd = syn.init_dense(rng, n_max=n_max, d=d)
    pr = syn.init_random(rng, n_max=n_max, heads=2)
    a, _ = DENSE.forward(q, k, v, **pd)
    b, _ = DENSE.forward(q, k, v, **{**pd, "W2": pd["W2"][:, :n].copy(), "b2": pd["b2"][:n].copy()})
    np.testing.assert_allclose(a, b, atol=1e-14)
    a, _ = RANDOM.forward(q, k, v, **pr)
    b, _ = RANDOM.forward(q, k, v, R=pr["R"][:, :n, :n].copy())
    np.testing.assert_allclose(a, b, atol=1e-14)
    with pytest.raises(ValueError, match="W2"):
        DENSE.forward(*qkv(rng, n=n_max + 1, d=d), **pd)
    with pytest.raises(ValueError, match="R"):
        RANDOM.forward(*qkv(rng, n=n_max + 1, d=d), **pr)


def test_factorized_random_has_rank_k():
    rng = np.random.default_rng(3)
    n, kk = 10, 2
    q, k, v = qkv(rng, n=n)
    p = syn.init_random(rng, n_max=n, heads=2, factorized=kk)
    out, cache = RANDOM.forward(q, k, v, **p, factorized=kk)
    logw = np.log(RANDOM.weights(cache))                 # = R - lse(R) 1^T: rank <= k + 1
    for h in range(2):
        r = np.linalg.matrix_rank(logw[0, h], tol=1e-8)
        assert r <= kk + 1 < n
        # and R = R1 R2^T exactly: remove the row constant and compare
        R = p["R1"][h] @ p["R2"][h].T
        np.testing.assert_allclose(logw[0, h] - logw[0, h, :, :1], R - R[:, :1], atol=1e-10)


def test_factorized_dense_rows_are_rank_one_outer_products():
    rng = np.random.default_rng(4)
    n, d, a = 12, 4, 3
    q, k, v = qkv(rng, n=n, d=d)
    p = syn.init_dense(rng, n_max=n, d=d, factorized=a)
    c = p["Wb"].shape[1]
    assert a * c >= n
    out, cache = DENSE.forward(q, k, v, **p, factorized=a)
    fa = q @ p["Wa"] + p["ba"]
    fb = q @ p["Wb"] + p["bb"]
    logits = np.einsum("...i,...j->...ij", fa, fb).reshape(q.shape[:-1] + (a * c,))[..., :n]
    np.testing.assert_allclose(out, softmax_rows(logits, True) @ v, atol=1e-12)
    for row in logits.reshape(-1, n)[:5]:
        assert np.linalg.matrix_rank(np.pad(row, (0, a * c - n)).reshape(a, c), tol=1e-10) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_factorized_gradients(causal):
    rng = np.random.default_rng(5)
    n, d = 7, 3
    q, k, v = qkv(rng, n=n, d=d, batch=1)
    km = np.array([[[True, True, False, True, True, False, True]]])
    for spec, p, f in ((DENSE, syn.init_dense(rng, n_max=n + 2, d=d, factorized=3), 3),
                       (RANDOM, syn.init_random(rng, n_max=n + 1, heads=2, factorized=2), 2),
                       (RANDOM, {"R": rng.standard_normal((n + 3, n + 3))}, None)):
        cfg = {"causal": causal, "key_mask": km, "factorized": f}
        err = check_gradients(spec.forward, spec.backward, {"q": q, "k": k, "v": v, **p}, cfg, rng=rng)
        assert max(err.values()) < 1e-7, err


@pytest.mark.parametrize("spec", [DENSE, RANDOM], ids=["dense", "random"])
def test_causal_is_masked_lower_triangular(spec):
    rng = np.random.default_rng(6)
    n = 11
    q, k, v = qkv(rng, n=n)
    params, _ = spec.setup(rng, n=n, d=4, heads=2)
    out, cache = spec.forward(q, k, v, **params, causal=True)
    W = spec.weights(cache)
    assert np.all(np.triu(W, 1) == 0)
    np.testing.assert_allclose(W.sum(-1), 1, atol=1e-12)
    _, cache_nc = spec.forward(q, k, v, **params)
    # causal = the same logits renormalised over j <= i
    Wn = cache_nc.p
    tri = np.tril(np.ones((n, n), bool))
    ref = np.where(tri, Wn, 0)
    ref = ref / ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(W, ref, atol=1e-12)
    # v after t never reaches outputs before t
    v2 = v.copy()
    v2[..., 5:, :] = 9.0
    out2, _ = spec.forward(q, k, v2, **params, causal=True)
    assert np.array_equal(out[..., :5, :], out2[..., :5, :])


def test_key_mask_zeroes_columns():
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng)
    km = rng.random((2, 1, 9)) > 0.4
    km[..., 0] = True
    for spec in (DENSE, RANDOM):
        params, _ = spec.setup(rng, n=9, d=4, heads=2)
        _, cache = spec.forward(q, k, v, **params, key_mask=km)
        W = spec.weights(cache)
        assert np.all(W[np.broadcast_to(~km[..., None, :], W.shape)] == 0)


@pytest.mark.parametrize("name", ["synthesizer_dense", "synthesizer_random"])
def test_inside_multi_head_attention_at_shorter_lengths(name):
    from effattn.models.attention import MultiHeadAttention

    rng = np.random.default_rng(12)
    mha = MultiHeadAttention(8, 2, rng, attention=name, causal=True, max_len=20)
    for n in (20, 13, 1):
        x = rng.standard_normal((2, n, 8))
        y = mha.forward(x)
        dx, _ = mha.backward(np.ones_like(y))
        assert y.shape == x.shape and np.isfinite(dx).all()
