"""Perceiver and Perceiver AR (effattn.layers.perceiver): the layer against its written-out
reference (explicit masks from the rule, no shared attention core) for 0-2 latent layers and
both modes, gradients beyond the registry's example, Perceiver AR's prefix rule (latent r reads
positions <= N - m + r, checked on the weights), m >= N, linear memory in N, bad configuration."""
import numpy as np
import pytest

import effattn
from effattn.gradcheck import check_gradients
from effattn.layers import perceiver

SPEC = effattn.get("perceiver")


def case(seed, B=2, N=11, D=6, m=4, L=1, causal=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N, D))
    return rng, x, perceiver.init_params(rng, D, n_latents=m, latent_layers=L, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [0, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_equals_the_written_out_reference(causal, L, masked):
    rng, x, p = case(L + 3 * causal, L=L, causal=causal)
    km = None
    if masked:
        km = rng.random((2, 11)) > 0.3
        km[:, 0] = True
    cfg = dict(heads=2, latent_layers=L, causal=causal, key_mask=km, n_latents=4 if causal else None)
    out, _ = perceiver.forward(x, **cfg, **p)
    ref = perceiver.reference(x, **cfg, **p)
    assert out.shape == (2, 4, 6)
    rows = np.ones((2, 4), bool) if (km is None or not causal) else km[:, -4:]
    np.testing.assert_allclose(out[rows], ref[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [0, 2])
def test_gradients_match_finite_differences(causal, L):
    rng, x, p = case(7 + L, N=8, L=L, causal=causal)
    km = np.ones((2, 8), bool)
    km[1, 5:] = False
    for mask in (None, km):
        cfg = dict(heads=2, latent_layers=L, causal=causal, key_mask=mask, n_latents=3 if causal else None)
        errors = check_gradients(perceiver.forward, perceiver.backward, {"x": x, **p}, cfg, rng=rng)
        assert max(errors.values()) < 1e-6, {k: e for k, e in errors.items() if e >= 1e-6}


def test_perceiver_ar_latent_r_reads_the_prefix_and_the_latents_before_it():
    """The cross-attention weights (B, h, m, N) are nonzero exactly on j <= N - m + r (and real j)."""
    rng, x, p = case(2, N=10, m=4, causal=True)
    km = np.ones((2, 10), bool)
    km[0, 2] = False
    _, c = perceiver.forward(x, heads=2, causal=True, n_latents=4, key_mask=km, **p)
    w = perceiver.weights(c)
    r, j = np.arange(4)[:, None], np.arange(10)[None, :]
    rule = (j <= 10 - 4 + r) & km[:, None, None, :]
    np.testing.assert_array_equal(w != 0, np.broadcast_to(rule, w.shape))
    assert perceiver.weights(perceiver.forward(x[:1], heads=2, causal=True, n_latents=4, **p)[1]).shape == (1, 2, 4, 10)


def test_every_position_a_latent_when_m_reaches_n():
    """n_latents >= N: the latents are the whole sequence (clipped to N), one output row per position."""
    rng, x, p = case(3, N=6, causal=True)
    a, _ = perceiver.forward(x, heads=2, causal=True, n_latents=6, **p)
    b, _ = perceiver.forward(x, heads=2, causal=True, n_latents=50, **p)
    assert a.shape == (2, 6, 6)
    np.testing.assert_array_equal(a, b)


def test_the_learned_latents_do_not_depend_on_the_input_order_without_positions():
    """Non-causal, no position vectors: the latents read a set, so permuting the inputs changes nothing."""
    rng, x, p = case(4)
    a, _ = perceiver.forward(x, heads=2, **p)
    b, _ = perceiver.forward(x[:, rng.permutation(11)], heads=2, **p)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_memory_grows_linearly_with_n():
    """forward + backward peak memory at N = 4096 over N = 1024 (m = 16): about 4x, not 16x."""
    import tracemalloc

    peaks = []
    for n in (1024, 4096):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, n, 16))
        p = perceiver.init_params(rng, 16, n_latents=16, latent_layers=1)
        tracemalloc.start()
        try:
            out, c = perceiver.forward(x, heads=2, **p)
            perceiver.backward(np.ones_like(out), c)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] / peaks[0] < 4.6, peaks


def test_bad_configuration_is_named():
    rng, x, p = case(5, causal=True)
    with pytest.raises(ValueError, match="n_latents"):
        perceiver.forward(x, causal=True, heads=2, **p)
    with pytest.raises(ValueError, match="latents"):
        perceiver.forward(x, causal=False, heads=2, **p)                 # non-causal needs its latents
    rng, x, q = case(5)
    with pytest.raises(ValueError, match="no 'latents'"):
        perceiver.forward(x, causal=True, n_latents=3, heads=2, **q)
    with pytest.raises(ValueError, match="n_latents"):
        perceiver.forward(x, heads=2, n_latents=9, **q)
    with pytest.raises(ValueError, match="latent_layers"):
        perceiver.forward(x, heads=2, latent_layers=-1, **q)
    with pytest.raises(ValueError, match="heads"):
        perceiver.forward(x, heads=4, **q)
