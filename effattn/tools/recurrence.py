"""Measurements of the recurrent layers (notebook 07): ``python -m effattn.tools.recurrence``.

* :func:`time_segment`: forward + backward of one ``transformer_xl`` segment of N tokens with a
  memory of L states, L varied (and L = 0, the baseline): CPU time and peak memory (tracemalloc), with
  the exponents fitted in L, in M = L + N (the keys a query scores) and of the cost the memory adds to
  the baseline. The cost is O(N M D) = a + b L: linear in L on top of the segment's own N^2 part, so
  the plain exponent in L is below 1 unless L >> N; the added cost's exponent is the one near 1.
* :func:`segments_vs_full`: a sequence of T = segments * N tokens processed segment by segment
  (forward + backward of each, the memory handed on with ``next_memory``) against all T tokens at once
  -- the registered kernel ``full``, causal, and the same ``transformer_xl`` layer without memory over
  the T tokens, causal (projections, relative positions and LayerNorm included: the like-for-like
  comparison) -- and the ratios.

Float32, batch 1, D = heads * d. Times are the median of ``repeats`` runs of the CPU clock
(:data:`effattn.tools.bench.CLOCKS`) on ``threads`` BLAS thread(s) (1 by default, restored afterwards,
as :func:`effattn.tools.bench.cost_table` does): steady on a shared machine; quote ratios from one run.
Peak memory: what tracemalloc sees forward + backward allocate beyond the inputs.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager

import numpy as np

from .. import backend
from ..attention import full as full_kernel
from ..layers import transformer_xl as xl
from ..validate import check_int
from .bench import CLOCKS, blas_threads, fit_exponent, peak_bytes as _peak, time_median as _time


@contextmanager
def _pinned(threads):
    """``threads`` BLAS threads inside the block (None: leave them), the count restored afterwards."""
    before = blas_threads()
    pinned = threads is not None and backend.get_backend() == "numpy" and backend.set_blas_threads(threads)
    try:
        yield
    finally:
        if pinned and before is not None:
            backend.set_blas_threads(before)


def _layer_step(x, heads, params, *, memory=None, memory_mask=None, mem_len=None):
    """forward + backward of one segment (causal); returns the next (memory, memory_mask). The cache
    and the gradients are dropped before returning, so that a loop holds one segment's work at a time."""
    out, cache = xl.forward(x, memory=memory, memory_mask=memory_mask, causal=True, heads=heads, mem_len=mem_len,
                            **params)
    xl.backward(np.ones_like(out), cache)
    nxt = xl.next_memory(cache)
    del out, cache
    return nxt


