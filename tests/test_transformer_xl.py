"""Transformer-XL's layer (effattn.layers.transformer_xl, effattn.nn.relative): the relative shift
against its definition and against the paper's zero-pad form, the sinusoid of the official code,
scores that depend on i - j only, the memory's rules, bad input, and cost linear in the memory.
The contract (tests/test_contract.py) adds gradients, causality, key masks and segment by segment
against the one-pass equivalent; tests/parity has the official code's numbers."""
import tracemalloc

import numpy as np
import pytest

import effattn
from effattn.layers import transformer_xl as xl
from effattn.nn.relative import distances, rel_shift, rel_unshift, sinusoid
from effattn.tools.bench import fit_exponent


def test_the_shift_reads_each_row_from_its_own_distance():
    rng = np.random.default_rng(0)
    for n, m in ((1, 1), (3, 3), (4, 9), (6, 7)):
        w = m + n - 1
        P = rng.standard_normal((2, n, w))
        dist = distances(n, m, np)
        want = np.empty((2, n, m))
        for i in range(n):
            for j in range(m):
                (c,) = np.flatnonzero(dist == (m - n) + i - j)   # the column of distance L + i - j
                want[:, i, j] = P[:, i, c]
        np.testing.assert_array_equal(rel_shift(P, m), want)
        # the backward is the transpose: <shift(P), G> = <P, unshift(G)>
        G = rng.standard_normal((2, n, m))
        assert np.sum(rel_shift(P, m) * G) == pytest.approx(np.sum(P * rel_unshift(G, w)), rel=1e-12)


def test_the_papers_zero_pad_shift_agrees_inside_the_causal_band():
    """Appendix B's form: P over distances M-1..0 (M columns), a zero column padded in front,
    viewed as (M + 1, N), the first row dropped, viewed back as (N, M). Inside the causal band
    (j <= L + i) it equals effattn's shift; above it, it reads other rows' numbers."""
    rng = np.random.default_rng(1)
    n, L = 5, 3
    m = L + n
    P = rng.standard_normal((n, m + n - 1))
    causal_part = P[:, :m]                            # distances m - 1 .. 0
    padded = np.concatenate([np.zeros((n, 1)), causal_part], axis=1)          # (N, M + 1)
    paper = padded.reshape(m + 1, n)[1:].reshape(n, m)
    band = np.arange(m)[None, :] <= L + np.arange(n)[:, None]
    ours = rel_shift(P, m)
    np.testing.assert_array_equal(paper[band], ours[band])
    assert not np.allclose(paper[~band], ours[~band])


def test_the_sinusoid_is_the_official_concatenated_form():
    t = np.array([0.0, 1.0, 5.0])
    R = sinusoid(t, 8, np)
    np.testing.assert_array_equal(R[0], [0, 0, 0, 0, 1, 1, 1, 1])
    f = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(R[2], np.concatenate([np.sin(5 * f), np.cos(5 * f)]), rtol=0, atol=1e-15)


def test_scores_depend_on_the_distance_not_the_absolute_position():
    """The same tokens at another offset (a longer memory in front, all of it masked) give the same
    output: nothing in the layer knows absolute positions."""
    rng = np.random.default_rng(2)
    case = effattn.get("transformer_xl").example(rng, batch=1, heads=2, n=6, d=4, causal=True)
    p = {k: v for k, v in case.inputs.items() if k != "x"}
    x = case.inputs["x"]
    a, _ = xl.forward(x, causal=True, heads=2, **p)
    pad = rng.standard_normal((1, 9, x.shape[-1]))
    b, _ = xl.forward(x, memory=pad, memory_mask=np.zeros((1, 9), bool), causal=True, heads=2, **p)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


