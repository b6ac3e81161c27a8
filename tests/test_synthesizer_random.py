"""Random Synthesizer: it reads neither q nor k, the table per head, the factorized rank and the
N < N_max slicing. Oracles: softmax of the table written out, and finite differences.
What both Synthesizers share (masks, causality, inside a model): tests/test_synthetic.py."""
import numpy as np
import pytest

import effattn
from effattn.attention import synthesizer_random as SR
from effattn.gradcheck import check_gradients

RANDOM = effattn.get("synthesizer_random")


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
    e = np.exp(params["R"] - params["R"].max(-1, keepdims=True))
    W = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, W[None] @ v, atol=1e-12)


def test_shorter_inputs_use_the_first_columns():
    rng = np.random.default_rng(2)
    n_max, n, d = 12, 7, 4
    q, k, v = qkv(rng, n=n, d=d)
    pr = SR.init_params(rng, n_max=n_max, heads=2)
    a, _ = RANDOM.forward(q, k, v, **pr)
    b, _ = RANDOM.forward(q, k, v, R=pr["R"][:, :n, :n].copy())
    np.testing.assert_allclose(a, b, atol=1e-14)
    with pytest.raises(ValueError, match="R"):
        RANDOM.forward(*qkv(rng, n=n_max + 1, d=d), **pr)


def test_factorized_random_has_rank_k():
    rng = np.random.default_rng(3)
    n, kk = 10, 2
    q, k, v = qkv(rng, n=n)
    p = SR.init_params(rng, n_max=n, heads=2, factorized=kk)
    out, cache = RANDOM.forward(q, k, v, **p, factorized=kk)
    logw = np.log(RANDOM.weights(cache))                 # = R - lse(R) 1^T: rank <= k + 1
    for h in range(2):
        r = np.linalg.matrix_rank(logw[0, h], tol=1e-8)
        assert r <= kk + 1 < n
        # and R = R1 R2^T exactly: remove the row constant and compare
        R = p["R1"][h] @ p["R2"][h].T
        np.testing.assert_allclose(logw[0, h] - logw[0, h, :, :1], R - R[:, :1], atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_factorized_and_of_a_shared_table(causal):
    rng = np.random.default_rng(5)
    n, d = 7, 3
    q, k, v = qkv(rng, n=n, d=d, batch=1)
    km = np.array([[[True, True, False, True, True, False, True]]])
    for p, f in ((SR.init_params(rng, n_max=n + 1, heads=2, factorized=2), 2),
                 ({"R": rng.standard_normal((n + 3, n + 3))}, None)):          # one (L, L) table for every head
        cfg = {"causal": causal, "key_mask": km, "factorized": f}
        err = check_gradients(RANDOM.forward, RANDOM.backward, {"q": q, "k": k, "v": v, **p}, cfg, rng=rng)
        assert max(err.values()) < 1e-7, err


def test_bad_parameters():
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="R is required"):
        RANDOM.forward(q, k, v)
    p = SR.init_params(rng, n_max=9, heads=2, factorized=2)
    with pytest.raises(ValueError, match="R1"):
        RANDOM.forward(q, k, v, **{**p, "R1": p["R1"][..., :1]}, factorized=2)