def time_segment(n=512, mem_lens=(512, 1024, 2048, 4096), d=64, heads=1, repeats=3, clock="cpu", threads=1,
                 expect=None, retries=1):
    """One causal ``transformer_xl`` segment of ``n`` tokens with a memory of L states, for each L in
    ``mem_lens`` and for L = 0 (no memory, the baseline): forward + backward, float32, D = heads * d,
    batch 1.

    Returns ``(rows, exponents)``: rows {mem_len, m (= L + n), time_s, peak_bytes, added_s, added_bytes}
    in L order, the first the baseline L = 0 (``added_*``: minus the baseline, what the memory costs);
    exponents (:func:`effattn.tools.bench.fit_exponent`, over the L > 0 rows) {"time", "memory"} fitted
    against L, {"time_vs_m", "memory_vs_m"} against M = L + n, {"added_time", "added_memory"} of the
    added cost against L. The cost is a + b L (a: the segment's own N^2 part and the fixed work), so
    the first pair is below 1 unless L >> N; the last pair is the one that reads "linear" as 1.

    ``expect``: ``{exponent name: (lo, hi)}`` sanity ranges, checked as ``cost_table`` does: a time
    exponent outside its range has every point timed again (``retries`` times at most), each keeping
    its smaller time (a busy machine only adds time); then any exponent still outside raises
    AssertionError (memory is deterministic and measured once)."""
    n, d, heads = check_int("n", n), check_int("d", d), check_int("heads", heads)
    mem_lens = [check_int("mem_len", L) for L in mem_lens]
    if len(set(mem_lens)) < 2:
        raise ValueError(f"mem_lens must hold at least two distinct lengths (an exponent is fitted), got {mem_lens}")
    D = heads * d
    runs, rows = [], []
    for L in [0] + sorted(set(mem_lens)):
        rng = np.random.default_rng(0)
        p = xl.init_params(rng, D, heads, dtype="float32")
        x = rng.standard_normal((1, n, D)).astype("float32")
        memory = rng.standard_normal((1, L, D)).astype("float32") if L else None
        runs.append(lambda x=x, p=p, memory=memory, L=L: _layer_step(x, heads, p, memory=memory, mem_len=L))
        rows.append({"mem_len": L, "m": L + n})
    with _pinned(threads):
        for r, run in zip(rows, runs):
            r["time_s"], r["peak_bytes"] = _time(run, repeats, clock), _peak(run)
    expect = dict(expect or {})

    def fit():
        base, rs = rows[0], rows[1:]
        for r in rows:
            r["added_s"], r["added_bytes"] = r["time_s"] - base["time_s"], r["peak_bytes"] - base["peak_bytes"]
        ls, ms = [r["mem_len"] for r in rs], [r["m"] for r in rs]
        t, b = [r["time_s"] for r in rs], [r["peak_bytes"] for r in rs]
        return {"time": fit_exponent(ls, t), "memory": fit_exponent(ls, b), "time_vs_m": fit_exponent(ms, t),
                "memory_vs_m": fit_exponent(ms, b), "added_time": fit_exponent(ls, [r["added_s"] for r in rs]),
                "added_memory": fit_exponent(ls, [r["added_bytes"] for r in rs])}

    def outside(ex, keys):
        return [f"{k} exponent {ex[k]:.2f} outside {expect[k]}" for k in keys
                if not expect[k][0] < ex[k] < expect[k][1]]

    for key in expect:
        if key not in ("time", "memory", "time_vs_m", "memory_vs_m", "added_time", "added_memory"):
            raise ValueError(f"expect: unknown exponent {key!r}")
    ex = fit()
    time_keys = [k for k in expect if "time" in k]
    for _ in range(retries):
        bad = outside(ex, time_keys)
        if not bad:
            break
        print("measured again (a busy machine only adds time): " + "; ".join(bad))
        with _pinned(threads):
            for r, run in zip(rows, runs):
                r["time_s"] = min(r["time_s"], _time(run, repeats, clock))
        ex = fit()
    bad = outside(ex, list(expect))
    if bad:
        raise AssertionError("time_segment: " + "; ".join(bad))
    return rows, ex


def segments_vs_full(n=512, segments=16, mem_len=512, d=64, heads=1, repeats=1, clock="cpu", threads=1):
    """T = ``segments`` * ``n`` tokens: segment by segment against all at once (float32, batch 1).

    * ``xl_segments``: the ``segments`` segments one after another, each a causal ``transformer_xl``
      forward + backward with the memory of ``mem_len`` states that ``next_memory`` hands on (the first
      segment has none); time of the whole loop, peak memory of the whole loop (one segment's work at a
      time, plus the memory carried).
    * ``full``: the registered kernel ``full`` (:mod:`effattn.attention.full`), causal, forward + backward
      over the T tokens (q, k, v (1, heads, T, d) given: attention alone, no projections; its causal path
      skips the tiles above the diagonal).
    * ``xl_at_once``: the same layer with no memory over the T tokens at once, causal: what the segments
      compute but with the whole past visible (projections, relative positions, LayerNorm: like for like;
      it scores all T x T pairs and the (T, 2T - 1) positional product, masked).

    Returns {"n", "segments", "mem_len", "t", and for each of the three ``<name>_s`` and ``<name>_bytes``,
    then ``full_over_xl_time``, ``full_over_xl_memory``, ``at_once_over_xl_time``, ``at_once_over_xl_memory``}.
    ``repeats`` runs each after one warm-up (1: the large ones are slow); the warm-up is skipped then."""
    n, segments, d, heads = (check_int(k, v) for k, v in (("n", n), ("segments", segments), ("d", d),
                                                          ("heads", heads)))
    mem_len = check_int("mem_len", mem_len, minimum=0)
    D, t = heads * d, n * segments
    rng = np.random.default_rng(0)
    p = xl.init_params(rng, D, heads, dtype="float32")
    x = rng.standard_normal((1, t, D)).astype("float32")

    def run_segments():
        memory = mask = None
        for s in range(segments):
            memory, mask = _layer_step(x[:, s * n:(s + 1) * n], heads, p, memory=memory, memory_mask=mask,
                                       mem_len=mem_len)

    def run_at_once():
        _layer_step(x, heads, p, mem_len=0)

    q, k, v = (rng.standard_normal((1, heads, t, d)).astype("float32") for _ in range(3))

    def run_full():
        out, cache = full_kernel.forward(q, k, v, causal=True)
        full_kernel.backward(np.ones_like(out), cache)

    out = {"n": n, "segments": segments, "mem_len": mem_len, "t": t, "d": d, "heads": heads, "clock": clock}
    warm = repeats > 1
    with _pinned(threads):
        for name, f in (("xl_segments", run_segments), ("full", run_full), ("xl_at_once", run_at_once)):
            out[f"{name}_s"] = _time(f, repeats, clock, warmup=warm)
            out[f"{name}_bytes"] = _peak(f)
    out["full_over_xl_time"] = out["full_s"] / out["xl_segments_s"]
    out["full_over_xl_memory"] = out["full_bytes"] / out["xl_segments_bytes"]
    out["at_once_over_xl_time"] = out["xl_at_once_s"] / out["xl_segments_s"]
    out["at_once_over_xl_memory"] = out["xl_at_once_bytes"] / out["xl_segments_bytes"]
    return out


