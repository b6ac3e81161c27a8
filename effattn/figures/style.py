"""The shared style of every figure: patterns, weight matrices, saving.

Every function takes NumPy or CuPy arrays (moved to the host here) and either
an existing ``ax`` or makes its own figure. ``save(fig, path)`` writes a PNG
and closes the figure. Only ``effattn.figures`` imports matplotlib: the compute
packages (``nn``, ``attention``, ``layers``, ``models``) never do, and a test
enforces it.
"""
from __future__ import annotations

import os

import matplotlib

if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..backend import to_numpy  # noqa: E402

PATTERN_CMAP = ListedColormap(["#f4f4f4", "#1f5fa8"])
WEIGHT_CMAP = "viridis"
CATEGORY_CMAP = "tab20"


def host2d(a):
    a = np.asarray(to_numpy(a))
    while a.ndim > 2:
        a = a[0]
    return a


def plot_pattern(matrix, ax=None, title=None, *, weights=None, grid=None, xlabel="key position j",
                 ylabel="query position i", colorbar=None):
    """Draw an attention support (boolean) or a weight matrix (float), queries down, keys across.

    matrix: (..., N, M); leading axes take index 0. ``weights`` forces the
    float/boolean style (default: by dtype). ``grid``: draw block lines every
    ``grid`` positions. Returns the axes.
    """
    a = host2d(matrix)
    is_weights = a.dtype.kind == "f" if weights is None else weights
    if ax is None:
        side = 3.2 if a.shape[1] <= 64 else 4.2
        _, ax = plt.subplots(figsize=(side * min(max(a.shape[1] / max(a.shape[0], 1), 0.5), 2.5), side))
    ratio = a.shape[1] / max(a.shape[0], 1)
    aspect = "equal" if 0.25 <= ratio <= 4 else "auto"   # long strips (m x N) stay readable
    if is_weights:
        im = ax.imshow(a, cmap=WEIGHT_CMAP, interpolation="nearest", aspect=aspect)
        if colorbar is None or colorbar:
            ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    else:
        ax.imshow(a != 0, cmap=PATTERN_CMAP, interpolation="nearest", aspect=aspect, vmin=0, vmax=1)
    if grid:
        for t in range(grid, max(a.shape), grid):
            if t < a.shape[1]:
                ax.axvline(t - 0.5, color="#888", lw=0.5)
            if t < a.shape[0]:
                ax.axhline(t - 0.5, color="#888", lw=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def pattern_legend(fig, loc="lower center", **kw):
    """The key of the boolean panels: the pattern colour = a key the query attends, the pale one = masked."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=PATTERN_CMAP(1.0), label="attended (allowed)"),
               Patch(facecolor=PATTERN_CMAP(0.0), edgecolor="#999", label="masked (zero weight)")]
    return fig.legend(handles=handles, loc=loc, ncol=2, frameon=False, fontsize=9, bbox_to_anchor=(0.5, 0.0), **kw)


def plot_patterns(matrices, titles, suptitle=None, ncols=None, legend=None, **kw):
    """Several patterns side by side (e.g. one per head). Returns the figure.

    ``legend`` (default: when a panel is boolean) adds :func:`pattern_legend` under the panels."""
    k = len(matrices)
    ncols = ncols or min(k, 4)
    nrows = -(-k // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, m, t in zip(axes.flat, matrices, titles):
        plot_pattern(m, ax=ax, title=t, colorbar=False, **kw)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    forced = kw.get("weights")
    if legend is None:
        legend = forced is False or (forced is None and any(host2d(m).dtype == bool for m in matrices))
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight() if legend else 0, 1, 1))   # room for the legend (0.4 inch)
    if legend:
        pattern_legend(fig)
    return fig


def plot_shared(rows, *, suptitle=None, xlabel="key position j", ylabel="query position i", cmaps=None,
                vranges=None, labels=None, gammas=None, side=3.0):
    """Rows of matrices, each row on ONE colour scale with one colour bar, so a property can be read off.

    rows: a list of rows, each a list of ``(matrix, title)`` (or None: an empty place); ``cmaps`` / ``vranges`` / ``labels``: per row the colour
    map, the ``(vmin, vmax)`` (default: 0 to the row's largest entry), the colour bar's label and a power-law
    ``gamma`` (0.5: square-root colour scale, so that small weights show; None: linear). Returns the figure.
    (The shared-scale version of :func:`plot_patterns`.)
    """
    ncols = max(len(r) for r in rows)
    from matplotlib.colors import Normalize, PowerNorm

    fig, axes = plt.subplots(len(rows), ncols, figsize=(side * ncols + 1.0, (side + 0.4) * len(rows)), squeeze=False,
                             layout="constrained")
    for i, row in enumerate(rows):
        mats = [None if e is None else np.asarray(to_numpy(e[0]), dtype=float) for e in row]
        lo, hi = (vranges[i] if vranges and vranges[i] else (0.0, max(float(m.max()) for m in mats if m is not None)))
        cmap = cmaps[i] if cmaps else WEIGHT_CMAP
        gamma = gammas[i] if gammas else None
        norm = PowerNorm(gamma, vmin=lo, vmax=hi) if gamma else Normalize(vmin=lo, vmax=hi)
        for ax, m, entry in zip(axes[i], mats, row):
            if m is None:                                   # an empty place, to align a row with the one above
                ax.axis("off")
                continue
            title = entry[1]
            im = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
        for ax in axes[i][len(row):]:
            ax.axis("off")
        fig.colorbar(im, ax=list(axes[i]), fraction=0.025, pad=0.02, label=labels[i] if labels else None)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def save(fig, path):
    """Write ``fig`` as a PNG (folders made as needed), close it, return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def mechanism_pattern_figure(spec, out_dir="figures", n=48):
    """Default figure of a kernel, ``<name>_pattern.png``: the support of its effective attention
    matrix (exact kernels) or the matrix itself (approximations), bidirectional and (if supported)
    causal, from its registered example."""
    modes = [False, True] if spec.causal else [False]
    mats, titles = [], []
    for causal in modes:
        case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=n, d=8, causal=causal)
        _, cache = spec.forward(**case.inputs, **case.config)
        w = spec.weights(cache)
        mats.append(np.abs(host2d(w)) > 0 if spec.exact else host2d(w))
        titles.append(f"{spec.name} ({'causal' if causal else 'bidirectional'})")
    fig = plot_patterns(mats, titles, suptitle=f"{spec.title}: {spec.complexity}", weights=not spec.exact)
    return save(fig, os.path.join(out_dir, f"{spec.name}_pattern.png"))
