"""Multi-head attention around any registered kernel (the registry sits below this package,
above ``nn``, so the module that looks kernels up lives here).

:class:`MultiHeadAttention` plugs *any* registered kernel (``effattn.get(name)``,
kind ``"kernel"``) between its projections; see its docstring for how the
kernel's learnable parameters and configuration are built with the kernel's
own ``setup``. :func:`resolve_kernel` is the check a model or the trainer makes
before building one.

Decoding: a causal :class:`MultiHeadAttention` whose kernel offers the decoding protocol
(``spec.step is not None``; DESIGN.md, "Decode steps") also runs one token at a time::

    state = mha.init_state(B)                       # the kernel's own state, lead (B, H)
    y, state = mha.prefill(x, state, key_mask=m)    # x (B, P, D): the prompt in one pass
    y_t, state = mha.step(x_t, state)               # x_t (B, D): one token

and cross-attention keeps the projected memory (``init_state(B, memory=..., memory_mask=...)``)
that every query then attends to. The rows equal :meth:`MultiHeadAttention.forward`'s causal
rows over ``max_len`` tokens (the kernel configuration decoding uses, see
:meth:`MultiHeadAttention.init_state`).
"""
from __future__ import annotations

import copy
import inspect
import sys
from typing import NamedTuple

from .. import registry
from ..backend import get_namespace
from ..nn import functional as F
from ..nn.modules import Linear, Module
from ..validate import check_bool, check_float_array, check_int


class SelfAttentionState(NamedTuple):
    """The decoder state of a causal self-attention (:meth:`MultiHeadAttention.init_state`)."""

    kernel: object   # the kernel's state (spec.init_state, lead (B, H)): e.g. full's KV cache
    batch: int       # B
    t: int           # tokens seen: the position of the next one


