"""Switch / mixture of experts (effattn.layers.switch): the per-token loop, the paper's dropping
order, padding, the future leak of capacity dropping, and the auxiliary losses' gradients."""
import numpy as np
import pytest

from effattn.gradcheck import numerical_gradient, rel_error
from effattn.layers import switch


def case(seed, B=2, N=9, D=6, F=8, E=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N, D))
    return rng, x, switch.init_params(rng, D, F, E)


@pytest.mark.parametrize("k", [1, 2])
def test_forward_equals_the_per_token_loop_with_dropping(k):
    rng, x, p = case(0)
    km = rng.random(x.shape[:2]) > 0.3
    for cf in (0.5, 1.0, None):
        y, c = switch.forward(x, k=k, capacity_factor=cf, key_mask=km, **p)
        np.testing.assert_allclose(y, switch.loop(x, k=k, capacity_factor=cf, key_mask=km, **p), rtol=0, atol=1e-12)
        assert np.all(y[~km] == 0)
    assert switch.aux_losses(switch.forward(x, k=k, capacity_factor=0.5, **p)[1])["dropped"] > 0


def test_padding_takes_no_capacity():
    rng, x, p = case(1, B=1)
    pad = np.concatenate([x, 50 * rng.standard_normal((1, 5, 6))], axis=1)
    km = np.arange(14)[None] < 9
    a, ca = switch.forward(x, capacity_factor=1.0, **p)
    b, cb = switch.forward(pad, capacity_factor=1.0, key_mask=km, **p)
    np.testing.assert_allclose(b[:, :9], a, rtol=0, atol=1e-12)
    assert abs(switch.aux_losses(ca)["balance"] - switch.aux_losses(cb)["balance"]) < 1e-12


@pytest.mark.parametrize("k,B", [(1, 2), (2, 1)])
def test_capacity_dropping_leaks_the_future(k, B):
    """Changing only later tokens changes an earlier token's output when capacity drops tokens."""
    rng, x, p = case(2, B=B, N=16)
    leaked = False
    for t in range(4, 16):
        x2 = x.copy()
        x2[:, t:] = 3 * rng.standard_normal(x2[:, t:].shape)
        a, _ = switch.forward(x, k=k, capacity_factor=0.5, **p)
        b, _ = switch.forward(x2, k=k, capacity_factor=0.5, **p)
        leaked |= np.abs(a[:, :t] - b[:, :t]).max() > 1e-6          # a real change, not rounding
    assert leaked
    with pytest.raises(ValueError, match="capacity_factor must be None when causal"):
        switch.forward(x, causal=True, capacity_factor=1.0, **p)


def test_one_sequence_top1_dropping_is_causal():
    rng, x, p = case(3, B=1, N=16)
    a, _ = switch.forward(x, k=1, capacity_factor=0.5, **p)
    for t in (3, 8, 12):
        x2 = x.copy()
        x2[:, t:] = 3 * rng.standard_normal(x2[:, t:].shape)
        b, _ = switch.forward(x2, k=1, capacity_factor=0.5, **p)
        np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-12)   # expert GEMMs: last-bit rounding only


@pytest.mark.parametrize("k", [1, 2])
def test_backward_includes_the_auxiliary_losses(k):
    """dWr matches finite differences of sum(dout*y) + aux_loss; without the aux term it does not."""
    rng, x, p = case(4)
    jit = switch.draw_jitter(rng, x.shape, eps=0.1)
    cfg = dict(k=k, capacity_factor=1.0, aux_weight=1.0, z_weight=0.1, jitter=jit)
    y, c = switch.forward(x, **cfg, **p)
    dout = rng.standard_normal(y.shape)
    g = switch.backward(dout, c)

    def L(with_aux):
        y, c = switch.forward(x, **cfg, **p)
        return np.array((y * dout).sum() + (switch.aux_loss(c) if with_aux else 0.0))

    for name in ("Wr", "x"):
        arr = x if name == "x" else p[name]
        num = numerical_gradient(lambda: L(True), arr, np.array(1.0))
        assert rel_error(g[name], num) < 1e-7
        wrong = numerical_gradient(lambda: L(False), arr, np.array(1.0))
        assert rel_error(g[name], wrong) > 1e-4
