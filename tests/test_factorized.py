"""Factorized attention (effattn.nn.factorized): the three ways to combine two patterns, tested
on both Sparse Transformer patterns (strided and fixed).

The helpers ``to_mask`` and ``combined_mask`` turn the per-query sets the two mechanism tests
write from the paper into the dense mask of each combine mode (used by tests/test_sparse_strided.py
and tests/test_sparse_fixed.py). Oracles: set algebra between the modes, central finite differences.
"""
import numpy as np
import pytest

from effattn.attention import sparse_fixed, sparse_strided
from effattn.gradcheck import check_gradients

# Each pattern with the sizes used here (a small stride, or a block of 4 with 2 summary cells).
PATTERNS = {"sparse_strided": (sparse_strided, {"stride": 4}),
            "sparse_fixed": (sparse_fixed, {"block": 4, "summary": 2})}
COMBINES = [("merged", 1), ("heads", 1), ("layers", 1), ("layers", 2)]


def to_mask(sets, n):
    """Bool (n, n) with row i True on the set of query i."""
    m = np.zeros((n, n), bool)
    for i, s in enumerate(sets):
        m[i, sorted(s)] = True
    return m


def combined_mask(a1, a2, n, combine, part, heads):
    """The pattern of a combine mode from the sets A(1), A(2): their union ("merged"), one of
    them ("layers", part 1 or 2), or A(1) on even heads and A(2) on odd heads ((heads, n, n))."""
    m1, m2 = to_mask(a1, n), to_mask(a2, n)
    if combine == "merged":
        return m1 | m2
    if combine == "layers":
        return m1 if part == 1 else m2
    return np.stack([m1 if h % 2 == 0 else m2 for h in range(heads)])


def qkv(rng, b, h, n, d=4, dv=3):
    return rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))


@pytest.mark.parametrize("name", PATTERNS)
def test_union_of_the_two_heads_is_the_merged_pattern(name):
    mod, sizes = PATTERNS[name]
    rng = np.random.default_rng(1)
    for causal in (False, True):
        q, k, v = qkv(rng, 1, 2, 19)
        _, heads = mod.forward(q, k, v, causal=causal, combine="heads", **sizes)
        _, merged = mod.forward(q, k, v, causal=causal, combine="merged", **sizes)
        per_head = mod.pattern(heads)
        assert per_head.shape == (2, 19, 19)
        assert np.array_equal(per_head[0] | per_head[1], mod.pattern(merged))
        assert not np.array_equal(per_head[0], per_head[1])


@pytest.mark.parametrize("name", PATTERNS)
def test_heads_mode_is_layers_mode_per_head(name):
    mod, sizes = PATTERNS[name]
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 2, 5, 21)
    for causal in (False, True):
        out, _ = mod.forward(q, k, v, causal=causal, combine="heads", **sizes)
        o1, _ = mod.forward(q, k, v, causal=causal, combine="layers", part=1, **sizes)
        o2, _ = mod.forward(q, k, v, causal=causal, combine="layers", part=2, **sizes)
        np.testing.assert_array_equal(out[:, 0::2], o1[:, 0::2])
        np.testing.assert_array_equal(out[:, 1::2], o2[:, 1::2])


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("combine,part", COMBINES)
def test_gradients_of_every_combine_mode(name, combine, part):
    mod, sizes = PATTERNS[name]
    rng = np.random.default_rng(3)
    for causal in (False, True):
        q, k, v = qkv(rng, 1, 2, 11, d=3, dv=2)
        km = rng.random((1, 2, 11)) > 0.3
        km[..., 0] = True
        errors = check_gradients(mod.forward, mod.backward, {"q": q, "k": k, "v": v},
                                 {"causal": causal, "key_mask": km, "combine": combine, "part": part, **sizes},
                                 rng=rng)
        assert max(errors.values()) < 1e-7, (name, combine, part, causal, errors)
