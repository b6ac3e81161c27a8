"""The table of mechanisms that drives the tests, the command line, the figures,
the benchmarks and the README.

A mechanism module registers itself at import time::

    register(Mechanism(name="local", title="Blockwise local attention", ...,
                       forward=forward, backward=backward, weights=weights,
                       setup=setup, pattern=pattern))

and every module under ``effattn/attention`` and ``effattn/layers`` is
imported on the first :func:`get` / :func:`names`, so adding a file is all it
takes to join the contract tests (``tests/test_contract.py``), ``python -m
effattn list/check/bench`` and the README table. :func:`get` and :func:`names`
are the one public way to look mechanisms up (``effattn.get``, ``effattn.names``).

Kernel mechanisms map ``(q, k, v) -> out``. Their :class:`Case` is built from
``setup(rng, n=..., d=..., heads=..., causal=..., dtype=...) -> (params, config)``:
``params`` are the mechanism's learnable arrays (shape per head or shared, as
the mechanism documents; they go into ``case.inputs`` and get gradients) and
``config`` its sizes, flags and random draws. The same ``setup`` lets
``nn.MultiHeadAttention`` build any kernel inside a model.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from typing import Callable

import numpy as np

from . import backend
from .validate import FLOAT_DTYPES, check_float_array, check_int

KINDS = ("kernel", "layer")

# The survey's taxonomy (Figure 2 / Table 1 of Tay et al.).
TAXONOMY = {
    "FP": "fixed patterns",
    "CP": "combination of patterns",
    "LP": "learnable patterns",
    "M": "neural memory",
    "LR": "low rank",
    "KR": "kernels",
    "RC": "recurrence",
    "DS": "downsampling",
    "SP": "sparse models / conditional computation",
    "TR": "transformer (baseline)",
}


@dataclasses.dataclass
class Case:
    """One example input of a mechanism.

    inputs:  every differentiable array (q, k, v or x, and the mechanism's parameters)
    config:  everything else (sizes, flags, random draws), passed as keywords
    seq_inputs: names of inputs whose axis -2 is the sequence position (causality test)
    key_inputs: names of inputs whose axis -2 is indexed by key position (key_mask test)
    out_follows_keys: output rows are the key positions too (layers such as ISAB,
        shared-QK Reformer): the key_mask test then compares only unmasked rows
    out_positions: layers whose output is shorter or longer than their input (downsampling,
        Perceiver AR): for each output row, the input position it stands for -- a causal layer's
        row r may read inputs up to out_positions[r] only (the causality test). None: row r is
        position r.
    real_rows: such layers' key-mask rule: ``real_rows(key_mask (..., M)) -> bool (..., N')``,
        the output rows that are real (a pooled position is real if any of its inputs is); the
        key_mask test compares only those. None: every row (or, with out_follows_keys, the
        unmasked ones).
    n, m: query and key lengths
    """

    inputs: dict
    config: dict
    seq_inputs: tuple = ("q", "k", "v")
    key_inputs: tuple = ("k", "v")
    out_follows_keys: bool = False
    out_positions: tuple | None = None
    real_rows: Callable | None = None
    n: int = 0
    m: int = 0


def _dtype_name(dtype):
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """The registry entry of one mechanism (see the module docstring)."""

    name: str
    title: str
    citation: str
    url: str
    classes: tuple
    complexity: str
    causal: bool
    exact: bool
    kind: str
    notebook: str
    forward: Callable
    backward: Callable
    weights: Callable | None = None
    setup: Callable | None = None          # kernels: (rng, *, n, d, heads, causal, dtype) -> (params, config)
    make_example: Callable | None = None   # layers (or special kernels): (rng, batch, heads, n, d, causal, dtype) -> Case
    pattern: Callable | None = None        # exact kernels: cache -> bool (..., N, M) built from the paper's rule
    reference: Callable | None = None      # optional dense O(N^2) oracle: (**inputs, **config) -> out
    init_state: Callable | None = None     # decoding (causal kernels): (*, lead, d, dv, dtype, **config) -> state
    prefill: Callable | None = None        # (q, k, v, state, *, key_mask) -> (out, state): the prompt in one pass
    step: Callable | None = None           # (q_t, k_t, v_t, state, *, key_mask_t) -> (out_t, state)
    bounded_state: bool = False            # the decoder state does not grow with the position
    sizes: tuple = ()                      # config entries that must be positive integers (bad-input test)
    tol32: float = 1e-4                    # float32 vs float64 tolerance (max abs err / max abs value)
    subquadratic: bool = True              # efficient path must not allocate N x N
    min_n: int = 1                         # the shortest sequence its example() and forward accept
    windows: tuple = ()                    # config sizes that may exceed the sequence: clipped, never allocated
    summary: str = ""
    aux_loss: Callable | None = None       # layers with auxiliary losses: cache -> the weighted scalar backward adds to sum(dout * out)
    aux_trains: tuple | None = None        # the inputs the auxiliary loss's gradient reaches (None: all; compressive: Wc, bc -- a stop-gradient elsewhere)
    next_memory: Callable | None = None    # recurrent layers: cache -> the next segment's state, a tuple in state_keys order
    state_keys: tuple = ()                 # recurrent layers: the forward's keywords that next_memory's tuple fills
    one_pass: Callable | None = None       # recurrent layers: (x (.., T, D), *, segment, key_mask, **config) -> out, what the segments compute

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        unknown = [c for c in self.classes if c not in TAXONOMY]
        if unknown:
            raise ValueError(f"classes {unknown} are not survey taxonomy codes {tuple(TAXONOMY)}")
        if self.kind == "kernel" and self.setup is None and self.make_example is None:
            raise ValueError(f"kernel {self.name!r} needs setup= (or make_example=)")
        if self.kind == "layer" and self.make_example is None:
            raise ValueError(f"layer {self.name!r} needs make_example=")

    def example(self, rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64") -> Case:
        """A random :class:`Case` of this mechanism, drawn on the host from ``rng`` and
        moved to the active backend. Same rng state, same case."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        batch, heads, n, d = (check_int(k, x) for k, x in (("batch", batch), ("heads", heads), ("n", n), ("d", d)))
        if _dtype_name(dtype) not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        if n < self.min_n:
            raise ValueError(f"n must be >= {self.min_n} for {self.name}, got {n}")
        if causal and not self.causal:
            raise ValueError(f"causal=True is not supported by {self.name}")
        if self.make_example is not None:
            return self.make_example(rng, batch=batch, heads=heads, n=n, d=d, causal=causal, dtype=dtype)
        shape = (batch, heads, n, d)
        q, k, v = (backend.asarray(rng.standard_normal(shape), dtype=dtype) for _ in range(3))
        params, config = self.setup(rng, n=n, d=d, heads=heads, causal=causal, dtype=dtype)
        inputs = {"q": q, "k": k, "v": v, **params}
        return Case(inputs=inputs, config={"causal": causal, **config}, n=n, m=n)


