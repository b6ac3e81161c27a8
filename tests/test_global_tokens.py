"""effattn.nn.global_tokens: index sets, the global keys of every group and their adjoint, the
dense global rows (shared by Longformer, ETC and BigBird)."""
import numpy as np
import pytest

from effattn.nn.global_tokens import global_keys, global_keys_backward, global_rows_forward, index_set, membership


def test_index_set_sorts_deduplicates_and_names_the_argument():
    assert index_set("global_positions", [5, 0, 5, 3], 6, expected="positions", bound="N") == (0, 3, 5)
    assert index_set("global_positions", np.array([2, 1]), 3, expected="positions", bound="N") == (1, 2)
    assert index_set("global_positions", (), 3, expected="positions", bound="N") == ()
    with pytest.raises(ValueError, match=r"global_blocks must lie in \[0, n_blocks=4\), got \[4\]"):
        index_set("global_blocks", (0, 4), 4, expected="block indices", bound="n_blocks")
    with pytest.raises(ValueError, match="global_blocks must be block indices"):
        index_set("global_blocks", 3, 4, expected="block indices", bound="n_blocks")


def test_membership():
    np.testing.assert_array_equal(membership((0, 3), 5, np), [True, False, False, True, False])
    assert not membership((), 3, np).any()


def test_global_keys_backward_is_the_adjoint():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))                        # (..., g, f)
    y = rng.standard_normal((2, 3, 7, 4, 5))                     # (..., G, g, f)
    gk = global_keys(x, 7)
    assert gk.shape == y.shape
    np.testing.assert_array_equal(gk[..., 6, :, :], x)
    assert abs((gk * y).sum() - (x * global_keys_backward(y)).sum()) < 1e-10


def test_global_rows_are_dense_masked_softmax_attention():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 9, 5))
    allowed = rng.random((3, 9)) > 0.3
    km = rng.random((2, 9)) > 0.3
    km[:, 0] = True
    allowed[:, 0] = True
    out, _, _ = global_rows_forward(q, k, v, allowed, key_mask=km, scale=0.5)
    s = np.where(allowed & km[:, None, :], 0.5 * q @ k.swapaxes(-1, -2), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out, (p / p.sum(-1, keepdims=True)) @ v, atol=1e-12)
