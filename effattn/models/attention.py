"""Multi-head attention around any registered kernel (the registry sits below this package,
above ``nn``, so the module that looks kernels up lives here).

:class:`MultiHeadAttention` plugs *any* registered kernel (``effattn.get(name)``,
kind ``"kernel"``) between its projections; see its docstring for how the
kernel's learnable parameters and configuration are built with the kernel's
own ``setup``. :func:`resolve_kernel` is the check a model or the trainer makes
before building one.
"""
from __future__ import annotations

import copy
import inspect

from .. import registry
from ..backend import get_namespace
from ..nn import functional as F
from ..nn.modules import Linear, Module
from ..validate import check_bool, check_float_array, check_int


def _accepts(fn, key):
    """Whether ``fn`` takes a keyword ``key`` (or **kwargs)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD or (p.name == key and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)):
            return True
    return False


def resolve_kernel(name, *, causal=False, rng=None):
    """The registry entry of a kernel usable inside :class:`MultiHeadAttention`.

    Unknown names and layer-kind mechanisms raise ValueError listing the
    kernels; ``causal=True`` with a kernel that cannot decode raises the
    kernel's own reason (found by a tiny probe call drawn from a copy of ``rng``).
    """
    kernels = registry.names("kernel")
    if name not in registry.names():
        raise ValueError(f"unknown attention {name!r}; kernels: {', '.join(kernels)}")
    spec = registry.get(name)
    if spec.kind != "kernel" or spec.setup is None:
        why = "a whole layer" if spec.kind != "kernel" else "a kernel without setup()"
        raise ValueError(f"attention {name!r} is {why}, not usable inside MultiHeadAttention; "
                         f"kernels: {', '.join(k for k in kernels if registry.get(k).setup is not None)}")
    if causal and not spec.causal:
        raise ValueError(f"attention {name!r} cannot decode (causal=True): {_causal_reason(spec, rng)}")
    return spec


def _causal_reason(spec, rng):
    """The kernel's own error for causal=True, from a tiny call (falls back to the registry flag)."""
    if rng is None:
        return f"{spec.name} is registered with causal=False"
    try:
        case = spec.example(copy.deepcopy(rng), batch=1, heads=1, n=8, d=4, causal=False)
        spec.forward(**case.inputs, **{**case.config, "causal": True})
    except ValueError as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - any failure: fall back to the flag
        pass
    return f"{spec.name} is registered with causal=False"


