"""Image Transformer 1-D local attention: the fast path against a per-query loop with the
paper's rule written pair by pair, the pattern helper, the tensor2tensor convention,
validation and figures."""
import numpy as np
import pytest

import effattn
from effattn.attention import image_local_1d as il1
from effattn.attention import local
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn.loops import masked_loop


def qkv(rng, lead, n, d=4, dv=3):
    return rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, dv))


def rule_1d(lq, lm, causal):
    def allowed(i, j):
        g = i // lq
        return g * lq - lm <= j < (g + 1) * lq and (not causal or j <= i)
    return allowed


@pytest.mark.parametrize("n,lq,lm,causal", [(20, 4, 6, True), (20, 4, 6, False), (13, 5, 0, True),
                                            (17, 3, 10, False), (6, 8, 3, True)])
def test_1d_matches_per_query_loop(n, lq, lm, causal):
    rng = np.random.default_rng(n + lq + lm)
    q, k, v = qkv(rng, (2, 2), n)
    km = rng.random((2, 1, n)) > 0.25
    out, _ = il1.forward(q, k, v, block_length=lq, memory_length=lm, causal=causal, key_mask=km)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref = masked_loop(q[b, h], k[b, h], v[b, h], allowed=rule_1d(lq, lm, causal), key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)
            ref = il1.loop(q[b, h], k[b, h], v[b, h], block_length=lq, memory_length=lm, causal=causal,
                           key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)


def test_pattern_helper_is_the_rule():
    n = 22
    for causal in (False, True):
        a = rule_1d(5, 7, causal)
        ref = np.array([[a(i, j) for j in range(n)] for i in range(n)])
        assert np.array_equal(il1.build_pattern(n, block_length=5, memory_length=7, causal=causal, xp=np), ref)


def test_tensor2tensor_masked_local_1d_is_local_with_one_block_of_look_back():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, (1, 2), 29)
    a, _ = il1.forward(q, k, v, block_length=6, memory_length=6, causal=True)
    b, _ = local.forward(q, k, v, block=6, look_back=1, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_gradients_of_a_non_default_configuration():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (1, 2), 14, d=3, dv=2)
    km = rng.random((1, 1, 14)) > 0.3
    cfg = {"block_length": 4, "memory_length": 5, "key_mask": km}
    errors = check_gradients(il1.forward, il1.backward, {"q": q, "k": k, "v": v}, cfg, rng=rng)
    assert max(errors.values()) < 1e-7, (cfg, errors)


def test_validation():
    q = np.zeros((1, 10, 2))
    with pytest.raises(ValueError, match="memory_length"):
        il1.forward(q, q, q, block_length=2, memory_length=-1)


def test_registry_entry_and_figures(tmp_path):
    spec = effattn.get("image_local_1d")
    assert spec.notebook == "01_fixed_patterns" and spec.classes == ("FP",) and spec.complexity == "O(N·m)"
    paths = FIGURES["image_local_1d"](str(tmp_path), np.random.default_rng(0))
    assert paths and all("image_local_1d_" in p for p in paths)