# --------------------------------------------------------------------------- the cache a forward returns
class Cache:
    """What a mechanism's ``forward`` returns beside ``out``.

    ``saved`` is the mechanism's own record (a NamedTuple of what its backward needs); the
    envelope adds the mechanism's name and the shape and dtype of ``out``, so that ``backward``
    can check ``dout`` and refuse a cache from another mechanism by name. The fields of ``saved``
    read through: ``cache.attend`` is ``cache.saved.attend``, and ``a, b, ... = cache`` unpacks it.

    The cache holds references, not copies: several mechanisms keep ``out`` itself (the softmax
    backward uses it), so editing ``out`` in place after ``forward`` changes what a later
    ``backward`` returns. Copy ``out`` before editing it.
    """

    __slots__ = ("mechanism", "shape", "dtype", "saved")

    def __init__(self, mechanism, shape, dtype, saved):
        self.mechanism, self.shape, self.dtype, self.saved = mechanism, tuple(shape), dtype, saved

    def __getattr__(self, name):                      # only for names that are not the envelope's own
        if name in Cache.__slots__:
            raise AttributeError(name)
        return getattr(self.saved, name)

    def __iter__(self):
        return iter(self.saved)

    def __len__(self):
        return len(self.saved)

    def __getitem__(self, i):
        return self.saved[i]

    def __repr__(self):
        return f"Cache({self.mechanism}, out {self.shape} {self.dtype}, {type(self.saved).__name__})"


