"""Figures across mechanisms: the overview of every kernel's effective attention, and the
measured scaling curves that ``python -m effattn bench`` writes."""
from __future__ import annotations

import math
import os

import matplotlib.pyplot as plt
import numpy as np

from .. import registry
from .style import host2d, plot_patterns, save


def overview_figure(out_dir, n=32):
    """``overview_patterns.png``: every kernel's effective attention at ``n`` positions, one panel
    each: exact kernels their support (boolean, the pattern colours and their legend), approximations
    |W| on the weight colour map (each panel its own scale: the shape is what is compared)."""
    mats, titles = [], []
    for name in registry.names("kernel"):
        spec = registry.get(name)
        case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=n, d=8, causal=False)
        _, cache = spec.forward(**case.inputs, **case.config)
        w = host2d(spec.weights(cache))
        mats.append(np.abs(w) > 1e-12 if spec.exact else np.abs(w))
        titles.append(f"{spec.name} [{','.join(spec.classes)}]" + (" support" if spec.exact else " |W|"))
    fig = plot_patterns(mats, titles, ncols=6, legend=True,
                        suptitle=f"Effective attention of every kernel (N = {n}): exact kernels show their support, "
                                 f"approximations |W| (viridis, own scale)")
    return save(fig, os.path.join(out_dir, "overview_patterns.png"))


# the panels of the scaling figures: one per survey family (by notebook), full attention in each as the reference
FAMILIES = (("fixed patterns (01)", ("01_fixed_patterns",)),
            ("fixed + global memory (02), memory (04)", ("02_combination_of_patterns", "04_neural_memory")),
            ("learned patterns (03)", ("03_learned_patterns",)),
            ("low rank (05), kernels (06)", ("05_low_rank", "06_kernels")),
            ("techniques (10) and the rest", None))
LINESTYLES = ("-", "--", "-.", ":")


def plot_scaling(rows, value="time_s", ax=None, title=None, ylabel=None, legend_loc="upper left"):
    """Log-log curves of a measured quantity against N, one line per mechanism (``full`` thick and
    black; the others each a distinct colour and line style).

    rows: dicts with keys name, n and ``value``. Returns the axes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.2))
    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append((r["n"], r[value]))
    colours = plt.get_cmap("tab10").colors
    others = [nm for nm in by_name if nm != "full"]
    for name, pts in by_name.items():
        pts.sort()
        if name == "full":
            style = dict(lw=2.4, color="k", ls="-", zorder=3)
        else:
            i = others.index(name)
            style = dict(lw=1.4, color=colours[i % len(colours)], ls=LINESTYLES[(i // len(colours)) % 4])
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, **style)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(ylabel or value)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc=legend_loc, framealpha=0.85)
    return ax


def _family(name):
    nb = registry.get(name).notebook
    for i, (_, notebooks) in enumerate(FAMILIES):
        if notebooks is not None and nb in notebooks:
            return i
    return len(FAMILIES) - 1


def scaling_figures(rows, out_dir, d=64, dtype="float32"):
    """``scaling_time.png`` and ``scaling_memory.png`` from the rows of :func:`effattn.tools.bench.run`:
    small multiples, one panel per survey family, ``full`` in every panel as the reference, the
    y axis shared so that panels compare."""
    paths = []
    for value, label, fname in (("time_s", "forward + backward time (s)", "scaling_time.png"),
                                ("peak_bytes", "peak memory (bytes, tracemalloc)", "scaling_memory.png")):
        pts = [r for r in rows if math.isfinite(r[value])]
        if not pts:
            continue
        groups = {}
        for r in pts:
            if r["name"] != "full":
                groups.setdefault(_family(r["name"]), []).append(r)
        full = [r for r in pts if r["name"] == "full"]
        order = sorted(groups)
        if not order:                                      # full alone
            ax = plot_scaling(full, value=value, ylabel=label, title=f"{label} vs N (d={d}, {dtype})")
            paths.append(save(ax.figure, os.path.join(out_dir, fname)))
            continue
        ncols = min(len(order), 3)
        nrows = -(-len(order) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False, sharex=True,
                                 sharey=True)
        for ax, g in zip(axes.flat, order):
            plot_scaling(full + groups[g], value=value, ax=ax, ylabel=label, title=FAMILIES[g][0])
        for ax in list(axes.flat)[len(order):]:
            ax.axis("off")
        fig.suptitle(f"{label} vs N (d = {d}, {dtype}); full attention in black in every panel")
        fig.tight_layout()
        paths.append(save(fig, os.path.join(out_dir, fname)))
    return paths


def decode_figures(traces, out_dir, d=64, dtype="float32", smooth=64):
    """``decode_state.png`` (the numbers each decoder state holds against the position) and
    ``decode_time.png`` (time per generated token, a running median over ``smooth`` steps) from
    the traces of :func:`effattn.tools.bench.decode_run`."""
    fig_s, ax_s = plt.subplots(figsize=(7, 4))
    fig_t, ax_t = plt.subplots(figsize=(7, 4))
    for tr in traces:
        pos = tr["prompt"] + np.arange(1, len(tr["size"]) + 1)
        ax_s.plot(pos, tr["size"], label=tr["name"])
        t = np.asarray(tr["time_s"])
        w = max(1, min(smooth, len(t)))
        med = np.array([np.median(t[max(0, i - w + 1):i + 1]) for i in range(len(t))])
        ax_t.plot(pos, 1e3 * med, label=tr["name"])
    ax_s.set(xlabel="position t", ylabel="numbers in the decoder state", yscale="log",
             title=f"decoder state against position (one head, d={d})")
    ax_t.set(xlabel="position t", ylabel="ms per token (running median)", yscale="log",
             title=f"time per generated token (one head, d={d}, {dtype})")
    for ax in (ax_s, ax_t):
        ax.legend(fontsize=7, ncol=2)
    return [save(fig_s, os.path.join(out_dir, "decode_state.png")), save(fig_t, os.path.join(out_dir, "decode_time.png"))]
