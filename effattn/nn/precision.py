"""Low precision, emulated exactly (issue 16; the survey's "low-precision arithmetic").

The package computes in float32 or float64 (``validate.FLOAT_DTYPES``); this module emulates the
two 16-bit storage formats of mixed-precision training and int8 quantised attention on top of
float32, so that every number a 16-bit unit would store is the number stored here:

* **bfloat16** (8 exponent bits, 7 mantissa bits: float32's range, 2^-8 relative spacing) —
  :func:`round_bf16` rounds a float32 to the nearest bfloat16, ties to even, by integer
  arithmetic on the float32 bit pattern: add 0x7FFF plus the lowest kept bit, clear the 16 low
  bits. A carry into the exponent rounds the largest values to infinity, as the format does.
* **float16** (5 exponent bits, 10 mantissa bits: largest finite 65504, subnormals below
  2^-14) — :func:`round_fp16` goes through the array module's IEEE float16 conversion (round to
  nearest, ties to even; overflow to +-inf) and back.

Mixed-precision training (Micikevicius et al., 2018, https://arxiv.org/abs/1710.03740) keeps
float32 **master weights**; each linear layer computes with a 16-bit copy of its weight and
input, accumulates in float32 (as a bf16/fp16 matrix unit does) and stores its output and its
gradients in 16 bits (:func:`set_storage` switches a model's ``Linear`` layers to that;
everything else -- softmax, layer norm, the optimizer -- stays float32). float16's small range
makes gradients underflow to zero, hence **dynamic loss scaling** (:class:`LossScaler`): the loss
is multiplied by S before the backward, the gradients divided by S after; a step whose gradients
overflowed (inf or NaN) is skipped and S halved; after ``growth_interval`` good steps S doubles.

:func:`lowp_attention` runs softmax attention with bf16/fp16 storage (the error tables of
notebook 10). **int8 attention** (:func:`int8_attention`, in the manner of Q8BERT / LLM.int8 without outliers):
symmetric scales, q and k per row for the logits, P per row and v per column for the output:

    x_int = round(x / s),  s = max|x| / 127 (per row or column),   x ~ s * x_int
    S = scale * (s_q s_k^T) * (Q_int K_int^T),   P = softmax(S),   out = (s_P s_v^T) * (P_int V_int)

with the integer products summed exactly (they are computed in floating point, where every
partial sum stays below 2^24 = 16777216 for d <= 1040 in float32: exact, as an int32
accumulator is).
"""
from __future__ import annotations

import contextlib

from ..backend import get_namespace
from ..validate import check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
INT8_MAX = 127


def _quiet(xp):
    """Silence overflow warnings where the array module has them (NumPy's errstate)."""
    errstate = getattr(xp, "errstate", None)
    return errstate(over="ignore", invalid="ignore") if errstate else contextlib.nullcontext()


def round_bf16(x):
    """x (any shape, float32 or float64) -> float32 array of the nearest bfloat16 values (ties to even)."""
    xp = get_namespace(x)
    x32 = xp.asarray(x, dtype=xp.float32)
    bits = x32.view(xp.uint32)
    lsb = (bits >> 16) & 1                                   # the lowest bit bfloat16 keeps
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(xp.uint32).view(xp.float32)
    return xp.where(xp.isnan(x32), x32, rounded)             # a NaN stays NaN (the carry could make it inf)


def round_fp16(x):
    """x (any shape) -> float32 array of the nearest float16 values (IEEE: ties to even, +-inf beyond 65504)."""
    xp = get_namespace(x)
    with _quiet(xp):                                         # overflow to inf is the format's behaviour
        return xp.asarray(x, dtype=xp.float32).astype(xp.float16).astype(xp.float32)


def rounder(precision):
    """The storage rounding of ``precision`` ("fp32": None, exact; "bf16"; "fp16")."""
    precision = check_choice("precision", precision, PRECISIONS)
    return {"fp32": None, "bf16": round_bf16, "fp16": round_fp16}[precision]


def set_storage(model, precision):
    """Make every ``Linear`` of ``model`` compute and store in ``precision`` (see the module
    docstring; the parameters stay float32 master weights). Returns the number of layers switched."""
    from .modules import Linear

    rnd = rounder(precision)
    count = 0
    for _, m in model.modules():
        if isinstance(m, Linear):
            m.storage = rnd
            count += 1
    return count