def test_next_memory_keeps_the_last_mem_len_states_and_their_mask():
    rng = np.random.default_rng(3)
    case = effattn.get("transformer_xl").example(rng, batch=2, heads=2, n=5, d=4)
    p = {k: v for k, v in case.inputs.items() if k != "x"}
    x = case.inputs["x"]
    mem = rng.standard_normal((2, 7, x.shape[-1]))
    mm = rng.random((2, 7)) > 0.5
    for mem_len, rows in ((3, 3), (5, 5), (12, 12), (40, 12)):
        _, cache = xl.forward(x, memory=mem, memory_mask=mm, heads=2, mem_len=mem_len, **p)
        got, gm = xl.next_memory(cache)
        h = np.concatenate([mem, x], axis=1)
        km = np.concatenate([mm, np.ones((2, 5), bool)], axis=1)
        np.testing.assert_array_equal(got, h[:, 12 - rows:])
        np.testing.assert_array_equal(gm, km[:, 12 - rows:])
    _, cache = xl.forward(x, heads=2, **p)                    # default: one segment's states, no mask
    got, gm = xl.next_memory(cache)
    assert got.shape == x.shape and gm is None
    _, cache = xl.forward(x, heads=2, mem_len=0, **p)
    assert xl.next_memory(cache) == (None, None)


def test_bad_memory_and_sizes_are_refused_by_name():
    rng = np.random.default_rng(4)
    case = effattn.get("transformer_xl").example(rng, batch=2, heads=2, n=5, d=4)
    p = {k: v for k, v in case.inputs.items() if k != "x"}
    x = case.inputs["x"]
    D = x.shape[-1]
    with pytest.raises(ValueError, match="^memory must be"):
        xl.forward(x, memory=np.zeros((2, 3, D + 2)), heads=2, **p)
    with pytest.raises(ValueError, match="^memory must be"):
        xl.forward(x, memory=np.zeros((2, 3, D), np.float32), heads=2, **p)
    with pytest.raises(ValueError, match="^memory_mask was given without a memory"):
        xl.forward(x, memory_mask=np.ones((2, 3), bool), heads=2, **p)
    with pytest.raises(ValueError, match="^memory_mask must have shape"):
        xl.forward(x, memory=np.zeros((2, 3, D)), memory_mask=np.ones((2, 4), bool), heads=2, **p)
    with pytest.raises(ValueError, match="^mem_len"):
        xl.forward(x, heads=2, mem_len=-1, **p)
    with pytest.raises(ValueError, match="^x: the model width D must be even"):
        q = {**xl.init_params(rng, 3, 1)}
        xl.forward(rng.standard_normal((1, 4, 3)), heads=1, **q)
    with pytest.raises(ValueError, match="^u must have shape"):
        xl.forward(x, heads=2, **{**p, "u": p["u"][:1]})


def test_time_and_memory_per_segment_grow_linearly_in_the_memory():
    """Peak memory of forward + backward for one segment of N = 32 with L = 64 .. 512: exponent ~1."""
    rng = np.random.default_rng(5)
    case = effattn.get("transformer_xl").example(rng, batch=1, heads=2, n=32, d=8, causal=True)
    p = {k: v for k, v in case.inputs.items() if k != "x"}
    ls, peaks = (64, 128, 256, 512), []
    for L in ls:
        mem = rng.standard_normal((1, L, case.inputs["x"].shape[-1]))
        tracemalloc.start()
        out, cache = xl.forward(case.inputs["x"], memory=mem, causal=True, heads=2, **p)
        xl.backward(np.ones_like(out), cache)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del out, cache
    assert 0.7 < fit_exponent(ls, peaks) < 1.15, peaks


def test_decoding_token_by_token_equals_the_parallel_causal_layer():
    """Segments of one token with a memory that keeps everything: each step equals row t of the
    causal layer over the whole sequence (Transformer-XL's fast evaluation, float64, 1e-12)."""
    rng = np.random.default_rng(6)
    case = effattn.get("transformer_xl").example(rng, batch=2, heads=2, n=9, d=4, causal=True)
    p = {k: v for k, v in case.inputs.items() if k != "x"}
    x = case.inputs["x"]
    want, _ = xl.forward(x, causal=True, heads=2, **p)
    memory, rows = None, []
    for t in range(9):
        out, cache = xl.forward(x[:, t:t + 1], memory=memory, causal=True, heads=2, mem_len=9, **p)
        memory, _ = xl.next_memory(cache)
        rows.append(out)
    np.testing.assert_allclose(np.concatenate(rows, axis=1), want, rtol=0, atol=1e-12)
