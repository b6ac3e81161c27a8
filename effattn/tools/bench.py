"""Time and peak-memory scaling of every mechanism against the sequence length N.

For each mechanism and N: forward + backward on one (B = H = 1) example in
float32 with d = 64, the median wall time of ``repeats`` runs, and the peak
memory that ``tracemalloc`` sees (NumPy registers its buffers with it) in a
separate run, counting only what forward + backward allocate beyond the
inputs. Then:

- the exponent ``p`` of a least-squares fit ``time ~ N^p`` (and memory);
- the ratio to ``full`` at each N (time and memory);
- the machine's float32 matmul rate measured in the same run, and the share
  of it that ``full`` reaches (full's forward + backward does 12 N^2 d flops:
  QK^T, PV forward; dV, dP, dQ, dK backward).

Machines here are shared and noisy: quote ratios and exponents, not lone
absolute times.
"""
from __future__ import annotations

import csv
import gc
import math
import os
import sys
import time
import tracemalloc

import numpy as np

from .. import backend
from ..registry import get, names
from ..validate import check_int, check_positive_float

DEFAULT_N = (1024, 2048, 4096, 8192, 16384)
QUICK_N = (256, 512, 1024, 2048)
# bench --peers: what to install (development tools, never dependencies), and where its timing code lives
PEERS_INSTALL = ("pip install torch==2.13.0 local-attention reformer-pytorch routing-transformer performer-pytorch "
                 "sinkhorn-transformer")
PEERS_SCRIPT = os.path.join("benchmarks", "peers.py")


def _sync():
    if backend.get_backend() == "cupy":
        backend.xp().cuda.Stream.null.synchronize()


def matmul_rate(n=1024, repeats=5, dtype="float32"):
    """float32 GEMM rate (flop/s) of this machine: median over repeats of (n x n) @ (n x n)."""
    xp = backend.xp()
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((n, n)), dtype=dtype)
    b = backend.asarray(rng.standard_normal((n, n)), dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        a @ b
        _sync()
        times.append(time.perf_counter() - t0)
    del xp
    return 2.0 * n ** 3 / float(np.median(times))


def attention_gemm_rate(n=4096, d=64, repeats=3, dtype="float32"):
    """flop/s of the six products of full attention's forward + backward at this N and d
    (QK^T, PV, P^T dO, dO V^T, dS K, dS^T Q): the rate full could reach if its softmax
    passes were free. Context for the fraction of the square-matmul rate."""
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((n, d)), dtype=dtype)
    b = backend.asarray(rng.standard_normal((n, d)), dtype=dtype)
    s = a @ b.T
    steps = (lambda: a @ b.T, lambda: s @ a, lambda: s.T @ a, lambda: a @ b.T, lambda: s @ a, lambda: s.T @ a)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        for f in steps:
            f()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 12.0 * n * n * d / best


def _case(spec, n, d, dtype, causal):
    case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=n, d=d, causal=causal, dtype=dtype)
    return case


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(spec, n, *, d=64, dtype="float32", causal=False, repeats=3, clock="wall"):
    """One point: dict(name, n, time_s, peak_bytes) for forward + backward of ``spec``'s
    example at length n (B = H = 1, head size d). ``clock="cpu"`` times with the process's
    CPU time, which other users of a shared machine barely move (on one BLAS thread it
    equals the work done); "wall" is what a user waits. Kernels and layers alike."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    repeats = check_int("repeats", repeats)
    tick = CLOCKS[clock]
    case = _case(spec, n, d, dtype, causal)
    out, cache = spec.forward(**case.inputs, **case.config)
    dout = backend.xp().ones_like(out)
    del out, cache
    gc.collect()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = tick()
        out, cache = spec.forward(**case.inputs, **case.config)
        spec.backward(dout, cache)
        _sync()
        times.append(tick() - t0)
        del out, cache
    peak = float("nan")
    if backend.get_backend() == "numpy":
        gc.collect()
        tracemalloc.start()
        try:
            out, cache = spec.forward(**case.inputs, **case.config)
            spec.backward(dout, cache)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        del out, cache
    return {"name": spec.name, "n": n, "d": d, "dtype": dtype, "causal": causal, "clock": clock,
            "time_s": float(np.median(times)), "peak_bytes": float(peak)}


def time_median(f, repeats=3, clock="cpu", warmup=True):
    """Median of ``repeats`` runs of f() on the clock ``clock`` ("cpu" or "wall"), after one warm-up run."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    tick = CLOCKS[clock]
    if warmup:
        f()
    times = []
    for _ in range(check_int("repeats", repeats)):
        t0 = tick()
        f()
        times.append(tick() - t0)
    return float(np.median(times))


