"""Sparse Transformer, fixed pattern: the paper's per-query sets vs the fast block-sparse path.

Oracles: the sets A(1)_i, A(2)_i written as plain Python loops over queries
from the paper's definitions (not the vectorised pattern helper), dense
attention masked by them, and graph reachability
(:func:`effattn.nn.factorized.receptive_field`). The combine modes and their gradients are
tested on both patterns in tests/test_factorized.py.
"""
import numpy as np
import pytest
from test_contract import decode
from test_factorized import combined_mask, qkv, to_mask

import effattn
from effattn.attention import sparse_fixed as sf
from effattn.figures import FIGURES
from effattn.nn.factorized import receptive_field
from effattn.registry import Case

FULL = effattn.get("full")
FIXED = effattn.get("sparse_fixed")


# --------------------------------------------------------------------------- readable oracles
def fixed_sets(n, l, c, causal):
    a1, a2 = [], []
    for i in range(n):
        block = {j for j in range(n) if j // l == i // l}
        summary = {j for j in range(n) if j % l in range(l - c, l)}
        if causal:
            block = {j for j in block if j <= i}
            summary = {j for j in summary if j <= i}
        a1.append(block)
        a2.append(summary)
    return a1, a2


def oracle_mask(n, l, c, causal, combine, part, heads):
    return combined_mask(*fixed_sets(n, l, c, causal), n, combine, part, heads)


# --------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_helper_follows_the_paper(causal):
    for n in (1, 7, 16, 29):
        for l in (1, 2, 3, 5, 8):
            for c in range(1, l + 1):
                f1, f2 = fixed_sets(n, l, c, causal)
                assert np.array_equal(sf.build_pattern(n, block=l, summary=c, causal=causal, part=1), to_mask(f1, n))
                assert np.array_equal(sf.build_pattern(n, block=l, summary=c, causal=causal, part=2), to_mask(f2, n))
                assert np.array_equal(sf.build_pattern(n, block=l, summary=c, causal=causal),
                                      to_mask(f1, n) | to_mask(f2, n))


# --------------------------------------------------------------------------- fast path == dense masked by the oracle
CASES = ((5, 2, 1), (16, 4, 2), (23, 4, 1), (37, 6, 3), (30, 5, 5))


@pytest.mark.parametrize("combine,part", [("merged", 1), ("heads", 1), ("layers", 1), ("layers", 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_equals_dense_masked_by_paper_sets(combine, part, causal):
    rng = np.random.default_rng(0)
    heads = 3
    for n, l, c in CASES:
        q, k, v = qkv(rng, 2, heads, n)
        km = rng.random((2, heads, n)) > 0.3
        km[..., 0] = True
        for key_mask in (None, km):
            out, cache = sf.forward(q, k, v, causal=causal, key_mask=key_mask, block=l, summary=c, combine=combine,
                                    part=part)
            mask = oracle_mask(n, l, c, causal, combine, part, heads)
            ref, _ = FULL.forward(q, k, v, mask=mask, key_mask=key_mask)
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12, err_msg=f"fixed n={n} l={l} c={c}")
            assert np.array_equal(np.broadcast_to(FIXED.pattern(cache), mask.shape), mask)
            np.testing.assert_allclose(FIXED.weights(cache) @ v, out, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- receptive field
def test_two_layers_reach_every_earlier_position():
    for n, l in ((64, 8), (50, 7), (30, 5)):
        tril = np.tril(np.ones((n, n), bool))
        merged = sf.build_pattern(n, block=l, summary=1, causal=True)
        assert not np.array_equal(merged, tril)
        assert np.array_equal(receptive_field(merged, merged), tril)    # fixed: block -> summary -> block


# --------------------------------------------------------------------------- cost and configuration
def test_score_entries_grow_like_n_sqrt_n():
    """Sum of the per-group score matrices: O(N sqrt N), far from N^2."""
    def entries(n):
        q = np.zeros((1, 1, n, 2))
        _, cache = sf.forward(q, q, q, causal=True)
        return sum(a.p.size for _, c in cache.slices for a in c.attends)

    small, big = entries(1024), entries(16384)
    exponent = np.log(big / small) / np.log(16)
    assert exponent < 1.6, exponent
    assert big < 16384 ** 2 / 20


def test_defaults_and_bad_configuration():
    assert sf.default_summary(128) == 4 and sf.default_summary(2) == 1
    assert sf.setup(np.random.default_rng(0), n=1024, d=4, heads=2) == ({}, {"block": 32, "summary": 4})
    q = np.ones((1, 2, 8, 3))
    with pytest.raises(ValueError, match="combine"):
        sf.forward(q, q, q, combine="both")
    with pytest.raises(ValueError, match="part"):
        sf.forward(q, q, q, combine="layers", part=3)
    with pytest.raises(ValueError, match="summary"):
        sf.forward(q, q, q, block=2, summary=3)
    with pytest.raises(ValueError, match="summary"):
        sf.build_pattern(8, block=2, summary=3)
    with pytest.raises(ValueError, match="head axis"):
        sf.forward(q[0, 0], q[0, 0], q[0, 0], combine="heads")
    with pytest.raises(ValueError, match="k must have the same length"):
        sf.forward(q, q[..., :5, :], q[..., :5, :])


def test_single_head_in_heads_mode_and_unbatched_input():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 1, 9)
    out, cache = sf.forward(q, k, v, block=3, summary=1, combine="heads", causal=True)
    ref, _ = FULL.forward(q, k, v, mask=sf.pattern(cache), causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    out2, _ = sf.forward(q[0, 0], k[0, 0], v[0, 0], block=3, summary=1)
    ref2, _ = FULL.forward(q[0, 0], k[0, 0], v[0, 0], mask=sf.build_pattern(9, block=3, summary=1))
    np.testing.assert_allclose(out2, ref2, atol=1e-12)


def test_figures(tmp_path):
    paths = FIGURES["sparse_fixed"](str(tmp_path), np.random.default_rng(0))
    assert [p.split("/")[-1] for p in paths] == ["sparse_fixed_heads.png"]
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------- decoding
def stepped(q, k, v, prompt, key_mask=None, **config):
    """Prefill + token-by-token steps (the contract's driver): out and the state sizes."""
    return decode(effattn.get("sparse_fixed"), Case(inputs={"q": q, "k": k, "v": v}, config=config),
                  key_mask, prompt)


@pytest.mark.parametrize("combine,part,heads", [("merged", 1, 2), ("heads", 1, 3), ("heads", 1, 1),
                                                ("layers", 1, 2), ("layers", 2, 2)])
def test_decoding_every_combine_mode(combine, part, heads):
    """Stepping equals the causal forward in every combine mode (per-head rules for "heads"), key
    masks included; the state holds the current block up to t and every summary cell,
    (t mod l) + c floor(t / l) keys, growing as c t / l (A(1) alone: the current block only;
    A(2) alone: the summary cells only)."""
    n, block, summary, (b, d, dv) = 100, 8, 3, (2, 4, 3)
    rng = np.random.default_rng(heads + part)
    q, k, v = qkv(rng, b, heads, n, d, dv)
    km = np.broadcast_to(rng.random((b, 1, n)) > 0.3, (b, heads, n))
    cfg = {"block": block, "summary": summary, "combine": combine, "part": part}
    want, _ = sf.forward(q, k, v, causal=True, key_mask=km, **cfg)
    own = lambda t: t % block                                                  # noqa: E731
    cells = lambda t: summary * (t // block) + max(0, t % block - (block - summary))  # noqa: E731
    if (combine, part) == ("layers", 1) or (combine == "heads" and heads == 1):
        held = own
    elif (combine, part) == ("layers", 2):
        held = cells
    else:
        held = lambda t: own(t) + summary * (t // block)                       # noqa: E731
    for prompt in (1, 21):
        got, sizes = stepped(q, k, v, prompt, km, **cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        rows = [s // (b * heads * (d + dv + 1)) for s in sizes]
        assert rows == [held(t) for t in range(prompt, n + 1)]


def test_decoding_needs_the_block():
    with pytest.raises(ValueError, match="^block must be given"):
        sf.init_state(lead=(1, 2), d=4, dv=4)
    with pytest.raises(ValueError, match="^summary"):
        sf.init_state(lead=(1, 2), d=4, dv=4, block=4, summary=5)
    with pytest.raises(ValueError, match="^part"):
        sf.init_state(lead=(1, 2), d=4, dv=4, block=4, combine="layers", part=3)
