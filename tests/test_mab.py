"""The Set Transformer's multihead attention block (effattn.nn.mab), shared by ISAB and PMA.

What ISAB and PMA share as layers (batch axes, masked weights, every parameter's gradient) is
tested here on both. Oracles (used by tests/test_isab.py and tests/test_pma.py too): the paper's MAB written out per
set and per head with a plain dense softmax; a NumPy transcription of the official PyTorch
``modules.py`` (juho-lee/set_transformer, including its key bias, which must cancel); central
finite differences.
"""
import numpy as np
import pytest

import effattn
from effattn.gradcheck import check_gradients
from effattn.layers import isab, pma
from effattn.nn import mab

FORMS = [("paper", True), ("paper", False), ("official", True), ("official", False)]
LAYERS = {"isab": isab, "pma": pma}   # the third argument of init_params: m inducing points, k seeds


# --------------------------------------------------------------------------- independent oracles
def _ln(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def paper_mab(X, Y, p, heads, ln, keep=None):
    """MAB(X, Y) = LN(H + rFF(H)), H = LN(X + Multihead(X, Y, Y)) for ONE set: X (n, D), Y (M, D).
    ``keep`` (M,) bool drops masked rows of Y entirely (they are simply not in the set)."""
    if keep is not None:
        Y = Y[keep]
    D = p["Wq"].shape[1]
    d = D // heads
    Q, K, V = X @ p["Wq"] + p["bq"], Y @ p["Wk"], Y @ p["Wv"] + p["bv"]
    O = []
    for j in range(heads):
        sl = slice(j * d, (j + 1) * d)
        O.append(_softmax(Q[:, sl] @ K[:, sl].T / np.sqrt(d)) @ V[:, sl])   # Att(Q W_j^Q, K W_j^K, V W_j^V)
    R0 = X + np.concatenate(O, axis=1) @ p["Wo"] + p["bo"]
    H = _ln(R0, p["ln0_g"], p["ln0_b"]) if ln else R0
    F = np.maximum(H @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"]
    return _ln(H + F, p["ln1_g"], p["ln1_b"]) if ln else H + F


def official_mab(Q_in, K_in, p, bk, heads, ln):
    """NumPy transcription of the official MAB.forward (batched like torch: (B, n, dim))."""
    Q = Q_in @ p["Wq"] + p["bq"]                       # fc_q
    K, V = K_in @ p["Wk"] + bk, K_in @ p["Wv"] + p["bv"]   # fc_k (with its bias), fc_v
    dim_V = Q.shape[-1]
    B = Q.shape[0]
    split = dim_V // heads
    Q_ = np.concatenate(np.split(Q, heads, axis=2), 0)  # torch.cat(Q.split(dim_split, 2), 0)
    K_ = np.concatenate(np.split(K, heads, axis=2), 0)
    V_ = np.concatenate(np.split(V, heads, axis=2), 0)
    assert Q_.shape[-1] == split
    A = _softmax(Q_ @ K_.transpose(0, 2, 1) / np.sqrt(dim_V))
    O = np.concatenate(np.split(Q_ + A @ V_, heads, axis=0), 2)   # torch.cat((Q_ + A.bmm(V_)).split(B, 0), 2)
    assert O.shape[0] == B
    if ln:
        O = _ln(O, p["ln0_g"], p["ln0_b"])
    O = O + np.maximum(O @ p["W1"] + p["b1"], 0)        # O + relu(fc_o(O))
    if ln:
        O = _ln(O, p["ln1_g"], p["ln1_b"])
    return O


def _sub(params, prefix):
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- the block itself
@pytest.mark.parametrize("ln", [True, False])
def test_mab_matches_the_papers_equations_and_the_official_code(ln):
    """MAB(X, Y) with queries and keys from different sets, a key mask, both forms."""
    rng = np.random.default_rng(10)
    B, nq, nk, D, heads = 2, 5, 9, 6, 3
    X, Y = rng.standard_normal((B, nq, D)), rng.standard_normal((B, nk, D))
    km = rng.random((B, nk)) > 0.3
    km[:, 0] = True
    p = mab.init_mab(rng, "", D, D, D, ln=ln, hidden=7)
    out, _ = mab.mab_forward(X, Y, p, heads=heads, ln=ln, key_mask=km)
    for b in range(B):
        np.testing.assert_allclose(out[b], paper_mab(X[b], Y[b], p, heads, ln, keep=km[b]), rtol=0, atol=1e-12)
    d_q, d_k = 4, 5                                     # the official form allows other input widths
    Xo, Yo = rng.standard_normal((B, nq, d_q)), rng.standard_normal((B, nk, d_k))
    p = mab.init_mab(rng, "", d_q, d_k, D, form="official", ln=ln)
    out, _ = mab.mab_forward(Xo, Yo, p, heads=heads, ln=ln, form="official")
    np.testing.assert_allclose(out, official_mab(Xo, Yo, p, rng.standard_normal(D), heads, ln), rtol=0, atol=1e-12)


def test_param_names_follow_form_and_ln():
    assert mab.mab_param_names() == ["Wq", "bq", "Wk", "Wv", "bv", "Wo", "bo", "W1", "b1", "W2", "b2",
                                     "ln0_g", "ln0_b", "ln1_g", "ln1_b"]
    assert mab.mab_param_names("official", ln=False) == ["Wq", "bq", "Wk", "Wv", "bv", "W1", "b1"]
    rng = np.random.default_rng(11)
    for form, ln in FORMS:
        assert list(mab.init_mab(rng, "mab_", 4, 4, 4, form=form, ln=ln)) == \
            [f"mab_{n}" for n in mab.mab_param_names(form, ln)]


# --------------------------------------------------------------------------- SAB
def test_sab_gradients_and_agreement_with_isab_building_block():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 4))
    p = mab.init_mab(rng, "mab_", 4, 4, 4)
    p = {k: np.asarray(v) for k, v in p.items()}
    errors = check_gradients(mab.sab_forward, mab.sab_backward, {"x": x, **p}, {"heads": 2}, rng=rng)
    assert max(errors.values()) < 1e-7, errors
    out, _ = mab.sab_forward(x, heads=2, **p)
    for b in range(2):
        np.testing.assert_allclose(out[b], paper_mab(x[b], x[b], _sub(p, "mab_"), 2, True), atol=1e-12)