class MultiHeadAttention(Module):
    """Multi-head attention around any registered kernel.

        Q = X_q W_q + b_q,  K = X_kv W_k + b_k,  V = X_kv W_v + b_v          (B, N|M, D)
        split heads: (B, N, D) -> (B, H, N, d),  d = D / H
        O_h = kernel(Q_h, K_h, V_h; causal, key_mask, config, params)        (B, H, N, d)
        Y = concat_h(O_h) W_o + b_o                                          (B, N, D)

    ``attention`` names a registered kernel (``effattn.names("kernel")``);
    ``attn_config`` holds its options. The kernel is built with its own
    ``spec.setup(rng, n=max_len, d=head_dim, heads=H, causal=causal, dtype=dtype)``:

    * the returned **params** become parameters of this module (trained;
      their gradients come from ``spec.backward``), created once for
      ``max_len``. Params whose shape depends on the length (Linformer's
      projection E (k, N_max)) are sliced by the kernel itself for shorter inputs;
    * the returned **config** (block sizes, random draws, layouts) is passed to
      ``spec.forward``. Because configs may depend on n, a forward of length
      n != max_len re-runs ``setup(n=n)`` with a copy of the *same* generator
      state (so the draws are reproducible) and keeps only its config,
      cached per n.

    ``attn_config`` entries that ``setup`` accepts as keywords are passed to
    it; the others override entries of the config passed to ``forward`` (which
    must accept them). ``forward(x, kv=None, key_mask=None)``: self-attention
    when ``kv`` is None, else cross-attention from ``x`` (B, N, D) to ``kv``
    (B, M, D); ``key_mask`` (B, M) bool, True = real token. After a forward,
    ``self.kernel_cache`` holds the kernel's cache, so ``self.spec.weights(...)``
    (or :meth:`attention_weights`) gives the (B, H, N, M) maps.
    """

    def __init__(self, d_model, heads, rng, *, attention="full", attn_config=None, causal=False,
                 max_len=512, dtype="float64"):
        super().__init__()
        d_model, heads = check_int("d_model", d_model), check_int("heads", heads)
        if d_model % heads:
            raise ValueError(f"heads={heads} must divide d_model={d_model}")
        self.d_model, self.heads, self.head_dim = d_model, heads, d_model // heads
        self.causal = check_bool("causal", causal)
        self.max_len = check_int("max_len", max_len)
        self.dtype = dtype
        self.name = attention
        self.spec = resolve_kernel(attention, causal=self.causal, rng=rng)
        attn_config = dict(attn_config or {})
        self._setup_kw = {k: v for k, v in attn_config.items() if _accepts(self.spec.setup, k)}
        self._override = {k: v for k, v in attn_config.items() if k not in self._setup_kw}
        bad = [k for k in self._override if not _accepts(self.spec.forward, k)]
        if bad:
            raise ValueError(f"attention {attention!r} does not accept option(s) {bad}; "
                             f"its forward takes {list(inspect.signature(self.spec.forward).parameters)[3:]}")
        for nm in ("q", "k", "v", "o"):
            setattr(self, nm, Linear(d_model, d_model, rng, dtype=dtype))
        self._kernel_rng = copy.deepcopy(rng)          # the state setup() draws from, reused per n
        params, config = self._setup(self.max_len)
        self.param_names = tuple(params)
        for nm, p in params.items():
            if nm in ("q", "k", "v") or nm in self._modules:
                raise ValueError(f"kernel parameter name {nm!r} clashes with the projections")
            self.add_param(nm, p)
        self._configs = {self.max_len: config}
        self.kernel_cache = None

    def _setup(self, n):
        try:
            return self.spec.setup(copy.deepcopy(self._kernel_rng), n=n, d=self.head_dim, heads=self.heads,
                                   causal=self.causal, dtype=self.dtype, **self._setup_kw)
        except TypeError as exc:
            raise ValueError(f"attention {self.name!r}: bad options {self._setup_kw}: {exc}") from None

    def config_for(self, n):
        """The kernel config for query length n (setup re-run with the same draws' generator, cached)."""
        if n not in self._configs:
            self._configs[n] = self._setup(n)[1]
        return {**self._configs[n], **self._override}

    def _split(self, x):
        return F.split_heads(x, self.heads)                  # (B, N, D) -> (B, H, N, d)

    def _merge(self, x):
        return F.merge_heads(x)                              # (B, H, N, d) -> (B, N, D)

    def forward(self, x, kv=None, key_mask=None):
        check_float_array("x", x, ndim=3, finite=False)
        cross = kv is not None
        src = kv if cross else x
        if cross:
            check_float_array("kv", kv, ndim=3, finite=False)
        b, n, dm = x.shape
        m = src.shape[1]
        if dm != self.d_model or src.shape[2] != self.d_model or src.shape[0] != b:
            raise ValueError(f"x and kv must be (B, N, {self.d_model}) with the same B, got {tuple(x.shape)} and {tuple(src.shape)}")
        if n > self.max_len or m > self.max_len:
            raise ValueError(f"sequence length {max(n, m)} exceeds max_len={self.max_len}")
        xp = get_namespace(x)
        q = self._split(self.q.forward(x))                   # (B, H, N, d)
        k = self._split(self.k.forward(src))                 # (B, H, M, d)
        v = self._split(self.v.forward(src))                 # (B, H, M, d)
        km = None
        if key_mask is not None:
            if tuple(key_mask.shape) != (b, m):
                raise ValueError(f"key_mask must have shape {(b, m)}, got {tuple(key_mask.shape)}")
            km = xp.ascontiguousarray(xp.broadcast_to(key_mask[:, None, :], (b, self.heads, m)))   # (B, H, M)
        params = {nm: self.params[nm] for nm in self.param_names}
        o, self.kernel_cache = self.spec.forward(q, k, v, causal=self.causal, key_mask=km,
                                                 **self.config_for(n), **params)           # (B, H, N, d)
        self.cache = cross
        return self.o.forward(self._merge(o))                # (B, N, D)

    def backward(self, dy):
        """Returns (dx, dkv); dkv is None for self-attention (dx then includes the k, v paths)."""
        cross = self.cache
        do = self._split(self.o.backward(dy))                # (B, H, N, d)
        g = self.spec.backward(do, self.kernel_cache)
        for nm in self.param_names:
            if nm not in g:
                raise KeyError(f"{self.name}.backward returned no gradient for parameter {nm!r}")
            self._acc(nm, g[nm])
        dx = self.q.backward(self._merge(g["q"]))
        dsrc = self.k.backward(self._merge(g["k"])) + self.v.backward(self._merge(g["v"]))
        if cross:
            return dx, dsrc
        return dx + dsrc, None

    def attention_weights(self):
        """(B, H, N, M) effective attention matrix of the last forward (``spec.weights``)."""
        if self.kernel_cache is None or self.spec.weights is None:
            raise ValueError("no attention weights: run forward first (and the kernel must define weights())")
        return self.spec.weights(self.kernel_cache)
