"""Linformer against the paper's equation written out directly, in every sharing mode."""
import numpy as np
import pytest

from effattn.attention import linformer
from effattn.gradcheck import check_gradients


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def explicit(q, k, v, E, F, key_mask=None):
    """softmax(Q (E K)^T / sqrt(d)) (F V), masked rows of K and V zeroed, E and F cut to M columns."""
    m = k.shape[-2]
    if key_mask is not None:
        k = k * key_mask[..., None]
        v = v * key_mask[..., None]
    E, F = E[..., :m], F[..., :m]
    p = softmax(q @ np.swapaxes(E @ k, -1, -2) / np.sqrt(q.shape[-1]))
    return p @ (F @ v), p @ F


def params(rng, sharing, heads, kk, n_max):
    shape = (heads, kk, n_max) if sharing == "none" else (kk, n_max)
    E = rng.standard_normal(shape) / np.sqrt(kk)
    F = rng.standard_normal(shape) / np.sqrt(kk) if sharing in ("none", "headwise") else None
    return E, F


@pytest.mark.parametrize("sharing", linformer.SHARING)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_equation(sharing, masked):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 9, 4)) for _ in range(3))
    E, F = params(rng, sharing, 3, 5, 13)                   # N_max = 13 > N = 9: first 9 columns
    km = rng.random((2, 1, 9)) > 0.3 if masked else None
    out, cache = linformer.forward(q, k, v, E=E, F=F, sharing=sharing, key_mask=km)
    ref, W = explicit(q, k, v, E, E if F is None else F, km)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    W_ref = W if km is None else W * km[..., None, :]
    np.testing.assert_allclose(linformer.weights(cache), W_ref, atol=1e-12)
    np.testing.assert_allclose(linformer.weights(cache) @ v, out, atol=1e-12)


@pytest.mark.parametrize("sharing", linformer.SHARING)
def test_gradients_every_sharing_mode(sharing):
    rng = np.random.default_rng(1)
    E, F = params(rng, sharing, 2, 3, 8)
    inputs = {x: rng.standard_normal((2, 2, 6, 3)) for x in "qkv"}
    inputs["E"] = E
    if F is not None:
        inputs["F"] = F
    km = rng.random((2, 1, 6)) > 0.3
    km[:, :, 0] = True
    errors = check_gradients(linformer.forward, linformer.backward, inputs, {"sharing": sharing, "key_mask": km}, rng=rng)
    assert max(errors.values()) < 1e-7, errors
    grads = linformer.backward(np.ones((2, 2, 6, 3)), linformer.forward(**inputs, sharing=sharing)[1])
    assert np.all(grads["E"][..., 6:] == 0)                 # unused columns of E get no gradient


def test_errors():
    rng = np.random.default_rng(2)
    q = k = v = rng.standard_normal((1, 2, 6, 3))
    E, F = params(rng, "headwise", 2, 3, 5)
    with pytest.raises(ValueError, match="N_max"):
        linformer.forward(q, k, v, E=E, F=F)                # M = 6 > N_max = 5
    E, F = params(rng, "headwise", 2, 3, 8)
    with pytest.raises(ValueError, match="causal"):
        linformer.forward(q, k, v, E=E, F=F, causal=True)
    with pytest.raises(ValueError, match="F"):
        linformer.forward(q, k, v, E=E, F=F, sharing="key_value")
    with pytest.raises(ValueError, match="E"):
        linformer.forward(q, k, v, E=E[None], F=F, sharing="headwise")


def test_masked_keys_contribute_zero_to_projections():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 1, 7, 3)) for _ in range(3))
    E, F = params(rng, "headwise", 1, 4, 7)
    km = np.array([[[True] * 4 + [False] * 3]])
    out, cache = linformer.forward(q, k, v, E=E, F=F, key_mask=km)
    out_short, _ = linformer.forward(q, k[..., :4, :], v[..., :4, :], E=E[:, :4], F=F[:, :4])
    np.testing.assert_allclose(out, out_short, atol=1e-12)  # masking the tail == dropping it
    assert np.all(linformer.weights(cache)[..., 4:] == 0)


@pytest.mark.parametrize("sharing", linformer.SHARING)
def test_reference_formula_every_sharing_mode(sharing):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 2, 8, 3)) for _ in range(3))
    E, F = params(rng, sharing, 2, 3, 11)
    km = rng.random((2, 1, 8)) > 0.3
    out, _ = linformer.forward(q, k, v, E=E, F=F, sharing=sharing, key_mask=km)
    np.testing.assert_allclose(linformer.reference(q, k, v, E=E, F=F, sharing=sharing, key_mask=km), out, atol=1e-12)


def test_scale_is_checked_and_explicit_default_scale_is_the_same():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 6, 3)) for _ in range(3))
    E, F = params(rng, "headwise", 2, 3, 6)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            linformer.forward(q, k, v, E=E, F=F, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            linformer.reference(q, k, v, E=E, F=F, scale=bad)
    out, _ = linformer.forward(q, k, v, E=E, F=F)
    np.testing.assert_array_equal(linformer.forward(q, k, v, E=E, F=F, scale=3 ** -0.5)[0], out)


def test_init_projection_shape_and_scale():
    E = linformer.init_projection(np.random.default_rng(7), 4, 900)
    assert E.shape == (4, 900) and abs(E.std() * 30 - 1) < 0.1      # N(0, 1/n_max): std 1/30
    assert linformer.init_projection(np.random.default_rng(7), 4, 10, heads=3).shape == (3, 4, 10)
