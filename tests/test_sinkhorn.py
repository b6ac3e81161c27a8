"""Sparse Sinkhorn attention: the balancing (effattn.nn.sinkhorn) and its hand-written backward,
hard permutations against dense attention, SortCut, causality. Oracles: finite differences, a
readable probability-space loop form of Sinkhorn, and `full` masked by a pattern built here."""
import numpy as np
import pytest

import effattn
from effattn.attention import sinkhorn as sk
from effattn.nn import sinkhorn as balancing
from effattn.gradcheck import check_gradients, rel_error
from effattn.nn.decode import state_size

FULL = effattn.get("full")
SPEC = effattn.get("sinkhorn")


def causal_support(nb):
    return np.arange(nb)[None, :] < np.arange(nb)[:, None]


def sinkhorn_loop(alpha, n_iters, causal=False):
    """Readable oracle in probability space: divide rows by their sums, then columns
    (causal: entry (i, j) by the sum over rows i' <= i of column j)."""
    a = np.array(alpha, dtype=np.float64)
    nb = a.shape[0]
    for _ in range(n_iters):
        for i in range(nb):
            s = a[i].sum()
            if s > 0:
                a[i] = a[i] / s
        new = a.copy()
        for i in range(nb):
            for j in range(nb):
                s = a[: i + 1, j].sum() if causal else a[:, j].sum()
                new[i, j] = a[i, j] / s if s > 0 else 0.0
        a = new
    return a


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_iters", [1, 2, 5])
def test_sinkhorn_backward_matches_finite_differences(causal, n_iters):
    rng = np.random.default_rng(n_iters + 10 * causal)
    nb = 5
    la = rng.standard_normal((2, nb, nb)) * 1.5
    if causal:
        la = np.where(causal_support(nb), la, -np.inf)
    g = rng.standard_normal(la.shape)
    logp, cache = balancing.sinkhorn_forward(la, n_iters, causal=causal)
    fin = np.isfinite(logp)
    assert np.array_equal(fin, np.isfinite(la))
    dla = balancing.sinkhorn_backward(np.where(fin, g, 0.0), cache)

    def f():
        out = balancing.sinkhorn_forward(la, n_iters, causal=causal)[0]
        return np.where(fin, out, 0.0)

    # perturb only the finite entries (a -inf entry is a hard constraint, not a variable)
    num = np.zeros_like(la)
    for idx in zip(*np.nonzero(np.isfinite(la))):
        old = la[idx]
        la[idx] = old + 1e-6
        plus = (f() * g).sum()
        la[idx] = old - 1e-6
        minus = (f() * g).sum()
        la[idx] = old
        num[idx] = (plus - minus) / 2e-6
    assert rel_error(dla, num) < 1e-7
    assert np.all(dla[~np.isfinite(la)] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_equals_probability_space_loop(causal):
    rng = np.random.default_rng(1)
    nb = 6
    la = rng.standard_normal((nb, nb))
    if causal:
        la = np.where(causal_support(nb), la, -np.inf)
    for n_iters in (1, 4):
        logp, _ = balancing.sinkhorn_forward(la, n_iters, causal=causal)
        np.testing.assert_allclose(np.exp(logp), sinkhorn_loop(np.exp(la), n_iters, causal), atol=1e-12)


def test_rows_and_columns_sum_to_one_after_enough_iterations():
    rng = np.random.default_rng(2)
    la = rng.standard_normal((3, 7, 7)) * 2
    p = np.exp(balancing.sinkhorn_forward(la, 60)[0])
    np.testing.assert_allclose(p.sum(-2), 1, atol=1e-12)        # the last step normalised columns
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-6)         # rows converge
    p1 = np.exp(balancing.sinkhorn_forward(la, 1)[0])
    assert np.abs(p1.sum(-1) - 1).max() > 1e-3                  # one iteration is not enough
    # low temperature: P approaches the permutation that maximises sum of logits
    import itertools

    cold = np.exp(balancing.sinkhorn_forward(la[0] / 0.01, 200)[0])
    assert cold.max(-1).min() > 0.95
    best = max(itertools.permutations(range(7)), key=lambda pr: la[0][np.arange(7), list(pr)].sum())
    np.testing.assert_array_equal(cold.argmax(-1), best)


