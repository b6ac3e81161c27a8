"""Blockwise local attention: oracles independent of the fast path (a per-query loop,
the rule written pair by pair, dense attention), the window-copy helper's adjoint,
conventions (tensor2tensor masked_local_attention_1d), validation and figures."""
import numpy as np
import pytest

import effattn
from effattn.attention import local
from effattn.attention.full import forward as full_forward
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn.blockwise import block_windows, block_windows_backward, window_positions


def qkv(rng, shape, dv=None):
    *lead, n, d = shape
    q, k = rng.standard_normal(shape), rng.standard_normal(shape)
    v = rng.standard_normal((*lead, n, dv or d))
    return q, k, v


def rule(i, j, b, r, a, causal):
    """The paper's rule for one pair, written from scratch."""
    g = i // b
    return (g - r) * b <= j < (g + 1 + a) * b and (not causal or j <= i)


@pytest.mark.parametrize("n,b,r,a,causal", [(13, 4, 1, 0, True), (13, 4, 1, 0, False), (17, 5, 2, 0, True),
                                            (9, 3, 0, 0, False), (20, 4, 1, 1, False), (7, 16, 1, 0, True),
                                            (31, 6, 3, 2, False)])
def test_matches_per_query_loop(n, b, r, a, causal):
    rng = np.random.default_rng(n * 7 + b)
    q, k, v = qkv(rng, (2, 3, n, 5), dv=4)
    km = rng.random((2, 1, n)) > 0.25
    out, _ = local.forward(q, k, v, block=b, look_back=r, look_ahead=a, causal=causal, key_mask=km)
    for bi in range(2):
        for h in range(3):
            ref = local.loop(q[bi, h], k[bi, h], v[bi, h], block=b, look_back=r, look_ahead=a,
                             causal=causal, key_mask=km[bi, 0])
            np.testing.assert_allclose(out[bi, h], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,b,r,a,causal", [(11, 3, 1, 0, True), (16, 4, 2, 1, False), (5, 8, 1, 0, False)])
def test_pattern_helper_is_the_rule(n, b, r, a, causal):
    pat = local.build_pattern(n, block=b, look_back=r, look_ahead=a, causal=causal, xp=np)
    ref = np.array([[rule(i, j, b, r, a, causal) for j in range(n)] for i in range(n)])
    assert np.array_equal(pat, ref)


def test_weights_support_and_rows():
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, (1, 2, 23, 4))
    out, cache = local.forward(q, k, v, block=5, look_back=1, causal=True)
    w = local.weights(cache)
    assert np.array_equal(w[0, 0] != 0, local.build_pattern(23, block=5, look_back=1, causal=True, xp=np))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(out, w @ v, atol=1e-12)


def test_tensor2tensor_masked_local_attention_1d_convention():
    """t2t masked_local_attention_1d(block_length=b): a query block attends to itself and the
    previous block, causally = positions [(g - 1) b, i] for query i in block g."""
    rng = np.random.default_rng(1)
    n, b = 26, 6
    q, k, v = qkv(rng, (1, 1, n, 4))
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = (j <= i) & (j >= (i // b - 1) * b)
    ref, _ = full_forward(q, k, v, mask=mask)
    out, _ = local.forward(q, k, v, block=b, look_back=1, causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_one_block_or_wide_window_is_full_attention():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, (2, 2, 19, 4))
    for causal in (False, True):
        ref, _ = full_forward(q, k, v, causal=causal)
        out, _ = local.forward(q, k, v, block=19, look_back=0, causal=causal)
        np.testing.assert_allclose(out, ref, atol=1e-12)
    ref, _ = full_forward(q, k, v)
    out, _ = local.forward(q, k, v, block=4, look_back=5, look_ahead=5)
    np.testing.assert_allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("n,b,before,after", [(10, 3, 4, 0), (12, 4, 8, 4), (5, 7, 0, 2), (9, 2, 5, 3)])
def test_block_windows_is_a_gather_and_its_adjoint(n, b, before, after):
    rng = np.random.default_rng(n + b)
    x = rng.standard_normal((2, n, 3))
    w = block_windows(x, b, before, after)
    pos = window_positions(np, -(-n // b), b, before, after)
    inside = (pos >= 0) & (pos < n)
    ref = np.where(inside[..., None], x[:, np.clip(pos, 0, n - 1)], 0.0)      # fancy-index gather oracle
    np.testing.assert_array_equal(w, ref)
    g = rng.standard_normal(w.shape)
    # <W x, g> = <x, W^T g>
    np.testing.assert_allclose((w * g).sum(), (x * block_windows_backward(g, n, b, before, after)).sum(), rtol=1e-12)


def test_gradients_of_non_default_configuration():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (1, 2, 14, 3), dv=2)
    km = rng.random((1, 2, 14)) > 0.3
    for cfg in ({"block": 3, "look_back": 2, "look_ahead": 1}, {"block": 4, "look_back": 0, "causal": True},
                {"block": 5, "look_back": 1, "causal": True, "key_mask": km}):
        errors = check_gradients(local.forward, local.backward, {"q": q, "k": k, "v": v}, cfg, rng=rng)
        assert max(errors.values()) < 1e-7, (cfg, errors)


def test_float32_stays_float32():
    rng = np.random.default_rng(4)
    q, k, v = (x.astype(np.float32) for x in qkv(rng, (1, 1, 30, 8)))
    out, cache = local.forward(q, k, v, block=7, causal=True)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in local.backward(np.ones_like(out), cache).values())


def test_validation():
    q = np.zeros((1, 6, 2))
    with pytest.raises(ValueError, match="look_back"):
        local.forward(q, q, q, block=2, look_back=-1)
    with pytest.raises(ValueError, match="look_ahead"):
        local.forward(q, q, q, block=2, look_ahead=1, causal=True)
    with pytest.raises(ValueError, match="block"):
        local.forward(q, q, q, block=0)
    with pytest.raises(ValueError, match="k must have the same length"):
        local.forward(q, np.zeros((1, 7, 2)), np.zeros((1, 7, 2)), block=2)


def test_registry_entry_and_figures(tmp_path):
    spec = effattn.get("local")
    assert spec.notebook == "01_fixed_patterns" and spec.classes == ("FP",) and spec.exact and spec.causal
    paths = FIGURES["local"](str(tmp_path), np.random.default_rng(0))
    assert paths and all(p.endswith(".png") and "local_" in p for p in paths)
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("name,cfg", [("local", {}), ("image_local_1d", {}), ("image_local_2d", {}),
                                      ("memory_compressed", {"compression": 4})])
def test_fixed_pattern_kernels_inside_multi_head_attention(name, cfg):
    """setup() at max_len gives the parameters; shorter sequences re-run setup for their config only."""
    from effattn.models.attention import MultiHeadAttention

    rng = np.random.default_rng(0)
    mha = MultiHeadAttention(16, 2, np.random.default_rng(1), attention=name, attn_config=cfg, causal=True, max_len=40)
    for n in (40, 13):
        x = rng.standard_normal((2, n, 16))
        y = mha.forward(x)
        assert y.shape == (2, n, 16) and np.isfinite(y).all()
        dx = mha.backward(np.ones_like(y))[0]                                  # (dx, d kv-source)
        assert dx.shape == x.shape and np.isfinite(dx).all()
