"""Tiled attention with the online softmax: equal to dense attention (``full``, and a softmax
written out here) for every mask, shape and tile size; the tiles a causal call skips, counted; the
memory it does not allocate, measured; validation and the registry entry."""
import tracemalloc

import numpy as np
import pytest

import effattn
from effattn.attention import flash, full
from effattn.gradcheck import check_gradients


def qkv(rng, lead, n, m, d=5, dv=4, dtype=np.float64):
    q = rng.standard_normal((*lead, n, d)).astype(dtype)
    k = rng.standard_normal((*lead, m, d)).astype(dtype)
    v = rng.standard_normal((*lead, m, dv)).astype(dtype)
    return q, k, v


def dense_softmax(q, k, v, allowed, scale):
    """The dense masked softmax, written out with NumPy (natural exp, no tiles): out and lse."""
    s = np.where(allowed, scale * q @ k.swapaxes(-1, -2), -np.inf)
    mx = s.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    z = e.sum(-1, keepdims=True)
    out = np.where(z > 0, (e / np.where(z > 0, z, 1.0)) @ v, 0.0)
    with np.errstate(divide="ignore"):
        lse = (np.log(z) + mx)[..., 0]
    return out, lse


def key_masks(rng, m, bk):
    """None; a random mask (one batch element fully masked); a mask hiding the whole first key tile."""
    km = rng.random((2, 1, m)) > 0.3
    km[1, 0, 0] = True
    km[0] = False
    first = np.ones((2, 1, m), bool)
    first[..., :min(bk, m - 1)] = False
    return [None, km, first]


SHAPES = [(37, 37), (20, 45), (45, 20), (1, 9), (9, 1)]
TILES = [(7, 5), (8, 8), (1, 1), (100, 100), (None, None), (37, 3)]   # None: one tile (b = N or M)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("bq,bk", TILES)
def test_equals_full_forward_backward_and_weights(n, m, bq, bk, causal):
    rng = np.random.default_rng(n * 100 + m)
    bq, bk = bq or n, bk or m
    q, k, v = qkv(rng, (2, 3), n, m)
    dout = rng.standard_normal((2, 3, n, 4))
    for km in key_masks(rng, m, bk):
        out, cache = flash.forward(q, k, v, causal=causal, key_mask=km, block_q=bq, block_k=bk)
        ref, rcache = full.forward(q, k, v, causal=causal, key_mask=km)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)
        g, rg = flash.backward(dout, cache), full.backward(dout, rcache)
        for key in ("q", "k", "v"):
            np.testing.assert_allclose(g[key], rg[key], rtol=0, atol=1e-10, err_msg=f"d{key}")
        np.testing.assert_allclose(flash.weights(cache), full.weights(rcache), rtol=0, atol=1e-12)
        assert np.array_equal(flash.pattern(cache), np.broadcast_to(full.pattern(rcache), (2, 3, n, m)))


@pytest.mark.parametrize("causal", [False, True])
def test_out_and_lse_equal_the_written_out_softmax(causal):
    rng = np.random.default_rng(1)
    n, m = 29, 31
    q, k, v = qkv(rng, (2, 2), n, m)
    km = rng.random((2, 1, m)) > 0.4
    km[0] = False                                             # batch 0: no key at all
    allowed = np.broadcast_to(km[..., None, :], (2, 2, n, m))
    if causal:
        allowed = allowed & (np.arange(m)[None, :] <= np.arange(n)[:, None])
    out, cache = flash.forward(q, k, v, causal=causal, key_mask=km, scale=0.7, block_q=6, block_k=4)
    want, lse = dense_softmax(q, k, v, allowed, 0.7)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.lse, lse, rtol=0, atol=1e-12)   # -inf == -inf on the empty rows
    assert np.isneginf(cache.lse[0]).all() and (out[0] == 0).all()


def test_cache_keeps_only_out_and_one_lse_per_row():
    rng = np.random.default_rng(2)
    n, m = 40, 50
    q, k, v = qkv(rng, (1, 2), n, m)
    out, cache = flash.forward(q, k, v, block_q=8, block_k=8)
    assert cache.lse.shape == (1, 2, n)
    arrays = [a for a in cache.saved if hasattr(a, "shape")]
    assert all(a.shape[-2:] != (n, m) and a.size < n * m for a in arrays), [a.shape for a in arrays]
    assert cache.out is out


@pytest.mark.parametrize("cfg", [{"causal": True, "block_q": 3, "block_k": 4},
                                 {"causal": False, "block_q": 5, "block_k": 2, "scale": 0.3}])
def test_gradients_of_cross_attention_match_finite_differences(cfg):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (1, 2), 11, 14, d=3, dv=2)
    km = rng.random((1, 1, 14)) > 0.3
    km[..., 0] = True
    errors = check_gradients(flash.forward, flash.backward, {"q": q, "k": k, "v": v}, {**cfg, "key_mask": km}, rng=rng)
    assert max(errors.values()) < 1e-7, errors


