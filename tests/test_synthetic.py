"""effattn.nn.synthetic, the core both Synthesizers share: softmax over the synthesized logits with
the causal and key masks, its backward, and both registered kernels inside a model."""
import numpy as np
import pytest

import effattn
from effattn.gradcheck import rel_error
from effattn.nn import synthetic

SPECS = [effattn.get("synthesizer_dense"), effattn.get("synthesizer_random")]
IDS = ["dense", "random"]


def qkv(rng, n=9, d=4, heads=2, batch=2):
    return tuple(rng.standard_normal((batch, heads, n, d)) for _ in range(3))


def test_attend_logits_and_its_backward():
    """P = softmax(B) masked, Y = P v; a fully masked row gives 0; dB and dV against finite differences."""
    rng = np.random.default_rng(9)
    n, m, dv = 5, 6, 3
    logits, v = rng.standard_normal((2, n, m)), rng.standard_normal((2, m, dv))
    km = np.array([[True, False, True, True, False, True], [False] * 6])        # batch 1: nothing visible
    p, out = synthetic.attend_logits(logits.copy(), v, causal=True, key_mask=km)
    allowed = np.tril(np.ones((n, m), bool)) & km[:, None, :]
    e = np.where(allowed, np.exp(logits), 0.0)
    ref = e / np.where(e.sum(-1, keepdims=True) > 0, e.sum(-1, keepdims=True), 1.0)
    np.testing.assert_allclose(p, ref, atol=1e-14)
    np.testing.assert_allclose(out, ref @ v, atol=1e-14)
    assert np.all(out[1] == 0)
    dout = rng.standard_normal(out.shape)
    cache = synthetic.SynthesizerCache("random", p, v, out, (), {}, n, m, 4)
    db, grads = synthetic.attend_logits_backward(dout, cache)
    assert grads["q"].shape == (2, n, 4) and not grads["q"].any() and not grads["k"].any()

    def loss(b, vv):
        return (synthetic.attend_logits(b.copy(), vv, causal=True, key_mask=km)[1] * dout).sum()

    for x, g in ((logits, db), (v, grads["v"])):
        num = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            old = x[idx]
            x[idx] = old + 1e-6
            plus = loss(logits, v)
            x[idx] = old - 1e-6
            minus = loss(logits, v)
            x[idx] = old
            num[idx] = (plus - minus) / 2e-6
        assert rel_error(g, num) < 1e-7


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
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


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_key_mask_zeroes_columns(spec):
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng)
    km = rng.random((2, 1, 9)) > 0.4
    km[..., 0] = True
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
