"""The feed-forward of a block, swappable (issue 15): the dense MLP, or a registered sparse layer.

The survey's "sparse models" replace the position-wise feed-forward, not the attention. A block
builds its feed-forward with :func:`make_ffn`::

    ffn="dense"    FFN(x) = GELU(x W_1 + b_1) W_2 + b_2           (effattn.nn.modules.FeedForward)
    ffn="switch"   a mixture of E expert FFNs of width d_ff, top-k routing (effattn.layers.switch)
    ffn="pkm"      a product-key memory of K value rows, k read per token (effattn.layers.pkm)

and ``ffn_config`` sets the sparse layer's options (``switch``: ``experts`` E (default 8), ``k``
(1: Switch, 2: GShard), ``capacity_factor`` (default 1.25), ``aux_weight`` (Switch's alpha,
1e-2), ``z_weight`` (ST-MoE's c_z, 1e-3)). Each expert has the dense FFN's shape, so a Switch
block holds E times the feed-forward parameters for about the FLOPs of one (k = 1).
``pkm``: ``keys`` K (a square, default 1024), ``topk`` k (default 32, at most sqrt(K)), ``heads``
(default 4), ``dq`` the query size per head (default d_model rounded up to even). The memory
replaces the feed-forward as in the paper, so ``d_ff`` is not used; its parameters are
K d_model + d_model heads dq + heads sqrt(K) dq, its FLOPs per token about
d_model heads dq + heads (sqrt(K) dq + k^2 + k d_model).

:class:`SparseFeedForward` wraps any registered layer that is not attention (kind "layer",
``x (..., N, D) -> y (..., N, D)``) as a :class:`~effattn.nn.modules.Module`: its learnable
arrays become the module's parameters (``blocks.0.ff.Wr`` ...), its auxiliary losses (the
registry's ``aux_loss``) are folded into its backward by the layer itself, with their weights,
so the model's gradient is that of CE + sum over blocks of the weighted auxiliary losses.
:meth:`SparseFeedForward.aux` reads the last forward's losses and statistics (expert load,
the share of tokens dropped) for logs.

Conventions. A decoder's sparse feed-forward runs in the layer's decodable setting (``switch``:
no capacity dropping, see its "Causality" paragraph), so decoding token by token equals the
causal forward. Padding tokens (``key_mask`` False) take no capacity and move no router
statistics. Router jitter is not used in models (it would make the recomputing backward of
reversible and checkpointed stacks see another draw). Under float16 loss scaling (``grad_scale``
S, set by :meth:`~effattn.models.transformer.Model.loss_and_backward`) the backward returns the
gradient of S (sum(dy' y) + aux): it runs the layer's backward on dy / S and multiplies by S.
"""
from __future__ import annotations

from .. import registry
from ..nn.modules import FeedForward, Module
from ..validate import check_choice, check_int

FFN_KINDS = ("dense", "switch", "pkm")


def _switch_build(rng, d_model, d_ff, config, causal, dtype):
    from ..layers import switch

    allowed = {"experts", "k", "capacity_factor", "aux_weight", "z_weight"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"ffn_config: unknown option {unknown[0]!r} for ffn='switch'; "
                         f"options: {', '.join(sorted(allowed))}")
    experts = check_int("ffn_config['experts']", config.get("experts", 8))
    opts = {"k": config.get("k", 1), "capacity_factor": config.get("capacity_factor", 1.25),
            "aux_weight": config.get("aux_weight", 1e-2), "z_weight": config.get("z_weight", 1e-3)}
    if causal:
        opts["capacity_factor"] = None          # the decodable setting: no dropping
    return switch.init_params(rng, d_model, d_ff, experts, dtype=dtype), opts