def test_a_late_larger_logit_is_rescaled_not_overflowed():
    """Logits that grow along the keys (the max of every later tile is larger, by up to ~8000 in
    float32): the running sums are rescaled; out is finite and equals full."""
    rng = np.random.default_rng(4)
    n, m, d = 16, 64, 4
    q = np.abs(rng.standard_normal((1, 1, n, d))) + 1.0
    k = np.linspace(0.0, 1.0, m)[:, None] * np.ones(d) * 40.0
    k = k[None, None] + 0.01 * rng.standard_normal((1, 1, m, d))
    v = rng.standard_normal((1, 1, m, 3))
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        args = [x.astype(dtype) for x in (q, k, v)]
        out, cache = flash.forward(*args, block_q=4, block_k=8)
        ref, _ = full.forward(*args)
        assert out.dtype == dtype and np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
        grads = flash.backward(np.ones_like(out), cache)
        assert all(np.isfinite(g).all() and g.dtype == dtype for g in grads.values())


def count_products(monkeypatch, q, k, v, **cfg):
    """Tile products of the forward and of the backward, and the tiles masked for the diagonal."""
    counts = {"products": 0, "diagonal": 0}
    scores, mask_tile = flash._scores, flash._mask_tile

    def counting_scores(qs, kt):
        counts["products"] += 1
        return scores(qs, kt)

    def counting_mask(s, i0, j0, diagonal, key_mask, j1, xp):
        counts["diagonal"] += bool(diagonal)
        return mask_tile(s, i0, j0, diagonal, key_mask, j1, xp)

    monkeypatch.setattr(flash, "_scores", counting_scores)
    monkeypatch.setattr(flash, "_mask_tile", counting_mask)
    out, cache = flash.forward(q, k, v, **cfg)
    fwd = dict(counts)
    flash.backward(np.ones_like(out), cache)
    bwd = {key: counts[key] - fwd[key] for key in counts}
    return fwd, bwd


@pytest.mark.parametrize("n,bq,bk", [(64, 8, 8), (64, 16, 8), (64, 8, 16), (60, 7, 5)])
def test_causal_calls_skip_the_tiles_above_the_diagonal(monkeypatch, n, bq, bk):
    """Counted: query tile [i0, i1) needs key tiles j0 < i1 only, ceil(i1 / bk) of them, and only
    those holding a key after the tile's first query (j1 - 1 > i0) are masked."""
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, (1, 1), n, n)
    tiles = [(i0, min(i0 + bq, n)) for i0 in range(0, n, bq)]
    kt = -(-n // bk)
    want_causal = sum(-(-i1 // bk) for _, i1 in tiles)
    want_diag = sum(sum(1 for j0 in range(0, i1, bk) if min(j0 + bk, i1) - 1 > i0) for i0, i1 in tiles)
    fwd, bwd = count_products(monkeypatch, q, k, v, block_q=bq, block_k=bk)
    assert fwd == bwd == {"products": len(tiles) * kt, "diagonal": 0}
    fwd, bwd = count_products(monkeypatch, q, k, v, causal=True, block_q=bq, block_k=bk)
    assert fwd == bwd == {"products": want_causal, "diagonal": want_diag}
    if bq == bk and n % bq == 0:
        nb = n // bq
        assert want_causal == nb * (nb + 1) // 2 and want_diag == nb      # the lower triangle of tiles


def test_causal_cross_attention_skips_too(monkeypatch):
    """N < M: the keys after the last query are never touched (query i sees j <= i)."""
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, (1, 1), 16, 64)
    fwd, _ = count_products(monkeypatch, q, k, v, causal=True, block_q=8, block_k=8)
    assert fwd["products"] == 1 + 2                            # rows 0-7: key tile 0; rows 8-15: tiles 0, 1


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_n_by_m_allocation_and_linear_memory():
    """forward + backward at N = 4096 (float64, d = dv = 64, tiles 256): the peak is O(N d + tiles)
    -- under 12 arrays of N x (d + 1) plus 4 tiles, about 1/6 of one N x N matrix (128 MiB) --
    and it doubles, not quadruples, from N = 2048."""
    peaks = {}
    d, b = 64, 256
    for n in (2048, 4096):
        rng = np.random.default_rng(7)
        q, k, v = qkv(rng, (1, 1), n, n, d=d, dv=d)
        dout = np.ones((1, 1, n, d))

        def run():
            out, cache = flash.forward(q, k, v, block_q=b, block_k=b)
            flash.backward(dout, cache)

        peaks[n] = peak_bytes(run)
    n = 4096
    assert peaks[n] < (12 * n * (d + 1) + 4 * b * b) * 8, f"peak {peaks[n] / 2**20:.1f} MiB at N={n}"
    assert peaks[n] < n * n * 8 / 6
    assert peaks[4096] < 2.5 * peaks[2048], peaks


def test_memory_is_a_fraction_of_full():
    """At N = 4096 (float32, d = 64) flash's forward + backward peak is under 1/10 of full's
    (full holds two N x N matrices; the fraction shrinks as 1/N)."""
    n = 4096
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, (1, 1), n, n, d=64, dv=64, dtype=np.float32)
    dout = np.ones((1, 1, n, 64), np.float32)
    peaks = {}
    for name, mod, cfg in (("full", full, {}), ("flash", flash, {"block_q": 512, "block_k": 512})):
        def run():
            out, cache = mod.forward(q, k, v, **cfg)
            mod.backward(dout, cache)
        peaks[name] = peak_bytes(run)
    assert peaks["flash"] < peaks["full"] / 10, peaks


def test_tile_sizes_do_not_change_the_result_beyond_rounding():
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, (2, 1), 33, 33)
    outs = [flash.forward(q, k, v, causal=True, block_q=bq, block_k=bk)[0]
            for bq, bk in ((1, 1), (4, 9), (33, 33), (10**6, 10**6))]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-13)
    assert np.array_equal(outs[2], outs[3])                  # beyond the sequence: clipped to it


