"""Modules (Linear, LayerNorm, FeedForward, Embedding, MultiHeadAttention) against finite differences
and against the functional forms they wrap; kernel plumbing with a toy kernel registered for the test."""
import ast
import pathlib

import numpy as np
import pytest

import effattn
from effattn import registry
from effattn.validate import check_causal, check_qkv
from effattn.gradcheck import numerical_gradient, rel_error
from effattn.models.attention import MultiHeadAttention
from effattn.nn.modules import Embedding, FeedForward, LayerNorm, Linear

TOL = 1e-6


def module_gradcheck(module, run, out_shape, rng, max_entries=None):
    """Relative errors of every parameter's gradient (and of the inputs returned by ``run``)
    for L = sum(run() * dout): analytic (module.backward) vs central differences."""
    dout = rng.standard_normal(out_shape)
    module.zero_grad()
    run()
    module.backward(dout)
    errors = {}
    for name, p in module.parameters():
        analytic = dict(module.gradients())[name].copy()
        num = numerical_gradient(lambda: run(), p, dout)
        errors[name] = grad_error(analytic, num)
    return errors


def grad_error(analytic, num):
    """rel_error, or the absolute error where the true gradient is ~0 (the key bias:
    softmax ignores a score shift shared by all keys, so d b_k = 0 up to rounding)."""
    scale = max(np.abs(analytic).max(), np.abs(num).max())
    return rel_error(analytic, num) if scale > 1e-7 else float(np.abs(analytic - num).max())


def test_linear_layernorm_feedforward_gradients():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5))
    for mod in (Linear(5, 4, rng), LayerNorm(5), FeedForward(5, 7, rng)):
        if isinstance(mod, LayerNorm):
            mod.params["gamma"][...] = rng.standard_normal(5)
            mod.params["beta"][...] = rng.standard_normal(5)
        out = mod.forward(x)
        errs = module_gradcheck(mod, lambda: mod.forward(x), out.shape, rng)
        assert max(errs.values()) < TOL, (type(mod).__name__, errs)
        dout = rng.standard_normal(out.shape)
        mod.forward(x)
        dx = mod.backward(dout)
        num = numerical_gradient(lambda: mod.forward(x), x, dout)
        assert rel_error(dx, num) < TOL


def test_embedding_repeated_ids_accumulate():
    rng = np.random.default_rng(1)
    emb = Embedding(4, 3, rng)
    ids = np.array([[0, 1, 1], [1, 3, 0]])
    out = emb.forward(ids)
    assert np.array_equal(out, emb.params["table"][ids])
    dout = rng.standard_normal(out.shape)
    emb.backward(dout)
    want = np.zeros((4, 3))
    for (b, n), i in np.ndenumerate(ids):           # loop oracle: repeats add up
        want[i] += dout[b, n]
    assert np.allclose(emb.grads["table"], want)
    with pytest.raises(ValueError, match="ids"):
        emb.forward(np.array([[4]]))


def test_parameters_names_zero_grad_and_accumulation():
    rng = np.random.default_rng(3)
    ff = FeedForward(4, 6, rng)
    assert [n for n, _ in ff.parameters()] == ["fc1.W", "fc1.b", "fc2.W", "fc2.b"]
    x = rng.standard_normal((2, 4))
    dout = rng.standard_normal((2, 4))
    ff.forward(x)
    ff.backward(dout)
    once = {k: g.copy() for k, g in ff.gradients()}
    ff.forward(x)
    ff.backward(dout)
    for k, g in ff.gradients():
        assert np.allclose(g, 2 * once[k])          # backward accumulates
    ff.zero_grad()
    assert all(not g.any() for _, g in ff.gradients())


def test_load_parameters_refuses_mismatch_and_changes_nothing():
    rng = np.random.default_rng(4)
    ff = FeedForward(4, 6, rng)
    before = {k: p.copy() for k, p in ff.parameters()}
    bad = {k: np.zeros_like(p) for k, p in ff.parameters()}
    bad["fc2.b"] = np.zeros(5)
    with pytest.raises(ValueError, match="wrong shapes"):
        ff.load_parameters(bad)
    del bad["fc2.b"]
    with pytest.raises(ValueError, match="missing"):
        ff.load_parameters(bad)
    for k, p in ff.parameters():
        assert np.array_equal(p, before[k])
    good = {k: np.full(p.shape, 0.5) for k, p in ff.parameters()}
    ff.load_parameters(good)
    assert all((p == 0.5).all() for _, p in ff.parameters())


