"""Stateful layers built from the forward/backward pairs of :mod:`effattn.nn.functional`.

A :class:`Module` holds its learnable arrays in ``params`` and their
gradients in ``grads`` (same names, same shapes). ``forward`` computes the
output and keeps what the backward needs in ``self.cache`` (one forward, one
backward: calling forward twice before backward overwrites the cache, as in
CS231n's layer objects); ``backward(dout)`` *accumulates* into ``grads`` and
returns the gradient of the input. Submodules are registered by assigning
them as attributes (``self.q = Linear(...)``) or with :meth:`Module.add`;
:meth:`Module.parameters` yields ``("blocks.0.attn.q.W", array)`` pairs over
the whole tree — the names the optimizer state and the checkpoints use.

Parameters are created on the host from an explicit ``numpy.random.Generator``
(``rng``) and moved to the active backend, so one seed gives the same model on
NumPy and CuPy. This module never imports numpy.

Multi-head attention around a registered kernel lives one layer up, in
:mod:`effattn.models.attention` (it needs the registry; ``nn`` never imports it).
"""
from __future__ import annotations

from .. import backend
from ..backend import get_namespace
from ..validate import check_int
from . import functional as F


# --------------------------------------------------------------------------- base
class Module:
    """Base class: ``params``/``grads`` dicts, named submodules, ``parameters()``, ``zero_grad()``."""

    def __init__(self):
        object.__setattr__(self, "params", {})
        object.__setattr__(self, "grads", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "cache", None)

    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def add(self, name, module):
        """Register ``module`` under ``name`` (used for lists of blocks: ``"blocks.0"``)."""
        if not isinstance(module, Module):
            raise ValueError(f"module must be a Module, got {type(module).__name__}")
        self._modules[name] = module
        return module

    def add_param(self, name, array):
        self.params[name] = array
        self.grads[name] = get_namespace(array).zeros_like(array)
        return array

    def modules(self, prefix=""):
        """(qualified name, module) over the tree, depth first, this module first."""
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.modules(f"{prefix}{name}.")

    def parameters(self):
        """(qualified name, array) for every learnable array in the tree, in a fixed order."""
        for prefix, m in self.modules():
            for name, p in m.params.items():
                yield prefix + name, p

    def gradients(self):
        """(qualified name, gradient) in the order of :meth:`parameters`."""
        for prefix, m in self.modules():
            for name in m.params:
                yield prefix + name, m.grads[name]

    def zero_grad(self):
        for _, m in self.modules():
            for name, p in m.params.items():
                m.grads[name] = get_namespace(p).zeros_like(p)

    def num_parameters(self):
        return sum(int(p.size) for _, p in self.parameters())

    def load_parameters(self, arrays):
        """Copy ``{qualified name: array}`` into the parameters, in place.

        Every name and shape is checked first (:meth:`check_parameters`); on
        any mismatch nothing is changed and a ValueError lists the differences.
        """
        own = self.check_parameters(arrays)
        for k, p in own.items():
            p[...] = backend.asarray(arrays[k], dtype=p.dtype)

    def check_parameters(self, arrays):
        """Raise ValueError unless ``arrays`` has exactly this model's names and shapes."""
        own = dict(self.parameters())
        missing = sorted(set(own) - set(arrays))
        extra = sorted(set(arrays) - set(own))
        wrong = [f"{k}: {tuple(arrays[k].shape)} != {tuple(own[k].shape)}"
                 for k in own if k in arrays and tuple(arrays[k].shape) != tuple(own[k].shape)]
        if missing or extra or wrong:
            raise ValueError("parameters do not match the model: "
                             + "; ".join(s for s in (f"missing {missing}" if missing else "",
                                                     f"unexpected {extra}" if extra else "",
                                                     f"wrong shapes {wrong}" if wrong else "") if s))
        return own

    def _acc(self, name, g):
        self.grads[name] += g

    def drop_caches(self):
        """Forget what every forward in the tree kept for its backward (``cache``, and a
        :class:`~effattn.models.attention.MultiHeadAttention`'s ``kernel_cache``), so the
        arrays can be freed: reversible layers and checkpointing recompute them instead. A
        ``backward`` needs a fresh ``forward`` after this."""
        for _, m in self.modules():
            for attr in ("cache", "kernel_cache"):
                if attr in m.__dict__:
                    object.__setattr__(m, attr, None)


