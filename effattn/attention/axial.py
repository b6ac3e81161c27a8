"""Axial attention: attend along one axis of the sequence laid out as a grid.

Ho, Kalchbrenner, Weissenborn, Salimans, 2019, *Axial Attention in
Multidimensional Transformers*, https://arxiv.org/abs/1912.12180

Intuition. An image of r x c pixels flattened to N = r c tokens costs N^2 with
full attention. Axial attention keeps the grid: a row attention lets every
pixel look at the c pixels of its row, a column attention at the r pixels of
its column. Each is a batch of small full attentions — rows as the groups of
a batched matmul — costing O(N (r + c)) = O(N sqrt N) on a square grid, and a
row layer followed by a column layer already connects every pair of pixels.

Layout. Position i of the (padded) sequence is the raster-order cell
(i // c, i mod c) of a grid ``shape = (r, c)`` (any number of axes works:
``shape = (s_0, ..., s_{k-1})``, C order, the last axis varies fastest;
:func:`effattn.nn.image.raster_coords`).

    row    attention:  A_row(i)    = {j : row(j) = row(i)}       (the last axis)
    column attention:  A_column(i) = {j : col(j) = col(i)}       (the second-to-last axis)
    both:              A_row(i) ∪ A_column(i), ONE softmax over the union
    causal (the paper's masked arrangement, raster order): intersect with j <= i,
    so the row attention sees the earlier cells of its row, the column
    attention the cells above it, and "both" every earlier key that shares
    the query's row or column.

Conventions (config): ``axis`` is "row", "column", "both" (the default: one
kernel call whose pattern is the union, so the pattern of one call already
has the O(N sqrt N) support the survey draws; the paper applies row and
column attention in SEPARATE layers — pass axis="row" / "column" to each
layer to do that), an int (one grid axis) or a tuple of ints (union over
those axes). ``shape=None`` picks a near-square grid c = ceil(sqrt N),
r = ceil(N / c) (:func:`effattn.nn.image.default_image_shape`, also the
Image Transformer's default image); when r c > N the tail of the last row is
padding, masked (so the last row is shorter and the last columns one cell
shorter).
lucidrains' ``axial-attention`` (``AxialAttention(dim, num_dimensions=2,
dim_index=..., sum_axial_out=True)``) takes the tensor already shaped
(B, r, c, d) (so N must equal r c, no padding) and has no causal or padding
mask; with ``sum_axial_out=True`` it SUMS the outputs of one attention per
axis (each normalised on its own — not our single softmax over the union; add
the outputs of axis="row" and axis="column" calls to get it), with
``sum_axial_out=False`` it runs them one after the other (the paper's
layered use: axis="row" in one layer, axis="column" in the next).

Peer mapping (lucidrains ``axial-attention`` 0.6.1, ``AxialAttention(dim, num_dimensions,
heads, dim_index=-1)``): each grid axis is its own ``PermuteToFrom(SelfAttention)`` with its own
q/k/v/out projections, so one of those modules is one call of this kernel with that module's
q, k, v: the peer's axis 1 of (B, r, c, D) is ``axis="column"``, axis 2 is ``axis="row"``, and
on an n-D grid the peer's tensor axis a + 1 is our ``axis=a`` (``shape`` = the grid, positions in
raster order). Out (before ``to_out``) and dq, dk, dv agree to 4.5e-16 (fixtures
``axial__lucidrains_axial_attention__*``: 2-D column, 2-D row, 3-D axis 1). The peer's summed
output is the sum of such calls, never ``axis="both"``.

Receptive field: bidirectional row then column attention reaches every cell
in two layers. Causal row then column does NOT reach the earlier cells above
and to the right of the query (they are earlier in raster order, but neither
the row prefix nor the column above leads to them); the paper's Axial
Transformer closes that gap with an unmasked row attention over the rows
above (its "outer decoder", output shifted down one row). That is a model
arrangement built from these kernels, not a different kernel.

Implementation: the rows (or columns) are groups of ``attend_forward``
((..., r, c, d) for rows, the grid transposed (..., c, r, d) for columns).
"both" merges the two parts under one softmax through their log-sum-exps
(:mod:`effattn.nn.union`); the query itself is in its row and its column, so
it is removed from the column part (the only overlap).

Complexity: O(N (r + c) d) time, O(N (r + c)) memory; O(N sqrt N) for a
square grid. Backward: the union backward (flash-attention
dS = P * (dP - rowsum(dO * O)) per part plus the log-sum-exp merge terms).

Cache: :class:`AxialCache` (the union cache and the grid).

Decoding (:mod:`effattn.nn.decode`, the KV window, on a fixed ``shape``; raster order): token t
sees the earlier keys on its lines along the attended axes. Key j is read by the cells of its
lines after it, the last of which has coordinate s_a - 1 on axis a; the window keeps j until t
passes the last such cell over the attended axes. With a the outermost attended axis, the
window holds at most s_a s_{a+1} ... s_{k-1} - 1 keys. Along the rows alone (axis="row") that is
the current row: at most c - 1 keys, bounded. Along the columns of a 2-D grid ("column", and the
default "both") each column's earlier cells stay reachable until the last row, so the window
holds all t keys at position t (draining only along the last row): it grows with t, up to the
grid's r c cells, the KV cache of ``full`` on that grid. A step scores the held keys and masks
those off its lines. Decoding stops at the grid's last cell.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_bool, check_int, check_qkv, check_scale
from ..nn.image import default_image_shape, raster_coords
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.union import Part, union_backward, union_forward, union_weights
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


class AxialCache(NamedTuple):
    union: object     # UnionCache
    shape: tuple      # the grid
    axes: tuple       # grid axes attended along
    causal: bool
    n: int


def _check_shape(shape, n):
    """``shape``: a tuple of >= 1 positive ints whose product is >= n (the padded grid)."""
    if not isinstance(shape, (tuple, list)) or len(shape) < 1:
        raise ValueError(f"shape must be a tuple of positive grid sizes, e.g. (rows, cols), got {shape!r}")
    shape = tuple(check_int("shape", s) for s in shape)
    if math.prod(shape) < n:
        raise ValueError(f"shape {shape} holds {math.prod(shape)} cells, fewer than the N={n} positions")
    return shape


def _resolve_axes(axis, ndim):
    """axis ("row" | "column" | "both" | int | tuple of ints) -> sorted tuple of grid axes."""
    names = {"row": (ndim - 1,), "column": (ndim - 2,) if ndim >= 2 else None, "both": tuple(range(ndim))}
    if isinstance(axis, str):
        if axis not in names or names[axis] is None:
            raise ValueError(f"axis must be 'row', 'column', 'both', an int or a tuple of ints, got {axis!r}"
                             f" (grid of {ndim} axes)")
        return names[axis]
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"axis must name grid axes in [-{ndim}, {ndim}), got {axis!r}")
        out.append(a % ndim)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"axis must name distinct grid axes, got {axis!r}")
    return tuple(sorted(out))


def build_pattern(n, *, shape=None, axis="both", causal=False, xp=None):
    """The rule as a bool (n, n) mask: j shares every grid coordinate of i except
    along one of the attended axes (and j <= i if causal). ``shape=None``: the default grid."""
    xp = get_namespace() if xp is None else xp
    n = check_int("n", n)
    shape = default_image_shape(n) if shape is None else _check_shape(shape, n)
    axes = _resolve_axes(axis, len(shape))
    ci = raster_coords(xp.arange(n)[:, None], shape)  # per axis (N, 1)
    cj = raster_coords(xp.arange(n)[None, :], shape)  # per axis (1, N)
    allowed = xp.zeros((n, n), dtype=bool)
    for a in axes:
        same = xp.ones((n, n), dtype=bool)
        for b in range(len(shape)):
            if b != a:
                same = same & (ci[b] == cj[b])       # same coordinates off axis a
        allowed = allowed | same
    if causal:
        allowed = allowed & (xp.arange(n)[None, :] <= xp.arange(n)[:, None])
    return allowed


def _part(n, shape, axis, *, causal, exclude_self=False, xp=None):
    """The :class:`Part` of one grid axis: groups = lines of the grid along ``axis``."""
    xp = get_namespace() if xp is None else xp
    pos = xp.arange(math.prod(shape)).reshape(shape)
    lines = xp.moveaxis(pos, axis, -1).reshape(-1, shape[axis])   # (cells / s_a, s_a): one line per group
    i = lines[:, :, None]
    j = lines[:, None, :]
    ok = (i < n) & (j < n)                                        # padding cells are masked
    if causal:
        ok = ok & (j <= i)                                        # raster order: earlier in the line
    if exclude_self:
        ok = ok & (j != i)                                        # i is already in the first part
    return Part(lines, lines, ok, f"axis {axis}")


@forward_of("axial")
def forward(q, k, v, *, causal=False, key_mask=None, shape=None, axis="both", scale=None):
    """Axial attention.

    q, k, v (..., N, d) / (..., N, dv) (self-attention); shape: the grid
    (default :func:`effattn.nn.image.default_image_shape`); axis: "row" | "column" | "both" | int |
    tuple of ints; key_mask (..., N) bool. Returns out (..., N, dv), :class:`AxialCache`.
    """
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    causal = check_bool("causal", causal)
    shape = default_image_shape(n) if shape is None else _check_shape(shape, n)
    axes = _resolve_axes(axis, len(shape))
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    parts = tuple(_part(n, shape, a, causal=causal, exclude_self=t > 0, xp=xp) for t, a in enumerate(axes))
    out, cache = union_forward(q, k, v, parts, key_mask=key_mask, scale=scale)
    return out, AxialCache(cache, shape, axes, causal, n)


@backward_of("axial")
def backward(dout, cache):
    """Gradients {"q": dq, "k": dk, "v": dv}."""
    return union_backward(dout, cache.union)


@reads_cache("axial")
def weights(cache):
    """The effective attention matrix (..., N, N): out == W @ v. Teaching sizes only."""
    return union_weights(cache.union)


@reads_cache("axial")
def pattern(cache):
    """The rule (not the fast path) as a bool (N, N) mask."""
    xp = get_namespace(cache.union.out)
    return build_pattern(cache.n, shape=cache.shape, axis=cache.axes, causal=cache.causal, xp=xp)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; a near-square grid with padding, axis="both"."""
    return {}, {"shape": default_image_shape(n), "axis": "both"}


