"""Set Transformer layers (effattn.layers.set_transformer): ISAB and PMA.

Oracles: the paper's equations written out per set and per head with a plain
dense softmax; a NumPy transcription of the official PyTorch ``modules.py``
(juho-lee/set_transformer, including its key bias, which must cancel);
permutation symmetry; padding + key_mask equal to the unpadded set; central
finite differences; tracemalloc for the O(N m) memory claim.
"""
import tracemalloc

import numpy as np
import pytest

import effattn
from effattn.gradcheck import check_gradients
from effattn.layers import set_transformer as st

FORMS = [("paper", True), ("paper", False), ("official", True), ("official", False)]


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


# --------------------------------------------------------------------------- forward against the paper
@pytest.mark.parametrize("ln", [True, False])
def test_isab_and_pma_match_the_papers_equations_per_set(ln):
    rng = np.random.default_rng(0)
    B, n, D, heads, m, k = 3, 11, 8, 2, 4, 3
    x = rng.standard_normal((B, n, D))
    km = rng.random((B, n)) > 0.3
    km[:, 0] = True
    pi = st.init_isab(rng, D, D, m, ln=ln, hidden=12)
    pp = st.init_pma(rng, D, D, k, ln=ln, hidden=5)
    out_i, _ = st.isab_forward(x, heads=heads, ln=ln, key_mask=km, **pi)
    out_p, _ = st.pma_forward(x, heads=heads, ln=ln, key_mask=km, **pp)
    for b in range(B):
        H = paper_mab(pi["I"], x[b], _sub(pi, "mab0_"), heads, ln, keep=km[b])       # H = MAB(I, X)
        ref_i = paper_mab(x[b], H, _sub(pi, "mab1_"), heads, ln)                     # MAB(X, H)
        np.testing.assert_allclose(out_i[b][km[b]], ref_i[km[b]], rtol=0, atol=1e-12)
        Z = np.maximum(x[b] @ pp["rff_W1"] + pp["rff_b1"], 0) @ pp["rff_W2"] + pp["rff_b2"]   # rFF(Z)
        ref_p = paper_mab(pp["S"], Z, _sub(pp, "mab_"), heads, ln, keep=km[b])       # MAB(S, rFF(Z))
        np.testing.assert_allclose(out_p[b], ref_p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ln", [True, False])
def test_official_form_matches_the_official_code(ln):
    """form='official' == juho-lee/set_transformer modules.py (ISAB and PMA), with an
    input width different from D and a nonzero fc_k bias (which cancels in the softmax)."""
    rng = np.random.default_rng(1)
    B, n, d_in, D, heads, m, k = 2, 9, 5, 6, 3, 4, 2
    x = rng.standard_normal((B, n, d_in))
    pi = st.init_isab(rng, d_in, D, m, form="official", ln=ln)
    pp = st.init_pma(rng, d_in, D, k, form="official", ln=ln)
    out_i, _ = st.isab_forward(x, heads=heads, ln=ln, form="official", **pi)
    out_p, _ = st.pma_forward(x, heads=heads, ln=ln, form="official", **pp)
    bk = rng.standard_normal(D)
    Ib = np.repeat(pi["I"][None], B, 0)                                  # self.I.repeat(X.size(0), 1, 1)
    H = official_mab(Ib, x, _sub(pi, "mab0_"), bk, heads, ln)            # mab0(I, X)
    ref_i = official_mab(x, H, _sub(pi, "mab1_"), -bk, heads, ln)        # mab1(X, H)
    ref_p = official_mab(np.repeat(pp["S"][None], B, 0), x, _sub(pp, "mab_"), bk, heads, ln)
    np.testing.assert_allclose(out_i, ref_i, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out_p, ref_p, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("form,ln", FORMS)
def test_isab_is_permutation_equivariant_and_pma_invariant(form, ln):
    rng = np.random.default_rng(2)
    B, n, D = 2, 37, 8
    x = rng.standard_normal((B, n, D))
    km = rng.random((B, n)) > 0.25
    pi = st.init_isab(rng, D, D, 5, form=form, ln=ln)
    pp = st.init_pma(rng, D, D, 3, form=form, ln=ln)
    perm = rng.permutation(n)
    a, _ = st.isab_forward(x, heads=2, form=form, ln=ln, key_mask=km, **pi)
    b, _ = st.isab_forward(x[:, perm], heads=2, form=form, ln=ln, key_mask=km[:, perm], **pi)
    np.testing.assert_allclose(b, a[:, perm], rtol=0, atol=1e-12)            # ISAB(pi X) = pi ISAB(X)
    a, _ = st.pma_forward(x, heads=2, form=form, ln=ln, key_mask=km, **pp)
    b, _ = st.pma_forward(x[:, perm], heads=2, form=form, ln=ln, key_mask=km[:, perm], **pp)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)                     # PMA(pi X) = PMA(X)


# --------------------------------------------------------------------------- masks and batch axes
def test_padded_masked_set_equals_the_unpadded_set():
    rng = np.random.default_rng(3)
    n, pad, D = 13, 7, 6
    x = rng.standard_normal((n, D))
    xpad = np.concatenate([x, 100 * rng.standard_normal((pad, D))])
    km = np.arange(n + pad) < n
    for fwd, init in ((st.isab_forward, st.init_isab), (st.pma_forward, st.init_pma)):
        p = init(rng, D, D, 4)
        a, _ = fwd(x, heads=3, **p)
        b, _ = fwd(xpad, heads=3, key_mask=km, **p)
        np.testing.assert_allclose(b[:n] if fwd is st.isab_forward else b, a, rtol=0, atol=1e-12)


def test_leading_batch_axes_are_independent_sets():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 10, 4))
    for fwd, init in ((st.isab_forward, st.init_isab), (st.pma_forward, st.init_pma)):
        p = init(rng, 4, 4, 3)
        out, _ = fwd(x, heads=2, **p)
        for i in range(2):
            for j in range(3):
                one, _ = fwd(x[i, j], heads=2, **p)
                np.testing.assert_allclose(out[i, j], one, rtol=0, atol=1e-13)


