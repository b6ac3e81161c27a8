"""Low precision (issue 16): exact bfloat16/float16 rounding against an independent oracle written
with exact rational arithmetic, loss scaling, int8 attention's error, mixed-precision training."""
import math
from fractions import Fraction

import numpy as np
import pytest

from effattn.models import Decoder
from effattn.nn import precision as P
from effattn.nn.modules import Linear


def nearest_even(x, mant_bits, emin, emax):
    """The nearest number with ``mant_bits`` bits after the point of a normal significand, exponent in
    [emin, emax] (subnormals below emin), ties to the even significand; inf beyond the largest.
    Exact arithmetic with Fractions: no float rounding of its own."""
    if x == 0 or not math.isfinite(x):
        return x
    f = Fraction(x)
    sign = -1 if f < 0 else 1
    f = abs(f)
    e = max(math.frexp(float(f))[1] - 1, emin)              # the binade (frexp's exponent of a float is exact)
    if Fraction(2) ** e > f:                                # frexp on the float could be one off at a boundary
        e -= 1
        e = max(e, emin)
    ulp = Fraction(2) ** (e - mant_bits)
    q, r = divmod(f, ulp)
    if r * 2 > ulp or (r * 2 == ulp and q % 2 == 1):
        q += 1
    y = q * ulp
    largest = (2 - Fraction(2) ** -mant_bits) * Fraction(2) ** emax
    # overflow: beyond the largest finite value plus half an ulp of it, the result is infinite
    if y > largest:
        return sign * math.inf
    return sign * float(y)


def sample_values(rng):
    x = np.concatenate([
        rng.standard_normal(300) * 10.0 ** rng.integers(-8, 8, 300),
        np.array([0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, 1 + 3 * 2 ** -9, 65504.0, 65520.0, 65519.0,
                  6.0e-8, 3.0e-5, 2.0 ** -24, 2.0 ** -25, 3.4e38, -3.4e38, 1e-39]),
    ]).astype(np.float32)
    return x


def test_bf16_rounding_is_nearest_even():
    x = sample_values(np.random.default_rng(0))
    got = P.round_bf16(x)
    assert got.dtype == np.float32
    want = [nearest_even(float(v), 7, -126, 127) for v in x]
    for v, g, w in zip(x, got, want):                              # subnormals included (ulp 2^-133)
        assert g == w, (v, g, w)
    assert np.isnan(P.round_bf16(np.array([np.nan], np.float32)))[0]


def test_fp16_rounding_is_nearest_even():
    x = sample_values(np.random.default_rng(1))
    got = P.round_fp16(x)
    want = [nearest_even(float(v), 10, -14, 15) for v in x]
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))
    assert P.round_fp16(np.array([65519.0], np.float32))[0] == 65504.0
    assert P.round_fp16(np.array([65520.0], np.float32))[0] == np.inf


def test_softmax_in_float16_overflows_without_the_max():
    x = np.array([[2.0, 11.0, 12.0]])
    assert np.isnan(P.softmax_in(x, subtract_max=False)).any()            # exp(12) > 65504
    good = P.softmax_in(x)
    ref = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert good.dtype == np.float16 and np.abs(good - ref).max() < 2e-3


def test_loss_scaler_skips_overflow_halves_and_regrows():
    s = P.LossScaler(scale=8.0, growth_interval=2)
    g = {"w": np.array([2.0, 4.0])}
    assert s.unscale(g) and np.array_equal(g["w"], [0.25, 0.5]) and s.scale == 8.0
    assert s.unscale({"w": np.array([8.0])}) and s.scale == 16.0              # two good steps: doubled
    bad = {"w": np.array([1.0, np.inf])}
    assert not s.unscale(bad) and s.scale == 8.0 and s.skipped == 1
    assert bad["w"][0] == 1.0                                                # a skipped step is left as it was
    assert [ok for _, ok in s.history] == [True, True, False]
    with pytest.raises(ValueError, match="backoff"):
        P.LossScaler(backoff=2.0)


