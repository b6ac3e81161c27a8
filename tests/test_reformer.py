"""Reformer LSH attention: independent oracles (dense masked attention, a loop over chunks,
the paper's round-combination formula). The hash and the sorted layout: tests/test_lsh.py."""
import itertools

import numpy as np
import pytest

import effattn
from effattn.attention import reformer as R
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size

full = effattn.get("full").forward


def unit(k, eps=1e-6):
    return k / np.sqrt((k * k).mean(-1, keepdims=True) + eps) / np.sqrt(k.shape[-1])


def make(rng, b=2, h=2, n=29, d=4, rounds=1, buckets=6, per_head=True):
    q, k, v = (rng.standard_normal((b, h, n, d)) for _ in range(3))
    rot = R.draw_rotations(rng, d, buckets, rounds, heads=h if per_head else None)
    return q, k, v, rot


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunking", ["sorted", "bucket"])
def test_one_round_equals_dense_masked_by_induced_pattern(causal, chunking):
    rng = np.random.default_rng(0)
    for n in (7, 16, 29):
        q, k, v, rot = make(rng, n=n)
        km = rng.random((2, 1, n)) > 0.25
        km[..., 0] = True
        out, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, causal=causal, key_mask=km, chunking=chunking)
        ref, _ = full(q, unit(k), v, mask=R.pattern(cache), scale=1.0)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_loop_over_chunks_oracle(causal):
    rng = np.random.default_rng(1)
    for n, c in ((10, 3), (24, 4), (31, 8)):
        q, k, v = (rng.standard_normal((n, 5)) for _ in range(3))
        rot = R.draw_rotations(rng, 5, 4, 1)
        out, _ = R.forward(q, k, v, rotations=rot, chunk_size=c, causal=causal, chunking="sorted")
        np.testing.assert_allclose(out, R.loop(q, k, v, rotations=rot, chunk_size=c, causal=causal),
                                   rtol=0, atol=1e-12)


def test_shared_qk_keys_are_normalised():
    rng = np.random.default_rng(3)
    q, k, v, rot = make(rng, rounds=2)
    a, _ = R.forward(q, k, v, rotations=rot, chunk_size=4, norm_eps=1e-30)
    b, _ = R.forward(q, 3.0 * k, v, rotations=rot, chunk_size=4, norm_eps=1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_identical_rounds_equal_one_round():
    """Buckets that coincide in every round: the union is one round's window, each key once."""
    rng = np.random.default_rng(4)
    q, k, v, rot = make(rng, rounds=1, per_head=False)
    one, _ = R.forward(q, k, v, rotations=rot, chunk_size=4)
    rot3 = np.concatenate([rot, rot, rot], axis=0)
    for dedupe in (True, False):
        three, _ = R.forward(q, k, v, rotations=rot3, chunk_size=4, dedupe=dedupe)
        np.testing.assert_allclose(three, one, rtol=0, atol=1e-12)


def test_rounds_with_duplicate_correction_are_dense_over_the_union():
    rng = np.random.default_rng(5)
    q, k, v, rot = make(rng, rounds=3, per_head=False)
    out, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, self_penalty=None)
    union = np.zeros(q.shape[:-2] + (q.shape[-2],) * 2, bool)
    for r in range(3):
        _, c1 = R.forward(q, k, v, rotations=rot[r:r + 1], chunk_size=4, self_penalty=None)
        union |= R.pattern(c1)
    ref, _ = full(q, unit(k), v, mask=union, scale=1.0)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_without_duplicate_correction_keys_count_once_per_round():
    """dedupe=False (HF, trax): W_ij proportional to N_ij exp(q_i . k_j) over the union."""
    rng = np.random.default_rng(6)
    q, k, v, rot = make(rng, rounds=3, per_head=False)
    _, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, self_penalty=None, dedupe=False)
    counts = 0
    for r in range(3):
        _, c1 = R.forward(q, k, v, rotations=rot[r:r + 1], chunk_size=4, self_penalty=None)
        counts = counts + R.pattern(c1)
    s = np.exp(q @ np.swapaxes(unit(k), -1, -2)) * counts
    expected = s / s.sum(-1, keepdims=True)
    np.testing.assert_allclose(R.weights(cache), expected, rtol=0, atol=1e-12)
    assert counts.max() > 1   # some key really was seen twice