def test_attention_weights_are_zero_on_masked_elements_and_rows_sum_to_one():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 15, 4))
    km = rng.random((2, 15)) > 0.4
    km[:, 0] = True
    _, c = st.isab_forward(x, heads=2, key_mask=km, **st.init_isab(rng, 4, 4, 3))
    w = st.isab_weights(c)                                                  # (B, h, m, N)
    assert w.shape == (2, 2, 3, 15)
    assert np.all(w[~np.broadcast_to(km[:, None, None, :], w.shape)] == 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    _, c = st.pma_forward(x, heads=2, key_mask=km, **st.init_pma(rng, 4, 4, 2))
    assert st.pma_weights(c).shape == (2, 2, 2, 15)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("form,ln", FORMS)
def test_gradients_of_every_parameter(form, ln):
    rng = np.random.default_rng(6)
    n, D = 7, 6
    d_in = D if form == "paper" else 4
    x = rng.standard_normal((2, n, d_in))
    km = np.ones((2, n), bool)
    km[1, 2:5] = False
    for name, init, names in (("isab", st.init_isab, st.isab_param_names), ("pma", st.init_pma, st.pma_param_names)):
        spec = effattn.get(name)
        p = init(rng, d_in, D, 3, form=form, ln=ln, hidden=5)
        inputs = {"x": x.copy(), **p}
        errors = check_gradients(spec.forward, spec.backward, inputs,
                                 {"heads": 2, "form": form, "ln": ln, "key_mask": km}, rng=rng)
        assert set(errors) == {"x", *names(form, ln)}
        bad = {k: e for k, e in errors.items() if not e < 1e-7}
        assert not bad, f"{name} {form} ln={ln}: {bad}"


def test_sab_gradients_and_agreement_with_isab_building_block():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 4))
    p = st.init_mab(rng, "mab_", 4, 4, 4)
    p = {k: np.asarray(v) for k, v in p.items()}
    errors = check_gradients(st.sab_forward, st.sab_backward, {"x": x, **p}, {"heads": 2}, rng=rng)
    assert max(errors.values()) < 1e-7, errors
    out, _ = st.sab_forward(x, heads=2, **p)
    for b in range(2):
        np.testing.assert_allclose(out[b], paper_mab(x[b], x[b], _sub(p, "mab_"), 2, True), atol=1e-12)


# --------------------------------------------------------------------------- errors
def test_bad_configuration_raises_value_error_naming_it():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6))
    p = st.init_isab(rng, 6, 6, 3)
    with pytest.raises(ValueError, match="causal.*no order"):
        st.isab_forward(x, causal=True, **p)
    with pytest.raises(ValueError, match="heads must divide"):
        st.isab_forward(x, heads=4, **p)
    with pytest.raises(ValueError, match="missing \\['mab1_W2'\\]"):
        st.isab_forward(x, **{k: v for k, v in p.items() if k != "mab1_W2"})
    with pytest.raises(ValueError, match="unexpected \\['mab0_bk'\\]"):
        st.isab_forward(x, mab0_bk=np.zeros(6), **p)
    with pytest.raises(ValueError, match="mab0_Wv must have shape"):
        st.isab_forward(x, **{**p, "mab0_Wv": np.zeros((6, 5))})
    with pytest.raises(ValueError, match="form must be one of"):
        st.isab_forward(x, form="torch", **p)
    with pytest.raises(ValueError, match="x must have width D=6"):
        st.isab_forward(x[..., :4], **p)
    with pytest.raises(ValueError, match="I must have dtype"):
        st.isab_forward(x.astype("float32"), **p)
    with pytest.raises(ValueError, match="key_mask"):
        st.pma_forward(x, key_mask=np.ones((2, 6), bool), **st.init_pma(rng, 6, 6, 1))


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
    p = st.init_isab(rng, D, D, m)

    def run():
        out, cache = st.isab_forward(x, heads=2, **p)
        st.isab_backward(np.ones_like(out), cache)

    peak = _peak(run)
    assert peak < n * n * 8 / 16, f"ISAB peak {peak / 2**20:.1f} MiB (one N x N float64 is {n * n * 8 / 2**20:.0f} MiB)"
    # the tracer does see an N x N: SAB at a quarter of the length already holds more
    ns = 1024
    xs = x[:, :ns].copy()
    ps = st.init_mab(rng, "mab_", D, D, D)
    peak_sab = _peak(lambda: st.sab_forward(xs, heads=1, **ps))
    assert peak_sab > ns * ns * 8
