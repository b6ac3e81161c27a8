"""Set Transformer PMA (effattn.layers.pma): pooling by multihead attention through k seeds.

Oracles: the paper's equations written out per set and per head with a plain dense softmax and
a NumPy transcription of the official PyTorch ``modules.py`` (both in tests/test_mab.py);
permutation invariance; padding + key_mask equal to the unpadded set. Batch axes, masked weights and the
finite-difference gradients of every parameter are tested with ISAB's in tests/test_mab.py.
"""
import numpy as np
import pytest
from test_mab import FORMS, _sub, official_mab, paper_mab

from effattn.layers import pma


# --------------------------------------------------------------------------- forward against the paper
@pytest.mark.parametrize("ln", [True, False])
def test_pma_matches_the_papers_equations_per_set(ln):
    rng = np.random.default_rng(0)
    B, n, D, heads, k = 3, 11, 8, 2, 3
    x = rng.standard_normal((B, n, D))
    km = rng.random((B, n)) > 0.3
    km[:, 0] = True
    pp = pma.init_params(rng, D, D, k, ln=ln, hidden=5)
    out_p, _ = pma.forward(x, heads=heads, ln=ln, key_mask=km, **pp)
    for b in range(B):
        Z = np.maximum(x[b] @ pp["rff_W1"] + pp["rff_b1"], 0) @ pp["rff_W2"] + pp["rff_b2"]   # rFF(Z)
        ref_p = paper_mab(pp["S"], Z, _sub(pp, "mab_"), heads, ln, keep=km[b])       # MAB(S, rFF(Z))
        np.testing.assert_allclose(out_p[b], ref_p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ln", [True, False])
def test_official_form_matches_the_official_code(ln):
    """form='official' == juho-lee/set_transformer modules.py PMA, with an input width different
    from D and a nonzero fc_k bias (which cancels in the softmax)."""
    rng = np.random.default_rng(1)
    B, n, d_in, D, heads, k = 2, 9, 5, 6, 3, 2
    x = rng.standard_normal((B, n, d_in))
    pp = pma.init_params(rng, d_in, D, k, form="official", ln=ln)
    out_p, _ = pma.forward(x, heads=heads, ln=ln, form="official", **pp)
    bk = rng.standard_normal(D)
    ref_p = official_mab(np.repeat(pp["S"][None], B, 0), x, _sub(pp, "mab_"), bk, heads, ln)   # mab(S.repeat, X)
    np.testing.assert_allclose(out_p, ref_p, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("form,ln", FORMS)
def test_pma_is_permutation_invariant(form, ln):
    rng = np.random.default_rng(2)
    B, n, D = 2, 37, 8
    x = rng.standard_normal((B, n, D))
    km = rng.random((B, n)) > 0.25
    pp = pma.init_params(rng, D, D, 3, form=form, ln=ln)
    perm = rng.permutation(n)
    a, _ = pma.forward(x, heads=2, form=form, ln=ln, key_mask=km, **pp)
    b, _ = pma.forward(x[:, perm], heads=2, form=form, ln=ln, key_mask=km[:, perm], **pp)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)                     # PMA(pi X) = PMA(X)


# --------------------------------------------------------------------------- masks and batch axes
def test_padded_masked_set_equals_the_unpadded_set():
    rng = np.random.default_rng(3)
    n, pad, D = 13, 7, 6
    x = rng.standard_normal((n, D))
    xpad = np.concatenate([x, 100 * rng.standard_normal((pad, D))])
    km = np.arange(n + pad) < n
    p = pma.init_params(rng, D, D, 4)
    a, _ = pma.forward(x, heads=3, **p)
    b, _ = pma.forward(xpad, heads=3, key_mask=km, **p)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- errors
def test_bad_configuration_raises_value_error_naming_it():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6))
    p = pma.init_params(rng, 6, 6, 1)
    with pytest.raises(ValueError, match="key_mask"):
        pma.forward(x, key_mask=np.ones((2, 6), bool), **p)
    with pytest.raises(ValueError, match="causal.*no order"):
        pma.forward(x, causal=True, **p)
    with pytest.raises(ValueError, match="missing \\['rff_W2'\\]"):
        pma.forward(x, **{k: v for k, v in p.items() if k != "rff_W2"})
    with pytest.raises(ValueError, match="unexpected .*'rff_W1'"):
        pma.forward(x, form="official", **p)
    with pytest.raises(ValueError, match="rff_W2 must have shape"):
        pma.forward(x, **{**p, "rff_W2": np.zeros((6, 5))})
    with pytest.raises(ValueError, match="S must have dtype"):
        pma.forward(x.astype("float32"), **p)
