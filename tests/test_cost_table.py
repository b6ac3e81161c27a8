"""The notebooks' cost helper (effattn.tools.bench.cost_table): ranges checked, noise measured again."""
import pytest

from effattn.tools import bench


def fake_measure(times):
    """A stand-in for bench.measure: time_s from ``times[(n, call)]``, memory N^2, counting calls per N."""
    calls = {}

    def measure(spec, n, **kw):
        calls[n] = calls.get(n, 0) + 1
        return {"name": spec.name, "n": n, "time_s": times(n, calls[n]), "peak_bytes": float(n * n)}
    return measure, calls


def test_a_time_exponent_bent_by_one_slow_run_is_measured_again_and_passes(monkeypatch):
    # first pass: the largest N ran 8x slow (exponent ~ 3.5); the second pass is clean (exponent 2)
    measure, calls = fake_measure(lambda n, k: (n / 64.0) ** 2 * (8.0 if (n == 256 and k == 1) else 1.0))
    monkeypatch.setattr(bench, "measure", measure)
    rows, exps = bench.cost_table(["full"], [64, 128, 256], expect={"full": (1.8, 2.2)},
                                  expect_memory={"full": (1.9, 2.1)}, verbose=False)
    assert exps["full"]["time"] == pytest.approx(2.0)
    assert calls == {64: 2, 128: 2, 256: 2}          # one retry was enough
    assert rows["full"][-1]["time_s"] == pytest.approx(16.0)   # the smaller of the two times kept


def test_a_time_exponent_that_stays_outside_fails_naming_the_label(monkeypatch):
    measure, calls = fake_measure(lambda n, k: float(n))   # exponent 1, every time
    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(AssertionError, match=r"full: time exponent 1\.00 outside \(1\.8, 2\.2\)"):
        bench.cost_table(["full"], [64, 128], expect={"full": (1.8, 2.2)}, verbose=False, retries=2)
    assert calls == {64: 3, 128: 3}                   # measured, then twice again


def test_memory_is_not_measured_again_and_its_failure_is_named(monkeypatch):
    measure, calls = fake_measure(lambda n, k: float(n))
    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(AssertionError, match=r"full: memory exponent 2\.00 outside \(0\.8, 1\.2\)"):
        bench.cost_table(["full"], [64, 128], expect_memory={"full": (0.8, 1.2)}, verbose=False)
    assert calls == {64: 1, 128: 1}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ns: full needs at least two distinct lengths"):
        bench.cost_table(["full"], [64, 64], verbose=False)
    with pytest.raises(ValueError, match="expect: 'local' is not one of the measured"):
        bench.cost_table(["full"], [32, 64], expect={"local": (0, 3)}, verbose=False, repeats=1)


def test_a_real_measurement_of_full_attention_has_a_quadratic_memory_exponent():
    rows, exps = bench.cost_table(["full"], [128, 256, 512], repeats=1, verbose=False,
                                  expect_memory={"full": (1.5, 2.3)})
    assert [r["n"] for r in rows["full"]] == [128, 256, 512]