def peak_bytes(f):
    """The peak bytes tracemalloc sees while f() runs (what f allocates beyond what exists already)."""
    gc.collect()
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def fit_exponent(ns, values):
    """Slope of the least-squares line through (log N, log value)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return float("nan")
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def run(mech_names=None, ns=DEFAULT_N, *, d=64, dtype="float32", causal=False, repeats=3,
        full_max_n=16384, max_seconds=60.0, progress=True, clock="wall", threads=None):
    """Measure every requested mechanism at every N. Returns (rows, summary dict).

    ``full`` is skipped above ``full_max_n`` (an N x N float32 matrix at 65536 is 16 GiB);
    a mechanism whose last point took longer than ``max_seconds`` skips its larger N.
    ``progress``: a tqdm bar on a terminal; off one (or with ``TQDM_DISABLE`` set) one line per
    mechanism on stderr instead, so that a long run in a log is not silent.
    Every size is checked first (ValueError naming it): ``ns`` needs two distinct positive
    lengths at least, since an exponent is fitted through them.
    """
    from tqdm import tqdm

    ns = [check_int("n", n) for n in ns]
    if len(set(ns)) < 2:
        raise ValueError(f"ns must hold at least two distinct lengths (an exponent cannot be fitted from one N), got {ns}")
    check_int("d", d)
    check_int("repeats", repeats)
    check_int("full_max_n", full_max_n)
    check_positive_float("max_seconds", max_seconds)
    if threads is not None:
        check_int("threads", threads)
    mech_names = list(mech_names or names())
    if "full" not in mech_names:
        mech_names = ["full"] + mech_names
    for name in mech_names:
        get(name)  # unknown names fail before any work
    if threads is not None and not backend.set_blas_threads(threads):
        raise RuntimeError("could not set the BLAS thread count (no OpenBLAS found); run without --threads")
    rate = matmul_rate()
    gemm_n = min(max(ns), full_max_n, 4096)
    gemm_rate = attention_gemm_rate(gemm_n, d)
    rows = []
    # a bar on a terminal; off one (a log, CI) or with TQDM_DISABLE set, one line per mechanism on stderr
    off = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    bar = tqdm(total=len(mech_names) * len(ns), desc="bench", unit="point", disable=True if off else None)
    lines = progress and bar.disable
    for i, name in enumerate(mech_names, 1):
        spec = get(name)
        t0, done = time.perf_counter(), []
        for n in sorted(ns):
            bar.set_postfix_str(f"{name} N={n}")
            bar.update(1)
            if (causal and not spec.causal) or (name == "full" and n > full_max_n):
                continue
            row = measure(spec, n, d=d, dtype=dtype, causal=causal, repeats=repeats, clock=clock)
            rows.append(row)
            done.append(n)
            if row["time_s"] * repeats > max_seconds:
                break                                # its larger N would take longer still
        if lines:
            what = f"N = {done[0]}..{done[-1]}" if done else "skipped (not causal)" if causal and not spec.causal else "skipped"
            print(f"bench [{i}/{len(mech_names)}] {name}: {what}, {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
    bar.close()
    summary = summarise(rows, rate, d)
    summary["attention_gemm_gflops"] = gemm_rate / 1e9
    summary["attention_gemm_n"] = gemm_n
    return rows, summary


def summarise(rows, rate, d):
    full = {r["n"]: r for r in rows if r["name"] == "full"}
    for r in rows:
        f = full.get(r["n"])
        r["speedup_vs_full"] = f["time_s"] / r["time_s"] if f else float("nan")
        r["memory_vs_full"] = r["peak_bytes"] / f["peak_bytes"] if f and f["peak_bytes"] else float("nan")
    summary = {"matmul_gflops": rate / 1e9, "mechanisms": {}}
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((r for r in rows if r["name"] == name), key=lambda r: r["n"])
        ns = [r["n"] for r in pts]
        summary["mechanisms"][name] = {
            "n": ns,
            "time_exponent": fit_exponent(ns, [r["time_s"] for r in pts]),
            "memory_exponent": fit_exponent(ns, [r["peak_bytes"] for r in pts]),
        }
    if full:
        nmax = max(full)
        summary["full_fraction_of_matmul_by_n"] = {n: 12.0 * n * n * d / r["time_s"] / rate for n, r in full.items()}
        summary["full_peak_in_nn_matrices_by_n"] = {n: r["peak_bytes"] / (n * n * 4) for n, r in full.items()}
        summary["full_fraction_of_matmul"] = summary["full_fraction_of_matmul_by_n"][nmax]
        summary["full_peak_in_nn_matrices"] = summary["full_peak_in_nn_matrices_by_n"][nmax]
        summary["full_n"] = nmax
    return summary


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = ["name", "n", "d", "dtype", "causal", "time_s", "peak_bytes", "speedup_vs_full", "memory_vs_full"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def format_table(rows, summary):
    lines = [f"float32 matmul rate (1024 x 1024 GEMM): {summary['matmul_gflops']:.1f} GFLOP/s"]
    if "attention_gemm_gflops" in summary:
        lines.append(f"full attention's own six GEMMs alone at N={summary['attention_gemm_n']}: "
                     f"{summary['attention_gemm_gflops']:.1f} GFLOP/s "
                     f"({100 * summary['attention_gemm_gflops'] / summary['matmul_gflops']:.0f}% of the matmul rate)")
    for n, frac in summary.get("full_fraction_of_matmul_by_n", {}).items():
        lines.append(f"full at N={n}: forward + backward at {100 * frac:.0f}% of the matmul rate, "
                     f"peak memory {summary['full_peak_in_nn_matrices_by_n'][n]:.2f} N x N float32 matrices")
    lines.append(f"{'mechanism':22s} {'N':>6s} {'time (s)':>10s} {'peak MiB':>9s} {'x faster':>9s} {'mem/full':>9s}")
    for r in rows:
        lines.append(f"{r['name']:22s} {r['n']:6d} {r['time_s']:10.4f} {r['peak_bytes'] / 2**20:9.1f} "
                     f"{r['speedup_vs_full']:9.2f} {r['memory_vs_full']:9.3f}")
    lines.append("")
    lines.append(f"{'mechanism':22s} {'N range':>14s} {'time exp':>9s} {'mem exp':>8s}")
    for name, s in summary["mechanisms"].items():
        rng = f"{s['n'][0]}-{s['n'][-1]}" if s["n"] else "-"
        lines.append(f"{name:22s} {rng:>14s} {s['time_exponent']:9.2f} {s['memory_exponent']:8.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- decoding
def decode_trace(spec, *, prompt, steps, d=64, dtype="float32", clock="wall"):
    """Decode ``steps`` tokens after a ``prompt``-token prefill with ``spec``'s step (B = H = 1):
    dict(name, prompt, prefill_s, time_s (steps,): each step's time, size (steps,): the numbers
    the state holds after each step (``nn.decode.state_size``))."""
    from ..nn.decode import state_size

    if spec.step is None:
        raise ValueError(f"{spec.name} has no step (see its WHY_NO_STEP)")
    prompt, steps = check_int("prompt", prompt), check_int("steps", steps)
    tick = CLOCKS[clock]
    case = _case(spec, prompt + steps, d, dtype, True)
    i = case.inputs
    q, k, v = i["q"], i["k"], i["v"]
    config = {key: a for key, a in {**i, **case.config}.items() if key not in ("q", "k", "v", "causal")}
    state = spec.init_state(lead=tuple(q.shape[:-2]), d=d, dv=v.shape[-1], dtype=dtype, **config)
    t0 = tick()
    _, state = spec.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state)
    _sync()
    prefill_s = tick() - t0
    times, sizes = np.zeros(steps), np.zeros(steps, dtype=np.int64)
    for s in range(steps):
        t = prompt + s
        qt, kt, vt = q[..., t, :], k[..., t, :], v[..., t, :]
        t0 = tick()
        _, state = spec.step(qt, kt, vt, state)
        _sync()
        times[s] = tick() - t0
        sizes[s] = state_size(state)
    return {"name": spec.name, "prompt": prompt, "prefill_s": prefill_s, "time_s": times, "size": sizes}


def recompute_time(spec, n, *, d=64, dtype="float32", repeats=3, clock="wall"):
    """The time to get token n's row by recomputing the causal forward over all n tokens (what
    generation without a decoder state pays at every token)."""
    tick = CLOCKS[clock]
    case = _case(spec, n, d, dtype, True)
    spec.forward(**case.inputs, **case.config)
    times = []
    for _ in range(check_int("repeats", repeats)):
        _sync()
        t0 = tick()
        spec.forward(**case.inputs, **case.config)
        _sync()
        times.append(tick() - t0)
    return float(np.median(times))


def decode_run(mech_names=None, *, prompt=4096, steps=4096, d=64, dtype="float32", window=256, clock="wall",
               progress=True):
    """Per-token decoding cost of every mechanism with a step: the mean step time over the first
    and the last ``window`` steps, their ratio, the state size at both ends; for ``full`` also
    the time of recomputing the prefix at the last position, and how many times slower that is.
    Returns (rows, traces)."""
    from tqdm.auto import tqdm

    window = check_int("window", window)
    chosen = [n for n in (mech_names or names("kernel")) if get(n).step is not None]
    rows, traces = [], []
    for name in tqdm(chosen, desc="decode", disable=not progress):
        tr = decode_trace(get(name), prompt=prompt, steps=steps, d=d, dtype=dtype, clock=clock)
        w = min(window, steps)
        first, last = float(tr["time_s"][:w].mean()), float(tr["time_s"][-w:].mean())
        row = {"name": name, "prompt": prompt, "steps": steps, "first_s": first, "last_s": last,
               "ratio": last / first, "size_first": int(tr["size"][0]), "size_last": int(tr["size"][-1]),
               "bounded": get(name).bounded_state, "recompute_s": float("nan"), "speedup": float("nan")}
        if name == "full":
            row["recompute_s"] = recompute_time(get(name), prompt + steps, d=d, dtype=dtype, clock=clock)
            row["speedup"] = row["recompute_s"] / last
        rows.append(row)
        traces.append(tr)
    return rows, traces


def format_decode_table(rows):
    lines = [f"{'mechanism':22s} {'first ms/token':>14s} {'last ms/token':>14s} {'last/first':>10s} "
             f"{'state first':>12s} {'state last':>12s} {'recompute ms':>13s} {'x faster':>9s}"]
    for r in rows:
        extra = (f"{1e3 * r['recompute_s']:13.2f} {r['speedup']:9.1f}" if math.isfinite(r["recompute_s"])
                 else f"{'-':>13s} {'-':>9s}")
        lines.append(f"{r['name']:22s} {1e3 * r['first_s']:14.3f} {1e3 * r['last_s']:14.3f} {r['ratio']:10.2f} "
                     f"{r['size_first']:12d} {r['size_last']:12d} {extra}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the notebooks' cost cells
def blas_threads():
    """The host OpenBLAS's thread count now, or None when no OpenBLAS is loaded (read the way
    ``backend.set_blas_threads`` writes it)."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({line.split()[-1] for line in fh if "openblas" in line and ".so" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for fn in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                   "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, fn):
                return int(getattr(lib, fn)())
    return None


