"""Figures of the recurrent layers (notebook 07): Transformer-XL's segments and memory, the four terms of
its relative score, the relative shift step by step; the Compressive Transformer's two memories, segment by
segment, and its reconstruction loss while only the compression trains.

The numbers behind each figure come from the layer itself (:mod:`effattn.layers.transformer_xl`,
:mod:`effattn.nn.relative`, :mod:`effattn.layers.compressive`); the helpers that compute them
(:func:`receptive_field`, :func:`score_terms`, :func:`shift_steps`, :func:`compressive_positions`,
:func:`compression_training`) are public so that the notebook prints the same numbers.
"""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from .style import PATTERN_CMAP, save


# --------------------------------------------------------------------------- (a) segments and depth
def receptive_field(n_segments, segment, mem_len, layers, causal=True):
    """What a stack of ``layers`` Transformer-XL layers sees, composed from the one-layer pattern.

    One layer: query p sees the keys of ``transformer_xl.segment_pattern`` (T = n_segments * segment
    positions). In a stack, layer l's output at p reads layer l - 1's states at the keys j it sees, and
    those (kept as memory when j is in an earlier segment) read layer l - 2's, ... so the inputs that
    reach p through l layers are the boolean l-th power of the one-layer pattern.

    Returns ``(depth, reach)``: ``depth`` (T, T) int, the least number of layers through which input j
    reaches output p (0: not within ``layers``); ``reach`` (layers,) int, for the first query of the last
    segment (p = T - segment), how far back (p - the earliest j) it sees through 1, 2, ... layers.
    """
    from ..layers.transformer_xl import segment_pattern

    t = n_segments * segment
    one = np.asarray(segment_pattern(t, segment, mem_len, causal, np)).astype(np.int64)
    depth = np.zeros((t, t), dtype=np.int64)
    seen = np.eye(t, dtype=np.int64)                      # 0 layers: a position is itself
    p = t - segment
    reach = []
    for layer in range(1, layers + 1):
        seen = np.minimum(one @ seen, 1)                  # one more layer: the pattern composed once more
        depth[(seen > 0) & (depth == 0)] = layer
        reach.append(p - int(np.flatnonzero(seen[p])[0]))
    return depth, np.array(reach)


