"""Dense Synthesizer: what it reads, the paper's formula per token, the factorized rank-1 rows and
the N < N_max slicing. Oracles: per-token loops of the paper's equations and finite differences.
What both Synthesizers share (masks, causality, inside a model): tests/test_synthetic.py."""
import numpy as np
import pytest

import effattn
from effattn.attention import synthesizer_dense as SD
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size

DENSE = effattn.get("synthesizer_dense")


def softmax_rows(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def qkv(rng, n=9, d=4, heads=2, batch=2):
    return tuple(rng.standard_normal((batch, heads, n, d)) for _ in range(3))


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
        ref[idx] = softmax_rows(B) @ v[idx]
    np.testing.assert_allclose(out, ref, atol=1e-12)
    # a token's row depends only on that token: changing q_j changes only row j
    q3 = q.copy()
    q3[..., 4, :] += 1.0
    out3, _ = DENSE.forward(q3, k, v, **params)
    changed = ~np.all(out3 == out, axis=-1)
    assert changed[..., 4].all() and not np.delete(changed, 4, axis=-1).any()
    g = DENSE.backward(rng.standard_normal(out.shape), cache)
    assert np.all(g["k"] == 0) and set(g) == {"q", "k", "v", "W1", "b1", "W2", "b2"}


def test_shorter_inputs_use_the_first_columns():
    rng = np.random.default_rng(2)
    n_max, n, d = 12, 7, 4
    q, k, v = qkv(rng, n=n, d=d)
    pd = SD.init_params(rng, n_max=n_max, d=d)
    a, _ = DENSE.forward(q, k, v, **pd)
    b, _ = DENSE.forward(q, k, v, **{**pd, "W2": pd["W2"][:, :n].copy(), "b2": pd["b2"][:n].copy()})
    np.testing.assert_allclose(a, b, atol=1e-14)
    with pytest.raises(ValueError, match="W2"):
        DENSE.forward(*qkv(rng, n=n_max + 1, d=d), **pd)


def test_factorized_dense_rows_are_rank_one_outer_products():
    rng = np.random.default_rng(4)
    n, d, a = 12, 4, 3
    q, k, v = qkv(rng, n=n, d=d)
    p = SD.init_params(rng, n_max=n, d=d, factorized=a)
    c = p["Wb"].shape[1]
    assert a * c >= n
    out, cache = DENSE.forward(q, k, v, **p, factorized=a)
    fa = q @ p["Wa"] + p["ba"]
    fb = q @ p["Wb"] + p["bb"]
    logits = np.einsum("...i,...j->...ij", fa, fb).reshape(q.shape[:-1] + (a * c,))[..., :n]
    np.testing.assert_allclose(out, softmax_rows(logits) @ v, atol=1e-12)
    for row in logits.reshape(-1, n)[:5]:
        assert np.linalg.matrix_rank(np.pad(row, (0, a * c - n)).reshape(a, c), tol=1e-10) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_factorized_gradients(causal):
    rng = np.random.default_rng(5)
    n, d = 7, 3
    q, k, v = qkv(rng, n=n, d=d, batch=1)
    km = np.array([[[True, True, False, True, True, False, True]]])
    p = SD.init_params(rng, n_max=n + 2, d=d, factorized=3)
    cfg = {"causal": causal, "key_mask": km, "factorized": 3}
    err = check_gradients(DENSE.forward, DENSE.backward, {"q": q, "k": k, "v": v, **p}, cfg, rng=rng)
    assert max(err.values()) < 1e-7, err


def test_bad_parameters():
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="W1"):
        DENSE.forward(q, k, v)
    p = SD.init_params(rng, n_max=9, d=4, factorized=2)
    with pytest.raises(ValueError, match="Wb"):
        DENSE.forward(q, k, v, **{**p, "Wb": p["Wb"][:, :2], "bb": p["bb"][:2]}, factorized=2)   # 2 x 2 < 9 keys


# --------------------------------------------------------------------------- decoding
def decode(q, k, v, km, prompt, params, factorized=None):
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    state = SD.init_state(lead=q.shape[:-2], d=q.shape[-1], dv=v.shape[-1], factorized=factorized, **params)
    out, state = SD.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                            key_mask=None if kmb is None else kmb[..., :prompt])
    rows, sizes = [out], [state_size(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = SD.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                           key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        sizes.append(state_size(state))
    return np.concatenate(rows, axis=-2), sizes, state


@pytest.mark.parametrize("factorized", [None, 3])
def test_decoding_equals_the_causal_forward_and_keeps_the_values(factorized):
    """Row t's logits B_t[:t+1] from q_t alone (plain MLP or the rank-1 factorized row): prefill +
    steps equal the causal forward with an N_max longer than the sequence; the state holds t (dv + 1)
    numbers per head (values and mask bits), growing by dv + 1 per token."""
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, n=13, d=4)
    v = v[..., :3]
    params = SD.init_params(rng, n_max=16, d=4, factorized=factorized)
    km = rng.random((2, 1, 13)) > 0.3
    km[..., 0] = True
    want, _ = SD.forward(q, k, v, causal=True, key_mask=km, factorized=factorized, **params)
    for prompt in (1, 6, 12):
        got, sizes, _ = decode(q, k, v, km, prompt, params, factorized)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        assert sizes == [2 * 2 * t * (3 + 1) for t in range(prompt, 14)]


@pytest.mark.parametrize("factorized", [None, 2])
def test_decoding_stops_at_n_max(factorized):
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, n=6, d=4)
    params = SD.init_params(rng, n_max=5, d=4, factorized=factorized)      # factorized: a = 2, c = 3 cover 6
    length = 5 if factorized is None else 6
    state = SD.init_state(lead=(2, 2), d=4, dv=4, factorized=factorized, **params)
    _, state = SD.prefill(q[..., :length - 1, :], k[..., :length - 1, :], v[..., :length - 1, :], state)
    _, state = SD.step(q[..., 0, :], k[..., 0, :], v[..., 0, :], state)
    with pytest.raises(ValueError, match="^W2" if factorized is None else "^Wb"):
        SD.step(q[..., 0, :], k[..., 0, :], v[..., 0, :], state)
    with pytest.raises(ValueError, match="^W1 is required"):
        SD.init_state(lead=(2, 2), d=4, dv=4)