@pytest.mark.parametrize("cross", [False, True])
def test_mha_full_gradients_with_key_mask(cross):
    rng = np.random.default_rng(5)
    mha = MultiHeadAttention(8, 2, rng, attention="full", max_len=8)
    x = rng.standard_normal((2, 5, 8))
    kv = rng.standard_normal((2, 6, 8)) if cross else None
    m = 6 if cross else 5
    km = np.ones((2, m), bool)
    km[0, -2:] = False
    run = lambda: mha.forward(x, kv=kv, key_mask=km)  # noqa: E731
    out = run()
    errs = module_gradcheck(mha, run, out.shape, rng)
    assert max(errs.values()) < TOL, errs
    dout = rng.standard_normal(out.shape)
    run()
    dx, dkv = mha.backward(dout)
    assert rel_error(dx, numerical_gradient(run, x, dout)) < TOL
    if cross:
        assert rel_error(dkv, numerical_gradient(run, kv, dout)) < TOL
    else:
        assert dkv is None


def test_mha_equals_projected_full_attention_and_weights():
    """Oracle: per-head loop of softmax(q k^T / sqrt(d)) v between the projections."""
    rng = np.random.default_rng(6)
    mha = MultiHeadAttention(6, 3, rng, attention="full", max_len=8, causal=True)
    x = rng.standard_normal((2, 4, 6))
    out = mha.forward(x)
    q = x @ mha.q.params["W"] + mha.q.params["b"]
    k = x @ mha.k.params["W"] + mha.k.params["b"]
    v = x @ mha.v.params["W"] + mha.v.params["b"]
    heads = []
    W = mha.attention_weights()
    for h in range(3):
        sl = slice(2 * h, 2 * h + 2)
        s = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / np.sqrt(2)
        s = np.where(np.tril(np.ones((4, 4), bool)), s, -np.inf)
        P = np.exp(s - s.max(-1, keepdims=True))
        P /= P.sum(-1, keepdims=True)
        assert np.allclose(W[:, h], P)
        heads.append(P @ v[..., sl])
    want = np.concatenate(heads, -1) @ mha.o.params["W"] + mha.o.params["b"]
    assert np.allclose(out, want)


# --------------------------------------------------------------------------- toy kernel plumbing
def _toy_forward(q, k, v, *, causal=False, key_mask=None, g=None, n_cfg=None, tag=None):
    """out = g[h] * full(q, k, v): a learnable per-head gate g (H, 1, 1); n_cfg must equal N."""
    check_qkv(q, k, v, key_mask=key_mask)
    if n_cfg != q.shape[-2]:
        raise ValueError(f"config made for n={n_cfg}, called with N={q.shape[-2]}")
    o, c = effattn.get("full").forward(q, k, v, causal=causal, key_mask=key_mask)
    return g * o, (c, o, g)


def _toy_backward(dout, cache):
    c, o, g = cache
    gr = effattn.get("full").backward(dout * g, c)
    return {**gr, "g": (dout * o).sum(axis=(0, 2, 3)).reshape(g.shape)}


def _toy_setup(rng, *, n, d, heads, causal=False, dtype="float64", scale=1.0):
    return ({"g": effattn.backend.asarray(1.0 + scale * rng.standard_normal((heads, 1, 1)), dtype=dtype)},
            {"n_cfg": n, "tag": float(rng.standard_normal())})


def _noncausal_forward(q, k, v, *, causal=False, key_mask=None):
    check_causal(causal, False, "toy_global pools over the whole sequence, so it cannot decode")
    return effattn.get("full").forward(q, k, v, key_mask=key_mask)


@pytest.fixture
def toy(monkeypatch):
    registry._discover()
    base = dict(title="t", citation="t", url="u", classes=("TR",), complexity="O(N^2)", exact=False,
                notebook="00_background")
    monkeypatch.setitem(registry._REGISTRY, "toy_gate", registry.Mechanism(
        name="toy_gate", causal=True, kind="kernel", forward=_toy_forward, backward=_toy_backward,
        setup=_toy_setup, weights=lambda c: c[0].attend.p, **base))
    monkeypatch.setitem(registry._REGISTRY, "toy_global", registry.Mechanism(
        name="toy_global", causal=False, kind="kernel", forward=_noncausal_forward,
        backward=lambda d, c: effattn.get("full").backward(d, c), setup=lambda rng, **kw: ({}, {}), **base))
    monkeypatch.setitem(registry._REGISTRY, "toy_layer", registry.Mechanism(
        name="toy_layer", causal=False, kind="layer", forward=_toy_forward, backward=_toy_backward,
        make_example=lambda *a, **k: None, **base))
    return "toy_gate"