def test_build_pattern_is_the_rule():
    assert flash.build_pattern(4, m=6, xp=np).all()
    want = np.array([[j <= i for j in range(6)] for i in range(4)])
    assert np.array_equal(flash.build_pattern(4, m=6, causal=True, xp=np), want)
    assert flash.build_pattern(5, xp=np).shape == (5, 5)


def test_float32_stays_float32():
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, (1, 2), 30, 30, dtype=np.float32)
    out, cache = flash.forward(q, k, v, causal=True, block_q=7, block_k=6)
    assert out.dtype == np.float32 and cache.lse.dtype == np.float32
    assert all(g.dtype == np.float32 for g in flash.backward(np.ones_like(out), cache).values())


def test_validation():
    q = np.zeros((1, 6, 2))
    for key, value in (("block_q", 0), ("block_k", -1), ("block_q", 2.5), ("block_k", True), ("causal", 1)):
        with pytest.raises(ValueError, match=key):
            flash.forward(q, q, q, **{key: value})
    with pytest.raises(ValueError, match="scale"):
        flash.forward(q, q, q, scale=0.0)
    with pytest.raises(ValueError, match="key_mask"):
        flash.forward(q, q, q, key_mask=np.ones((1, 7), bool))
    with pytest.raises(ValueError, match="block_q"):
        flash.init_state(lead=(1,), d=2, dv=2, block_q=0)


def test_registry_entry():
    spec = effattn.get("flash")
    assert spec.exact and spec.causal and spec.subquadratic and spec.kind == "kernel"
    assert set(spec.windows) == set(spec.sizes) == {"block_q", "block_k"}
    assert spec.step is not None and spec.init_state is not None


def test_inside_multi_head_attention():
    from effattn.models.attention import MultiHeadAttention

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 21, 16))
    ys = {}
    for name in ("full", "flash"):
        mha = MultiHeadAttention(16, 2, np.random.default_rng(1), attention=name, causal=True, max_len=21)
        ys[name] = mha.forward(x)
        dx = mha.backward(np.ones_like(ys[name]))[0]
        assert dx.shape == x.shape and np.isfinite(dx).all()
    np.testing.assert_allclose(ys["flash"], ys["full"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("m, bk", [(16, 4), (13, 5), (7, 32)])
def test_online_softmax_trace_ends_at_the_softmax_and_its_log_sum_exp(m, bk):
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, (2,), 6, m)
    scale = 1 / np.sqrt(q.shape[-1])
    tr = flash.online_softmax_trace(q, k, v, block_k=bk)
    want, want_lse = dense_softmax(q, k, v, np.ones((6, m), bool), scale)
    assert tr.bounds[0][0] == 0 and tr.bounds[-1][1] == m and len(tr.bounds) == -(-m // bk)
    assert np.max(np.abs(tr.out[-1] - want)) < 1e-12
    assert np.max(np.abs(tr.m[-1] + np.log(tr.l[-1]) - want_lse)) < 1e-12
    s = scale * q @ k.swapaxes(-1, -2)
    # after tile t: the softmax over the keys seen so far, and m their max
    j1 = tr.bounds[0][1]
    assert np.max(np.abs(tr.m[0] - s[..., :j1].max(-1))) < 1e-14
    allowed = np.zeros((6, m), bool)
    allowed[:, :j1] = True
    assert np.max(np.abs(tr.out[0] - dense_softmax(q, k, v, allowed, scale)[0])) < 1e-12