def cost_table(names, ns, *, causal=False, d=64, repeats=3, expect=None, expect_memory=None, dtype="float32",
               threads=1, verbose=True, retries=2):
    """The measured cost of the notebooks, one helper for all: forward + backward of each mechanism's
    example (B = H = 1, head size ``d``) at each N, timed with the process's CPU time on ``threads``
    BLAS thread(s) (the count is restored afterwards), the median of ``repeats`` runs, and the peak
    memory that ``tracemalloc`` sees (:func:`measure` with ``clock="cpu"``).

    ``names``: registry names (or ``Mechanism`` objects, e.g. an unregistered baseline made with
    ``dataclasses.replace``), or ``(name, causal)`` pairs (label "name causal"); ``causal`` is the
    default of the plain names. ``ns``: the lengths, one list for all or ``{label: list}`` (labels not
    in it get ``ns["*"]``). ``expect`` / ``expect_memory``: ``{label: (lo, hi)}`` sanity ranges of the
    fitted time / memory exponents; a time exponent outside its range is measured again (up to
    ``retries`` times, each point keeping its smallest time: a busy machine only adds time), and
    after printing the table, an exponent still outside its range raises AssertionError naming the
    label, the exponent and the range.

    Returns ``(rows, exponents)``: ``rows[label]`` the :func:`measure` dicts in N order,
    ``exponents[label] = {"time": ..., "memory": ..., "n": [...]}`` (:func:`fit_exponent`).
    """
    def spec_of(e):
        return get(e) if isinstance(e, str) else e   # unknown names fail before any work

    entries = [(spec_of(e), causal) if not isinstance(e, tuple) else (spec_of(e[0]), bool(e[1])) for e in names]
    labels = [spec.name if not isinstance(e, tuple) else spec.name + (" causal" if c else "")
              for e, (spec, c) in zip(names, entries)]
    if isinstance(ns, dict):
        sizes = {label: list(ns.get(label, ns.get("*", ()))) for label in labels}
    else:
        sizes = {label: list(ns) for label in labels}
    for label, s in sizes.items():
        if len(set(s)) < 2:
            raise ValueError(f"ns: {label} needs at least two distinct lengths, got {s}")
    before = blas_threads()
    pinned = threads is not None and backend.get_backend() == "numpy" and backend.set_blas_threads(threads)
    rows, exponents, specs = {}, {}, {}
    try:
        for (spec, c), label in zip(entries, labels):
            rows[label] = [measure(spec, n, d=d, dtype=dtype, causal=c, repeats=repeats, clock="cpu")
                           for n in sorted(sizes[label])]
            specs[label] = spec
    finally:
        if pinned and before is not None:
            backend.set_blas_threads(before)
    def fit(label):
        rs = rows[label]
        n_ = [r["n"] for r in rs]
        exponents[label] = {"time": fit_exponent(n_, [r["time_s"] for r in rs]),
                            "memory": fit_exponent(n_, [r["peak_bytes"] for r in rs]), "n": n_}

    def outside(what, ranges):
        bad = {}
        for label, (lo, hi) in ranges.items():
            if label not in exponents:
                raise ValueError(f"expect: {label!r} is not one of the measured {list(exponents)}")
            e = exponents[label][what]
            if not (lo < e < hi):
                bad[label] = f"{label}: {what} exponent {e:.2f} outside ({lo}, {hi})"
        return bad

    for label in rows:
        fit(label)
    # A busy machine only ever adds time, so a time exponent outside its range is measured again
    # (twice at most) and each point keeps its smallest time; memory is deterministic, measured once.
    for _ in range(retries):
        bad = outside("time", expect or {})
        if not bad:
            break
        if verbose:
            print("measured again (a busy machine only adds time): " + "; ".join(bad.values()))
        pinned = threads is not None and backend.get_backend() == "numpy" and backend.set_blas_threads(threads)
        try:
            for label in bad:
                spec, c = dict(zip(labels, entries))[label]
                for r in rows[label]:
                    again = measure(spec, r["n"], d=d, dtype=dtype, causal=c, repeats=repeats, clock="cpu")
                    r["time_s"] = min(r["time_s"], again["time_s"])
        finally:
            if pinned and before is not None:
                backend.set_blas_threads(before)
        for label in bad:
            fit(label)
    if verbose:
        print(format_cost_table(rows, exponents, threads=threads, complexity={k: s.complexity for k, s in specs.items()}))
    failures = {**outside("time", expect or {}), **{k + " memory": v for k, v in outside("memory", expect_memory or {}).items()}}
    if failures:
        raise AssertionError("; ".join(failures.values()))
    return rows, exponents