def test_mean_combination_is_the_average_of_rounds():
    rng = np.random.default_rng(7)
    q, k, v, rot = make(rng, rounds=2)
    out, _ = R.forward(q, k, v, rotations=rot, chunk_size=4, combine="mean")
    rounds = [R.forward(q, k, v, rotations=rot[:, r:r + 1], chunk_size=4)[0] for r in range(2)]
    np.testing.assert_allclose(out, (rounds[0] + rounds[1]) / 2, rtol=0, atol=1e-12)


def test_self_attention_only_when_nothing_else_is_visible():
    rng = np.random.default_rng(8)
    q, k, v, rot = make(rng, n=17)
    _, cache = R.forward(q, q.copy(), v, rotations=rot, chunk_size=4, causal=True)
    W = R.weights(cache)
    assert W[..., 0, 0].min() == 1.0                      # the first token sees only itself
    diag = np.diagonal(W, axis1=-2, axis2=-1)
    offrow = (W > 0).sum(-1) - (diag > 0)
    assert np.all(diag[offrow > 0] == 0)                  # never itself when another key is visible


def test_bucket_chunking_is_strictly_causal_and_sorted_chunking_leaks():
    """Chunks of the global sort depend on later tokens' buckets (the paper's causal mode leaks);
    per-bucket chunks do not."""
    leaked = False
    for seed in range(30):
        rng = np.random.default_rng(seed)
        q, k, v, rot = make(rng, n=24, buckets=4)
        t = 12
        k2 = k.copy()
        k2[..., t:, :] = rng.standard_normal(k2[..., t:, :].shape)
        for chunking in ("bucket", "sorted"):
            a, _ = R.forward(q, k, v, rotations=rot, chunk_size=3, causal=True, chunking=chunking)
            b, _ = R.forward(q, k2, v, rotations=rot, chunk_size=3, causal=True, chunking=chunking)
            same = np.array_equal(a[..., :t, :], b[..., :t, :])
            if chunking == "bucket":
                assert same
            else:
                leaked |= not same
    assert leaked


@pytest.mark.parametrize("options", [
    {"combine": "mean"}, {"shared_qk": False}, {"dedupe": False}, {"chunking": "sorted", "causal": True},
    {"chunks_before": 2, "chunks_after": 1}, {"scale": 0.7, "self_penalty": 50.0},
])
def test_gradients_of_other_options(options):
    rng = np.random.default_rng(9)
    q, k, v, rot = make(rng, b=1, n=11, d=3, rounds=2)
    config = {"rotations": rot, "chunk_size": 3, **options}
    errors = check_gradients(R.forward, R.backward, {"q": q, "k": k, "v": v}, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_weights_rows_and_layout():
    rng = np.random.default_rng(10)
    q, k, v, rot = make(rng, n=21, rounds=2)
    km = np.ones((2, 1, 21), bool)
    km[0, 0, 15:] = False
    out, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, key_mask=km)
    W = R.weights(cache)
    np.testing.assert_allclose(W[0][:, :15, :].sum(-1), 1.0, atol=1e-12)   # real rows sum to one
    np.testing.assert_allclose(W[1].sum(-1), 1.0, atol=1e-12)
    assert np.all(W[0][..., 15:] == 0)
    # every token sits in exactly one slot per round; masked tokens in the padding bucket
    assert np.all(cache.buckets[0][..., 15:] == 6)
    st = cache.slot_token
    for r in range(2):
        toks = np.sort(st[0, 0, r][st[0, 0, r] < 21])
        np.testing.assert_array_equal(toks, np.arange(21))


def test_bad_arguments():
    rng = np.random.default_rng(11)
    q, k, v, rot = make(rng)
    with pytest.raises(ValueError, match="rotations"):
        R.forward(q, k, v, chunk_size=4)
    with pytest.raises(ValueError, match="rotations"):
        R.forward(q, k, v, rotations=rot[..., :3, :], chunk_size=4)
    with pytest.raises(ValueError, match="combine"):
        R.forward(q, k, v, rotations=rot, chunk_size=4, combine="max")
    with pytest.raises(ValueError, match="n_buckets"):
        R.draw_rotations(rng, 4, 5)