def _segments_panel(ax, pattern, segment, mem_len, title):
    t = pattern.shape[0]
    start = (np.arange(t)[:, None] // segment) * segment
    kind = np.where(~pattern, 0, np.where(np.arange(t)[None, :] < start, 2, 1))   # 0 masked, 1 own, 2 memory
    ax.imshow(kind, cmap=ListedColormap(["#f4f4f4", PATTERN_CMAP(1.0), "#e69f00"]), vmin=0, vmax=2,
              interpolation="nearest")
    for b in range(segment, t, segment):
        ax.axvline(b - 0.5, color="k", lw=0.8)
        ax.axhline(b - 0.5, color="k", lw=0.8)
    ax.set(title=title, xlabel="key position j (lines: segment boundaries)", ylabel="query position p")


def transformer_xl_segments(out_path, *, segment=8, mem_len=8, n_segments=4, layers=3):
    """``transformer_xl_segments.png``: left, which keys each query sees, segment by segment (causal,
    segment N, memory L, drawn over the whole sequence: its own segment in blue, the memory in orange);
    middle, the least depth through which each input reaches each output (the pattern composed);
    right, how far back the first query of the last segment sees, against the depth l, for memories
    L = N/2, N, 2N, with the line l L."""
    from ..layers.transformer_xl import segment_pattern

    t = n_segments * segment
    pattern = np.asarray(segment_pattern(t, segment, mem_len, True, np))
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 5.0), layout="constrained")
    _segments_panel(axes[0], pattern, segment, mem_len,
                    f"one layer: {n_segments} segments of N = {segment}, memory L = {mem_len}\n"
                    "blue: its own segment (causal), orange: the memory")
    depth, _ = receptive_field(n_segments, segment, mem_len, layers)
    cmap = ListedColormap(["#f4f4f4"] + [plt.get_cmap("viridis")(v) for v in np.linspace(0.9, 0.15, layers)])
    im = axes[1].imshow(depth, cmap=cmap, vmin=-0.5, vmax=layers + 0.5, interpolation="nearest")
    for b in range(segment, t, segment):
        axes[1].axvline(b - 0.5, color="k", lw=0.5)
        axes[1].axhline(b - 0.5, color="k", lw=0.5)
    cb = fig.colorbar(im, ax=axes[1], ticks=range(layers + 1), fraction=0.046, pad=0.03)
    cb.set_label("least number of layers (0: not reached)")
    axes[1].set(title=f"{layers} layers: the pattern composed layer by layer\n"
                      "input j reaches output p through this many layers",
                xlabel="input position j", ylabel="output position p of the top layer")
    ax = axes[2]
    deep = 6
    for mem, marker in ((segment // 2, "s"), (segment, "o"), (2 * segment, "^")):
        _, reach = receptive_field(deep * -(-mem // segment) + 2, segment, mem, deep)   # long enough
        ls = np.arange(1, deep + 1)
        line, = ax.plot(ls, reach, marker + "-", label=f"L = {mem} (measured)")
        ax.plot(ls, ls * mem, ":", color=line.get_color(), label=f"l L = {mem} l")
    ax.set(xlabel="depth l (layers)", ylabel="how far back the query sees (tokens)",
           title=f"receptive field of the first query of a segment (N = {segment})\n"
                 "grows by L per layer (L a multiple of N); L < N: by N after the first")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.suptitle("Transformer-XL: segment-level recurrence (the memory carries no gradient, yet the context grows "
                 "with depth)")
    return save(fig, out_path)


# --------------------------------------------------------------------------- (b) the four terms
def score_terms(rng, *, n=6, mem=4, D=8, jitter=1.0):
    """The four terms of the relative score of one head (heads = 1, d = D) for a random case, from the
    layer's parameters (``init_params(rng, D, 1, jitter=jitter)``: u and v at scale ``jitter`` so that
    terms (c) and (d) are visible): dict with ``a`` = q_i . k_j, ``b`` = q_i . r_{L+i-j}, ``c`` = u . k_j,
    ``d`` = v . r_{L+i-j} (each (N, M), M = L + N), ``dist`` (N, M) = L + i - j, ``weights`` the layer's
    own attention weights (non-causal) and ``params``, ``x``, ``memory``. Checks that softmax((a + b + c
    + d) / sqrt(d)) is the layer's ``weights`` (assert)."""
    from ..layers import transformer_xl as xl
    from ..nn.relative import sinusoid

    p = xl.init_params(rng, D, 1, jitter=jitter)
    x = rng.standard_normal((n, D))
    memory = rng.standard_normal((mem, D))
    h = np.concatenate([memory, x])
    q, k = x @ p["Wq"], h @ p["Wk"]
    dist = mem + np.arange(n)[:, None] - np.arange(mem + n)[None, :]
    r = sinusoid(dist, D, np) @ p["Wr"]                                   # (N, M, D): r_{L+i-j}, pair by pair
    u, vb = p["u"][0], p["vb"][0]
    terms = {"a": q @ k.T, "b": np.einsum("id,ijd->ij", q, r), "c": np.broadcast_to(k @ u, dist.shape).copy(),
             "d": np.einsum("d,ijd->ij", vb, r)}
    s = sum(terms.values()) / np.sqrt(D)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    _, cache = xl.forward(x[None], memory=memory[None], heads=1, **p)
    layer_w = np.asarray(xl.weights(cache))[0, 0]
    assert np.allclose(w, layer_w, atol=1e-12), "the four terms do not give the layer's weights"
    return {**terms, "dist": dist, "weights": layer_w, "params": p, "x": x, "memory": memory}


def transformer_xl_terms(out_path, rng, *, n=6, mem=4, D=8):
    """``transformer_xl_terms.png``: top, the four terms (a)-(d) of A_ij as N x M matrices (memory keys
    left of the dashed line); bottom, (c) against j (every row on one curve: it depends on j only), (d)
    against the distance L + i - j (every entry on one curve: it depends on i - j only), their sum A and
    the layer's attention weights softmax(A / sqrt(d)) (checked equal to ``weights`` of the layer)."""
    t = score_terms(rng, n=n, mem=mem, D=D)
    names = {"a": "(a) q_i . k_j  content", "b": "(b) q_i . W_R R_{i-j}  position",
             "c": "(c) u . k_j  content bias", "d": "(d) v . W_R R_{i-j}  position bias"}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.4), layout="constrained")
    for ax, key in zip(axes[0], "abcd"):
        m = t[key]
        lim = float(np.abs(m).max())
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.axvline(mem - 0.5, color="k", ls="--", lw=0.8)
        ax.set(title=names[key], xlabel="key j (left of the dashes: memory)", ylabel="query i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    j = np.arange(mem + n)
    ax = axes[1, 0]
    for i in range(n):                                     # rings of decreasing size: every row is there
        ax.plot(j, t["c"][i], "o-", ms=11 - 1.5 * i, mfc="none", lw=0.8, label=f"i = {i}")
    ax.set(xlabel="key j", ylabel="(c)_ij", title="(c) row by row: the rows coincide\n(a function of j only)")
    ax.legend(fontsize=7, ncol=3, title="query row", title_fontsize=7, framealpha=0.6)
    ax = axes[1, 1]
    for i in range(n):
        ax.plot(t["dist"][i], t["d"][i], "o-", ms=11 - 1.5 * i, mfc="none", lw=0.8, label=f"i = {i}")
    ax.set(xlabel="distance t = L + i - j", ylabel="(d)_ij",
           title="(d) row by row against the distance:\none curve (a function of i - j only)")
    ax.legend(fontsize=7, ncol=3, title="query row", title_fontsize=7, framealpha=0.6)
    total = sum(t[k] for k in "abcd")
    for ax, m, title, cmap in ((axes[1, 2], total, "A_ij = (a) + (b) + (c) + (d)\n(the score, before 1 / sqrt(d))", "RdBu_r"),
                               (axes[1, 3], t["weights"], "softmax(A / sqrt(d)):\nthe layer's own weights", "viridis")):
        lim = float(np.abs(m).max())
        im = ax.imshow(m, cmap=cmap, vmin=-lim if cmap == "RdBu_r" else 0, vmax=lim, interpolation="nearest")
        ax.axvline(mem - 0.5, color="k" if cmap == "RdBu_r" else "w", ls="--", lw=0.8)
        ax.set(title=title, xlabel="key j", ylabel="query i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(f"Transformer-XL's relative score, one head: N = {n} queries over M = L + N = {mem} + {n} keys, "
                 f"d = {D} (u, v drawn at unit scale so that (c) and (d) show)")
    return save(fig, out_path)


# --------------------------------------------------------------------------- (c) the relative shift
def shift_steps(rng, *, n=3, mem=2, D=4):
    """The relative shift of :func:`effattn.nn.relative.rel_shift`, step by step, on a small random case
    (one head, d = D, the layer's parameters): dict with ``P`` (N, W) = (q + v) r^T over the distances
    ``dist_P`` = M - 1, ..., -(N - 1) (W = M + N - 1 columns), ``flat`` (N W,) its row-major view,
    ``start`` = N - 1 and ``stop`` = N - 1 + N (W - 1) (the slice read), ``skew`` (N, W - 1) that slice
    reshaped, ``BD`` (N, M) its first M columns, ``pair`` (N, M) the per-pair (q_i + v) . r_{L+i-j} and
    ``dist`` = L + i - j. Asserts BD == pair."""
    from ..layers import transformer_xl as xl
    from ..nn.relative import distances, rel_shift, sinusoid

    p = xl.init_params(rng, D, 1, jitter=1.0)
    m = mem + n
    x = rng.standard_normal((n, D))
    qv = x @ p["Wq"] + p["vb"][0]
    dist_P = np.asarray(distances(n, m, np))
    P = qv @ (sinusoid(dist_P, D, np) @ p["Wr"]).T                       # (N, W)
    w = P.shape[1]
    flat = P.reshape(n * w)
    start, stop = n - 1, n - 1 + n * (w - 1)
    skew = flat[start:stop].reshape(n, w - 1)
    BD = np.asarray(rel_shift(P, m))
    dist = mem + np.arange(n)[:, None] - np.arange(m)[None, :]
    pair = np.einsum("id,ijd->ij", qv, sinusoid(dist, D, np) @ p["Wr"])
    assert np.array_equal(BD, skew[:, :m])
    assert np.allclose(BD, pair, atol=1e-12), "the relative shift does not give the per-pair positional term"
    return {"P": P, "dist_P": dist_P, "flat": flat, "start": start, "stop": stop, "skew": skew, "BD": BD,
            "pair": pair, "dist": dist, "n": n, "m": m, "mem": mem}


def _cells(ax, values, labels, lim, dim=None):
    """A matrix of coloured cells, each with its value and a label underneath; ``dim`` (bool) greys cells out."""
    ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest", aspect="equal")
    if dim is not None:
        ax.imshow(np.where(dim, 1.0, np.nan), cmap=ListedColormap(["#dddddd"]), vmin=0, vmax=1,
                  interpolation="nearest", aspect="equal")
    for (i, j), v in np.ndenumerate(values):
        dark = abs(v) > 0.55 * lim and (dim is None or not dim[i, j])
        ax.text(j, i - 0.12, f"{v:+.2f}", ha="center", va="center", fontsize=7.5, color="w" if dark else "k")
        ax.text(j, i + 0.25, labels[i][j], ha="center", va="center", fontsize=6.5, color="w" if dark else "#333")
    ax.set_xticks([])
    ax.set_yticks([])


def transformer_xl_shift(out_path, rng, *, n=3, mem=2, D=4):
    """``transformer_xl_shift.png``: the relative shift in four steps: (1) P = (q + v) r^T over the W
    distances M - 1, ..., -(N - 1), each row's M entries outlined; (2) P flattened row-major, the slice
    [N - 1, N - 1 + N (W - 1)) outlined; (3) that slice read as N rows of W - 1: the skew has moved row
    i's entries to the front (the last column dropped); (4) BD, the first M columns, every entry the
    distance L + i - j it should hold (checked equal to the per-pair form)."""
    s = shift_steps(rng, n=n, mem=mem, D=D)
    P, m = s["P"], s["m"]
    w = P.shape[1]
    lim = float(np.abs(P).max())
    tP = [[f"i{i} t={int(s['dist_P'][c])}" for c in range(w)] for i in range(n)]
    flat = s["flat"][None, :]
    labels = [[tP[c // w][c % w] for c in range(n * w)]]
    fig = plt.figure(figsize=(15, 9.2), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=(n, 1.6, n), width_ratios=(w, m + 1))
    a1, a4, ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    a3, a5 = fig.add_subplot(grid[2, 0]), fig.add_subplot(grid[2, 1])
    _cells(a1, P, tP, lim)
    for i in range(n):
        a1.add_patch(plt.Rectangle((n - 1 - i - 0.5, i - 0.5), m, 1, fill=False, ec="k", lw=1.8))
    a1.set_title(f"(1) P = (q + v) r^T over W = M + N - 1 = {w} distances t = {m - 1} ... {-(n - 1)} "
                 f"(one product, O(N W d));\nrow i needs columns N-1-i ... N-1-i+M-1 (outlined): a skewed band",
                 fontsize=9)
    _cells(a4, s["pair"], [[f"t={int(t)}" for t in row] for row in s["dist"]], lim)
    a4.set_title(f"wanted: (q_i + v) . r_(L+i-j), pair by pair\n(N x M = {n} x {m}, L = {mem}; t = L + i - j)",
                 fontsize=9)
    _cells(ax, flat, labels, lim)
    ax.add_patch(plt.Rectangle((s["start"] - 0.5, -0.5), s["stop"] - s["start"], 1, fill=False, ec="k", lw=1.8))
    for b in range(w, n * w, w):
        ax.axvline(b - 0.5, color="k", lw=1.2, ls=":")
    ax.set_title(f"(2) P flattened row-major (N W = {n * w} numbers; dotted: where rows of P end); the slice from "
                 f"N - 1 = {s['start']}, N (W - 1) = {s['stop'] - s['start']} long (outlined): a view, no copy",
                 fontsize=9)
    sk = s["skew"]
    flat_labels = labels[0][s["start"]:s["stop"]]
    _cells(a3, sk, [flat_labels[i * (w - 1):(i + 1) * (w - 1)] for i in range(n)], lim,
           dim=np.arange(w - 1)[None, :].repeat(n, 0) >= m)
    a3.set_title(f"(3) the slice read as N rows of W - 1 = {w - 1}: row i starts N - 1 - i later in P's row, so "
                 f"its first M = {m} entries\nare exactly the ones row i needs (the grey last column is dropped)",
                 fontsize=9)
    _cells(a5, s["BD"], [[f"t={int(t)}" for t in row] for row in s["dist"]], lim)
    a5.set_title(f"(4) BD = the first M columns = rel_shift(P, M)\nequal to the pair-by-pair form (max diff "
                 f"{np.abs(s['BD'] - s['pair']).max():.0e})", fontsize=9)
    fig.suptitle("The relative shift (Transformer-XL, Appendix B): the positional term of every (query, key) pair "
                 "from one (N, W) product and a reshape")
    return save(fig, out_path)


def transformer_xl_figures(out_dir, rng=None):
    """The three figures of ``transformer_xl``: segments and depth, the four terms, the relative shift."""
    rng = np.random.default_rng(0) if rng is None else rng
    return [transformer_xl_segments(os.path.join(out_dir, "transformer_xl_segments.png")),
            transformer_xl_terms(os.path.join(out_dir, "transformer_xl_terms.png"), rng),
            transformer_xl_shift(os.path.join(out_dir, "transformer_xl_shift.png"), rng)]


# --------------------------------------------------------------------------- (d) the Compressive Transformer
def compressive_positions(*, segment=4, n_segments=6, mem_len=4, cmem_len=4, rate=2):
    """Which input positions the state of a ``compressive`` layer holds after each segment, tracked
    through the layer's own update (``forward`` and ``next_memory``).

    The input is the one-hot code of the position (x[p] = e_p, D = T rounded up to even, one head) and
    the compression is ``"mean"``: a memory row is then some e_p, and a compressed row the mean of the
    one-hot codes of the positions it summarises, (1 / c) sum_{p in group} e_p; its members are its
    non-zero entries (each checked to be 1 / |group|). ``cmem_len = 0`` is Transformer-XL.

    Returns a list with one dict per segment s (the state handed to segment s + 1): ``memory``, the
    positions of the memory's rows, oldest first; ``compressed``, one list of positions per
    compressed row, oldest first; ``forgotten``, the positions already read that neither holds.
    """
    from ..layers import compressive as cp

    t = segment * n_segments
    D = t + t % 2
    x = np.eye(t, D)[None]                                               # x[0, p] = e_p
    params = cp.init_params(np.random.default_rng(0), D, 1, compress="mean")
    state, out = {}, []
    for s in range(n_segments):
        _, cache = cp.forward(x[:, s * segment:(s + 1) * segment], **state, heads=1, mem_len=mem_len,
                              cmem_len=cmem_len, rate=rate, compress="mean", causal=True, **params)
        mem, mem_mask, comp, comp_mask = cp.next_memory(cache)
        state = {"memory": mem, "memory_mask": mem_mask, "compressed": comp, "compressed_mask": comp_mask}
        memory = [] if mem is None else [int(np.argmax(r)) for r in mem[0]]
        groups = []
        for r in ([] if comp is None else comp[0]):
            members = np.flatnonzero(np.abs(r) > 1e-12)
            assert np.allclose(r[members], 1.0 / len(members), atol=1e-12), "a compressed row is not a mean"
            groups.append([int(m) for m in members])
        assert mem is None or np.allclose(mem[0].max(axis=-1), 1.0), "a memory row is not one position"
        held = set(memory) | {m for g in groups for m in g}
        out.append({"memory": memory, "compressed": groups,
                    "forgotten": [q for q in range((s + 1) * segment) if q not in held]})
    return out


def _positions_panel(ax, rows, segment, title):
    """One row per segment: memory (orange), compressed (green, each slot outlined), forgotten (grey)."""
    n_seg = len(rows)
    t = n_seg * segment
    kind = np.zeros((n_seg, t))
    for s, r in enumerate(rows):
        kind[s, :(s + 1) * segment] = 1                                 # read, and forgotten unless held
        kind[s, r["memory"]] = 3
        for g in r["compressed"]:
            kind[s, g] = 2
    ax.imshow(kind, cmap=ListedColormap(["#ffffff", "#d9d9d9", "#74c476", "#e69f00"]), vmin=0, vmax=3,
              aspect="auto", interpolation="nearest")
    for s, r in enumerate(rows):
        for k, g in enumerate(r["compressed"]):
            ax.add_patch(plt.Rectangle((min(g) - 0.5, s - 0.42), len(g), 0.84, fill=False, ec="k", lw=1.2))
            ax.text((min(g) + max(g)) / 2, s, f"c{k}", ha="center", va="center", fontsize=7)
        for q in r["forgotten"]:
            ax.text(q, s, "x", ha="center", va="center", fontsize=7, color="#888888")
        held = r["memory"] + [m for g in r["compressed"] for m in g]
        slots = len(r["memory"]) + len(r["compressed"])
        reach = (s + 1) * segment - min(held) if held else 0
        ax.text(t - 0.2, s, f"  {slots} rows, {reach} back", ha="left", va="center", fontsize=8, clip_on=False)
    for b in range(segment, t, segment):
        ax.axvline(b - 0.5, color="k", lw=0.6, alpha=0.5)
    for s in range(1, n_seg):
        ax.axhline(s - 0.5, color="w", lw=2)
    ax.set_xticks(range(0, t, segment))
    ax.set_yticks(range(n_seg), [f"after {s + 1}" for s in range(n_seg)])
    ax.set(xlabel="input position (lines: segment boundaries)", ylabel="state after segment", title=title)


def compressive_memory(out_path, *, segment=4, n_segments=6, mem_len=4, cmem_len=4, rate=2):
    """``compressive_memory.png``: after each segment (rows), which input positions (columns) the
    memory holds (orange) and which each compressed row summarises (green, one outlined box per row
    c0, c1, ...), the forgotten ones (x), as tracked by :func:`compressive_positions`; left the
    Compressive Transformer (memory n_m, compressed memory n_cm, rate c), right Transformer-XL with
    the same number of rows, n_m + n_cm."""
    comp = compressive_positions(segment=segment, n_segments=n_segments, mem_len=mem_len, cmem_len=cmem_len,
                                 rate=rate)
    xl = compressive_positions(segment=segment, n_segments=n_segments, mem_len=mem_len + cmem_len, cmem_len=0,
                               rate=rate)
    fig, axes = plt.subplots(1, 2, figsize=(15.5, 4.2), layout="constrained")
    _positions_panel(axes[0], comp, segment,
                     f"Compressive Transformer: N = {segment}, memory n_m = {mem_len} (orange),\n"
                     f"compressed memory n_cm = {cmem_len} rows of c = {rate} states each (green boxes)")
    _positions_panel(axes[1], xl, segment,
                     f"Transformer-XL with the same {mem_len + cmem_len} rows: memory {mem_len + cmem_len}\n"
                     "(x: read, then forgotten)")
    fig.suptitle("What the state holds after each segment (tracked through the layer: one-hot positions, mean "
                 "compression)")
    return save(fig, out_path)


def _compression_case(rng, *, salient, n_batches, batch, N, L, D):
    """Random segments x (B, N, D) and memories (B, L, D); ``salient``: the first state of every pair
    of the memory scaled by 3, the second by 0.5 (a pair's attention is dominated by its first row)."""
    scale = np.where(np.arange(L) % 2 == 0, 3.0, 0.5)[:, None] if salient else 1.0
    return [(rng.standard_normal((batch, N, D)), rng.standard_normal((batch, L, D)) * scale)
            for _ in range(n_batches)]


def compression_training(rng=None, *, salient=False, steps=200, lr=None, D=16, heads=2, N=8, L=8, rate=2,
                         batch=16, eval_every=10):
    """Train only the convolution f_c of one ``compressive`` layer on its attention-reconstruction loss.

    Each step draws a random segment x (batch, N, D) and memory (batch, L, D) (``mem_len = L``: the
    L memory rows fall out and are compressed, L / rate groups), runs ``forward``, and takes a plain
    gradient step W_c -= lr dW_c, b_c -= lr db_c with the gradient ``backward(0, cache)`` returns (the
    reconstruction loss's alone: a zero upstream gradient gives every other parameter zero, asserted).
    The other parameters stay at their random initial values. ``salient``: see :func:`_compression_case`
    (default lr 1.0 for plain inputs, 0.15 for salient ones, whose gradients are about 9x larger).

    Returns dict: ``steps`` and ``held_out`` (the loss on a fixed held-out set of 64 sequences, every
    ``eval_every`` steps and at the end), ``train`` (each step's batch loss, before its update),
    ``max`` and ``mean`` (the parameter-free pooling's held-out loss), ``Wc``, ``bc`` (trained).
    """
    from ..layers import compressive as cp

    rng = np.random.default_rng(0) if rng is None else rng
    lr = (0.15 if salient else 1.0) if lr is None else lr
    params = cp.init_params(rng, D, heads, rate=rate)
    cfg = {"heads": heads, "mem_len": L, "cmem_len": L, "rate": rate, "causal": True}
    (xe, me), = _compression_case(rng, salient=salient, n_batches=1, batch=64, N=N, L=L, D=D)
    train = _compression_case(rng, salient=salient, n_batches=steps, batch=batch, N=N, L=L, D=D)

    def held(compress, p):
        return cp.aux_loss(cp.forward(xe, memory=me, compress=compress, **cfg, **p)[1])

    fixed = {k: v for k, v in params.items() if k not in ("Wc", "bc")}
    out = {"max": held("max", fixed), "mean": held("mean", fixed), "steps": [], "held_out": [], "train": []}
    for step, (x, m) in enumerate(train):
        if step % eval_every == 0:
            out["steps"].append(step)
            out["held_out"].append(held("conv", params))
        _, cache = cp.forward(x, memory=m, **cfg, **params)
        out["train"].append(cp.aux_loss(cache))
        g = cp.backward(np.zeros_like(x), cache)
        assert all(not np.any(v) for k, v in g.items() if k not in ("Wc", "bc")), "the loss reached the layer"
        params = {**params, "Wc": params["Wc"] - lr * g["Wc"], "bc": params["bc"] - lr * g["bc"]}
    out["steps"].append(steps)
    out["held_out"].append(held("conv", params))
    out.update(Wc=params["Wc"], bc=params["bc"], lr=lr)
    return out


def compressive_reconstruction(out_path, rng=None, runs=None):
    """``compressive_reconstruction.png``: the attention-reconstruction loss of a learned convolution
    f_c against the gradient steps on W_c, b_c alone (:func:`compression_training`), with the max and
    mean pooling's losses as horizontal lines; left plain random states, right states whose pairs have
    a salient first row. ``runs``: the two results of :func:`compression_training` (plain, salient), if
    already computed."""
    if runs is None:
        rng = np.random.default_rng(0) if rng is None else rng
        runs = [compression_training(rng, salient=False), compression_training(rng, salient=True)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
    titles = ("random states: the convolution learns the mean\n(W_c[t] close to I / c at the end)",
              "states whose pairs have a salient first row (x3, x0.5):\nthe convolution learns to keep it, "
              "and beats both poolings")
    for ax, r, title in zip(axes, runs, titles):
        ax.plot(np.arange(len(r["train"])), r["train"], color="#9ecae1", lw=0.8, label="conv, each step's batch")
        ax.plot(r["steps"], r["held_out"], "o-", color="#08519c", ms=3, label="conv, held out")
        ax.axhline(r["mean"], color="k", ls="--", lw=1, label=f"mean pooling ({r['mean']:.3f})")
        ax.axhline(r["max"], color="#d62728", ls=":", lw=1.2, label=f"max pooling ({r['max']:.3f})")
        ax.set_yscale("log")
        ax.set(xlabel=f"gradient step on W_c, b_c only (lr {r['lr']})", ylabel="reconstruction loss L_attn",
               title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("The attention-reconstruction loss trains the compression alone (c = 2, one layer, its other "
                 "weights fixed at random)")
    return save(fig, out_path)


def compressive_figures(out_dir, rng=None):
    """The two figures of ``compressive``: what the memories hold after each segment, and the
    reconstruction loss falling while only the compression trains."""
    rng = np.random.default_rng(0) if rng is None else rng
    return [compressive_memory(os.path.join(out_dir, "compressive_memory.png")),
            compressive_reconstruction(os.path.join(out_dir, "compressive_reconstruction.png"), rng)]