def format_segment_table(rows, exponents, n):
    lines = [f"transformer_xl, one causal segment of N = {n} with a memory of L: forward + backward",
             f"{'L':>6s} {'M = L + N':>10s} {'time (ms)':>10s} {'peak MiB':>9s} {'added ms':>9s} {'added MiB':>10s}"]
    for r in rows:
        lines.append(f"{r['mem_len']:6d} {r['m']:10d} {r['time_s'] * 1e3:10.1f} {r['peak_bytes'] / 2**20:9.1f} "
                     f"{r['added_s'] * 1e3:9.1f} {r['added_bytes'] / 2**20:10.2f}")
    lines.append(f"exponents in L: time {exponents['time']:.2f}, memory {exponents['memory']:.2f}; "
                 f"in M = L + N: time {exponents['time_vs_m']:.2f}, memory {exponents['memory_vs_m']:.2f}; "
                 f"of the cost added to L = 0, in L: time {exponents['added_time']:.2f}, "
                 f"memory {exponents['added_memory']:.2f}")
    return "\n".join(lines)


def format_full_table(r):
    lines = [f"T = {r['segments']} segments x N = {r['n']} = {r['t']} tokens, memory L = {r['mem_len']}, "
             f"D = {r['heads'] * r['d']} ({r['heads']} head(s)); forward + backward, causal",
             f"{'':44s} {'time (s)':>9s} {'peak MiB':>9s}"]
    for key, what in (("xl_segments", f"transformer_xl, {r['segments']} segments one after another"),
                      ("full", f"full (attention alone) over the {r['t']} tokens"),
                      ("xl_at_once", f"transformer_xl over the {r['t']} tokens at once")):
        lines.append(f"{what:44s} {r[key + '_s']:9.2f} {r[key + '_bytes'] / 2**20:9.1f}")
    lines.append(f"full / segments: time {r['full_over_xl_time']:.1f}x, memory {r['full_over_xl_memory']:.1f}x; "
                 f"layer at once / segments: time {r['at_once_over_xl_time']:.1f}x, "
                 f"memory {r['at_once_over_xl_memory']:.1f}x")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="segment length N (default 512)")
    ap.add_argument("--mem-lens", default="512,1024,2048,4096", help="memory lengths L of time_segment")
    ap.add_argument("--segments", type=int, default=16, help="segments of segments_vs_full (default 16)")
    ap.add_argument("--mem-len", type=int, default=512, help="memory L of segments_vs_full (default 512)")
    ap.add_argument("--d", type=int, default=64, help="head size (default 64)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of time_segment (segments_vs_full: 1)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    ap.add_argument("--skip-full", action="store_true", help="time_segment only")
    args = ap.parse_args(argv)
    mem_lens = [int(s) for s in args.mem_lens.split(",") if s.strip()]
    rows, ex = time_segment(args.n, mem_lens, d=args.d, heads=args.heads, repeats=args.repeats, clock=args.clock,
                            threads=args.threads)
    print(format_segment_table(rows, ex, args.n), flush=True)
    if not args.skip_full:
        print()
        print(format_full_table(segments_vs_full(args.n, args.segments, args.mem_len, d=args.d, heads=args.heads,
                                                 clock=args.clock, threads=args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
