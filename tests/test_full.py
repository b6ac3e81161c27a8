"""Full attention against a literal transcription of the equations."""
import numpy as np
import pytest

import effattn
from effattn.attention import full
from effattn.gradcheck import check_gradients

rng = np.random.default_rng(0)


def literal(q, k, v, allowed, scale):
    """softmax(Q K^T * scale) V over allowed entries, one row at a time (no shared code)."""
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(q.shape[:-2]):
        for i in range(q.shape[-2]):
            a = allowed[idx + (i,)] if allowed is not None else np.ones(k.shape[-2], bool)
            if not a.any():
                continue
            s = np.array([q[idx + (i,)] @ k[idx + (j,)] * scale for j in range(k.shape[-2])])
            w = np.exp(s[a] - s[a].max())
            out[idx + (i,)] = (w / w.sum()) @ v[idx][a]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_literal(causal):
    q, k, v = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 7, 4)), rng.standard_normal((2, 3, 7, 6))
    km = rng.random((2, 1, 7)) > 0.3
    mask = rng.random((5, 7)) > 0.2
    out, cache = full.forward(q, k, v, causal=causal, key_mask=km, mask=mask)
    allowed = np.broadcast_to(km[..., None, :] & mask, (2, 3, 5, 7)).copy()
    if causal:
        allowed &= np.tril(np.ones((5, 7), bool))
    np.testing.assert_allclose(out, literal(q, k, v, allowed, 0.5), atol=1e-12)
    assert out.shape == (2, 3, 5, 6)
    errs = check_gradients(full.forward, full.backward, {"q": q, "k": k, "v": v},
                           {"causal": causal, "key_mask": km, "mask": mask})
    assert max(errs.values()) < 1e-7


def test_float32_stays_float32_and_scale():
    q, k, v = (rng.standard_normal((4, 8)).astype(np.float32) for _ in range(3))
    out, cache = full.forward(q, k, v, scale=0.1)
    assert out.dtype == np.float32 and full.weights(cache).dtype == np.float32
    g = full.backward(np.ones_like(out), cache)
    assert all(x.dtype == np.float32 for x in g.values())
    np.testing.assert_allclose(out, literal(q.astype(float), k.astype(float), v.astype(float), None, 0.1), atol=1e-5)


def test_fully_masked_row_gives_zero_and_zero_gradient():
    q, k, v = (rng.standard_normal((3, 2)) for _ in range(3))
    mask = np.ones((3, 3), bool)
    mask[1] = False
    out, cache = full.forward(q, k, v, mask=mask)
    assert np.all(out[1] == 0) and np.isfinite(out).all()
    g = full.backward(np.ones_like(out), cache)
    assert np.all(g["q"][1] == 0)


@pytest.mark.parametrize("bad, word", [
    (dict(mask=np.ones((3, 4), int)), "mask"),
    (dict(mask=np.ones((2, 4), bool)), "mask"),
    (dict(scale=-1.0), "scale"),
    (dict(causal="yes"), "causal"),
    (dict(key_mask=np.ones(5, bool)), "key_mask"),
])
def test_bad_arguments(bad, word):
    q, k, v = (rng.standard_normal((3, 2)) for _ in range(3))
    with pytest.raises(ValueError, match=word):
        full.forward(np.pad(q, ((0, 1), (0, 0))), np.pad(k, ((0, 1), (0, 0))), np.pad(v, ((0, 1), (0, 0))), **bad)


def test_registry_entry():
    spec = effattn.get("full")
    assert spec.title and spec.url.startswith("https://arxiv.org/") and spec.causal and spec.exact
    assert "full" in effattn.names()
    with pytest.raises(ValueError, match="registered: .*full"):
        effattn.get("nope")


@pytest.mark.parametrize("n, m, block", [(11, 11, 4), (10, 7, 3), (6, 13, 4), (9, 9, 16)])
def test_causal_row_blocks_match_literal_and_gradients(monkeypatch, n, m, block):
    """The causal path by row blocks (tiles above the diagonal skipped): equal to the literal masked
    formula, key masks included, for N, M that the block does not divide, and N != M; gradients
    by finite differences; the weights zero above the diagonal."""
    monkeypatch.setattr(full, "CAUSAL_BLOCK", block)
    q, k, v = rng.standard_normal((2, n, 4)), rng.standard_normal((2, m, 4)), rng.standard_normal((2, m, 3))
    km = rng.random((2, m)) > 0.3
    km[:, 0] = True
    allowed = (np.arange(m)[None, :] <= np.arange(n)[:, None])[None] & km[:, None, :]
    out, cache = full.forward(q, k, v, causal=True, key_mask=km)
    np.testing.assert_allclose(out, literal(q, k, v, allowed, 0.5), atol=1e-12)
    assert len(cache.saved.parts) == -(-n // block)
    w = full.weights(cache)
    np.testing.assert_allclose(w @ v, out, atol=1e-12)
    assert not np.any(w[:, ~np.tril(np.ones((n, m), bool))])
    np.testing.assert_array_equal(full.pattern(cache), np.broadcast_to(allowed, w.shape))
    err = check_gradients(full.forward, full.backward, {"q": q, "k": k, "v": v}, {"causal": True, "key_mask": km})
    assert max(err.values()) < 1e-7, err
