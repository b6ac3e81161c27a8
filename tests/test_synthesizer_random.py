"""Random Synthesizer: it reads neither q nor k, the table per head, the factorized rank and the
N < N_max slicing. Oracles: softmax of the table written out, and finite differences.
What both Synthesizers share (masks, causality, inside a model): tests/test_synthetic.py."""
import numpy as np
import pytest

import effattn
from effattn.attention import synthesizer_random as SR
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size

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


# --------------------------------------------------------------------------- decoding
def decode(q, k, v, km, prompt, params, factorized=None):
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    state = SR.init_state(lead=q.shape[:-2], d=q.shape[-1], dv=v.shape[-1], factorized=factorized, **params)
    out, state = SR.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                            key_mask=None if kmb is None else kmb[..., :prompt])
    rows, sizes = [out], [state_size(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = SR.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                           key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        sizes.append(state_size(state))
    return np.concatenate(rows, axis=-2), sizes


@pytest.mark.parametrize("factorized", [None, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_decoding_equals_the_causal_forward_and_keeps_the_values(factorized, shared):
    """Row t's logits R[t, :t+1] (or R1[t] R2[:t+1]^T), per head or one table shared by the heads:
    prefill + steps equal the causal forward with an N_max longer than the sequence; the state
    holds t (dv + 1) numbers per head (values and mask bits)."""
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, n=13, d=4)
    v = v[..., :3]
    params = SR.init_params(rng, n_max=16, heads=2, factorized=factorized)
    if shared:
        params = {name: x[0] for name, x in params.items()}
    km = rng.random((2, 1, 13)) > 0.3
    km[..., 0] = True
    want, _ = SR.forward(q, k, v, causal=True, key_mask=km, factorized=factorized, **params)
    for prompt in (1, 6, 12):
        got, sizes = decode(q, k, v, km, prompt, params, factorized)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        assert sizes == [2 * 2 * t * (3 + 1) for t in range(prompt, 14)]


def test_decoding_stops_at_the_table_size():
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, n=6, d=4)
    params = SR.init_params(rng, n_max=5, heads=2)
    state = SR.init_state(lead=(2, 2), d=4, dv=4, **params)
    _, state = SR.prefill(q[..., :5, :], k[..., :5, :], v[..., :5, :], state)
    with pytest.raises(ValueError, match="^R: the table covers"):
        SR.step(q[..., 0, :], k[..., 0, :], v[..., 0, :], state)
    with pytest.raises(ValueError, match="^R must have shape"):
        SR.prefill(q, k, v, SR.init_state(lead=(2, 2), d=4, dv=4, **params))
    with pytest.raises(ValueError, match="^R "):
        SR.init_state(lead=(2, 2), d=4, dv=4, R=rng.standard_normal((3, 5, 5)))
