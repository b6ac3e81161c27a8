"""Sparse Transformer, strided pattern: the paper's per-query sets vs the fast block-sparse path.

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
from effattn.attention import sparse_strided as ss
from effattn.figures import FIGURES
from effattn.nn.factorized import default_stride, receptive_field
from effattn.registry import Case

FULL = effattn.get("full")
STRIDED = effattn.get("sparse_strided")


# --------------------------------------------------------------------------- readable oracles
def strided_sets(n, l, causal, paper_a1=False):
    """A(1)_i, A(2)_i as Python sets, one query at a time (Child et al., section 4.2).

    paper_a1=True uses the paper's A(1)_i = {t, ..., i}, t = max(0, i - l) (l + 1 cells);
    the default is l cells, i - l < j <= i (OpenAI's "local" band)."""
    a1, a2 = [], []
    for i in range(n):
        if causal:
            t = max(0, i - l) if paper_a1 else max(0, i - l + 1)
            a1.append(set(range(t, i + 1)))
            a2.append({j for j in range(0, i + 1) if (i - j) % l == 0})
        else:
            a1.append({j for j in range(n) if abs(i - j) < l})
            a2.append({j for j in range(n) if (i - j) % l == 0})
    return a1, a2


def oracle_mask(n, l, causal, combine, part, heads):
    return combined_mask(*strided_sets(n, l, causal), n, combine, part, heads)


# --------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_helper_follows_the_paper(causal):
    for n in (1, 7, 16, 29):
        for l in (1, 2, 3, 5, 8):
            a1, a2 = strided_sets(n, l, causal)
            assert np.array_equal(ss.build_pattern(n, stride=l, causal=causal, part=1), to_mask(a1, n))
            assert np.array_equal(ss.build_pattern(n, stride=l, causal=causal, part=2), to_mask(a2, n))
            assert np.array_equal(ss.build_pattern(n, stride=l, causal=causal), to_mask(a1, n) | to_mask(a2, n))


def test_paper_and_openai_local_conventions_give_the_same_merged_pattern():
    # The paper's A(1) has one more cell (j = i - l) than OpenAI's band; A(2) contains it.
    for n, l in ((20, 4), (33, 5)):
        p1, p2 = strided_sets(n, l, True, paper_a1=True)
        o1, o2 = strided_sets(n, l, True)
        assert (to_mask(p1, n) != to_mask(o1, n)).any()
        assert np.array_equal(to_mask(p1, n) | to_mask(p2, n), to_mask(o1, n) | to_mask(o2, n))


# --------------------------------------------------------------------------- fast path == dense masked by the oracle
CASES = ((5, 2), (16, 4), (23, 4), (37, 6), (40, 1))


@pytest.mark.parametrize("combine,part", [("merged", 1), ("heads", 1), ("layers", 1), ("layers", 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_equals_dense_masked_by_paper_sets(combine, part, causal):
    rng = np.random.default_rng(0)
    heads = 3
    for n, l in CASES:
        q, k, v = qkv(rng, 2, heads, n)
        km = rng.random((2, heads, n)) > 0.3
        km[..., 0] = True
        for key_mask in (None, km):
            out, cache = ss.forward(q, k, v, causal=causal, key_mask=key_mask, stride=l, combine=combine, part=part)
            mask = oracle_mask(n, l, causal, combine, part, heads)
            ref, _ = FULL.forward(q, k, v, mask=mask, key_mask=key_mask)
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12, err_msg=f"strided n={n} l={l}")
            assert np.array_equal(np.broadcast_to(STRIDED.pattern(cache), mask.shape), mask)
            np.testing.assert_allclose(STRIDED.weights(cache) @ v, out, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- receptive field
def test_two_layers_reach_every_earlier_position():
    for n, l in ((64, 8), (50, 7), (30, 5)):
        a1 = ss.build_pattern(n, stride=l, causal=True, part=1)
        a2 = ss.build_pattern(n, stride=l, causal=True, part=2)
        tril = np.tril(np.ones((n, n), bool))
        assert not np.array_equal(a1, tril) and not np.array_equal(a2, tril)
        assert np.array_equal(receptive_field(a1, a2), tril)             # local, then strided
        bi = ss.build_pattern(n, stride=l)
        assert receptive_field(bi, bi).all()


# --------------------------------------------------------------------------- cost and configuration
def test_score_entries_grow_like_n_sqrt_n():
    """Sum of the per-group score matrices: O(N sqrt N), far from N^2."""
    def entries(n):
        q = np.zeros((1, 1, n, 2))
        _, cache = ss.forward(q, q, q, causal=True)
        return sum(a.p.size for _, c in cache.slices for a in c.attends)

    small, big = entries(1024), entries(16384)
    exponent = np.log(big / small) / np.log(16)
    assert exponent < 1.6, exponent
    assert big < 16384 ** 2 / 20


def test_defaults_and_bad_configuration():
    assert default_stride(1024) == 32 and default_stride(16384) == 128 and default_stride(5) == 2
    assert ss.setup(np.random.default_rng(0), n=2048, d=4, heads=2) == ({}, {"stride": 64})
    q = np.ones((1, 2, 8, 3))
    with pytest.raises(ValueError, match="combine"):
        ss.forward(q, q, q, combine="both")
    with pytest.raises(ValueError, match="part"):
        ss.forward(q, q, q, combine="layers", part=3)
    with pytest.raises(ValueError, match="head axis"):
        ss.forward(q[0, 0], q[0, 0], q[0, 0], combine="heads")
    with pytest.raises(ValueError, match="k must have the same length"):
        ss.forward(q, q[..., :5, :], q[..., :5, :])
    with pytest.raises(ValueError, match="stride"):
        ss.forward(q, q, q, stride=0)


def test_single_head_in_heads_mode():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 1, 9)
    out, cache = ss.forward(q, k, v, stride=3, combine="heads", causal=True)
    ref, _ = FULL.forward(q, k, v, mask=ss.pattern(cache), causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_figures(tmp_path):
    paths = FIGURES["sparse_strided"](str(tmp_path), np.random.default_rng(0))
    assert [p.split("/")[-1] for p in paths] == ["sparse_strided_heads.png", "sparse_strided_receptive_field.png"]
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------- decoding
def stepped(q, k, v, prompt, key_mask=None, **config):
    """Prefill + token-by-token steps (the contract's driver): out and the state sizes."""
    return decode(effattn.get("sparse_strided"), Case(inputs={"q": q, "k": k, "v": v}, config=config),
                  key_mask, prompt)


@pytest.mark.parametrize("combine,part,heads", [("merged", 1, 2), ("heads", 1, 3), ("heads", 1, 1),
                                                ("layers", 1, 2), ("layers", 2, 2)])
def test_decoding_every_combine_mode(combine, part, heads):
    """Stepping equals the causal forward in every combine mode (per-head rules for "heads"), key
    masks included. A(2) reaches every earlier key of the same residue, so with it the state
    keeps all t keys; A(1) alone keeps the l - 1 keys before t, however long the sequence."""
    n, stride, (b, d, dv) = 90, 5, (2, 4, 3)
    rng = np.random.default_rng(heads + part)
    q, k, v = qkv(rng, b, heads, n, d, dv)
    km = np.broadcast_to(rng.random((b, 1, n)) > 0.3, (b, heads, n))
    cfg = {"stride": stride, "combine": combine, "part": part}
    want, _ = ss.forward(q, k, v, causal=True, key_mask=km, **cfg)
    for prompt in (1, 17):
        got, sizes = stepped(q, k, v, prompt, km, **cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        rows = [s // (b * heads * (d + dv + 1)) for s in sizes]
        a1_only = (combine, part) == ("layers", 1) or (combine == "heads" and heads == 1)
        expected = [min(t, stride - 1) if a1_only else t for t in range(prompt, n + 1)]
        assert rows == expected


def test_decoding_needs_the_stride_and_a_head_axis_for_heads():
    with pytest.raises(ValueError, match="^stride must be given"):
        ss.init_state(lead=(1, 2), d=4, dv=4)
    with pytest.raises(ValueError, match="^combine"):
        ss.init_state(lead=(1, 2), d=4, dv=4, stride=4, combine="both")
    with pytest.raises(ValueError, match="^combine='heads' needs a head axis"):
        ss.init_state(lead=(), d=4, dv=4, stride=4, combine="heads")