def _pkm_build(rng, d_model, d_ff, config, causal, dtype):
    import math

    from ..layers import pkm

    allowed = {"keys", "topk", "heads", "dq"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"ffn_config: unknown option {unknown[0]!r} for ffn='pkm'; "
                         f"options: {', '.join(sorted(allowed))}")
    keys = check_int("ffn_config['keys']", config.get("keys", 1024))
    sqrtK = math.isqrt(keys)
    if sqrtK * sqrtK != keys:
        raise ValueError(f"ffn_config['keys'] must be a square (K = sqrtK^2 product keys), got {keys}")
    heads = check_int("ffn_config['heads']", config.get("heads", 4))
    dq = check_int("ffn_config['dq']", config.get("dq", d_model + d_model % 2))
    params = pkm.init_params(rng, d_model, sqrtK=sqrtK, dq=dq, heads=heads, dtype=dtype)
    topk = check_int("ffn_config['topk']", config.get("topk", min(32, sqrtK)))
    if topk > sqrtK:
        raise ValueError(f"ffn_config['topk'] must be at most sqrt(keys) = {sqrtK}, got {topk}")
    return params, {"heads": heads, "topk": topk}


BUILDERS = {"switch": _switch_build, "pkm": _pkm_build}


def make_ffn(kind, d_model, d_ff, rng, *, config=None, causal=False, dtype="float64", chunk=None):
    """The feed-forward module of a block: :class:`FeedForward` for ``"dense"``, else a
    :class:`SparseFeedForward` around the registered layer ``kind``."""
    kind = check_choice("ffn", kind, FFN_KINDS)
    config = dict(config or {})
    if kind == "dense":
        if config:
            raise ValueError(f"ffn_config {sorted(config)} is for a sparse feed-forward; ffn='dense' takes none")
        return FeedForward(d_model, d_ff, rng, dtype=dtype, chunk=chunk)
    if chunk is not None:
        raise ValueError(f"ffn_chunk: a {kind} feed-forward routes the tokens of the whole call together "
                         "(capacity is per call); chunking is for ffn='dense'")
    return SparseFeedForward(kind, d_model, d_ff, rng, config=config, causal=causal, dtype=dtype)


class SparseFeedForward(Module):
    """A registered layer that is not attention as a block's feed-forward: x (..., N, D) -> (..., N, D).

    ``forward(x, key_mask=None)`` calls ``spec.forward(x, key_mask=..., causal=..., **options,
    **params)``; ``backward(dy)`` returns dx and accumulates every parameter's gradient,
    including the auxiliary losses' (see the module docstring)."""

    def __init__(self, kind, d_model, d_ff, rng, *, config=None, causal=False, dtype="float64"):
        super().__init__()
        if kind not in BUILDERS:
            raise ValueError(f"ffn must be one of {', '.join(BUILDERS)} for a sparse feed-forward, got {kind!r}")
        self.kind = kind
        self.spec = registry.get(kind)
        self.causal = bool(causal)
        params, self.options = BUILDERS[kind](rng, check_int("d_model", d_model), check_int("d_ff", d_ff),
                                              dict(config or {}), self.causal, dtype)
        for name, a in params.items():
            self.add_param(name, a)
        self.grad_scale = 1.0

    def forward(self, x, key_mask=None):
        y, self.cache = self.spec.forward(x, key_mask=key_mask, causal=self.causal, **self.options, **self.params)
        return y

    def backward(self, dy):
        if self.cache is None:
            raise ValueError(f"backward of the {self.kind} feed-forward needs a forward first")
        s = float(self.grad_scale)
        g = self.spec.backward(dy if s == 1.0 else dy / s, self.cache)
        if s != 1.0:
            g = {name: v * s for name, v in g.items()}
        for name in self.params:
            self._acc(name, g[name])
        return g["x"]

    def aux(self):
        """The last forward's weighted auxiliary loss (``"loss"``) and the layer's own statistics
        (the layer module's ``statistics``; ``switch``: ``balance``, ``z``, ``load`` per expert,
        ``dropped`` share; ``pkm``: ``usage``, the share of memory slots read), host floats."""
        if self.cache is None:
            return {}
        out = {"loss": float(self.spec.aux_loss(self.cache))} if self.spec.aux_loss is not None else {}
        from importlib import import_module

        stats = getattr(import_module(self.spec.forward.__module__), "statistics", None)
        if stats is not None:
            for name, v in stats(self.cache).items():
                out[name] = [int(c) for c in v.tolist()] if hasattr(v, "tolist") and getattr(v, "ndim", 0) else float(v)
        return out
