"""Set Transformer ISAB (effattn.layers.isab): induced set attention through m inducing points.

Oracles: the paper's equations written out per set and per head with a plain dense softmax and
a NumPy transcription of the official PyTorch ``modules.py`` (both in tests/test_mab.py);
permutation equivariance; padding + key_mask equal to the unpadded set; tracemalloc for the
O(N m) memory claim. Batch axes, masked weights and the finite-difference gradients of every
parameter are tested with PMA's in tests/test_mab.py.
"""
import tracemalloc

import numpy as np
import pytest
from test_mab import FORMS, _sub, official_mab, paper_mab

from effattn.layers import isab
from effattn.nn import mab


# --------------------------------------------------------------------------- forward against the paper
@pytest.mark.parametrize("ln", [True, False])
def test_isab_matches_the_papers_equations_per_set(ln):
    rng = np.random.default_rng(0)
    B, n, D, heads, m = 3, 11, 8, 2, 4
    x = rng.standard_normal((B, n, D))
    km = rng.random((B, n)) > 0.3
    km[:, 0] = True
    pi = isab.init_params(rng, D, D, m, ln=ln, hidden=12)
    out_i, _ = isab.forward(x, heads=heads, ln=ln, key_mask=km, **pi)
    for b in range(B):
        H = paper_mab(pi["I"], x[b], _sub(pi, "mab0_"), heads, ln, keep=km[b])       # H = MAB(I, X)
        ref_i = paper_mab(x[b], H, _sub(pi, "mab1_"), heads, ln)                     # MAB(X, H)
        np.testing.assert_allclose(out_i[b][km[b]], ref_i[km[b]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("ln", [True, False])
def test_official_form_matches_the_official_code(ln):
    """form='official' == juho-lee/set_transformer modules.py ISAB, with an input width different
    from D and a nonzero fc_k bias (which cancels in the softmax)."""
    rng = np.random.default_rng(1)
    B, n, d_in, D, heads, m = 2, 9, 5, 6, 3, 4
    x = rng.standard_normal((B, n, d_in))
    pi = isab.init_params(rng, d_in, D, m, form="official", ln=ln)
    out_i, _ = isab.forward(x, heads=heads, ln=ln, form="official", **pi)
    bk = rng.standard_normal(D)
    Ib = np.repeat(pi["I"][None], B, 0)                                  # self.I.repeat(X.size(0), 1, 1)
    H = official_mab(Ib, x, _sub(pi, "mab0_"), bk, heads, ln)            # mab0(I, X)
    ref_i = official_mab(x, H, _sub(pi, "mab1_"), -bk, heads, ln)        # mab1(X, H)
    np.testing.assert_allclose(out_i, ref_i, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("form,ln", FORMS)
def test_isab_is_permutation_equivariant(form, ln):
    rng = np.random.default_rng(2)
    B, n, D = 2, 37, 8
    x = rng.standard_normal((B, n, D))
    km = rng.random((B, n)) > 0.25
    pi = isab.init_params(rng, D, D, 5, form=form, ln=ln)
    perm = rng.permutation(n)
    a, _ = isab.forward(x, heads=2, form=form, ln=ln, key_mask=km, **pi)
    b, _ = isab.forward(x[:, perm], heads=2, form=form, ln=ln, key_mask=km[:, perm], **pi)
    np.testing.assert_allclose(b, a[:, perm], rtol=0, atol=1e-12)            # ISAB(pi X) = pi ISAB(X)


# --------------------------------------------------------------------------- masks and batch axes
def test_padded_masked_set_equals_the_unpadded_set():
    rng = np.random.default_rng(3)
    n, pad, D = 13, 7, 6
    x = rng.standard_normal((n, D))
    xpad = np.concatenate([x, 100 * rng.standard_normal((pad, D))])
    km = np.arange(n + pad) < n
    p = isab.init_params(rng, D, D, 4)
    a, _ = isab.forward(x, heads=3, **p)
    b, _ = isab.forward(xpad, heads=3, key_mask=km, **p)
    np.testing.assert_allclose(b[:n], a, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- errors
def test_bad_configuration_raises_value_error_naming_it():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6))
    p = isab.init_params(rng, 6, 6, 3)
    with pytest.raises(ValueError, match="causal.*no order"):
        isab.forward(x, causal=True, **p)
    with pytest.raises(ValueError, match="heads must divide"):
        isab.forward(x, heads=4, **p)
    with pytest.raises(ValueError, match="missing \\['mab1_W2'\\]"):
        isab.forward(x, **{k: v for k, v in p.items() if k != "mab1_W2"})
    with pytest.raises(ValueError, match="unexpected \\['mab0_bk'\\]"):
        isab.forward(x, mab0_bk=np.zeros(6), **p)
    with pytest.raises(ValueError, match="mab0_Wv must have shape"):
        isab.forward(x, **{**p, "mab0_Wv": np.zeros((6, 5))})
    with pytest.raises(ValueError, match="form must be one of"):
        isab.forward(x, form="torch", **p)
    with pytest.raises(ValueError, match="x must have width D=6"):
        isab.forward(x[..., :4], **p)
    with pytest.raises(ValueError, match="I must have dtype"):
        isab.forward(x.astype("float32"), **p)


# --------------------------------------------------------------------------- cost
def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_isab_at_n_4096_allocates_no_n_by_n():
    rng = np.random.default_rng(9)
    n, D, m = 4096, 8, 16
    x = rng.standard_normal((1, n, D))
    p = isab.init_params(rng, D, D, m)

    def run():
        out, cache = isab.forward(x, heads=2, **p)
        isab.backward(np.ones_like(out), cache)

    peak = _peak(run)
    assert peak < n * n * 8 / 16, f"ISAB peak {peak / 2**20:.1f} MiB (one N x N float64 is {n * n * 8 / 2**20:.0f} MiB)"
    # the tracer does see an N x N: SAB at a quarter of the length already holds more
    ns = 1024
    xs = x[:, :ns].copy()
    ps = mab.init_mab(rng, "mab_", D, D, D)
    peak_sab = _peak(lambda: mab.sab_forward(xs, heads=1, **ps))
    assert peak_sab > ns * ns * 8