def format_cost_table(rows, exponents, threads=1, complexity=None):
    """The table :func:`cost_table` prints: per mechanism the survey's complexity, the N range, the two
    fitted exponents, and the CPU time and memory relative to ``full`` at the largest N both have."""
    full = {r["n"]: r for r in rows.get("full", [])}
    lines = [f"forward + backward, B = H = 1, CPU time on {threads} BLAS thread(s), median of the repeats; "
             f"peak memory by tracemalloc",
             f"{'mechanism':20s} {'survey':>16s} {'N range':>11s} {'time exp':>8s} {'mem exp':>8s} "
             f"{'at N':>6s} {'time/full':>9s} {'mem/full':>9s}"]
    for label, rs in rows.items():
        e = exponents[label]
        common = [r for r in rs if r["n"] in full]
        at, tr, mr = "-", "-", "-"
        if common and label != "full":
            r = common[-1]
            at = str(r["n"])
            tr = f"{r['time_s'] / full[r['n']]['time_s']:.2f}"
            mr = f"{r['peak_bytes'] / full[r['n']]['peak_bytes']:.2f}"
        survey = (complexity or {}).get(label) or get(rs[0]["name"]).complexity
        lines.append(f"{label:20s} {survey:>16s} {e['n'][0]:>5d}-{e['n'][-1]:<5d} {e['time']:8.2f} "
                     f"{e['memory']:8.2f} {at:>6s} {tr:>9s} {mr:>9s}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- against the PyTorch peers
def peers_script(root=None):
    """The path of ``benchmarks/peers.py`` in the repository this package was imported from (it is outside the
    package: an installed effattn without its clone has none)."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, PEERS_SCRIPT)


def run_peers(argv=(), script=None):
    """``bench --peers [OPTIONS]``: effattn against the PyTorch peers, timed in one process by
    ``benchmarks/peers.py`` (its ``main(argv)``; its docstring maps every row). Torch and the peers are
    imported there, lazily; without torch this prints the one line of what to install and returns 0, without
    importing it (nor the script's timing code). Returns the exit status."""
    import importlib.util

    script = script or peers_script()
    if not os.path.exists(script):
        print(f"bench --peers: {script} is not here (it is in the repository, not in the installed package): "
              f"run it from a clone of effattn")
        return 0
    try:
        have_torch = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        have_torch = False
    if not have_torch:
        print(f"bench --peers needs torch and the peers, which are not dependencies of effattn: {PEERS_INSTALL}")
        return 0
    spec = importlib.util.spec_from_file_location("effattn_peers_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))