def _normal(rng, shape, std, dtype):
    """Host draw N(0, std^2) moved to the active backend."""
    return backend.asarray(rng.standard_normal(shape) * std, dtype=dtype)


def _zeros(shape, dtype):
    return backend.xp().zeros(shape, dtype=dtype)


def _ones(shape, dtype):
    return backend.xp().ones(shape, dtype=dtype)


# --------------------------------------------------------------------------- layers
class Linear(Module):
    """y = x W + b.  W (d_in, d_out) ~ N(0, 1/d_in) (LeCun), b = 0.

    ``storage`` (default None: exact) emulates low-precision storage for mixed-precision
    training (:mod:`effattn.nn.precision`, ``set_storage``): a function that rounds an array
    to the format (float32 values representable in bfloat16 / float16). The layer then
    computes with a rounded working copy of W and a rounded input, rounds its output, and
    rounds the gradients it passes back (dx, dW, db): the products accumulate in float32 (as
    a bf16/fp16 matmul unit does), the parameters themselves stay the float32 master copy.
    """

    storage = None

    def __init__(self, d_in, d_out, rng, *, bias=True, dtype="float64", std=None):
        super().__init__()
        d_in, d_out = check_int("d_in", d_in), check_int("d_out", d_out)
        self.add_param("W", _normal(rng, (d_in, d_out), d_in ** -0.5 if std is None else std, dtype))
        if bias:
            self.add_param("b", _zeros((d_out,), dtype))

    def forward(self, x):
        rnd = self.storage
        if rnd is None:
            y, self.cache = F.linear_forward(x, self.params["W"], self.params.get("b"))   # (..., d_in) -> (..., d_out)
            return y
        y, self.cache = F.linear_forward(rnd(x), rnd(self.params["W"]), self.params.get("b"))
        return rnd(y)

    def backward(self, dy):
        g = F.linear_backward(dy, self.cache)
        rnd = self.storage
        if rnd is not None:
            g = {k: rnd(v) for k, v in g.items()}
        self._acc("W", g["W"])
        if "b" in self.params:
            self._acc("b", g["b"])
        return g["x"]


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis (gamma = 1, beta = 0)."""

    def __init__(self, d, *, eps=1e-5, dtype="float64"):
        super().__init__()
        d = check_int("d", d)
        self.eps = eps
        self.add_param("gamma", _ones((d,), dtype))
        self.add_param("beta", _zeros((d,), dtype))

    def forward(self, x):
        y, self.cache = F.layer_norm_forward(x, self.params["gamma"], self.params["beta"], self.eps)
        return y

    def backward(self, dy):
        g = F.layer_norm_backward(dy, self.cache)
        self._acc("gamma", g["gamma"])
        self._acc("beta", g["beta"])
        return g["x"]


class FeedForward(Module):
    """Position-wise MLP: Linear(D, D_ff) - GELU - Linear(D_ff, D), optionally by chunks.

        FFN(x) = GELU(x W_1 + b_1) W_2 + b_2          x (..., D) -> (..., D), hidden (..., D_ff)

    ``chunk=None`` (default): one pass; the backward keeps the hidden activations, about
    three (R, D_ff) arrays for R = prod(leading axes) positions.

    ``chunk=c`` (Reformer, Kitaev et al. 2020, Section 3, "chunking"): the FFN acts on each
    position alone, so the R rows are cut into blocks of c rows and each block goes through the
    MLP on its own. The forward keeps only its input x (R, D); the backward recomputes each
    block's hidden activations from x and backpropagates through it at once:

        for each block X_c (c, D):  H = X_c W_1 + b_1,  A = GELU(H),  Y_c = A W_2 + b_2
        backward:                   dW_2 += A^T dY_c,  dA = dY_c W_2^T,  dH = GELU'(H) * dA,
                                    dW_1 += X_c^T dH,  dX_c = dH W_1^T

    Same result and gradients (to rounding: the sums over rows are split by blocks), peak
    memory O(c D_ff) instead of O(R D_ff), one more fc1 + GELU + fc2 per block in the backward.
    """

    def __init__(self, d_model, d_ff, rng, *, dtype="float64", chunk=None):
        super().__init__()
        self.chunk = None if chunk is None else check_int("chunk", chunk)
        self.fc1 = Linear(d_model, d_ff, rng, dtype=dtype)
        self.fc2 = Linear(d_ff, d_model, rng, dtype=dtype)

    def forward(self, x, key_mask=None):
        """x (..., D) -> (..., D). ``key_mask`` is accepted and unused (the MLP acts on each position
        alone), so a block calls every feed-forward alike (a sparse one routes only real tokens)."""
        if self.chunk is not None:
            return self._chunked_forward(x)
        h = self.fc1.forward(x)                  # (..., D) -> (..., D_ff)
        a, self.cache = F.gelu_forward(h)
        return self.fc2.forward(a)               # (..., D_ff) -> (..., D)

    def backward(self, dy):
        if self.chunk is not None:
            return self._chunked_backward(dy)
        da = self.fc2.backward(dy)
        return self.fc1.backward(F.gelu_backward(da, self.cache))

    def _rows(self, x):
        """x (..., D) -> (R, D) rows and the block starts 0, c, 2c, ..."""
        x2 = x.reshape(-1, x.shape[-1])
        return x2, range(0, x2.shape[0], self.chunk)

    def _chunked_forward(self, x):
        xp = get_namespace(x)
        x2, starts = self._rows(x)
        W2 = self.fc2.params["W"]
        y = xp.empty((x2.shape[0], W2.shape[1]), dtype=xp.result_type(x2, W2))
        for s in starts:                                       # one block of c rows at a time
            a, _ = F.gelu_forward(self.fc1.forward(x2[s:s + self.chunk]))      # (c, D_ff), freed next turn
            y[s:s + self.chunk] = self.fc2.forward(a)                           # (c, D)
        self.fc1.cache = self.fc2.cache = None                 # keep only x
        self.cache = x
        return y.reshape(x.shape[:-1] + (y.shape[-1],))

    def _chunked_backward(self, dy):
        xp = get_namespace(dy)
        x = self.cache
        x2, starts = self._rows(x)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = xp.empty(x2.shape, dtype=dy.dtype)
        for s in starts:                                       # recompute the block, then its backward
            a, gcache = F.gelu_forward(self.fc1.forward(x2[s:s + self.chunk]))
            self.fc2.forward(a)
            da = self.fc2.backward(dy2[s:s + self.chunk])      # accumulates dW_2, db_2
            dx[s:s + self.chunk] = self.fc1.backward(F.gelu_backward(da, gcache))   # accumulates dW_1, db_1
        self.fc1.cache = self.fc2.cache = None
        return dx.reshape(x.shape)


class Embedding(Module):
    """Token table lookup: ids (...) -> table[ids] (..., D); table (V, D) ~ N(0, std^2)."""

    def __init__(self, vocab, d, rng, *, std=1.0, dtype="float64"):
        super().__init__()
        self.vocab = check_int("vocab", vocab)
        self.add_param("table", _normal(rng, (self.vocab, check_int("d", d)), std, dtype))

    def forward(self, ids):
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"ids must lie in [0, {self.vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
        out, self.cache = F.embedding_forward(ids, self.params["table"])
        return out

    def backward(self, dout):
        self._acc("table", F.embedding_backward(dout, self.cache))
        return None
