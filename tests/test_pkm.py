"""Product Key Memory (effattn.layers.pkm): the product-key search finds the exhaustive top-k,
the forward equals the exhaustive per-token loop, the hand-written backward (sparse value and
sub-key gradients) matches finite differences, padding, bad configuration, and the layout of
lucidrains/product-key-memory."""
import numpy as np
import pytest

import effattn
from effattn.gradcheck import check_gradients
from effattn.layers import pkm


def case(seed, B=2, N=9, D=6, sqrtK=6, dq=4, H=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N, D))
    return rng, x, pkm.init_params(rng, D, sqrtK=sqrtK, dq=dq, heads=H)


def exhaustive_topk(x, p, topk):
    """Independent of the module: all K product keys scored densely with einsum, per head the
    k best slots (argsort of the full (K,) score vector) -> (T, H, k) sorted indices."""
    H, sqrtK, half = p["keys1"].shape
    q = (x.reshape(-1, x.shape[-1]) @ p["Wq"] + p["bq"]).reshape(-1, H, 2, half)
    s1 = np.einsum("thd,hkd->thk", q[:, :, 0], p["keys1"])
    s2 = np.einsum("thd,hkd->thk", q[:, :, 1], p["keys2"])
    full = (s1[..., :, None] + s2[..., None, :]).reshape(q.shape[0], H, sqrtK * sqrtK)
    return np.sort(np.argsort(-full, axis=-1, kind="stable")[..., :topk], axis=-1)


@pytest.mark.parametrize("sqrtK,topk,H", [(6, 3, 2), (16, 8, 1), (5, 5, 3), (7, 1, 2), (32, 32, 1)])
def test_product_search_finds_the_exhaustive_top_k(sqrtK, topk, H):
    """The paper's claim: the top-k of the k x k candidate pairs are the top-k of all K keys."""
    rng, x, p = case(sqrtK + topk, N=40, sqrtK=sqrtK, H=H)
    _, c = pkm.forward(x, topk=topk, **p)
    s = pkm.search(c)
    got = np.sort((s["a"] * sqrtK + s["b"]).transpose(1, 0, 2), axis=-1)     # (T, H, k)
    np.testing.assert_array_equal(got, exhaustive_topk(x, p, topk))


@pytest.mark.parametrize("sqrtK,topk,H", [(6, 3, 2), (5, 5, 1), (8, 2, 3)])
def test_forward_equals_the_exhaustive_loop(sqrtK, topk, H):
    rng, x, p = case(1, sqrtK=sqrtK, H=H)
    km = rng.random(x.shape[:2]) > 0.3
    for mask in (None, km):
        y, c = pkm.forward(x, topk=topk, key_mask=mask, **p)
        np.testing.assert_allclose(y, pkm.loop(x, topk=topk, key_mask=mask, **p), rtol=0, atol=1e-10)
        np.testing.assert_allclose(y, pkm.weights(c) @ p["values"], rtol=0, atol=1e-12)
    assert np.all(y[~km] == 0)


def test_weights_are_a_softmax_per_head_on_k_slots():
    rng, x, p = case(2, H=3, sqrtK=7)
    _, c = pkm.forward(x, topk=4, **p)
    W = pkm.weights(c)                                            # (B, N, 49)
    np.testing.assert_allclose(W.sum(axis=-1), 3.0, rtol=0, atol=1e-12)   # one softmax per head
    assert ((W > 0).sum(axis=-1) <= 12).all() and ((W > 0).sum(axis=-1) >= 4).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_finite_differences(seed, masked):
    rng, x, p = case(10 + seed, B=2, N=7, D=5, sqrtK=5, dq=6, H=2)
    config = {"topk": 3}
    if masked:
        config["key_mask"] = rng.random(x.shape[:2]) > 0.3
    errors = check_gradients(pkm.forward, pkm.backward, {"x": x, **p}, config, rng=rng)
    assert set(errors) == {"x", "Wq", "bq", "keys1", "keys2", "values"}
    assert max(errors.values()) < 1e-7, errors


def test_value_and_sub_key_gradients_only_on_the_chosen_rows():
    rng, x, p = case(3, B=1, N=3, sqrtK=12, H=2)
    km = np.array([[True, True, False]])
    y, c = pkm.forward(x, topk=3, key_mask=km, **p)
    g = pkm.backward(rng.standard_normal(y.shape), c)
    chosen = set(exhaustive_topk(x[:, :2], p, 3).reshape(-1).tolist())     # real tokens only
    nonzero = set(np.nonzero(np.abs(g["values"]).sum(axis=1))[0].tolist())
    assert nonzero == chosen and len(chosen) < 36
    # sub-keys: only those in a chosen slot of that head, for a real token
    s = pkm.search(c)
    for h in range(2):
        for name, part in (("keys1", "a"), ("keys2", "b")):
            used = set(s[part][h, :2].reshape(-1).tolist())
            rows = set(np.nonzero(np.abs(g[name][h]).sum(axis=1))[0].tolist())
            assert rows == used
    assert np.all(g["x"][~km] == 0)