def test_cumulative_column_lse_is_a_running_logsumexp():
    """The causal column step's normaliser C[i, j] = log sum_{i' <= i} exp x[i', j]."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 6, 6)) * 3
    x[0, 2, 4] = -np.inf
    x[1, 0, 1] = -np.inf                                            # a column that starts forbidden
    np.testing.assert_allclose(balancing.cumulative_col_lse(x), np.logaddexp.accumulate(x, axis=-2), atol=1e-12)


def sinkhorn_inputs(rng, n, d=4, heads=2, batch=2, causal=False):
    q, k, v = (rng.standard_normal((batch, heads, n, d)) for _ in range(3))
    params, config = SPEC.setup(rng, n=n, d=d, heads=heads, causal=causal)
    return q, k, v, params, config


def pattern_from_perm(perm, n, b, causal, sortcut=None):
    """The support implied by hard block choices: own block (causal inside) + chosen block."""
    pos = np.arange(n)
    blk = pos // b
    lead = perm.shape[:-1]
    pat = np.zeros(lead + (n, n), dtype=bool)
    for idx in np.ndindex(*lead):
        pr = perm[idx]
        for i in range(n):
            for j in range(n):
                if sortcut is not None:
                    pat[idx + (i, j)] = blk[j] in [c for c in pr[:sortcut] if c >= 0]
                else:
                    own = blk[i] == blk[j] and (not causal or j <= i)
                    pat[idx + (i, j)] = own or pr[blk[i]] == blk[j]
    return pat


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [7, 16, 23])
def test_hard_permutation_equals_full_masked_by_induced_pattern(causal, n):
    rng = np.random.default_rng(n)
    q, k, v, params, config = sinkhorn_inputs(rng, n, causal=causal)
    b = config["block"]
    nb = -(-n // b)
    if causal:   # block i draws from some j < i (or nothing: -1)
        perm = np.stack([np.array([rng.integers(-1, i) if i else -1 for i in range(nb)]) for _ in range(4)]).reshape(2, 2, nb)
    else:
        perm = np.stack([rng.permutation(nb) for _ in range(4)]).reshape(2, 2, nb)
    km = rng.random((2, 1, n)) > 0.3
    km[..., 0] = True
    for key_mask in (None, km):
        out, cache = SPEC.forward(q, k, v, **params, **config, causal=causal, key_mask=key_mask, perm=perm)
        pat = pattern_from_perm(perm, n, b, causal)
        ref, _ = FULL.forward(q, k, v, mask=pat, key_mask=key_mask)
        np.testing.assert_allclose(out, ref, atol=1e-12)
        np.testing.assert_array_equal(sk.induced_pattern(cache), pat)
        np.testing.assert_allclose(out, SPEC.weights(cache) @ v, atol=1e-12)
    # hard=True: perm = argmax of the balanced matrix; same identity with its own pattern
    out, cache = SPEC.forward(q, k, v, **params, **config, causal=causal, hard=True)
    ref, _ = FULL.forward(q, k, v, mask=sk.induced_pattern(cache))
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_sharp_soft_permutation_approaches_hard():
    """Logits dominated by a derangement (through the explicit noise argument): the soft
    result tends to the hard one, which equals `full` masked by the induced pattern."""
    rng = np.random.default_rng(5)
    n = 16
    q, k, v, params, config = sinkhorn_inputs(rng, n)
    nb = -(-n // config["block"])
    perm = np.roll(np.arange(nb), 1)                                 # no fixed point
    for sharp, tol in ((10.0, 0.5), (60.0, 1e-12)):
        noise = sharp * np.eye(nb)[perm]
        soft, cache = SPEC.forward(q, k, v, **params, **{**config, "gumbel": noise, "tau": 1.0, "n_iters": 20})
        assert np.array_equal(cache.p.argmax(-1), np.broadcast_to(perm, cache.p.shape[:-1]))
        hard, _ = SPEC.forward(q, k, v, **params, **config, perm=perm)
        assert np.abs(soft - hard).max() < tol


def paper_formula(q, k, v, p, b, scale):
    """out_i = softmax(Q_i [psi_S(K)_i; K_i]^T scale) [psi_S(V)_i; V_i] for every query block i,
    psi_S(X)_i = sum_j P[i, j] X_j (X_j the j-th block), written block by block (N = N_B b)."""
    lead, n, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    nb = n // b
    blocks = lambda x: x.reshape(lead + (nb, b, x.shape[-1]))  # noqa: E731
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    out = np.zeros_like(qb)
    for i in range(nb):
        ks = np.einsum("...j,...jsd->...sd", p[..., i, :], kb)              # sorted block psi_S(K)_i
        vs = np.einsum("...j,...jsd->...sd", p[..., i, :], vb)
        keys = np.concatenate([ks, kb[..., i, :, :]], axis=-2)               # (..., 2b, d)
        vals = np.concatenate([vs, vb[..., i, :, :]], axis=-2)
        e = qb[..., i, :, :] @ np.swapaxes(keys, -1, -2) * scale
        e = np.exp(e - e.max(-1, keepdims=True))
        out[..., i, :, :] = (e / e.sum(-1, keepdims=True)) @ vals
    return out.reshape(q.shape)


@pytest.mark.parametrize("n_iters", [1, 8])
def test_unpadded_default_is_the_papers_formula(n_iters):
    """No padding, no mask: exactly the paper's softmax over [sorted block; own block] for the
    soft P the mechanism used (P itself is tested against the probability-space loop above),
    however far P is from doubly stochastic (1 iteration: far)."""
    rng = np.random.default_rng(15)
    n, b = 12, 3
    q, k, v, params, config = sinkhorn_inputs(rng, n)
    gumbel = rng.gumbel(size=(2, n // b, n // b))
    out, cache = SPEC.forward(q, k, v, **params, block=b, n_iters=n_iters, gumbel=gumbel)
    assert np.abs(cache.p.sum(-1) - 1).max() > 1e-6                     # P is not exactly stochastic
    np.testing.assert_allclose(out, paper_formula(q, k, v, cache.p, b, 0.5), rtol=0, atol=1e-12)


def test_padding_bias_downweights_padding_mixed_in_softly():
    """With padding, the default biases each sorted slot by the log of its real fraction: padding
    mixed in softly weighs less, and real outputs never see the padded values; padding_bias=False
    is the plain formula over the zeroed padding."""
    rng = np.random.default_rng(16)
    n, b = 11, 3                                                         # the last block has one pad
    q, k, v, params, config = sinkhorn_inputs(rng, n)
    nb = -(-n // b)
    gumbel = rng.gumbel(size=(2, nb, nb))
    km = np.ones((2, 1, n), bool)
    km[..., 4] = False
    a, ca = SPEC.forward(q, k, v, **params, block=b, gumbel=gumbel, key_mask=km)
    c, cc = SPEC.forward(q, k, v, **params, block=b, gumbel=gumbel, key_mask=km, padding_bias=False)
    assert np.abs(a - c).max() > 1e-3                                    # the bias matters here
    for out, cache in ((a, ca), (c, cc)):
        np.testing.assert_allclose(SPEC.weights(cache) @ v, out, rtol=0, atol=1e-12)
        w = SPEC.weights(cache)
        assert np.all(w[..., 4] == 0)                                    # the masked key has no weight
    errors = check_gradients(SPEC.forward, SPEC.backward, {"q": q, "k": k, "v": v, **params},
                             {"block": b, "gumbel": gumbel, "key_mask": km}, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_sortcut_with_hard_choice_equals_full_masked():
    rng = np.random.default_rng(6)
    n = 21
    q, k, v, params, config = sinkhorn_inputs(rng, n)
    nb = -(-n // config["block"])
    perm = np.stack([rng.permutation(nb) for _ in range(4)]).reshape(2, 2, nb)
    for nk in (1, 2, nb + 3):
        out, cache = SPEC.forward(q, k, v, **params, **config, sortcut=nk, perm=perm)
        pat = pattern_from_perm(perm, n, config["block"], False, sortcut=min(nk, nb))
        ref, _ = FULL.forward(q, k, v, mask=pat)
        np.testing.assert_allclose(out, ref, atol=1e-12)


def test_sortcut_soft_gradients_and_weights():
    rng = np.random.default_rng(7)
    q, k, v, params, config = sinkhorn_inputs(rng, 11, d=3, heads=1, batch=1)
    km = np.array([[[True] * 8 + [False] * 3]])
    cfg = {**config, "sortcut": 2, "key_mask": km}
    errors = check_gradients(SPEC.forward, SPEC.backward, {"q": q, "k": k, "v": v, **params}, cfg, rng=rng)
    assert max(errors.values()) < 1e-6, errors
    out, cache = SPEC.forward(q, k, v, **params, **cfg)
    w = SPEC.weights(cache)
    np.testing.assert_allclose(out, w @ v, atol=1e-12)
    assert np.all(w[..., ~km[0, 0]] == 0)                           # masked keys get zero weight
    # every query attends to the same n_k * b sorted keys: W = A M with M (n_k b, N) shared
    assert 2 * config["block"] < 11
    assert np.linalg.matrix_rank(w[0, 0], tol=1e-10) <= 2 * config["block"]
    with pytest.raises(ValueError, match="sortcut"):
        SPEC.forward(q, k, v, **params, **config, sortcut=2, causal=True)


@pytest.mark.parametrize("n", [9, 13, 20])
def test_causal_never_leaks_at_any_split(n):
    """Stronger than the contract: every t, with a key_mask, and the SortNet parameters fixed."""
    rng = np.random.default_rng(n)
    q, k, v, params, config = sinkhorn_inputs(rng, n, causal=True)
    km = rng.random((2, 1, n)) > 0.2
    km[..., 0] = True
    out, _ = SPEC.forward(q, k, v, **params, **config, causal=True, key_mask=km)
    for t in range(1, n):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        for x in (q2, k2, v2):
            x[..., t:, :] = rng.standard_normal(x[..., t:, :].shape) * 4
        out2, _ = SPEC.forward(q2, k2, v2, **params, **config, causal=True, key_mask=km)
        assert np.array_equal(out[..., :t, :], out2[..., :t, :]), t


def test_causal_weights_are_lower_triangular_and_rows_stochastic():
    rng = np.random.default_rng(8)
    q, k, v, params, config = sinkhorn_inputs(rng, 19, causal=True)
    out, cache = SPEC.forward(q, k, v, **params, **config, causal=True)
    w = SPEC.weights(cache)
    assert np.all(np.triu(w, 1) == 0)
    np.testing.assert_allclose(out, w @ v, atol=1e-12)
    # the soft permutation is strictly lower block-triangular
    assert np.all(cache.p[..., ~causal_support(cache.nb)] == 0)


def test_summaries_are_sum_pooled_keys():
    """Changing the keys of block j while keeping their sum changes R only through nothing:
    the sort matrix P is the same (SortNet sees block sums)."""
    rng = np.random.default_rng(9)
    q, k, v, params, config = sinkhorn_inputs(rng, 16)
    b = config["block"]
    k2 = k.copy()
    delta = rng.standard_normal(k[..., :1, :].shape)
    k2[..., 0:1, :] += delta
    k2[..., 1:2, :] -= delta                                        # same block-0 sum (b >= 2)
    _, c1 = SPEC.forward(q, k, v, **params, **config)
    _, c2 = SPEC.forward(q, k2, v, **params, **config)
    assert b >= 2
    np.testing.assert_allclose(c1.p, c2.p, atol=1e-12)


def test_default_block_grows_like_sqrt_n():
    assert sk.default_block(5) < 5 and sk.default_block(47) < 47
    for n in (256, 1024, 4096):
        assert abs(sk.default_block(4 * n) - 2 * sk.default_block(n)) <= 1


def test_bad_config_raises():
    rng = np.random.default_rng(10)
    q, k, v, params, config = sinkhorn_inputs(rng, 12)
    nb = -(-12 // config["block"])
    for bad, word in (({"tau": 0.0}, "tau"), ({"gumbel": np.zeros((1, 1))}, "gumbel"),
                      ({"perm": np.zeros(nb + 1, dtype=int)}, "perm"), ({"perm": np.zeros(nb)}, "perm"),
                      ({"W2": params["W2"][:, :1]}, "W2"), ({"b1": params["b1"][:-1]}, "b1")):
        with pytest.raises(ValueError, match=word):
            SPEC.forward(q, k, v, **{**params, **config, **bad})
    with pytest.raises(ValueError, match="k"):
        SPEC.forward(q, k[..., :-1, :], v[..., :-1, :], **params, **config)   # cross-attention unsupported
    with pytest.raises(ValueError, match="log_alpha"):
        balancing.sinkhorn_forward(np.zeros((3, 4)), 2)


@pytest.mark.parametrize("causal", [False, True])
def test_inside_multi_head_attention_at_shorter_lengths(causal):
    """Params are made once for max_len; W2 must cover the N_B of every shorter length."""
    from effattn.models.attention import MultiHeadAttention

    rng = np.random.default_rng(11)
    mha = MultiHeadAttention(8, 2, rng, attention="sinkhorn", causal=causal, max_len=60)
    for n in range(1, 61, 7):
        x = rng.standard_normal((1, n, 8))
        y = mha.forward(x)
        dx, _ = mha.backward(np.ones_like(y))
        assert y.shape == x.shape and np.isfinite(dx).all()


# --------------------------------------------------------------------------- decoding
def decode(q, k, v, km, prompt, params, config):
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    state = sk.init_state(lead=q.shape[:-2], d=q.shape[-1], dv=v.shape[-1], **params, **config)
    out, state = sk.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                            key_mask=None if kmb is None else kmb[..., :prompt])
    rows, sizes = [out], [state_size(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = sk.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                           key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        sizes.append(state_size(state))
    return np.concatenate(rows, axis=-2), sizes


@pytest.mark.parametrize("mode", ["soft", "no noise", "no padding bias", "hard", "perm"])
def test_decoding_equals_the_causal_forward_at_every_block_boundary(mode):
    """Row t of the causal forward depends on the completed blocks before its own (their summaries
    give the sort logits of its block's row of P, balanced causally: rows above only) and on its
    own block up to t, so the state steps exactly: prompts of 1 token, shorter than a block (where
    the forward clips the block to the prompt), ending on a block boundary or inside a block,
    with key masks, for soft, hard and given block choices."""
    rng = np.random.default_rng(40)
    n = 23
    q, k, v, params, config = sinkhorn_inputs(rng, n, causal=True)
    v = v[..., :3]
    b = config["block"]
    nb = -(-n // b)
    if mode == "no noise":
        config["gumbel"] = None
    elif mode == "no padding bias":
        config["padding_bias"] = False
    elif mode == "hard":
        config["hard"] = True
    elif mode == "perm":
        config["perm"] = np.array([[rng.integers(-1, i) if i else -1 for i in range(nb)] for _ in range(2)])  # (H, N_B)
    km = rng.random((2, 1, n)) > 0.3
    km[..., 0] = True
    for key_mask in (None, km):
        want, _ = SPEC.forward(q, k, v, **params, **config, causal=True, key_mask=key_mask)
        for prompt in sorted({1, b - 1, b, b + 1, 2 * b, 3 * b + 2, n - 1}):
            got, _ = decode(q, k, v, key_mask, prompt, params, config)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"{mode}, prompt {prompt}")


def test_decoding_state_size():
    """After t tokens (g = ceil(t / b) blocks begun) the state holds, per head, every token's key,
    value and mask bit, t (d + dv + 1), the running column log-sum-exps, n_iters (g - 1), and the
    current sorted block, b (d + dv + 2): it grows with t."""
    rng = np.random.default_rng(41)
    n, d, dv = 30, 4, 3
    q, k, v, params, config = sinkhorn_inputs(rng, n, d=d, causal=True)
    v = v[..., :dv]
    b, it = config["block"], config["n_iters"]
    _, sizes = decode(q, k, v, None, 2, params, config)
    want = [2 * 2 * (t * (d + dv + 1) + it * (-(-t // b) - 1) + b * (d + dv + 2)) for t in range(2, n + 1)]
    assert sizes == want


def test_decoding_refuses_what_the_forward_refuses():
    rng = np.random.default_rng(42)
    n = 12
    q, k, v, params, config = sinkhorn_inputs(rng, n, causal=True)
    with pytest.raises(ValueError, match="^causal=True is not supported with sortcut"):
        sk.init_state(lead=(2, 2), d=4, dv=4, **params, **config, sortcut=2)
    bad = np.array([0, 0, 1, 2])                               # block 0 drawing from itself
    with pytest.raises(ValueError, match="^perm"):
        sk.init_state(lead=(2, 2), d=4, dv=4, **params, **config, perm=bad)
    # past the blocks the noise covers: the message names gumbel
    nb = config["gumbel"].shape[-1]
    b = config["block"]
    short = dict(config, gumbel=config["gumbel"][..., :nb - 1, :nb - 1])
    state = sk.init_state(lead=(2, 2), d=4, dv=4, **params, **short)
    _, state = sk.prefill(q[..., :(nb - 1) * b, :], k[..., :(nb - 1) * b, :], v[..., :(nb - 1) * b, :], state)
    with pytest.raises(ValueError, match="^gumbel must have at least"):
        sk.step(q[..., 0, :], k[..., 0, :], v[..., 0, :], state)
    with pytest.raises(ValueError, match="fresh state"):
        sk.prefill(q, k, v, state)