def test_kernel_params_are_trained_and_config_follows_n(toy):
    rng = np.random.default_rng(7)
    mha = MultiHeadAttention(8, 2, rng, attention="toy_gate", max_len=10, attn_config={"scale": 0.5})
    twin = MultiHeadAttention(8, 2, np.random.default_rng(7), attention="toy_gate", max_len=10,
                              attn_config={"scale": 0.5})
    assert [n for n, _ in mha.parameters()][:1] == ["g"] and mha.params["g"].shape == (2, 1, 1)
    # setup(n=6) re-runs from the generator state setup(n=max_len) saw: the same draws
    # (g's shape does not depend on n, so the tag drawn after it is the same), cached per n
    cfg6 = mha.config_for(6)
    assert cfg6["n_cfg"] == 6 and mha.config_for(10)["n_cfg"] == 10
    assert cfg6["tag"] == mha.config_for(10)["tag"] == twin.config_for(6)["tag"]
    assert mha.config_for(6) == cfg6
    x = rng.standard_normal((2, 6, 8))
    out = mha.forward(x)
    errs = module_gradcheck(mha, lambda: mha.forward(x), out.shape, rng)
    assert max(errs.values()) < TOL, errs
    assert np.abs(mha.grads["g"]).sum() > 0


def test_kernel_option_errors(toy):
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="does not accept"):
        MultiHeadAttention(8, 2, rng, attention="toy_gate", attn_config={"nonsense": 3})


def test_names_and_kinds_are_checked(toy):
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="unknown attention 'nope'.*full"):
        MultiHeadAttention(8, 2, rng, attention="nope")
    with pytest.raises(ValueError, match="toy_layer.*layer.*kernels:.*full"):
        MultiHeadAttention(8, 2, rng, attention="toy_layer")
    with pytest.raises(ValueError, match="cannot decode.*pools over the whole sequence"):
        MultiHeadAttention(8, 2, rng, attention="toy_global", causal=True)
    MultiHeadAttention(8, 2, rng, attention="toy_global", causal=False)
    with pytest.raises(ValueError, match="divide"):
        MultiHeadAttention(8, 3, rng)
    mha = MultiHeadAttention(8, 2, rng, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        mha.forward(rng.standard_normal((1, 5, 8)))


def test_compute_modules_do_not_import_numpy():
    root = pathlib.Path(effattn.__file__).parent
    files = [root / "nn" / "modules.py", root / "nn" / "optim.py", *(root / "models").glob("*.py")]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("numpy", "cupy") for a in node.names), f
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in ("numpy", "cupy"), f


@pytest.mark.parametrize("name", effattn.names("kernel"))
def test_mha_gradients_with_every_kernel(name):
    """Each registered kernel inside MultiHeadAttention at n = 12 < max_len = 16 (config re-made for n,
    length-dependent params sliced by the kernel): a few entries of every parameter, including the
    kernel's own, against central differences; key_mask where the kernel is bidirectional."""
    spec = effattn.get(name)
    if spec.setup is None:
        pytest.skip(f"{name} has no setup()")
    rng = np.random.default_rng(0)
    mha = MultiHeadAttention(8, 2, rng, attention=name, max_len=16, causal=spec.causal)
    x = rng.standard_normal((2, 12, 8))
    km = None
    if not spec.causal:
        km = np.ones((2, 12), bool)
        km[0, 9:] = False
    run = lambda: mha.forward(x, key_mask=km)  # noqa: E731
    dout = rng.standard_normal(run().shape)
    mha.zero_grad()
    run()
    mha.backward(dout)
    grads = dict(mha.gradients())
    for pname, p in mha.parameters():
        idx = rng.choice(p.size, min(p.size, 5), replace=False)
        flat, num = p.reshape(-1), []
        for i in idx:
            old = flat[i]
            flat[i] = old + 1e-5
            up = float((run() * dout).sum())
            flat[i] = old - 1e-5
            down = float((run() * dout).sum())
            flat[i] = old
            num.append((up - down) / 2e-5)
        err = grad_error(grads[pname].reshape(-1)[idx], np.array(num))
        assert err < 1e-6, f"{name} {pname}: {err}"