def test_padding_changes_no_other_token():
    rng, x, p = case(4, B=1)
    pad = np.concatenate([x, 50 * rng.standard_normal((1, 5, 6))], axis=1)
    km = np.arange(14)[None] < 9
    a, _ = pkm.forward(x, topk=3, **p)
    b, _ = pkm.forward(pad, topk=3, key_mask=km, **p)
    np.testing.assert_allclose(b[:, :9], a, rtol=0, atol=1e-12)
    assert np.all(b[:, 9:] == 0)


def test_each_token_alone():
    """Per token: the output of a token equals that token run on its own (so it is causal)."""
    rng, x, p = case(5)
    y, _ = pkm.forward(x, topk=2, causal=True, **p)
    for t in (0, 4, 8):
        np.testing.assert_allclose(pkm.forward(x[1, t:t + 1], topk=2, **p)[0][0], y[1, t], rtol=0, atol=1e-12)


def test_bad_configuration_names_the_argument():
    rng, x, p = case(6, sqrtK=4, dq=4, H=2)
    with pytest.raises(ValueError, match="^topk must be at most sqrtK=4"):
        pkm.forward(x, topk=5, **p)
    with pytest.raises(ValueError, match="^values must have K = sqrtK"):
        pkm.forward(x, topk=2, **{**p, "values": p["values"][:15]})
    with pytest.raises(ValueError, match="^Wq must have shape .*dq must be even"):
        pkm.forward(x, topk=2, **{**p, "Wq": p["Wq"][:, :7]})         # dq = 3.5 per head
    with pytest.raises(ValueError, match="^dq must be even"):
        pkm.init_params(rng, 6, sqrtK=4, dq=5)
    with pytest.raises(ValueError, match="^heads=3 must equal keys1.shape"):
        pkm.forward(x, topk=2, heads=3, **p)
    with pytest.raises(ValueError, match="^keys2 must have shape"):
        pkm.forward(x, topk=2, **{**p, "keys2": p["keys2"][:, :3]})
    with pytest.raises(ValueError, match="^bq must have shape"):
        pkm.forward(x, topk=2, **{**p, "bq": p["bq"][:5]})


def test_registry_entry():
    spec = effattn.get("pkm")
    assert spec.kind == "layer" and spec.classes == ("SP",) and spec.causal and not spec.exact
    assert spec.url == "https://arxiv.org/abs/1907.05242"


def test_lucidrains_layout():
    """lucidrains/product-key-memory's PKM forward (commit cee87da, query norm replaced by the
    identity, no dropout), transcribed in NumPy in its own layouts -- to_queries.weight
    (2 H dh, D) with outputs '(p h d)', keys (H, num_keys, 2, dh), values (num_keys^2, D) -- equals
    pkm.forward with the docstring's weight mapping."""
    rng = np.random.default_rng(7)
    B, T, D, H, dh, n, k = 2, 5, 6, 2, 3, 6, 3
    x = rng.standard_normal((B, T, D))
    Wlin = rng.standard_normal((2 * H * dh, D))
    keys = rng.standard_normal((H, n, 2, dh))
    values = rng.standard_normal((n * n, D))
    # theirs
    queries = (x @ Wlin.T).reshape(B, T, 2, H, dh).transpose(2, 0, 1, 3, 4)   # p b t h d
    dots = np.einsum("pbthd,hnpd->bthpn", queries, keys)
    idx = np.argsort(-dots, axis=-1)[..., :k]
    scores = np.take_along_axis(dots, idx, axis=-1)
    all_scores = (scores[..., 0, :, None] + scores[..., 1, None, :]).reshape(B, T, H, k * k)
    all_idx = (idx[..., 0, :, None] * n + idx[..., 1, None, :]).reshape(B, T, H, k * k)
    fin = np.argsort(-all_scores, axis=-1)[..., :k]
    top, vidx = np.take_along_axis(all_scores, fin, -1), np.take_along_axis(all_idx, fin, -1)
    attn = np.exp(top - top.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    theirs = (attn[..., None] * values[vidx]).sum(axis=(2, 3))                # EmbeddingBag sum over (h k)
    # ours, through the mapping
    Wt = Wlin.T.reshape(D, 2, H, dh)                                          # columns (p h d)
    Wq = Wt.transpose(0, 2, 1, 3).reshape(D, H * 2 * dh)                      # columns (h p d)
    ours, _ = pkm.forward(x, Wq=Wq, bq=np.zeros(H * 2 * dh), keys1=np.ascontiguousarray(keys[:, :, 0]),
                          keys2=np.ascontiguousarray(keys[:, :, 1]), values=values, topk=k)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_the_search_figure_is_written(tmp_path):
    from effattn.figures import FIGURES

    paths = FIGURES["pkm"](str(tmp_path), np.random.default_rng(0))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["pkm_search.png"]
    assert (tmp_path / "pkm_search.png").stat().st_size > 10_000