# --------------------------------------------------------------------------- decoding
class DecodeRule(NamedTuple):
    """The causal axial rule on a fixed grid, as the KV window's ``reach`` and ``keep``."""

    shape: tuple      # the grid
    axes: tuple       # grid axes attended along

    def _stride(self, a):
        return math.prod(self.shape[a + 1:])          # raster distance of one step along axis a

    def reach(self, i, pos):
        """Keys pos <= i that share every coordinate of i except along one attended axis."""
        xp = get_namespace(pos)
        ci, cj = raster_coords(i, self.shape), raster_coords(pos, self.shape)
        allowed = xp.zeros(pos.shape, dtype=bool)
        for a in self.axes:
            same = xp.ones(pos.shape, dtype=bool)
            for b in range(len(self.shape)):
                if b != a:
                    same = same & (cj[b] == ci[b])
            allowed = allowed | same
        return allowed & (pos <= i)

    def last_query(self, pos):
        """The last raster position that reads key pos: on one of its lines, at the far end."""
        xp = get_namespace(pos)
        coords = raster_coords(pos, self.shape)
        ends = [pos + (self.shape[a] - 1 - coords[a]) * self._stride(a) for a in self.axes]
        return functools.reduce(xp.maximum, ends)

    def keep(self, t, pos):
        return self.last_query(pos) >= t