def test_int8_quantisation_and_attention_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8))
    xi, s = P.quantize_int8(x)
    assert xi.dtype == np.int8 and np.abs(xi).max() == 127
    assert np.abs(xi * s - x).max() <= s.max() / 2 + 1e-7                  # half a step at most
    q, k, v = (rng.standard_normal((2, 64, 32)) for _ in range(3))
    out = P.int8_attention(q, k, v)
    s_ = q @ np.swapaxes(k, -1, -2) / np.sqrt(32)
    p = np.exp(s_ - s_.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 1e-4 < err < 0.05, err                                            # int8 is coarse, but close


def test_linear_storage_rounds_what_it_stores():
    lin = Linear(4, 3, np.random.default_rng(0), dtype="float32")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    exact = lin.forward(x)
    lin.storage = P.round_bf16
    y = lin.forward(x)
    np.testing.assert_array_equal(y, P.round_bf16(y))                      # the output is stored in bf16
    assert 0 < np.abs(y - exact).max() < 0.05 * np.abs(exact).max()
    lin.zero_grad()
    lin.backward(np.ones_like(y))
    g = dict(lin.gradients())["W"]
    np.testing.assert_array_equal(g, P.round_bf16(g))
    assert lin.params["W"].dtype == np.float32                             # the master weights stay float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_learns(precision):
    """The trainer with ``--precision``: a decoder learns the copy-the-past task about as well as float32."""
    from effattn.tools.train import train_model

    res = {p: train_model("lm", "full", steps=60, d_model=16, heads=2, layers=1, seq_len=16, batch_size=8,
                          precision=p)["result"] for p in ("fp32", precision)}
    assert res[precision]["loss"] < res["fp32"]["loss"] + 0.1, res
    if precision == "fp16":
        assert res[precision]["loss_scale"] is not None


def test_fp16_overflow_skips_steps_and_shrinks_the_scale():
    """A scale far too large for float16 (2^30): the stored gradients overflow, the first steps are
    skipped with no update, the scale halves each time until the steps go through."""
    import argparse

    from effattn.tools import train as T

    ap = argparse.ArgumentParser()
    T.add_train_arguments(ap)
    s = T.settings_from_args(ap.parse_args(["--task", "lm", "--steps", "30", "--d-model", "16", "--heads", "2",
                                            "--layers", "1", "--seq-len", "16", "--batch-size", "8",
                                            "--precision", "fp16"]))
    task, model, opt, sched = T.build(s)
    before = {k: v.copy() for k, v in model.parameters()}
    scaler = P.LossScaler(scale=2.0 ** 30, growth_interval=1000)
    h = T.fit(model, task, opt, sched, np.random.default_rng(0), steps=30, batch_size=8, progress=False,
              scaler=scaler)
    assert h["skipped"][:1] == [1] and 1 <= len(h["skipped"]) < 30
    assert scaler.scale == 2.0 ** 30 * 0.5 ** len(h["skipped"])
    assert len(h["step"]) == 30 - len(h["skipped"])
    after = dict(model.parameters())
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_a_resumed_fp16_run_goes_on_with_its_saved_loss_scale(tmp_path):
    """Four steps from a scale far too large (2^30: the first steps are skipped, the scale halves),
    a checkpoint, four more steps from it with a fresh scaler: the same parameters, bit for bit,
    and the same scale as eight steps in one go (a fresh 2^30 would skip steps again)."""
    import argparse

    from effattn.tools import train as T

    ap = argparse.ArgumentParser()
    T.add_train_arguments(ap)
    s = T.settings_from_args(ap.parse_args(["--task", "lm", "--steps", "8", "--d-model", "16", "--heads", "2",
                                            "--layers", "1", "--seq-len", "16", "--batch-size", "8",
                                            "--precision", "fp16"]))

    def run(steps, start=0, resume=None):
        task, model, opt, sched = T.build(s)
        scaler, rng = P.LossScaler(scale=2.0 ** 30, growth_interval=1000), np.random.default_rng(0)
        if resume:
            assert T.load_checkpoint(resume, model, opt, rng, s, scaler=scaler) == start
        T.fit(model, task, opt, sched, rng, steps=steps, start=start, batch_size=8, progress=False, scaler=scaler)
        return model, opt, rng, scaler

    whole = run(8)
    half = run(4)
    assert half[3].skipped >= 1 and half[3].scale < 2.0 ** 30
    ck = str(tmp_path / "half.npz")
    T.save_checkpoint(ck, *half[:2], 4, half[2], s, scaler=half[3])
    resumed = run(8, start=4, resume=ck)
    assert resumed[3].scale == whole[3].scale and resumed[3].skipped == whole[3].skipped
    a, b = dict(whole[0].parameters()), dict(resumed[0].parameters())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    bad = str(tmp_path / "bad.npz")
    T.save_checkpoint(bad, *half[:2], 4, half[2], s, scaler=half[3])
    import json
    with np.load(bad) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["scaler"]["scale"] = -1.0
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(bad, **arrays)
    fresh = P.LossScaler(scale=8.0)
    task, model, opt, sched = T.build(s)
    with pytest.raises(ValueError, match="loss-scaler state"):
        T.load_checkpoint(bad, model, opt, np.random.default_rng(0), s, scaler=fresh)
    assert fresh.scale == 8.0


@pytest.mark.parametrize("kw", [{"checkpoint": 1}, {"ffn_chunk": 5}])
def test_trainer_techniques_change_nothing_but_memory(kw):
    from effattn.tools.train import train_model

    args = dict(steps=20, d_model=16, heads=2, layers=2, seq_len=16, batch_size=8)
    plain = train_model("lm", "full", **args)["result"]
    other = train_model("lm", "full", **args, **kw)["result"]
    assert other["loss"] == pytest.approx(plain["loss"], abs=1e-4)


def test_trainer_refuses_bad_technique_options():
    from effattn.tools.train import train_model

    with pytest.raises(ValueError, match="--checkpoint"):
        train_model("lm", "full", steps=2, reversible=True, checkpoint=2)
    with pytest.raises(ValueError, match="--precision"):
        train_model("lm", "full", steps=2, precision="fp16", dtype="float64")
    with pytest.raises(ValueError, match="--ffn-chunk"):
        train_model("lm", "full", steps=2, ffn_chunk=0)


def test_lowp_attention_errors_are_ordered_by_the_formats():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 48, 16)).astype(np.float32) for _ in range(3))
    s_ = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / 4.0
    p = np.exp(s_ - s_.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    err = {f: np.abs(P.lowp_attention(q, k, v, precision=f) - ref).max() / np.abs(ref).max()
           for f in ("fp32", "fp16", "bf16")}
    assert err["fp32"] < 1e-5 < err["fp16"] < err["bf16"] < 0.05, err
    out = P.lowp_attention(q, k, v, precision="bf16")
    np.testing.assert_array_equal(out, P.round_bf16(out))                  # the output is stored in bf16
