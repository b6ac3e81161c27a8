"""Measurements of the downsampling layers (issue 14, notebook 08): ``python -m effattn.tools.downsampling``.

* :func:`time_perceiver`: forward + backward time and peak memory (tracemalloc) of the ``perceiver``
  layer (m latents, one latent block) against ``full`` attention (one head of size d) over N,
  float32, with fitted exponents.
* :func:`time_funnel`: one training step (forward + backward) of a 3-stage :class:`FunnelEncoder`
  against the plain :class:`~effattn.models.Encoder` of the same depth and width at length N.
* :func:`compare_training`: plain / funnel / perceiver encoders trained the same number of steps on
  an encoder task: held-out accuracy, seconds, parameters and the peak memory of one step.

Times are the median of ``repeats`` runs, CPU clock on one BLAS thread by default (steady on a
shared machine); quote ratios from one run.
"""
from __future__ import annotations

import json

import numpy as np

from .. import registry
from ..backend import set_blas_threads
from ..layers import perceiver as perceiver_layer
from ..models import Encoder
from ..models.downsampling import FunnelEncoder
from .bench import fit_exponent, peak_bytes as _peak, time_median as _time

def time_perceiver(ns=(1024, 2048, 4096, 8192, 16384), *, m=256, d=64, repeats=3, clock="cpu", full_max=16384):
    """Rows {n, perceiver_s, full_s, perceiver_bytes, full_bytes} and the exponents of both."""
    full = registry.get("full")
    rows = []
    for n in ns:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, n, d)).astype("float32")
        p = perceiver_layer.init_params(rng, d, n_latents=m, latent_layers=1, dtype="float32")

        def run_p():
            out, c = perceiver_layer.forward(x, heads=1, latent_layers=1, **p)
            perceiver_layer.backward(np.ones_like(out), c)

        q, k, v = (rng.standard_normal((1, 1, n, d)).astype("float32") for _ in range(3))

        def run_f():
            out, c = full.forward(q, k, v)
            full.backward(np.ones_like(out), c)

        row = {"n": n, "perceiver_s": _time(run_p, repeats, clock), "perceiver_bytes": _peak(run_p)}
        if n <= full_max:
            row.update(full_s=_time(run_f, repeats, clock), full_bytes=_peak(run_f))
        rows.append(row)
    ex = {key: fit_exponent([r["n"] for r in rows if key in r], [r[key] for r in rows if key in r])
          for key in ("perceiver_s", "full_s", "perceiver_bytes", "full_bytes")}
    return rows, ex


def _step(model, ids):
    batch = {"x": ids, "y": np.zeros(ids.shape[0], dtype=np.int64)}
    return lambda: model.loss_and_backward(batch)


def time_funnel(n=4096, *, d_model=64, heads=1, stages=(2, 2, 2), repeats=3, clock="cpu", batch=1):
    """{"funnel_s", "plain_s", "ratio"} for one training step of each at length n."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (batch, n))
    kw = dict(d_model=d_model, heads=heads, max_len=n, dtype="float32")
    funnel = FunnelEncoder(8, 4, np.random.default_rng(1), stages=stages, **kw)
    plain = Encoder(8, 4, np.random.default_rng(1), layers=sum(stages), **kw)
    out = {"n": n, "stages": list(stages), "lengths": None}
    out["funnel_s"] = _time(_step(funnel, ids), repeats, clock)
    out["lengths"] = funnel.cache
    out["plain_s"] = _time(_step(plain, ids), repeats, clock)
    out["ratio"] = out["plain_s"] / out["funnel_s"]
    return out


def compare_training(task="listops", *, steps=300, seed=0, archs=("plain", "funnel", "perceiver"), **options):
    """Train each architecture ``steps`` steps with the same settings: rows {arch, accuracy, loss,
    seconds, params, step_bytes} (step_bytes: tracemalloc's peak of one training step)."""
    from .train import train_model

    rows = []
    for arch in archs:
        extra = dict(options)
        if arch == "funnel":
            extra.setdefault("stages", "1,1,1")
        if arch == "perceiver":
            extra.setdefault("latents", 16)
        if arch == "plain":
            extra.setdefault("layers", 3)
        run = train_model(task, steps=steps, seed=seed, arch=arch, progress=False, eval_every=0, **extra)
        model, t = run["model"], run["task"]
        b = t.batch(np.random.default_rng(5), 32)
        rows.append({"arch": arch, "accuracy": run["result"]["accuracy"], "loss": run["result"]["loss"],
                     "seconds": run["result"]["seconds"], "params": run["result"]["params"],
                     "step_bytes": _peak(lambda: model.loss_and_backward(b))})
    return rows


def claims(*, n_perceiver=16384, n_funnel=4096):
    """The issue's performance claims in one dict (one run, one thread, CPU clock)."""
    rows, ex = time_perceiver(ns=(1024, 4096, n_perceiver))
    last = rows[-1]
    f = time_funnel(n_funnel)
    return {"perceiver_speedup_at_n": last["full_s"] / last["perceiver_s"],
            "perceiver_memory_exponent": ex["perceiver_bytes"], "perceiver_time_exponent": ex["perceiver_s"],
            "full_time_exponent": ex["full_s"], "funnel_speedup": f["ratio"], "funnel_lengths": f["lengths"],
            "perceiver_rows": rows}


def main():
    set_blas_threads(1)
    print(json.dumps(claims(), indent=1, default=float))


if __name__ == "__main__":
    main()
