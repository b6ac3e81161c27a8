"""The contract every registered mechanism must keep (DESIGN.md, "The registry").

Parametrized over ``effattn.names()``: registering a mechanism is all it takes
to be tested here. Oracles are independent of the code under test: central
finite differences, and dense attention (``full``) masked by the mechanism's
own pattern, built from the paper's rule.
"""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effattn
from effattn.backend import asarray, get_namespace, to_numpy
from effattn.gradcheck import check_gradients

NAMES = effattn.names()
KERNELS = effattn.names("kernel")
CAUSAL = [n for n in NAMES if effattn.get(n).causal]
EXACT = [n for n in KERNELS if effattn.get(n).exact]
HYP = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def run(spec, case, **extra):
    return spec.forward(**case.inputs, **{**case.config, **extra})


def np64(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def key_mask_shape(case):
    """(B, 1, ..., M): one mask per batch element, broadcast over the other leading axes."""
    x = case.inputs[case.key_inputs[0]]
    return (x.shape[0],) + (1,) * (x.ndim - 3) + (case.m,)


def random_key_mask(rng, case, frac=0.3):
    km = rng.random(key_mask_shape(case)) > frac
    km[..., 0] = True  # keep at least one real key per row
    return asarray(km)


# --------------------------------------------------------------------------- gradients
def contract_gradients(spec, inputs, config, rng):
    """check_gradients on the scalar ``backward`` differentiates: sum(dout * out), plus, for a layer
    with auxiliary losses (registry field ``aux_loss``), the weighted auxiliary loss aux_loss(cache)
    (finite differences of the output with the scalar appended, its upstream gradient 1)."""
    if spec.aux_loss is None:
        return check_gradients(spec.forward, spec.backward, inputs, config, rng=rng)

    def forward(**kw):
        out, cache = spec.forward(**kw)
        xp = get_namespace(out)
        aux = xp.asarray(spec.aux_loss(cache), dtype=out.dtype).reshape(1)
        return xp.concatenate([out.reshape(-1), aux]), cache

    def backward(d, cache):
        return spec.backward(d[:-1].reshape(cache.shape), cache)

    out, _ = spec.forward(**inputs, **config)
    dout = asarray(np.concatenate([rng.standard_normal(out.size), [1.0]]), dtype=out.dtype)
    if spec.aux_trains is None:
        return check_gradients(forward, backward, inputs, config, dout=dout)
    # a stop-gradient auxiliary loss (the Compressive Transformer's reconstruction loss trains only the
    # compression): the inputs it trains are checked on out and the loss together, the others on out alone
    trains = [k for k in inputs if k in spec.aux_trains]
    errors = check_gradients(forward, backward, inputs, config, dout=dout, names=trains)
    others = [k for k in inputs if k not in spec.aux_trains]
    errors.update(check_gradients(spec.forward, spec.backward, inputs, config, dout=dout[:-1].reshape(out.shape),
                                  names=others))
    assert spec.aux_loss(spec.forward(**inputs, **config)[1]) > 0, f"{spec.name}: the example has no auxiliary loss"
    return errors


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
@HYP
@given(n=st.integers(5, 23), seed=st.integers(0, 2**16))
def test_gradients_match_finite_differences(name, causal, n, seed):
    spec = effattn.get(name)
    if causal and not spec.causal:
        pytest.skip("not a causal mechanism")
    rng = np.random.default_rng(seed)
    case = spec.example(rng, batch=1, heads=2, n=n, d=3, causal=causal)
    errors = contract_gradients(spec, case.inputs, case.config, rng)
    assert set(errors) == set(case.inputs)
    bad = {k: e for k, e in errors.items() if not e < 1e-6}
    assert not bad, f"{name}: gradient relative errors {bad}"


def test_gradients_with_key_mask():
    for name in NAMES:
        spec = effattn.get(name)
        rng = np.random.default_rng(3)
        case = spec.example(rng, batch=2, heads=1, n=9, d=3)
        km = random_key_mask(rng, case)
        errors = contract_gradients(spec, case.inputs, {**case.config, "key_mask": km}, rng)
        bad = {k: e for k, e in errors.items() if not e < 1e-6}
        assert not bad, f"{name} with key_mask: gradient relative errors {bad}"


# --------------------------------------------------------------------------- exactness
def assert_exact(spec, case, extra):
    """The mechanism is softmax attention restricted to ``pattern(cache) & key_mask`` -- the
    pattern alone, never ``causal`` again, so a pattern that forgets causality or the key mask
    fails here: a causal call's pattern is lower triangular; the weights are nonzero exactly on
    it; and out equals dense attention masked by it (or, for mechanisms whose logits carry more
    than q . k, such as ETC's relative positions, the mechanism's own dense ``reference``)."""
    out, cache = run(spec, case, **extra)
    assert spec.pattern is not None, f"exact kernel {spec.name} needs pattern="
    pattern = np.asarray(to_numpy(spec.pattern(cache)), dtype=bool)
    assert pattern.shape[-2:] == (case.n, case.m), f"{spec.name}: pattern shape {pattern.shape}"
    if case.config.get("causal"):
        assert not np.triu(pattern, 1).any(), f"{spec.name}: the pattern of a causal call sees the future"
    allowed = pattern
    if "key_mask" in extra:
        allowed = pattern & np.asarray(to_numpy(extra["key_mask"]))[..., None, :]
    support = np64(spec.weights(cache)) != 0
    assert np.array_equal(support, np.broadcast_to(allowed, support.shape)), \
        f"{spec.name}: the weights are nonzero off the pattern, or zero on it"
    if spec.reference is not None:
        ref = spec.reference(**case.inputs, **{**case.config, **extra})
    else:
        i = case.inputs
        ref, _ = effattn.get("full").forward(i["q"], i["k"], i["v"], mask=asarray(allowed))
    np.testing.assert_allclose(np64(out), np64(ref), rtol=0, atol=1e-10, err_msg=f"{spec.name}: out is not the oracle's")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", EXACT)
@HYP
@given(n=st.integers(5, 47), seed=st.integers(0, 2**16), masked=st.booleans())
def test_exact_equals_dense_masked_by_pattern(name, causal, n, seed, masked):
    spec = effattn.get(name)
    if causal and not spec.causal:
        pytest.skip("not a causal mechanism")
    rng = np.random.default_rng(seed)
    case = spec.example(rng, batch=2, heads=2, n=n, d=4, causal=causal)
    assert_exact(spec, case, {"key_mask": random_key_mask(rng, case)} if masked else {})


def _forgets_causality(pattern):
    return lambda cache: (lambda p: p | p.swapaxes(-1, -2))(pattern(cache))


def _sees_everything(pattern):
    return lambda cache: pattern(cache) | True


@pytest.mark.parametrize("broken", [_forgets_causality, _sees_everything])
@pytest.mark.parametrize("name", EXACT)
def test_a_wrong_pattern_fails_the_exactness_check(name, broken):
    """The check above can fail: the same mechanism with a pattern that forgets causality (on a
    causal call), or one that allows every key (on a causal call, or on a sparse non-causal
    mechanism), is caught, with and without a key mask."""
    spec = effattn.get(name)
    if broken is _forgets_causality and not spec.causal:
        pytest.skip("not a causal mechanism")
    wrong = dataclasses.replace(spec, pattern=broken(spec.pattern))
    rng = np.random.default_rng(12)
    case = spec.example(rng, batch=1, heads=2, n=19, d=4, causal=spec.causal)
    assert_exact(spec, case, {})                                                # the true pattern passes
    for extra in ({}, {"key_mask": random_key_mask(rng, case)}):
        with pytest.raises(AssertionError):
            assert_exact(wrong, case, extra)


@pytest.mark.parametrize("name", [n for n in NAMES if effattn.get(n).reference is not None and not effattn.get(n).exact])
def test_approximation_equals_its_own_dense_formula(name):
    """Mechanisms that are not masked softmax still have an O(N^2) formula (``reference``) to equal."""
    spec = effattn.get(name)
    for causal in ([False, True] if spec.causal else [False]):
        rng = np.random.default_rng(11)
        case = spec.example(rng, batch=2, heads=2, n=23, d=4, causal=causal)
        for extra in ({}, {"key_mask": random_key_mask(rng, case)}):
            out, _ = run(spec, case, **extra)
            ref = spec.reference(**case.inputs, **{**case.config, **extra})
            np.testing.assert_allclose(np64(out), np64(ref), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", KERNELS)
def test_out_equals_weights_times_v(name):
    spec = effattn.get(name)
    for causal in ([False, True] if spec.causal else [False]):
        case = spec.example(np.random.default_rng(1), batch=2, heads=2, n=13, d=4, causal=causal)
        out, cache = run(spec, case)
        W = spec.weights(cache)
        assert tuple(W.shape[-2:]) == (case.n, case.m)
        np.testing.assert_allclose(np64(out), np64(W @ case.inputs["v"]), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_outputs_ignore_the_future(name):
    spec = effattn.get(name)
    rng = np.random.default_rng(2)
    n = 29
    case = spec.example(rng, batch=2, heads=2, n=n, d=4, causal=True)
    out, _ = run(spec, case)
    for t in (1, n // 3, n - 1):
        changed = dict(case.inputs)
        for key in case.seq_inputs:
            x = np64(case.inputs[key]).copy()
            x[..., t:, :] = rng.standard_normal(x[..., t:, :].shape) * 3
            changed[key] = asarray(x, dtype=case.inputs[key].dtype)
        out2, _ = spec.forward(**changed, **case.config)
        a, b = np64(out), np64(out2)
        pos = np.arange(a.shape[-2]) if case.out_positions is None else np.asarray(case.out_positions)
        assert pos.shape == (a.shape[-2],), f"{name}: out_positions has {pos.shape} rows, the output {a.shape[-2]}"
        # 1e-12 of the output's scale, not bit equality: a layer that runs rows through a GEMM in groups
        # whose sizes depend on other tokens (switch's experts) rounds a row's last bit differently when
        # the group changes size (BLAS blocks the rows); a real leak moves outputs by O(1) here
        tol = 1e-12 * max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(a[..., pos < t, :], b[..., pos < t, :], rtol=0, atol=tol,
                                   err_msg=f"{name}: output before {t} changed")
        if (pos >= t).any():
            assert not np.array_equal(a[..., pos >= t, :], b[..., pos >= t, :])


# --------------------------------------------------------------------------- decoding
def decode(spec, case, key_mask, prompt):
    """Prefill the first ``prompt`` tokens, then step token by token: (out (..., N, dv), state sizes
    after each token)."""
    from effattn.nn.decode import state_size

    i = case.inputs
    q, k, v = i["q"], i["k"], i["v"]
    config = {key: a for key, a in {**case.inputs, **case.config}.items() if key not in ("q", "k", "v", "causal")}
    state = spec.init_state(lead=tuple(q.shape[:-2]), d=q.shape[-1], dv=v.shape[-1], dtype=str(q.dtype), **config)
    km = None if key_mask is None else get_namespace(q).broadcast_to(key_mask, q.shape[:-1])
    out, state = spec.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                              key_mask=None if km is None else km[..., :prompt])
    rows, sizes = [np64(out)], [state_size(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = spec.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                             key_mask_t=None if km is None else km[..., t])
        rows.append(np64(o)[..., None, :])
        sizes.append(state_size(state))
    return np.concatenate(rows, axis=-2), sizes


DECODERS = [n for n in CAUSAL if effattn.get(n).step is not None]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", DECODERS)
def test_stepping_equals_the_causal_forward(name, masked):
    """After a prefill of random length, token by token equals the causal parallel forward
    (float64, 1e-10), key masks included."""
    spec = effattn.get(name)
    for seed in range(3):
        rng = np.random.default_rng(30 + seed)
        n = 29
        case = spec.example(rng, batch=2, heads=2, n=n, d=4, causal=True)
        km = random_key_mask(rng, case) if masked else None
        want, _ = run(spec, case, **({} if km is None else {"key_mask": km}))
        got, _ = decode(spec, case, km, prompt=int(rng.integers(1, n)))
        np.testing.assert_allclose(got, np64(want), rtol=0, atol=1e-10, err_msg=f"{name} seed {seed}")


@pytest.mark.parametrize("name", [n for n in DECODERS if effattn.get(n).bounded_state])
def test_a_bounded_state_does_not_grow(name):
    """The numbers a bounded decoder state holds over the last half of a long sequence are no
    more than over the second quarter."""
    spec = effattn.get(name)
    n = 96
    case = spec.example(np.random.default_rng(33), batch=1, heads=2, n=n, d=4, causal=True)
    _, sizes = decode(spec, case, None, prompt=3)
    sizes = sizes[1:]                                                # after token 3, 4, ...
    assert max(sizes[n // 2:]) <= max(sizes[n // 4:n // 2]), f"{name}: state sizes grow: {sizes}"


def test_every_causal_kernel_decodes_or_says_why():
    for name in CAUSAL:
        spec = effattn.get(name)
        if spec.kind != "kernel":
            continue
        roles = (spec.init_state, spec.prefill, spec.step)
        if all(r is None for r in roles):
            import importlib
            mod = importlib.import_module(f"effattn.attention.{name}")
            assert isinstance(getattr(mod, "WHY_NO_STEP", None), str), f"{name} can decode: give it init_state/prefill/step"
        else:
            assert all(r is not None for r in roles), f"{name}: init_state, prefill and step go together"


# --------------------------------------------------------------------------- state across segments
RECURRENT = [n for n in NAMES if effattn.get(n).next_memory is not None]


def run_segments(spec, case, x, segment, key_mask=None, **config):
    """x (..., T, D) segment by segment, each segment given the memory the last one left
    (``next_memory``): the outputs concatenated, and the memories after each segment."""
    xp = get_namespace(x)
    base = {k: v for k, v in {**case.config, **config}.items() if k not in spec.state_keys}
    params = {k: v for k, v in case.inputs.items() if k != "x"}
    state, outs, states = {}, [], []
    for s0 in range(0, x.shape[-2], segment):
        km = None if key_mask is None else key_mask[..., s0:s0 + segment]
        out, cache = spec.forward(x=x[..., s0:s0 + segment, :], key_mask=km, **state, **params, **base)
        nxt = spec.next_memory(cache)
        assert len(nxt) == len(spec.state_keys), f"{spec.name}: next_memory gives {len(nxt)}, state_keys {spec.state_keys}"
        state = dict(zip(spec.state_keys, nxt))
        outs.append(out)
        states.append(state)
    return xp.concatenate(outs, axis=-2), states


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", RECURRENT)
def test_segment_by_segment_equals_the_one_pass_equivalent(name, causal, masked):
    """A long sequence processed segment by segment, each segment handed the state the last one
    left, equals the mechanism's documented one-pass equivalent (float64, 1e-10), for memories
    shorter than, as long as and longer than a segment, with key masks carried in the state."""
    spec = effattn.get(name)
    rng = np.random.default_rng(40)
    segment, n_seg = 6, 4
    case = spec.example(rng, batch=2, heads=2, n=segment, d=4, causal=causal)
    D = case.inputs["x"].shape[-1]
    x = asarray(rng.standard_normal((2, segment * n_seg, D)))
    km = None
    if masked:
        km = rng.random((2, segment * n_seg)) > 0.3
        km[:, 0] = True
        km = asarray(km)
    params = {k: v for k, v in case.inputs.items() if k != "x"}
    for mem_len in (0, 4, segment, 2 * segment + 1):
        config = {k: v for k, v in case.config.items() if k not in spec.state_keys}
        config["mem_len"] = mem_len
        got, _ = run_segments(spec, case, x, segment, key_mask=km, mem_len=mem_len)
        want = spec.one_pass(x, segment=segment, key_mask=km, **params, **config)
        np.testing.assert_allclose(np64(got), np64(want), rtol=0, atol=1e-10, err_msg=f"{name} mem_len {mem_len}")


@pytest.mark.parametrize("name", RECURRENT)
def test_the_state_carries_the_past_and_never_the_future(name):
    """Across segment boundaries: changing tokens from position t on leaves every output before t
    alone, causal or not (a segment never sees a later one); changing only the first segment moves
    the second's outputs when it keeps a memory, and does not when every memory length is 0."""
    spec = effattn.get(name)
    rng = np.random.default_rng(41)
    segment = 5
    for causal in (False, True):
        case = spec.example(rng, batch=2, heads=2, n=segment, d=4, causal=causal)
        x = np64(rng.standard_normal((2, 3 * segment, case.inputs["x"].shape[-1])))
        base, _ = run_segments(spec, case, asarray(x), segment)
        t = segment + 2 if causal else segment                           # mid-segment for causal, a boundary otherwise
        x2 = x.copy()
        x2[..., t:, :] += 3 * rng.standard_normal(x2[..., t:, :].shape)
        out2, _ = run_segments(spec, case, asarray(x2), segment)
        np.testing.assert_allclose(np64(out2)[..., :t, :], np64(base)[..., :t, :], rtol=0, atol=1e-12,
                                   err_msg=f"{name}: the future reached position < {t}")
        x3 = x.copy()
        x3[..., :segment, :] += 3 * rng.standard_normal(x3[..., :segment, :].shape)
        out3, _ = run_segments(spec, case, asarray(x3), segment)
        assert not np.allclose(np64(out3)[..., segment:2 * segment, :], np64(base)[..., segment:2 * segment, :]), \
            f"{name}: the memory did not carry the first segment into the second"
        none = {k: 0 for k in ("mem_len", "cmem_len") if k == "mem_len" or k in case.config}   # every memory off
        a, _ = run_segments(spec, case, asarray(x), segment, **none)
        b, _ = run_segments(spec, case, asarray(x3), segment, **none)
        np.testing.assert_allclose(np64(a)[..., segment:, :], np64(b)[..., segment:, :], rtol=0, atol=1e-12,
                                   err_msg=f"{name}: mem_len 0 still carried something")


@pytest.mark.parametrize("name", RECURRENT)
def test_the_state_gets_no_gradient_and_is_a_copy(name):
    """The memory is a constant of the step (the paper's stop-gradient): backward returns no
    gradient for it, and the memory handed on is not a view of the caller's arrays."""
    spec = effattn.get(name)
    rng = np.random.default_rng(42)
    case = spec.example(rng, batch=2, heads=2, n=7, d=4, causal=True)
    out, cache = run(spec, case)
    grads = spec.backward(asarray(rng.standard_normal(out.shape)), cache)
    assert not set(grads) & set(spec.state_keys), f"{name}: the state got a gradient"
    assert set(grads) == set(case.inputs), f"{name}: gradients {sorted(grads)} for inputs {sorted(case.inputs)}"
    state = [a for a in spec.next_memory(cache) if a is not None and a.dtype.kind == "f"]
    assert state, f"{name}: an example with a memory handed on no state"
    before = [np64(a).copy() for a in state]
    xp = get_namespace(case.inputs["x"])
    case.inputs["x"][...] = xp.nan                                        # the caller reuses its buffers
    for k, v in case.config.items():
        if k in spec.state_keys and v is not None and v.dtype.kind == "f":
            v[...] = xp.nan
    for a, b in zip(state, before):
        np.testing.assert_array_equal(np64(a), b)


# --------------------------------------------------------------------------- key mask
def perturb_masked(case, km, keys, rng):
    """The case's inputs with the rows of ``keys`` at masked positions replaced by large noise."""
    changed = dict(case.inputs)
    hidden = ~np.asarray(to_numpy(km))[..., :, None]                # (B, 1, M, 1)
    for key in keys:
        x = np64(case.inputs[key])
        changed[key] = asarray(np.where(hidden, rng.standard_normal(x.shape) * 5, x), dtype=case.inputs[key].dtype)
    return changed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_masked_keys_change_nothing(name, causal):
    spec = effattn.get(name)
    if causal and not spec.causal:
        pytest.skip("not a causal mechanism")
    rng = np.random.default_rng(4)
    case = spec.example(rng, batch=2, heads=2, n=21, d=4, causal=causal)
    km = random_key_mask(rng, case)
    out, _ = run(spec, case, key_mask=km)
    changed = perturb_masked(case, km, case.key_inputs, rng)
    out2, _ = spec.forward(**changed, **{**case.config, "key_mask": km})
    a, b = np64(out), np64(out2)
    if case.real_rows is not None:
        keep = np.broadcast_to(np.asarray(to_numpy(case.real_rows(km)))[..., :, None], a.shape)
        a, b = a[keep], b[keep]
    elif case.out_follows_keys:
        keep = np.broadcast_to(np.asarray(to_numpy(km))[..., :, None], a.shape)
        a, b = a[keep], b[keep]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # and the mask matters: without it the changed keys do change the output
    out3, _ = spec.forward(**changed, **case.config)
    out4, _ = run(spec, case)
    assert not np.allclose(np64(out3), np64(out4))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", [n for n in NAMES if effattn.get(n).kind == "kernel"])
def test_padding_changes_no_real_output(name, causal):
    """Self-attention with a key mask: the masked positions are padding as queries too. Whatever
    sits there (in q, k and v) must not change a real row -- a padded query may not take part in
    a shared computation (landmarks, clusters, sorting) that real rows depend on."""
    spec = effattn.get(name)
    if causal and not spec.causal:
        pytest.skip("not a causal mechanism")
    rng = np.random.default_rng(20)
    case = spec.example(rng, batch=2, heads=2, n=21, d=4, causal=causal)
    km = random_key_mask(rng, case)
    out, _ = run(spec, case, key_mask=km)
    changed = perturb_masked(case, km, sorted(set(case.seq_inputs) | set(case.key_inputs)), rng)
    pad = ~np.asarray(to_numpy(km))[..., :, None]                 # (B, 1, N, 1)
    out2, _ = spec.forward(**changed, **{**case.config, "key_mask": km})
    real = np.broadcast_to(~pad, out.shape)
    np.testing.assert_allclose(np64(out2)[real], np64(out)[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_rows_are_finite(name):
    spec = effattn.get(name)
    for causal in ([False, True] if spec.causal else [False]):
        case = spec.example(np.random.default_rng(5), batch=2, heads=1, n=11, d=4, causal=causal)
        km = np.ones(key_mask_shape(case), dtype=bool)
        km[0] = False
        out, cache = run(spec, case, key_mask=asarray(km))
        assert np.isfinite(np64(out)).all()
        grads = spec.backward(asarray(np.ones(out.shape), dtype=out.dtype), cache)
        assert all(np.isfinite(np64(g)).all() for g in grads.values())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_huge_logits_are_finite(name, masked):
    """Logits x 1e4 (q x 1e4, or q and k x 100), float64 and float32, with and without a key mask
    (a masked key must not set the scale of the real ones): out and every gradient finite."""
    spec = effattn.get(name)
    for causal in ([False, True] if spec.causal else [False]):
        for dtype in ("float64", "float32"):
            for seed in range(4):
                rng = np.random.default_rng(6 + seed)
                case = spec.example(rng, batch=2, heads=2, n=17, d=4, causal=causal, dtype=dtype)
                extra = {"key_mask": random_key_mask(rng, case)} if masked else {}
                first = case.seq_inputs[0]
                if spec.kind == "kernel" and seed % 2:
                    case.inputs["q"], case.inputs["k"] = case.inputs["q"] * 100, case.inputs["k"] * 100
                else:
                    case.inputs[first] = case.inputs[first] * 1e4
                out, cache = run(spec, case, **extra)
                what = f"{name} ({dtype}, causal={causal}, masked={masked}, seed {seed})"
                assert np.isfinite(np64(out)).all(), f"{what} not finite with logits x 1e4"
                grads = spec.backward(asarray(np.ones(out.shape), dtype=out.dtype), cache)
                assert all(np.isfinite(np64(g)).all() for g in grads.values()), f"{what}: gradient not finite"


# --------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name):
    spec = effattn.get(name)
    for causal in ([False, True] if spec.causal else [False]):
        c64 = spec.example(np.random.default_rng(7), batch=2, heads=2, n=19, d=8, causal=causal, dtype="float64")
        c32 = spec.example(np.random.default_rng(7), batch=2, heads=2, n=19, d=8, causal=causal, dtype="float32")
        o64, cache64 = run(spec, c64)
        o32, cache32 = run(spec, c32)
        assert o32.dtype == np.float32 and o64.dtype == np.float64
        err = np.abs(np64(o32) - np64(o64)).max() / max(np.abs(np64(o64)).max(), 1e-30)
        assert err < spec.tol32, f"{name}: float32 error {err:.2e} above {spec.tol32:.0e}"
        g32 = spec.backward(asarray(np.ones(o32.shape), dtype="float32"), cache32)
        assert all(g.dtype == np.float32 for g in g32.values()), {k: g.dtype for k, g in g32.items()}


# --------------------------------------------------------------------------- bad input
def _expect_error(fn, *words):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert any(w in msg for w in words), f"error {msg!r} does not name {words}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_value_error_naming_it(name):
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(8), batch=1, heads=2, n=12, d=4)
    first = case.seq_inputs[0]

    def with_input(key, value):
        return lambda: spec.forward(**{**case.inputs, key: value}, **case.config)

    x = case.inputs[first]
    _expect_error(with_input(first, x[0, 0, 0]), first)                         # wrong rank
    _expect_error(with_input(first, x.astype("int64")), first)                  # not floating
    bad = np64(x).copy()
    bad.reshape(-1)[0] = np.nan
    _expect_error(with_input(first, asarray(bad)), first)                       # non-finite
    if spec.kind == "kernel":
        k, v = case.inputs["k"], case.inputs["v"]
        xp = get_namespace(k)
        _expect_error(with_input("k", xp.concatenate([k, k[..., :1]], axis=-1)), "k", "d=")    # mismatched d
        _expect_error(with_input("v", xp.concatenate([v, v[..., :1, :]], axis=-2)), "v", "k")  # M mismatch
    _expect_error(lambda: spec.forward(**case.inputs, **{**case.config, "key_mask": asarray(np.ones(key_mask_shape(case)[:-1] + (case.m + 1,), bool))}), "key_mask")
    if not spec.causal:
        _expect_error(lambda: spec.forward(**case.inputs, **{**case.config, "causal": True}), "causal")
    for size in spec.sizes:
        for value in (0, -1):
            _expect_error(lambda: spec.forward(**case.inputs, **{**case.config, size: value}), size)


# Families of bad input, drawn by hypothesis over the whole registry: each must raise
# ValueError or TypeError whose message names the argument.
BAD_NUMBERS = [float("inf"), float("-inf"), float("nan"), -1.0, True, "1", [1.0]]
POSITIVE_OPTIONS = ("scale", "tau", "norm_eps", "self_penalty")   # finite and > 0
NONNEGATIVE_OPTIONS = ("eps",)                                       # finite and >= 0
BAD_SIZES = [0, -1, 2.5, True, "3", 10**9 * 1.0]
BAD_DTYPES = ["float16", "longdouble", "int64", "complex128", "bool"]


def bad_input_families(spec, case):
    """Every (family, argument, change) to try on ``case``: a change maps (inputs, config) to new ones."""
    import inspect

    params = inspect.signature(spec.forward).parameters
    out = []
    for opt in POSITIVE_OPTIONS + NONNEGATIVE_OPTIONS:
        if opt in params:
            values = BAD_NUMBERS + ([0.0] if opt in POSITIVE_OPTIONS else [])
            out += [("option", opt, ("config", opt, v)) for v in values]
    for size in spec.sizes:
        out += [("size", size, ("config", size, v)) for v in BAD_SIZES]
    first = case.seq_inputs[0]
    out += [("dtype", first, ("dtype", first, dt)) for dt in BAD_DTYPES]
    out += [("rank", first, ("rank", first, r)) for r in (0, 1)]
    for name, a in case.inputs.items():
        if name in ("q", "k", "v", "x"):
            continue
        out += [("parameter", name, ("input", name, v)) for v in (None, "W", [[1.0, 2.0]])]
        out += [("parameter", name, ("stack", name, None)), ("parameter", name, ("dtype", name, "int64"))]
    for name, a in case.config.items():                 # random draws passed as configuration
        if hasattr(a, "dtype") and a.ndim and name != "key_mask":
            other = "float64" if a.dtype.kind in "iub" else "int64"
            out += [("draw", name, ("config", name, np64(a).tolist())), ("draw", name, ("config", name, "W")),
                    ("draw", name, ("config_stack", name, None)), ("draw", name, ("config_dtype", name, other))]
    return out


def apply_change(case, change):
    kind, name, value = change
    inputs, config = dict(case.inputs), dict(case.config)
    if kind == "config":
        config[name] = value
    elif kind == "input":
        inputs[name] = value
    elif kind == "dtype":
        inputs[name] = asarray(np64(inputs[name]).astype(value)) if value != "longdouble" else np64(inputs[name]).astype(np.longdouble)
    elif kind == "rank":
        inputs[name] = inputs[name][(0,) * (inputs[name].ndim - value)]
    elif kind == "config_stack":
        config[name] = get_namespace(config[name]).stack([config[name]] * 3)
    elif kind == "config_dtype":
        config[name] = config[name].astype(value)
    elif kind == "stack":                               # three copies on a new leading axis
        a = inputs[name]
        inputs[name] = get_namespace(a).stack([a, a, a])
    return inputs, config


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_bad_inputs_raise_an_error_naming_the_argument(name, data):
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(18), batch=1, heads=2, n=12, d=4)
    family, arg, change = data.draw(st.sampled_from(bad_input_families(spec, case)), label="bad input")
    inputs, config = apply_change(case, change)
    with pytest.raises((ValueError, TypeError)) as info:
        spec.forward(**inputs, **config)
    assert arg in str(info.value), f"{name}: {family} {change!r} raised {info.value!r}, not naming {arg}"


@pytest.mark.parametrize("name", NAMES)
def test_inputs_without_batch_and_head_axes_work_or_are_refused_by_name(name):
    """q, k, v (N, d) (or x (N, D)): the same as the one (batch, head) slice, or, where a parameter
    or draw is per head, a ValueError naming it."""
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(19), batch=1, heads=1, n=12, d=4)
    full_out, _ = run(spec, case)
    sliced = {k: (a[0, 0] if spec.kind == "kernel" else a[0]) if k in case.seq_inputs + case.key_inputs else a
              for k, a in case.inputs.items()}
    try:
        out, _ = spec.forward(**sliced, **case.config)
    except ValueError as e:
        named = [k for k in list(case.inputs) + list(case.config) if k in str(e)]
        assert named, f"{name}: rank-2 inputs refused without naming an argument: {e}"
        return
    want = full_out[0, 0] if spec.kind == "kernel" else full_out[0]
    np.testing.assert_allclose(np64(out), np64(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_every_bad_input_of_every_family_is_refused(name):
    """The same families, exhaustively (the property test above samples them with other seeds)."""
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(21), batch=1, heads=2, n=10, d=4)
    families = bad_input_families(spec, case)
    assert {f for f, _, _ in families} >= {"dtype", "rank"}
    for family, arg, change in families:
        inputs, config = apply_change(case, change)
        with pytest.raises((ValueError, TypeError)) as info:
            spec.forward(**inputs, **config)
        assert arg in str(info.value), f"{name}: {family} {change!r} raised {info.value!r}, not naming {arg}"


WINDOWED = [n for n in NAMES if effattn.get(n).windows]


@pytest.mark.parametrize("name", WINDOWED)
def test_windows_beyond_the_sequence_are_clipped_not_allocated(name):
    """A window, block or reach of 10**9 gives what N + 5 gives (a window longer than the sequence
    is the sequence), forward and backward, and allocates no more than that call does."""
    import tracemalloc

    spec = effattn.get(name)
    n = 13
    for causal in ([False, True] if spec.causal else [False]):
        rng = np.random.default_rng(14)
        case = spec.example(rng, batch=1, heads=2, n=n, d=4, causal=causal)
        km = random_key_mask(rng, case)
        dout = None
        for size in spec.windows:
            if causal and size in ("look_ahead", "chunks_after"):
                continue                                    # must be 0 when causal
            if size not in case.config:
                continue                                    # not a size of this mode (perceiver: causal only)
            results = []
            for value in (n + 5, 10**9):
                tracemalloc.start()
                try:
                    out, cache = run(spec, case, key_mask=km, **{size: value})
                    dout = asarray(np.random.default_rng(15).standard_normal(out.shape), dtype=out.dtype)
                    grads = spec.backward(dout, cache)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                results.append((out, grads, peak))
            (a, ga, pa), (b, gb, pb) = results
            np.testing.assert_allclose(np64(b), np64(a), rtol=0, atol=1e-12, err_msg=f"{name} {size}=10**9")
            for key in ga:
                np.testing.assert_allclose(np64(gb[key]), np64(ga[key]), rtol=0, atol=1e-12, err_msg=f"d{key}")
            assert pb < 2 * pa + 2**20, f"{name} {size}=10**9 allocated {pb} bytes, N + 5 only {pa}"


# --------------------------------------------------------------------------- backward's inputs
@pytest.mark.parametrize("name", NAMES)
def test_backward_refuses_a_wrong_dout_or_a_foreign_cache(name):
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(16), batch=1, heads=2, n=9, d=4)
    out, cache = run(spec, case)
    x = np64(out)
    xp = get_namespace(out)
    bad_douts = {"an extra row": xp.concatenate([out, out[..., :1, :]], axis=-2),
                 "a lost axis": out[0],
                 "an added axis": out[None],
                 "another dtype": out.astype("float32"),
                 "a NaN": asarray(np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x)),
                 "None": None,
                 "a list": x.tolist()}
    for what, dout in bad_douts.items():
        with pytest.raises((ValueError, TypeError), match="dout") as info:
            spec.backward(dout, cache)
        assert "dout" in str(info.value), f"{name}: dout with {what} not refused by name"
    other = effattn.get("local" if name == "full" else "full")
    _, foreign = run(other, other.example(np.random.default_rng(17), batch=1, heads=2, n=9, d=4))
    for what, c in {"another mechanism's cache": foreign, "the bare saved record": cache.saved, "None": None}.items():
        with pytest.raises((ValueError, TypeError), match="cache"):
            spec.backward(out, c)
        if spec.weights is not None:
            with pytest.raises((ValueError, TypeError), match="cache"):
                spec.weights(c)


def test_example_refuses_bad_sizes_and_dtypes():
    spec = effattn.get("full")
    rng = np.random.default_rng(0)
    for key, value in (("n", 0), ("n", -1), ("n", 2.5), ("d", 0), ("batch", 0), ("heads", 0), ("heads", True),
                       ("dtype", "bogus"), ("dtype", "int64"), ("dtype", "float16")):
        with pytest.raises(ValueError, match=key):
            spec.example(rng, **{key: value})
    with pytest.raises(ValueError, match="n must be >= 2 for etc"):
        effattn.get("etc").example(rng, n=1)


@pytest.mark.parametrize("name", NAMES)
def test_every_example_size_is_one_its_forward_accepts(name):
    spec = effattn.get(name)
    for n in range(spec.min_n, 6):
        case = spec.example(np.random.default_rng(n), batch=1, heads=2, n=n, d=3)
        out, _ = run(spec, case)
        assert out.shape[-2] == (case.n if not case.out_follows_keys else case.m) or spec.kind == "layer"


# --------------------------------------------------------------------------- determinism and cost
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output(name):
    spec = effattn.get(name)
    a = run(spec, spec.example(np.random.default_rng(9), batch=1, heads=2, n=16, d=4))[0]
    b = run(spec, spec.example(np.random.default_rng(9), batch=1, heads=2, n=16, d=4))[0]
    assert np.array_equal(np64(a), np64(b))


@pytest.mark.parametrize("name", [n for n in NAMES if effattn.get(n).subquadratic])
def test_efficient_path_never_allocates_n_by_n(name):
    """forward + backward at N = 2048 must stay well under one N x N float64 matrix (32 MiB)."""
    import tracemalloc

    spec = effattn.get(name)
    n = 2048
    case = spec.example(np.random.default_rng(10), batch=1, heads=1, n=n, d=8, causal=False)
    if effattn.get_backend() != "numpy":
        pytest.skip("tracemalloc sees host memory only")
    tracemalloc.start()
    try:
        out, cache = run(spec, case)
        spec.backward(np.ones_like(out), cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * n * n * 8, f"{name}: peak {peak / 2**20:.1f} MiB at N={n} (an N x N float64 is 32 MiB)"
