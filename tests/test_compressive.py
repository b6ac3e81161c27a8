"""The Compressive Transformer's layer (effattn.layers.compressive): the special cases the paper's
construction implies (rate 1 with an identity compression is Transformer-XL with the two memories
joined; no compressed memory is Transformer-XL), the convolution against a loop in torch's
Conv1d layout, the pooled compressions and their masks, the state update of Algorithm 1, and the
reconstruction loss (its value written out, its gradient only in the compression). The contract
adds gradients (the stop-gradient included), causality, key masks and segment by segment against
the one-pass form; tests/parity compares with lucidrains' compressive-transformer-pytorch."""
import numpy as np
import pytest

import effattn
from effattn.layers import compressive as cp
from effattn.layers import transformer_xl as xl


def params(rng, D=8, heads=2, **kw):
    return cp.init_params(rng, D, heads, **kw)


NEXT = {cp.forward: cp.next_memory, xl.forward: xl.next_memory}
KEYS = {cp.forward: ("memory", "memory_mask", "compressed", "compressed_mask"), xl.forward: ("memory", "memory_mask")}


def run(fn, x, segment, **kw):
    state, outs = {}, []
    for s0 in range(0, x.shape[1], segment):
        out, cache = fn(x[:, s0:s0 + segment], **state, **kw)
        state = dict(zip(KEYS[fn], NEXT[fn](cache)))
        outs.append(out)
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("causal", [False, True])
def test_rate_one_mean_compression_is_transformer_xl_with_both_memories(causal):
    rng = np.random.default_rng(0)
    p = params(rng, compress="mean")
    x = rng.standard_normal((2, 24, 8))
    got = run(cp.forward, x, 4, heads=2, mem_len=3, cmem_len=6, rate=1, compress="mean", causal=causal, **p)
    want = run(xl.forward, x, 4, heads=2, mem_len=9, causal=causal, **p)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_no_compressed_memory_is_transformer_xl():
    rng = np.random.default_rng(1)
    p = params(rng)
    x = rng.standard_normal((2, 20, 8))
    got = run(cp.forward, x, 5, heads=2, mem_len=5, cmem_len=0, rate=2, causal=True, **p)
    want = run(xl.forward, x, 5, heads=2, mem_len=5, causal=True, **{k: v for k, v in p.items() if k not in ("Wc", "bc")})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_the_convolution_is_torchs_conv1d_with_kernel_equal_to_stride():
    rng = np.random.default_rng(2)
    D, c = 6, 3
    p = {"Wc": rng.standard_normal((c, D, D)), "bc": rng.standard_normal(D)}
    weight = np.transpose(p["Wc"], (2, 1, 0))                   # torch layout (out, in, k): weight[:, :, t] = Wc[t].T
    old = rng.standard_normal((2, 7, D))                        # 7 rows: 2 groups from the newest 6, the oldest dropped
    C, mask, _ = cp.compress_rows(old, None, rate=c, compress="conv", params=p)
    want = np.stack([p["bc"] + sum(weight[:, :, t] @ old[:, 1 + g * c + t].T for t in range(c)).T for g in range(2)], 1)
    np.testing.assert_allclose(C, want, rtol=0, atol=1e-12)
    assert mask is None


def test_pooled_compressions_and_masks():
    rng = np.random.default_rng(3)
    old = rng.standard_normal((1, 6, 4))
    m = np.array([[True, False, False, False, True, True]])
    C, cm, _ = cp.compress_rows(old, m, rate=2, compress="mean", params={})
    np.testing.assert_allclose(C[0, 0], old[0, 0])                # only the real member
    np.testing.assert_allclose(C[0, 1], 0.0)                      # no real member: 0, and masked
    np.testing.assert_allclose(C[0, 2], old[0, 4:6].mean(0))
    np.testing.assert_array_equal(cm, [[True, False, True]])
    C, cm, _ = cp.compress_rows(old, m, rate=2, compress="max", params={})
    np.testing.assert_allclose(C[0, 2], old[0, 4:6].max(0))
    p = {"Wc": rng.standard_normal((2, 4, 4)), "bc": np.zeros(4)}
    C, cm, _ = cp.compress_rows(old, m, rate=2, compress="conv", params=p)
    np.testing.assert_allclose(C[0, 0], old[0, 0] @ p["Wc"][0])    # the masked member enters as 0
    np.testing.assert_array_equal(cm, [[True, False, True]])