class CrossAttentionState(NamedTuple):
    """The fixed memory of a cross-attention, projected once: every query of the decoder
    attends to all of it (:meth:`MultiHeadAttention.init_state` with ``memory``)."""

    k: object        # (B, H, M, d) the memory's keys
    v: object        # (B, H, M, d) the memory's values
    key_mask: object  # (B, H, M) bool (True = real token) or None


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

    Decoding (:meth:`init_state`, :meth:`prefill`, :meth:`step`): token by token with the
    kernel's state; see the module docstring. Like ``forward``, ``prefill`` and ``step``
    overwrite the projections' caches (run ``backward`` right after its own ``forward``).
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

    # ----------------------------------------------------------------------- decoding
    def why_no_step(self, *, cross=False):
        """None when this attention decodes token by token, else the reason (a sentence).

        Self-attention needs a causal module and a kernel with the decoding protocol
        (``spec.step``; a kernel without it says why in its module's ``WHY_NO_STEP``).
        Cross-attention (``cross=True``) decodes when its kernel is ``full``: each query then
        attends to the whole projected memory, which is what ``forward`` computes for it."""
        if cross:
            if self.name != "full":
                return (f"cross-attention {self.name!r} is not 'full': decoding attends each query to the whole "
                        f"memory, which is full attention only")
            return None
        if not self.causal:
            return f"attention {self.name!r} is not causal here (causal=False): there is nothing to decode"
        if self.spec.step is None:
            why = getattr(sys.modules.get(self.spec.forward.__module__), "WHY_NO_STEP", None)
            return f"attention {self.name!r} has no decoding step" + (f": {why}" if why else "")
        return None

    def init_state(self, batch, *, memory=None, memory_mask=None):
        """The empty decoder state of this attention for ``batch`` sequences.

        Self-attention (``memory`` None): a :class:`SelfAttentionState` around the kernel's
        ``spec.init_state(lead=(B, H), d=d, dv=d, dtype=..., **config, **params)``, with the
        configuration of length ``max_len`` (``config_for(max_len)``: the one the model was
        built with and, by default, trained with) and the kernel's learned parameters. The
        state then holds what the kernel holds (full: the keys and values of every token, 2 d
        numbers per token and head; local: a bounded window) and takes at most ``max_len``
        tokens. The recomputing :meth:`forward` instead re-runs ``setup(n)`` for each length n,
        so a kernel whose default configuration depends on the length (local's block ~ n / 4)
        decodes like ``forward`` over ``max_len`` tokens, not like ``forward`` over n < max_len;
        sizes given in ``attn_config`` make them agree for every n.

        Cross-attention (``memory`` (B, M, D), ``memory_mask`` (B, M) bool or None): a
        :class:`CrossAttentionState` holding the memory's keys and values, projected once
        (2 B M D numbers), and its mask.
        """
        batch = check_int("batch", batch)
        if memory is not None:
            return self._init_cross(batch, memory, memory_mask)
        if memory_mask is not None:
            raise ValueError("memory_mask is given without memory: it masks the keys of a cross-attention's memory")
        why = self.why_no_step()
        if why:
            raise ValueError(f"cannot decode step by step: {why}")
        dtype = str(self.q.params["W"].dtype)
        params = {nm: self.params[nm] for nm in self.param_names}
        try:
            kernel = self.spec.init_state(lead=(batch, self.heads), d=self.head_dim, dv=self.head_dim, dtype=dtype,
                                          **self.config_for(self.max_len), **params)
        except TypeError as exc:
            raise ValueError(f"attention {self.name!r} cannot decode with options {sorted(self._override)}: "
                             f"{exc}") from None
        return SelfAttentionState(kernel, batch, 0)

    def _init_cross(self, batch, memory, memory_mask):
        why = self.why_no_step(cross=True)
        if why:
            raise ValueError(f"cannot decode step by step: {why}")
        check_float_array("memory", memory, ndim=3, finite=False)
        b, m, dm = memory.shape
        if (b, dm) != (batch, self.d_model):
            raise ValueError(f"memory must have shape ({batch}, M, {self.d_model}), got {tuple(memory.shape)}")
        if m > self.max_len:
            raise ValueError(f"memory length {m} exceeds max_len={self.max_len}")
        km = None
        if memory_mask is not None:
            _check_mask("memory_mask", memory_mask, (b, m))
            xp = get_namespace(memory)
            km = xp.ascontiguousarray(xp.broadcast_to(memory_mask[:, None, :], (b, self.heads, m)))   # (B, H, M)
        k = self._split(self.k.forward(memory))              # (B, H, M, d)
        v = self._split(self.v.forward(memory))              # (B, H, M, d)
        return CrossAttentionState(k, v, km)

    def prefill(self, x, state, *, key_mask=None):
        """The first P tokens in one pass: x (B, P, D) -> (y (B, P, D), state).

        Self-attention: ``state`` fresh from :meth:`init_state`; ``key_mask`` (B, P) bool (True =
        real token) or None; the kernel's ``prefill`` gives the causal rows. Cross-attention:
        the P queries attend to the memory (its mask is in the state; ``key_mask`` must be None)."""
        check_float_array("x", x, ndim=3, finite=False)
        if isinstance(state, CrossAttentionState):
            self._check_query("x", x, state.k.shape[0], shape=(x.shape[1],))
            if x.shape[1] > self.max_len:
                raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={self.max_len}")
            if key_mask is not None:
                raise ValueError("key_mask: a cross-attention's keys are its memory, "
                                 "masked by init_state's memory_mask")
            return self._cross(x, state), state
        state = self._check_self_state(state)
        b, p = state.batch, x.shape[1]
        self._check_query("x", x, b, shape=(p,))
        if state.t != 0:
            raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
        if p > self.max_len:
            raise ValueError(f"prompt length {p} exceeds max_len={self.max_len}")
        xp = get_namespace(x)
        km = None
        if key_mask is not None:
            _check_mask("key_mask", key_mask, (b, p))
            km = xp.ascontiguousarray(xp.broadcast_to(key_mask[:, None, :], (b, self.heads, p)))   # (B, H, P)
        q, k, v = (self._split(lin.forward(x)) for lin in (self.q, self.k, self.v))          # (B, H, P, d)
        o, kernel = self.spec.prefill(q, k, v, state.kernel, key_mask=km)                    # (B, H, P, d)
        return self.o.forward(self._merge(o)), state._replace(kernel=kernel, t=p)

    def step(self, x_t, state, *, key_mask_t=None):
        """One token: x_t (B, D) -> (y_t (B, D), state); ``key_mask_t`` (B,) bool or None (False:
        token t is no key for anyone). Self-attention calls the kernel's ``step`` on the
        token's q_t, k_t, v_t (B, H, d); cross-attention attends q_t to the memory."""
        check_float_array("x_t", x_t, ndim=2, finite=False)
        if isinstance(state, CrossAttentionState):
            self._check_query("x_t", x_t, state.k.shape[0])
            if key_mask_t is not None:
                raise ValueError("key_mask_t: a cross-attention's keys are its memory, "
                                 "masked by init_state's memory_mask")
            return self._cross(x_t[:, None, :], state)[:, 0], state
        state = self._check_self_state(state)
        b, t = state.batch, state.t
        self._check_query("x_t", x_t, b)
        if t >= self.max_len:
            raise ValueError(f"the state is full: position {t} is past max_len={self.max_len}")
        xp = get_namespace(x_t)
        km = None
        if key_mask_t is not None:
            _check_mask("key_mask_t", key_mask_t, (b,))
            km = xp.ascontiguousarray(xp.broadcast_to(key_mask_t[:, None], (b, self.heads)))     # (B, H)
        heads = lambda lin: lin.forward(x_t).reshape(b, self.heads, self.head_dim)  # noqa: E731  (B, H, d)
        o, kernel = self.spec.step(heads(self.q), heads(self.k), heads(self.v), state.kernel, key_mask_t=km)
        return self.o.forward(o.reshape(b, self.d_model)), state._replace(kernel=kernel, t=t + 1)

    def _cross(self, x, state):
        """Queries x (B, N, D) attend to the projected memory: (B, N, D), as ``forward(x, kv=memory)``."""
        q = self._split(self.q.forward(x))                   # (B, H, N, d)
        params = {nm: self.params[nm] for nm in self.param_names}
        o, _ = self.spec.forward(q, state.k, state.v, causal=False, key_mask=state.key_mask,
                                 **self.config_for(x.shape[1]), **params)                    # (B, H, N, d)
        return self.o.forward(self._merge(o))

    def _check_query(self, name, x, batch, shape=()):
        want = (batch,) + tuple(shape) + (self.d_model,)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want} (B from the state, D = d_model), got {tuple(x.shape)}")

    @staticmethod
    def _check_self_state(state):
        if not isinstance(state, SelfAttentionState):
            raise TypeError(f"state must come from MultiHeadAttention.init_state (or a previous prefill/step), "
                            f"got {type(state).__name__}")
        return state


def _check_mask(name, mask, shape):
    """A boolean array of exactly ``shape`` (True = real token)."""
    if not hasattr(mask, "dtype") or mask.dtype.kind != "b":
        raise ValueError(f"{name} must be a boolean array (True = real token), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask
