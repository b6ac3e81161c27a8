"""Optimizers against their update rules written out with Python floats, clipping, schedule, state."""
import math

import numpy as np
import pytest

from effattn.nn.optim import SGD, Adam, WarmupDecay, clip_grad_norm


def _grads(rng, shapes, t):
    return {k: rng.standard_normal(s) * (1 + t) for k, s in shapes.items()}


def test_sgd_momentum_matches_formula():
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal(3)}
    start = p["w"].copy()
    opt = SGD(p, lr=0.1, momentum=0.9)
    gs = [rng.standard_normal(3) for _ in range(4)]
    v = np.zeros(3)
    want = start.copy()
    for g in gs:
        opt.step({"w": g})
        v = 0.9 * v + g
        want = want - 0.1 * v
    assert np.allclose(p["w"], want)


def test_adam_matches_scalar_formula():
    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal((2, 2)), "b": rng.standard_normal(2)}
    init = {k: v.copy() for k, v in p.items()}
    opt = Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    gs = [{k: rng.standard_normal(v.shape) for k, v in p.items()} for _ in range(5)]
    for g in gs:
        opt.step(g)
    for name in p:                                   # entry by entry with Python floats
        for idx in np.ndindex(p[name].shape):
            x, m, v = float(init[name][idx]), 0.0, 0.0
            for t, g in enumerate(gs, start=1):
                gi = float(g[name][idx])
                m = 0.8 * m + 0.2 * gi
                v = 0.95 * v + 0.05 * gi * gi
                x -= 0.01 * (m / (1 - 0.8 ** t)) / (math.sqrt(v / (1 - 0.95 ** t)) + 1e-6)
            assert abs(p[name][idx] - x) < 1e-12


def test_adam_minimises_a_quadratic():
    p = {"x": np.array([3.0, -2.0])}
    opt = Adam(p, lr=0.1)
    for _ in range(300):
        opt.step({"x": 2 * p["x"]})
    assert np.abs(p["x"]).max() < 1e-2


def test_clip_grad_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt(sum(float((x * x).sum()) for x in g.values())) == pytest.approx(1.0)
    assert np.allclose(g["a"], [0.6, 0.0]) and np.allclose(g["b"], [[0.8]])
    g2 = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(g2, 1.0) == pytest.approx(0.5) and np.allclose(g2["a"], [0.3, 0.4])
    with pytest.raises(ValueError):
        clip_grad_norm(g2, 0.0)


def test_warmup_decay_schedules():
    s = WarmupDecay(1e-3, warmup=10)
    assert s(1) == pytest.approx(1e-4) and s(10) == pytest.approx(1e-3)
    assert s(40) == pytest.approx(1e-3 * math.sqrt(10 / 40))
    c = WarmupDecay(1.0, warmup=10, total=110, kind="cosine", min_lr=0.1)
    assert c(10) == pytest.approx(1.0) and c(60) == pytest.approx(0.55) and c(110) == pytest.approx(0.1)
    lin = WarmupDecay(1.0, warmup=0, total=100, kind="linear")
    assert lin(50) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        WarmupDecay(1.0, kind="step")
    with pytest.raises(ValueError):
        WarmupDecay(1.0, kind="cosine")               # needs a horizon
    with pytest.raises(ValueError):
        s(0)


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_state_dict_resume_is_exact(cls):
    rng = np.random.default_rng(2)
    shapes = {"w": (3, 2), "b": (2,)}
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [_grads(rng, shapes, t) for t in range(6)]
    kw = {"momentum": 0.9} if cls is SGD else {}
    a = {k: v.copy() for k, v in init.items()}
    opt_a = cls(a, lr=0.05, **kw)
    for g in grads:
        opt_a.step(g)
    b = {k: v.copy() for k, v in init.items()}
    opt_b = cls(b, lr=0.05, **kw)
    for g in grads[:3]:
        opt_b.step(g)
    state = {k: np.array(v) for k, v in opt_b.state_dict().items()}
    c = {k: v.copy() for k, v in b.items()}
    opt_c = cls(c, lr=0.05, **kw)
    opt_c.load_state_dict(state)
    for g in grads[3:]:
        opt_c.step(g)
    for k in a:
        assert np.array_equal(a[k], c[k])


def test_load_state_dict_refuses_mismatch_and_changes_nothing():
    p = {"w": np.ones(3)}
    opt = Adam(p)
    opt.step({"w": np.ones(3)})
    before = {k: np.array(v) for k, v in opt.state_dict().items()}
    bad = dict(before)
    bad["m/w"] = np.zeros(4)
    with pytest.raises(ValueError, match="wrong shapes"):
        opt.load_state_dict(bad)
    bad = dict(before)
    del bad["v/w"]
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        Adam({"w": np.ones(2)}, lr=-1)
    with pytest.raises(ValueError, match="empty"):
        SGD({}, lr=0.1)
    opt = SGD({"w": np.ones(2)}, lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.ones(3)})


@pytest.mark.parametrize("cls", [SGD, Adam])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_is_refused_and_changes_nothing(cls, bad):
    rng = np.random.default_rng(3)
    p = {"w": rng.standard_normal(3), "b": rng.standard_normal(2)}
    opt = cls(p, lr=0.1, **({"momentum": 0.9} if cls is SGD else {}))
    opt.step({"w": rng.standard_normal(3), "b": rng.standard_normal(2)})
    params = {k: v.copy() for k, v in p.items()}
    state = {k: np.array(v) for k, v in opt.state_dict().items()}
    g = {"w": rng.standard_normal(3), "b": np.array([1.0, bad])}
    with pytest.raises(ValueError, match="gradient of 'b' is not finite"):
        opt.step(g)
    assert all(np.array_equal(params[k], p[k]) for k in p)
    after = opt.state_dict()
    assert opt.t == 1 and all(np.array_equal(state[k], after[k]) for k in state)


def test_clip_refuses_a_non_finite_norm_and_scales_nothing():
    g = {"a": np.array([3.0, 4.0]), "b": np.array([np.inf])}
    with pytest.raises(ValueError, match="gradient of 'b' is not finite"):
        clip_grad_norm(g, 1.0)
    assert np.array_equal(g["a"], [3.0, 4.0])
    # finite float32 gradients whose squares overflow float32 still have a finite norm
    big = {"a": np.full(4, 1e30, dtype=np.float32)}
    assert clip_grad_norm(big, 1.0) == pytest.approx(2e30, rel=1e-6)
    assert np.isfinite(big["a"]).all() and np.allclose(big["a"], 0.5)


def test_state_dict_step_must_be_one_integer():
    opt = Adam({"w": np.ones(2)})
    state = {k: np.array(v) for k, v in opt.state_dict().items()}
    for t in (np.zeros(3), np.array(1.5), np.array(-1)):
        with pytest.raises(ValueError, match="step t must be one integer"):
            opt.load_state_dict({**state, "t": t})