def test_the_state_update_of_algorithm_one():
    """With rows numbered by position: the memory keeps the newest mem_len of [memory; x], the
    fallen rows go in groups of c (the newest whole groups) to the compressed memory, which keeps
    its newest cmem_len rows."""
    rng = np.random.default_rng(4)
    p = params(rng, compress="mean")
    D = 8
    x = np.zeros((1, 5, D))
    x[0, :, 0] = np.arange(10, 15)                                 # feature 0 = the position
    mem = np.zeros((1, 4, D))
    mem[0, :, 0] = np.arange(6, 10)
    comp = np.zeros((1, 2, D))
    comp[0, :, 0] = [100, 200]
    _, cache = cp.forward(x, memory=mem, compressed=comp, heads=2, mem_len=3, cmem_len=4, rate=2, compress="mean", **p)
    m, mm, c, cm = cp.next_memory(cache)
    np.testing.assert_array_equal(m[0, :, 0], [12, 13, 14])
    # fallen: 6..11 (6 rows) -> groups (6, 7), (8, 9), (10, 11) -> means 6.5, 8.5, 10.5; keep the newest 4
    np.testing.assert_array_equal(c[0, :, 0], [200, 6.5, 8.5, 10.5])
    assert mm is None and cm is None


def test_the_reconstruction_loss_written_out_and_its_gradient_only_in_the_compression():
    rng = np.random.default_rng(5)
    p = params(rng)
    x = rng.standard_normal((2, 4, 8))
    mem = rng.standard_normal((2, 4, 8))
    kw = dict(memory=mem, heads=2, mem_len=4, cmem_len=4, rate=2, recon_weight=0.7)
    out, cache = cp.forward(x, **kw, **p)
    old = mem                                                      # N = mem_len: the whole memory falls out
    C = p["bc"] + np.concatenate([old[:, 0::2], old[:, 1::2]], axis=-1) @ p["Wc"].reshape(16, 8)

    def attn(rows):
        q = (x @ p["Wq"]).reshape(2, 4, 2, 4).transpose(0, 2, 1, 3)
        k = (rows @ p["Wk"]).reshape(2, -1, 2, 4).transpose(0, 2, 1, 3)
        v = (rows @ p["Wv"]).reshape(2, -1, 2, 4).transpose(0, 2, 1, 3)
        s = q @ k.swapaxes(-1, -2) / 2.0
        e = np.exp(s - s.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)) @ v

    want = 0.7 * np.mean((attn(old) - attn(C)) ** 2)
    assert cp.aux_loss(cache) == pytest.approx(want, rel=1e-12)
    g0 = cp.backward(np.zeros_like(out), cache)                     # the loss's gradient alone
    assert np.abs(g0["Wc"]).max() > 0 and np.abs(g0["bc"]).max() > 0
    for name in ("x", "Wq", "Wk", "Wv", "Wr", "u", "vb", "Wo", "ln_g", "ln_b"):
        assert np.abs(g0[name]).max() == 0, name                  # stop-gradient: nothing else moves
    # training only the compression lowers the loss
    before = cp.aux_loss(cache)
    p2 = {**p, "Wc": p["Wc"] - 0.5 * g0["Wc"], "bc": p["bc"] - 0.5 * g0["bc"]}
    assert cp.aux_loss(cp.forward(x, **kw, **p2)[1]) < before


def test_bad_compressive_options_are_refused_by_name():
    rng = np.random.default_rng(6)
    p = params(rng)
    x = rng.standard_normal((2, 4, 8))
    with pytest.raises(ValueError, match="^compress must be one of"):
        cp.forward(x, heads=2, compress="deconv", **p)
    with pytest.raises(ValueError, match="^compressive parameters"):
        cp.forward(x, heads=2, compress="max", **p)                # Wc, bc belong to "conv" only
    with pytest.raises(ValueError, match="^Wc must have shape"):
        cp.forward(x, heads=2, rate=3, **p)
    with pytest.raises(ValueError, match="^compressed_mask was given without a compressed"):
        cp.forward(x, heads=2, compressed_mask=np.ones((2, 3), bool), **p)
    with pytest.raises(ValueError, match="^compressed must be"):
        cp.forward(x, heads=2, compressed=np.zeros((2, 3, 6)), **p)
    with pytest.raises(ValueError, match="^recon_weight"):
        cp.forward(x, heads=2, recon_weight=-1.0, **p)
    with pytest.raises(ValueError, match="^cmem_len"):
        cp.forward(x, heads=2, cmem_len=-2, **p)
    assert effattn.get("compressive").aux_trains == ("Wc", "bc")