def _saved(name, cache):
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be the cache that {name}.forward returned, got {type(cache).__name__}")
    if cache.mechanism != name:
        raise ValueError(f"cache comes from {cache.mechanism}.forward, not {name}.forward")
    return cache.saved


def forward_of(name):
    """Decorator for the ``forward`` of mechanism ``name``: its ``(out, saved)`` becomes
    ``(out, Cache(name, out.shape, out.dtype, saved))``."""
    def decorate(fn):
        @functools.wraps(fn)
        def forward(*args, **kwargs):
            out, saved = fn(*args, **kwargs)
            return out, Cache(name, out.shape, out.dtype, saved)
        return forward
    return decorate


def backward_of(name):
    """Decorator for the ``backward(dout, cache)`` of mechanism ``name``: ``cache`` must come
    from ``name``'s forward and ``dout`` must be finite with the shape and dtype of ``out``; the
    body receives the mechanism's own ``saved`` record."""
    def decorate(fn):
        @functools.wraps(fn)
        def backward(dout, cache):
            saved = _saved(name, cache)
            check_float_array("dout", dout, min_ndim=0)
            if tuple(dout.shape) != cache.shape:
                raise ValueError(f"dout must have the shape of out {cache.shape}, got {tuple(dout.shape)}")
            if dout.dtype != cache.dtype:
                raise ValueError(f"dout must have the dtype of out ({cache.dtype}), got {dout.dtype}")
            return fn(dout, saved)
        return backward
    return decorate


def reads_cache(name):
    """Decorator for a function of mechanism ``name`` whose last argument is a cache
    (``weights``, ``pattern``, ...): checks it and passes on the ``saved`` record."""
    def decorate(fn):
        last = list(inspect.signature(fn).parameters)[-1]
        if last != "cache":
            raise TypeError(f"{fn.__qualname__}: reads_cache needs 'cache' as the last parameter")

        @functools.wraps(fn)
        def reader(*args, **kwargs):
            if "cache" in kwargs:
                kwargs["cache"] = _saved(name, kwargs["cache"])
            else:
                args = args[:-1] + (_saved(name, args[-1]),)
            return fn(*args, **kwargs)
        return reader
    return decorate


_REGISTRY: dict[str, Mechanism] = {}
_DISCOVERED = {"done": False}


def register(mech: Mechanism) -> Mechanism:
    """Add a mechanism to the table (its name must be new)."""
    if mech.name in _REGISTRY and _REGISTRY[mech.name] is not mech:
        raise ValueError(f"a mechanism named {mech.name!r} is already registered")
    _REGISTRY[mech.name] = mech
    return mech


def _discover():
    if _DISCOVERED["done"]:
        return
    _DISCOVERED["done"] = True
    for pkg_name in ("effattn.attention", "effattn.layers"):
        pkg = importlib.import_module(pkg_name)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")


def _order(m: Mechanism):
    return (m.notebook, m.name != "full", m.name)


def names(kind: str | None = None) -> list:
    """Registered names, in the survey's order (by notebook), optionally only one kind."""
    _discover()
    mechs = sorted(_REGISTRY.values(), key=_order)
    return [m.name for m in mechs if kind is None or m.kind == kind]


def get(name: str) -> Mechanism:
    """The :class:`Mechanism` registered as ``name``; unknown names list the valid ones."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown mechanism {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]