class LossScaler:
    """Dynamic loss scaling for float16 training.

    ``scale`` S multiplies the loss before the backward (``Model.loss_and_backward(..., loss_scale=S)``);
    :meth:`unscale` then divides the gradients by S in place and says whether the step may be
    applied. On inf/NaN in any gradient: the step is skipped, S *= ``backoff``; after
    ``growth_interval`` applied steps in a row: S *= ``growth``. ``history`` records
    (S used, applied) per step, ``skipped`` counts the skipped steps.
    """

    def __init__(self, scale=2.0 ** 15, *, growth=2.0, backoff=0.5, growth_interval=200, min_scale=1.0):
        from ..validate import check_int, check_positive_float

        self.scale = check_positive_float("scale", scale)
        self.growth = check_positive_float("growth", growth)
        self.backoff = check_positive_float("backoff", backoff)
        self.growth_interval = check_int("growth_interval", growth_interval)
        self.min_scale = check_positive_float("min_scale", min_scale)
        if not self.growth > 1:
            raise ValueError(f"growth must be > 1, got {growth}")
        if not self.backoff < 1:
            raise ValueError(f"backoff must be < 1, got {backoff}")
        self.good = 0
        self.skipped = 0
        self.history = []

    def unscale(self, grads):
        """Divide every gradient of ``grads`` ({name: array}) by S in place if all are finite and
        return True; else leave them, shrink S and return False (skip this step)."""
        finite = all(bool(get_namespace(g).isfinite(g).all()) for g in grads.values())
        if finite:
            self.history.append((self.scale, True))
            inv = 1.0 / self.scale
            for g in grads.values():
                g *= inv
            self.good += 1
            if self.good >= self.growth_interval:
                self.scale *= self.growth
                self.good = 0
        else:
            self.overflowed()
        return finite

    def overflowed(self):
        """Record a skipped step (its gradients overflowed, here or inside the backward) and shrink S."""
        self.history.append((self.scale, False))
        self.scale = max(self.scale * self.backoff, self.min_scale)
        self.good = 0
        self.skipped += 1

    def state_dict(self):
        return {"scale": self.scale, "good": self.good, "skipped": self.skipped}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`'s ``scale``, ``good`` and ``skipped`` (checked first: nothing
        changes on a bad entry), so a resumed float16 run goes on with the scale it had."""
        from ..validate import check_positive_float

        if not isinstance(state, dict) or set(state) != {"scale", "good", "skipped"}:
            raise ValueError(f"loss-scaler state must have scale, good and skipped, got {state!r}")
        scale = check_positive_float("scale", state["scale"])
        counts = {}
        for key in ("good", "skipped"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"loss-scaler state: {key} must be an integer >= 0, got {v!r}")
            counts[key] = v
        self.scale, self.good, self.skipped = scale, counts["good"], counts["skipped"]


# --------------------------------------------------------------------------- softmax in float16
def softmax_in(x, dtype="float16", *, subtract_max=True):
    """Row softmax of ``x`` (..., M) computed entirely in ``dtype`` (float16 arithmetic here,
    for teaching): without the max subtraction, exp overflows float16 for logits above
    ln(65504) ~ 11.09 and the row becomes inf / inf = NaN."""
    xp = get_namespace(x)
    s = xp.asarray(x).astype(dtype)
    if subtract_max:
        s = s - s.max(axis=-1, keepdims=True)
    with _quiet(xp):                                         # the overflow is what this shows
        e = xp.exp(s)
        return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- int8 attention
def quantize_int8(x, axis=-1):
    """Symmetric int8 quantisation along ``axis``: (x_int int8, s float32) with x ~ s * x_int,
    s = max|x| / 127 over ``axis`` (kept as a length-1 axis; an all-zero slice gets s = 1)."""
    xp = get_namespace(x)
    x = xp.asarray(x, dtype=xp.float32)
    amax = xp.abs(x).max(axis=axis, keepdims=True)
    s = xp.where(amax > 0, amax / INT8_MAX, 1.0).astype(xp.float32)
    return xp.clip(xp.rint(x / s), -INT8_MAX, INT8_MAX).astype(xp.int8), s


def _int_matmul(a, b):
    """Exact product of two int8 arrays (..., n, d) @ (..., d, m), summed in float32 when every
    sum fits its 24-bit mantissa (d * 127^2 < 2^24), else in float64."""
    xp = get_namespace(a)
    dt = xp.float32 if a.shape[-1] * INT8_MAX ** 2 < 2 ** 24 else xp.float64
    return a.astype(dt) @ b.astype(dt)


def int8_attention(q, k, v, *, scale=None):
    """Softmax attention with both products in int8 (module docstring): q (..., N, d),
    k (..., M, d), v (..., M, dv) -> out (..., N, dv) float32. Non-causal, no masks: a
    measuring tool for the error of int8 arithmetic, not a registry kernel."""
    xp = get_namespace(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qi, sq = quantize_int8(q, axis=-1)                          # (..., N, d), (..., N, 1)
    ki, sk = quantize_int8(k, axis=-1)                          # (..., M, d), (..., M, 1)
    s = _int_matmul(qi, xp.swapaxes(ki, -1, -2)) * (sq * xp.swapaxes(sk, -1, -2)) * scale
    s = s - s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)                          # (..., N, M) float32
    pi, sp = quantize_int8(p, axis=-1)                          # per row of P
    vi, sv = quantize_int8(v, axis=-2)                          # per column of v: (..., 1, dv)
    return (_int_matmul(pi, vi) * sp * sv).astype(xp.float32)


def lowp_attention(q, k, v, *, precision="bf16", scale=None):
    """Softmax attention with every stored array in ``precision`` ("bf16" / "fp16"; "fp32" exact)
    and every sum accumulated in float32, as a 16-bit matrix unit computes it: q, k, v rounded;
    S = q k^T scale rounded; P = softmax(S) (max subtracted, in float32) rounded; out = P v rounded.
    q (..., N, d), k (..., M, d), v (..., M, dv) -> out (..., N, dv) float32. Non-causal, no
    masks: a measuring tool, like :func:`int8_attention`."""
    xp = get_namespace(q, k, v)
    rnd = rounder(precision) or (lambda a: xp.asarray(a, dtype=xp.float32))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qr, kr, vr = rnd(q), rnd(k), rnd(v)
    with _quiet(xp):
        s = rnd(qr @ xp.swapaxes(kr, -1, -2) * scale)
        s = s - s.max(axis=-1, keepdims=True)
        p = xp.exp(s)
        p = rnd(p / p.sum(axis=-1, keepdims=True))
        return rnd(p @ vr)
