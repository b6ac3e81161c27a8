"""Input validation shared by every public function.

Every check raises ``ValueError`` whose message starts with the argument's
name and says what was expected, so a user sees at once which input is wrong.
These helpers only inspect shapes, dtypes and (cheaply, O(size)) finiteness;
they never copy data.
"""
from __future__ import annotations

import math
import numbers

from .backend import get_namespace


# The dtype policy, stated once: every array a mechanism computes with is float32 or float64.
# float16, bfloat16 and longdouble are refused (float16's 11-bit mantissa flips LSH buckets and
# overflows exp at logits > 11; convert with ``x.astype(np.float32)`` and back).
FLOAT_DTYPES = ("float32", "float64")


class NonFiniteError(ValueError):
    """An array holds NaN or inf (the message names it): raised by :func:`check_float_array`, so
    that a caller such as the trainer can tell numbers that diverged from a wrong argument."""


def is_floating(a) -> bool:
    return str(getattr(a, "dtype", None)) in FLOAT_DTYPES


def check_float_array(name, a, *, min_ndim=1, ndim=None, finite=True):
    """``a`` must be a float32 or float64 array of rank >= min_ndim (or exactly ndim), finite."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array (numpy or cupy), got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(a.shape)}")
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have rank >= {min_ndim}, got shape {tuple(a.shape)}")
    if not is_floating(a):
        raise ValueError(f"{name} must be a float32 or float64 array, got dtype {a.dtype}; "
                         f"convert it first, e.g. {name}.astype(numpy.float32)")
    if finite and a.size and not bool(get_namespace(a).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or inf")
    return a


def check_int(name, value, *, minimum=1):
    """``value`` must be an integer >= minimum (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_float(name, value):
    """``value`` must be a finite real number > 0 (not a bool); returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_nonnegative_float(name, value):
    """``value`` must be a finite real number >= 0 (not a bool); returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_scale(scale, d):
    """The logit scale of ``softmax(scale * q k^T)``: ``d ** -0.5`` when ``scale`` is None (Vaswani et al.),
    else a finite positive number. Always a Python float, so a float32 computation stays float32."""
    return d ** -0.5 if scale is None else check_positive_float("scale", scale)


def check_bool(name, value):
    if not isinstance(value, (bool,)) and type(value).__name__ != "bool_":
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_causal(causal, supported: bool, why: str = ""):
    """Validate the ``causal`` flag; raise with the mechanism's reason when unsupported."""
    causal = check_bool("causal", causal)
    if causal and not supported:
        raise ValueError(f"causal=True is not supported: {why}")
    return causal


def check_key_mask(key_mask, lead, m):
    """``key_mask``: boolean, shape broadcastable to ``lead + (m,)``; True marks a real key."""
    if key_mask is None:
        return None
    if not hasattr(key_mask, "dtype") or key_mask.dtype.kind != "b":
        raise ValueError(f"key_mask must be a boolean array (True = real token), got {getattr(key_mask, 'dtype', type(key_mask).__name__)}")
    if key_mask.ndim < 1 or key_mask.shape[-1] != m:
        raise ValueError(f"key_mask must have shape (..., {m}) matching the key length, got {tuple(key_mask.shape)}")
    if key_mask.ndim - 1 > len(lead) or not _broadcastable(key_mask.shape[:-1], lead):
        raise ValueError(f"key_mask leading shape {tuple(key_mask.shape[:-1])} does not broadcast to {tuple(lead)}")
    return key_mask


def broadcast_shapes(*shapes):
    """NumPy's broadcasting rule on shape tuples (pure Python, for either backend)."""
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0} - {1}
        if len(dims) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _broadcastable(a, b):
    try:
        broadcast_shapes(a, b)
    except ValueError:
        return False
    return True


def check_leading(name, a, lead, core, want):
    """The axes of ``a`` before its last ``core`` must broadcast to ``lead`` (the batch and head
    axes of the inputs); ``want`` describes the expected shape in the message."""
    head = tuple(a.shape[:a.ndim - core])
    if len(head) > len(lead) or not _broadcastable(head, lead) or broadcast_shapes(head, tuple(lead)) != tuple(lead):
        raise ValueError(f"{name} must have shape {want} with leading axes broadcasting to {tuple(lead)}, "
                         f"got {tuple(a.shape)}")
    return a


def check_qkv(q, k, v, *, key_mask=None, self_attention=False):
    """Validate ``q (..., N, d)``, ``k (..., M, d)``, ``v (..., M, dv)`` and ``key_mask (..., M)``.

    Leading (batch, head) axes must be equal; dtypes floating and equal.
    ``self_attention=True`` also requires ``M == N``. Returns ``(N, M, d, dv)``.
    """
    check_float_array("q", q, min_ndim=2)
    check_float_array("k", k, min_ndim=2)
    check_float_array("v", v, min_ndim=2)
    n, d = q.shape[-2:]
    m = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"k must have the same feature size d={d} as q, got shape {tuple(k.shape)}")
    if v.shape[-2] != m:
        raise ValueError(f"v must have as many positions as k (M={m}), got shape {tuple(v.shape)}")
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k and v must have the leading (batch, head) shape of q {tuple(q.shape[:-2])}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if n < 1 or m < 1 or d < 1:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if self_attention and m != n:
        raise ValueError(f"k must have the same length as q (self-attention, N={n}), got M={m}")
    check_key_mask(key_mask, q.shape[:-2], m)
    return n, m, d, v.shape[-1]


def check_param(name, a, shape, dtype=None):
    """A learnable parameter: floating, exactly ``shape`` (None entries are free), dtype like the inputs."""
    check_float_array(name, a, min_ndim=0)
    if len(a.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} like the inputs, got {a.dtype}")
    return a


def check_mlp_params(W1, b1, W2, b2, d, width, dtype, what):
    """Parameters of :func:`effattn.nn.functional.mlp_forward`: W1 (d, d_h), b1 (d_h,),
    W2 (d_h, L) with L >= width, b2 (L,). ``what`` says what the width counts."""
    check_param("W1", W1, (d, None), dtype=dtype)
    dh = W1.shape[1]
    check_param("b1", b1, (dh,), dtype=dtype)
    check_param("W2", W2, (dh, None), dtype=dtype)
    if W2.shape[1] < width:
        raise ValueError(f"W2 must have at least {what}={width} columns, got shape {tuple(W2.shape)}")
    check_param("b2", b2, (W2.shape[1],), dtype=dtype)