def init_state(*, lead, d, dv, dtype="float64", shape=None, axis="both", scale=None):
    """The KV window (:class:`effattn.nn.decode.WindowState`) of the causal axial pattern on the
    fixed grid ``shape`` (:class:`DecodeRule`): a key is kept while a later cell of one of its
    attended lines is still to come: at most s_a ... s_{k-1} - 1 keys (with their values and mask
    bits) per batch element and head, a the outermost attended axis. axis="row": the current row
    up to t, at most c - 1 keys, bounded; with the column axis of a 2-D grid ("column", "both")
    every earlier key, t keys at position t (growing with t, draining along the last row).
    ``shape`` is required (its default depends on N)."""
    if shape is None:
        raise ValueError("shape must be given to decode: its default (a near-square grid of N cells) depends "
                         "on the sequence length N, which a decoder does not know")
    shape = _check_shape(shape, 1)
    axes = _resolve_axes(axis, len(shape))
    scale = check_scale(scale, d)
    rule = DecodeRule(shape, axes)
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale, reach=rule.reach, keep=rule.keep,
                        capacity=math.prod(shape), forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, shape=shape,
                                                            axis=axes, scale=scale)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="axial",
    title="Axial attention",
    citation="Ho et al., 2019",
    url="https://arxiv.org/abs/1912.12180",
    classes=("FP",),
    complexity="O(N√N)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="01_fixed_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    init_state=init_state,
    prefill=prefill,
    step=step,
    summary="The sequence as a grid; attend along its rows and columns: O(N sqrt N) on a square grid.",
))