# --------------------------------------------------------------------------- decoding
def _decode(q, k, v, prompt, km=None, **config):
    """prefill the first ``prompt`` tokens, then step: the rows and the states after each token."""
    state = R.init_state(lead=q.shape[:-2], d=q.shape[-1], dv=v.shape[-1], **config)
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    out, state = R.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                           key_mask=None if kmb is None else kmb[..., :prompt])
    snapshot = lambda s: s._replace(pos=s.pos.copy(), count=s.count.copy())  # noqa: E731  (steps write in place)
    rows, states = [out], [snapshot(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = R.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                          key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        states.append(snapshot(state))
    return np.concatenate(rows, axis=-2), states


@pytest.mark.parametrize("options", [
    {}, {"rounds": 3}, {"rounds": 3, "combine": "mean"}, {"rounds": 3, "dedupe": False}, {"shared_qk": False},
    {"chunks_before": 0}, {"chunks_before": 3, "chunk_size": 2}, {"chunk_size": 50}, {"self_penalty": None},
    {"buckets": 2, "n": 60}, {"per_head": False, "rounds": 2},
])
def test_decoding_equals_the_causal_forward(options):
    """Prefill + steps = the causal forward (chunking "bucket"), key masks included, whatever the prompt
    length; with 2 buckets and n = 60 the rings wrap many times."""
    options = dict(options)
    shape = {key: options.pop(key) for key in ("rounds", "buckets", "n", "per_head") if key in options}
    rng = np.random.default_rng(len(str(options)) + len(str(shape)))
    q, k, v, rot = make(rng, **{"rounds": 2, **shape})
    config = {"rotations": rot, "chunk_size": 4, **options}
    km = rng.random((2, 1, q.shape[-2])) > 0.3
    km[..., 0] = True
    for mask in (None, km):
        want, _ = R.forward(q, k, v, causal=True, key_mask=mask, **config)
        for prompt in (1, 7, q.shape[-2] - 1):
            got, _ = _decode(q, k, v, prompt, mask, **config)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"prompt {prompt}")


def test_decoding_state_holds_the_last_keys_of_every_bucket():
    """After t tokens, ring (round r, bucket h) holds exactly the last S = (chunks_before + 1) c real tokens
    hashed to h in round r (by plain Python counting), and the state's size never changes."""
    rng = np.random.default_rng(21)
    n, c, before = 40, 3, 1
    q, k, v, rot = make(rng, b=1, h=2, n=n, rounds=2, buckets=4)
    km = rng.random((1, 1, n)) > 0.2
    km[..., 0] = True
    _, states = _decode(q, k, v, 5, km, rotations=rot, chunk_size=c, chunks_before=before)
    buckets = np.asarray(R._hash(k, rot, np.broadcast_to(km, (1, 2, n)), (1, 2)))    # (1, 2, R, N)
    s = (before + 1) * c
    sizes = {state_size(state) for state in states}
    assert sizes == {2 * (2 * 4 * s * (4 + 4 + 1 + 2 * 2) + 2 * 4)}                 # R b S (d + dv + 1 + 2R) + R b
    for state in states:
        t = state.t
        for h, r, bucket in itertools.product(range(2), range(2), range(4)):
            members = [j for j in range(t) if buckets[0, h, r, j] == bucket]
            held = sorted(p for p in state.pos[0, h, r, bucket] if p >= 0)
            assert held == members[-s:]
            assert state.count[0, h, r, bucket] == len(members)


def test_decoding_refuses_sorted_chunking_and_checks_its_inputs():
    rng = np.random.default_rng(22)
    q, k, v, rot = make(rng)
    with pytest.raises(ValueError, match="chunking='sorted' cannot decode"):
        R.init_state(lead=(2, 2), d=4, dv=4, rotations=rot, chunking="sorted")
    with pytest.raises(ValueError, match="chunks_after"):
        R.init_state(lead=(2, 2), d=4, dv=4, rotations=rot, chunks_after=1)
    with pytest.raises(ValueError, match="rotations"):
        R.init_state(lead=(2, 3), d=4, dv=4, rotations=rot)
    with pytest.raises(ValueError, match="rotations"):
        R.init_state(lead=(2, 2), d=4, dv=4)
    state = R.init_state(lead=(2, 2), d=4, dv=4, rotations=rot, chunk_size=4)
    with pytest.raises(ValueError, match="k must have shape"):
        R.prefill(q, k[..., :3], v, state)
    _, state = R.prefill(q[..., :3, :], k[..., :3, :], v[..., :3, :], state)
    with pytest.raises(ValueError, match="fresh"):
        R.prefill(q, k, v, state)
    with pytest.raises(ValueError, match="key_mask_t"):
        R.step(q[..., 3, :], k[..., 3, :], v[..., 3, :], state, key_mask_t=np.ones((2, 2)))