@pytest.mark.parametrize("form,ln", FORMS)
def test_sab_gradients_every_form_with_a_key_mask(form, ln):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 6, 4))
    km = np.ones((2, 6), bool)
    km[1, 3:] = False
    p = mab.init_mab(rng, "mab_", 4, 4, 4, form=form, ln=ln, hidden=5)
    errors = check_gradients(mab.sab_forward, mab.sab_backward, {"x": x, **p},
                             {"heads": 2, "form": form, "ln": ln, "key_mask": km}, rng=rng)
    assert set(errors) == {"x", *(f"mab_{n}" for n in mab.mab_param_names(form, ln))}
    assert max(errors.values()) < 1e-7, errors


def test_sab_bad_configuration_raises_value_error_naming_it():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 5, 6))
    p = mab.init_mab(rng, "mab_", 6, 6, 6)
    with pytest.raises(ValueError, match="heads must divide"):
        mab.sab_forward(x, heads=4, **p)
    with pytest.raises(ValueError, match="missing \\['W2'\\]"):
        mab.sab_forward(x, **{k: v for k, v in p.items() if k != "mab_W2"})
    with pytest.raises(ValueError, match="mab_Wq must have shape"):
        mab.sab_forward(x[..., :4], **p)


# --------------------------------------------------------------------------- ISAB and PMA as layers
@pytest.mark.parametrize("name", LAYERS)
def test_leading_batch_axes_are_independent_sets(name):
    layer = LAYERS[name]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 10, 4))
    p = layer.init_params(rng, 4, 4, 3)
    out, _ = layer.forward(x, heads=2, **p)
    for i in range(2):
        for j in range(3):
            one, _ = layer.forward(x[i, j], heads=2, **p)
            np.testing.assert_allclose(out[i, j], one, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name,m", [("isab", 3), ("pma", 2)])
def test_attention_weights_are_zero_on_masked_elements_and_rows_sum_to_one(name, m):
    layer = LAYERS[name]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 15, 4))
    km = rng.random((2, 15)) > 0.4
    km[:, 0] = True
    _, c = layer.forward(x, heads=2, key_mask=km, **layer.init_params(rng, 4, 4, m))
    w = layer.weights(c)                                                    # (B, h, m, N)
    assert w.shape == (2, 2, m, 15)
    assert np.all(w[~np.broadcast_to(km[:, None, None, :], w.shape)] == 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("form,ln", FORMS)
def test_gradients_of_every_parameter(name, form, ln):
    layer = LAYERS[name]
    rng = np.random.default_rng(6)
    n, D = 7, 6
    d_in = D if form == "paper" else 4
    x = rng.standard_normal((2, n, d_in))
    km = np.ones((2, n), bool)
    km[1, 2:5] = False
    spec = effattn.get(name)
    p = layer.init_params(rng, d_in, D, 3, form=form, ln=ln, hidden=5)
    errors = check_gradients(spec.forward, spec.backward, {"x": x.copy(), **p},
                             {"heads": 2, "form": form, "ln": ln, "key_mask": km}, rng=rng)
    assert set(errors) == {"x", *layer.param_names(form, ln)}
    bad = {k: e for k, e in errors.items() if not e < 1e-7}
    assert not bad, f"{name} {form} ln={ln}: {bad}"
