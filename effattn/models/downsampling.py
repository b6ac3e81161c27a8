"""Encoders that shrink the sequence (the survey's downsampling class): Funnel and Perceiver classifiers.

Both are :class:`~effattn.models.transformer.Model`s with the :class:`~effattn.models.transformer.Encoder`'s
surface (ids (B, N) [+ key_mask] -> logits (B, C), ``loss_and_backward``), so ``train --arch funnel|perceiver``
trains them on the encoder tasks next to the plain encoder.

* :class:`FunnelEncoder` (Dai et al., 2020, https://arxiv.org/abs/2006.03236): token embeddings plus
  positions, then **stages** of blocks, ``stages=(2, 2, 2)`` blocks each. Stage 0 is ordinary pre-LN
  blocks at length N; the first block of every later stage is the registered ``funnel`` layer
  (pooled-query attention, post-LN as the paper: h' = LN(pool(h) + MHA(pool(h), h, h)), stride s)
  followed by a pre-LN feed-forward, h' + FF(LN(h')); its other blocks run at the pooled length
  with the pooled key mask. Lengths N, N/s, N/s^2, ...; the depth equals a plain encoder with
  sum(stages) layers. ``decoder_layers=k > 0`` adds the paper's decoder: the last stage's states
  are upsampled back to N (each pooled row repeated over its group, stage by stage) plus the
  first stage's output (the residual), then k full-length blocks; the classifier then reads the
  N token states (the token-level path the paper uses for per-token tasks).
* :class:`PerceiverEncoder` (Jaegle et al., 2021, https://arxiv.org/abs/2103.03206): embeddings plus
  positions, then the registered ``perceiver`` layer (m learned latents cross-attend to the N
  inputs, then ``latent_layers`` latent self-attention blocks), LN, the mean over the latents
  and a linear head.

Pooling at the head: the mean over the real rows of the last states (the pooled mask for the
Funnel; every latent for the Perceiver) or, ``pool="cls"``, a learned [CLS] token at position 0
whose state is classified (the Funnel keeps [CLS] out of the pooling, so it survives every stage).
"""
from __future__ import annotations

from .. import backend, registry
from ..backend import get_namespace
from ..nn import functional as F
from ..nn.modules import Embedding, FeedForward, LayerNorm, Linear, Module
from ..nn.pooling import pool_groups, upsample_backward, upsample_forward
from ..validate import check_choice, check_int
from .transformer import Block, Model


class RegisteredLayer(Module):
    """A registered layer (kind ``"layer"``) as a module: its parameters are ``params``,
    ``forward(x, key_mask)`` calls ``spec.forward(x, key_mask=..., **options, **params)``, and
    ``backward(dy)`` accumulates every parameter's gradient and returns dx."""

    def __init__(self, name, params, options):
        super().__init__()
        self.spec = registry.get(name)
        self.options = dict(options)
        for key, a in params.items():
            self.add_param(key, a)

    def forward(self, x, key_mask=None, **state):
        """``state``: a recurrent layer's keywords (``memory=``, ``memory_mask=``), passed on."""
        y, self.cache = self.spec.forward(x, key_mask=key_mask, **state, **self.options, **self.params)
        return y

    def backward(self, dy):
        g = self.spec.backward(dy, self.cache)
        for key in self.params:
            self._acc(key, g[key])
        return g["x"]


class _Embed(Module):
    """Token embeddings + sinusoidal or learned positions, and the optional [CLS] token in front."""

    def __init__(self, vocab, d_model, rng, *, max_len, positions, pool, dtype):
        super().__init__()
        self.vocab = check_int("vocab", vocab)
        self.pool = check_choice("pool", pool, ("mean", "cls"))
        self.max_len = check_int("max_len", max_len) + (pool == "cls")
        self.positions = check_choice("positions", positions, ("sinusoidal", "learned"))
        self.embed = Embedding(vocab + (pool == "cls"), d_model, rng, dtype=dtype)
        if positions == "learned":
            self.add_param("pos", backend.asarray(rng.standard_normal((self.max_len, d_model)) * 0.1, dtype=dtype))
        else:
            self.pe = F.sinusoidal_positions(self.max_len, d_model, backend.xp(), dtype=dtype)

    def forward(self, ids, key_mask=None):
        xp = get_namespace(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, N), got {tuple(ids.shape)}")
        if self.pool == "cls":
            if ids.size and int(ids.max()) >= self.vocab:
                raise ValueError(f"ids must lie in [0, {self.vocab}), got a maximum of {int(ids.max())}")
            ids = xp.concatenate([xp.full((ids.shape[0], 1), self.vocab, dtype=ids.dtype), ids], axis=1)
            if key_mask is not None:
                key_mask = xp.concatenate([xp.ones((ids.shape[0], 1), dtype=bool), key_mask], axis=1)
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.max_len} (the positions the model has)")
        pos = self.params["pos"] if self.positions == "learned" else self.pe
        self.cache = n
        return self.embed.forward(ids) + pos[:n], key_mask

    def backward(self, dx):
        self.embed.backward(dx)
        if self.positions == "learned":
            self._acc("pos", get_namespace(dx).pad(dx.sum(axis=0), ((0, self.max_len - self.cache), (0, 0))))


class _Head(Module):
    """LN_f, then the mean over real rows (or the [CLS] row), then a linear classifier."""

    def __init__(self, d_model, n_classes, rng, *, pool, dtype):
        super().__init__()
        self.pool = pool
        self.ln_f = LayerNorm(d_model, dtype=dtype)
        self.out = Linear(d_model, check_int("n_classes", n_classes), rng, dtype=dtype)

    def forward(self, x, mask=None):
        xp = get_namespace(x)
        h = self.ln_f.forward(x)
        if self.pool == "cls":
            pooled, w = h[:, 0], None
        else:
            w = xp.ones(h.shape[:-1], dtype=h.dtype) if mask is None else mask.astype(h.dtype)
            w = w / xp.maximum(w.sum(axis=1, keepdims=True), 1.0)
            pooled = (h * w[..., None]).sum(axis=1)
        self.cache = (h.shape, w)
        return self.out.forward(pooled)

    def backward(self, dlogits):
        shape, w = self.cache
        dp = self.out.backward(dlogits)
        xp = get_namespace(dp)
        if w is None:
            dh = xp.zeros(shape, dtype=dp.dtype)
            dh[:, 0] = dp
        else:
            dh = dp[:, None, :] * w[..., None]
        return self.ln_f.backward(dh)


def _layer_module(name):
    """The module of a registered layer (its init_params, pooled_mask, groups, ...)."""
    from importlib import import_module

    return import_module(registry.get(name).forward.__module__)


class FunnelBlock(Module):
    """The first block of a later stage: h' = funnel(h) (pooled-query attention, post-LN), then h' + FF(LN(h'))."""

    def __init__(self, d_model, heads, d_ff, rng, *, stride=2, pool="mean", separate_cls=True, dtype="float64"):
        super().__init__()
        self.funnel = RegisteredLayer("funnel", _layer_module("funnel").init_params(rng, d_model, dtype=dtype),
                                      dict(heads=heads, stride=stride, pool=pool, separate_cls=separate_cls))
        self.ln = LayerNorm(d_model, dtype=dtype)
        self.ff = FeedForward(d_model, d_ff, rng, dtype=dtype)

    def forward(self, x, key_mask=None):
        """x (B, N, D) -> (y (B, N', D), the pooled key mask (B, N') or None)."""
        self.n_in = x.shape[1]
        y = self.funnel.forward(x, key_mask=key_mask)
        return y + self.ff.forward(self.ln.forward(y)), _layer_module("funnel").pooled_mask(self.funnel.cache)

    def backward(self, dy):
        dy = dy + self.ln.backward(self.ff.backward(dy))
        return self.funnel.backward(dy)

    def groups(self):
        """The (N', s) input positions of each pooled row of the last forward."""
        return _layer_module("funnel").groups(self.funnel.cache)


class FunnelEncoder(Model):
    """Classifier with a funnel of stages: ids (B, N) [+ key_mask] -> logits (B, C) (module docstring)."""

    mode = "encoder"

    def __init__(self, vocab, n_classes, rng, *, d_model=32, heads=2, stages=(2, 2, 2), d_ff=None, max_len=128,
                 attention="full", attn_config=None, positions="sinusoidal", pool="mean", stride=2,
                 funnel_pool="mean", decoder_layers=0, dtype="float64"):
        super().__init__()
        self.d_model, heads = check_int("d_model", d_model), check_int("heads", heads)
        if d_model % heads:
            raise ValueError(f"heads={heads} must divide d_model={d_model}")
        stages = tuple(stages)
        if not stages or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in stages):
            raise ValueError(f"stages must be a non-empty list of positive block counts, got {stages!r}")
        self.stages = stages
        self.decoder_layers = check_int("decoder_layers", decoder_layers, minimum=0)
        if self.decoder_layers and len(stages) < 2:
            raise ValueError("decoder_layers: the decoder upsamples a pooled sequence; give at least two stages")
        d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff)
        self.inp = _Embed(vocab, d_model, rng, max_len=max_len, positions=positions, pool=pool, dtype=dtype)
        self.pool = pool
        block = dict(attention=attention, attn_config=attn_config, max_len=self.inp.max_len, dtype=dtype)
        self.layers = []
        for s, k in enumerate(stages):
            for i in range(k):
                if s > 0 and i == 0:
                    m = FunnelBlock(d_model, heads, d_ff, rng, stride=stride, pool=funnel_pool, dtype=dtype)
                else:
                    m = Block(d_model, heads, d_ff, rng, **block)
                self.layers.append(self.add(f"stage{s}.{i}", m))
        self.decoder = [self.add(f"decoder.{i}", Block(d_model, heads, d_ff, rng, **block))
                        for i in range(self.decoder_layers)]
        self.head = _Head(d_model, n_classes, rng, pool=pool, dtype=dtype)

    def forward(self, ids, key_mask=None):
        x, mask = self.inp.forward(ids, key_mask)
        mask0, lengths, first = mask, [x.shape[1]], None
        for layer in self.layers:
            if isinstance(layer, FunnelBlock):
                if first is None:
                    first = x                                    # the first stage's output (decoder residual)
                x, mask = layer.forward(x, key_mask=mask)
                lengths.append(x.shape[1])
            else:
                x = layer.forward(x, key_mask=mask)
        if self.decoder:                                         # back to N: repeat over the groups, + stage 0
            for layer in reversed([m for m in self.layers if isinstance(m, FunnelBlock)]):
                x = upsample_forward(x, layer.groups(), layer.n_in)[0]
            x = x + first
            mask = mask0
            for blk in self.decoder:
                x = blk.forward(x, key_mask=mask)
        self.cache = lengths
        return self.head.forward(x, mask)

    def backward(self, dlogits):
        dx = self.head.backward(dlogits)
        funnels = [m for m in self.layers if isinstance(m, FunnelBlock)]
        dfirst = None
        if self.decoder:
            for blk in reversed(self.decoder):
                dx = blk.backward(dx)[0]
            dfirst = dx
            for layer in funnels:
                dx = upsample_backward(dx, (layer.groups(), None))
        for layer in reversed(self.layers):
            if isinstance(layer, FunnelBlock) and layer is funnels[0] and dfirst is not None:
                dx = layer.backward(dx) + dfirst
            elif isinstance(layer, FunnelBlock):
                dx = layer.backward(dx)
            else:
                dx = layer.backward(dx)[0]
        self.inp.backward(dx)

    def forward_batch(self, batch):
        return self.forward(batch["x"], batch.get("mask"))


class PerceiverEncoder(Model):
    """Classifier over m latents: ids (B, N) [+ key_mask] -> logits (B, C) (module docstring)."""

    mode = "encoder"

    def __init__(self, vocab, n_classes, rng, *, d_model=32, heads=2, latents=16, latent_layers=2, d_ff=None,
                 max_len=128, positions="sinusoidal", pool="mean", dtype="float64"):
        super().__init__()
        self.d_model, heads = check_int("d_model", d_model), check_int("heads", heads)
        if d_model % heads:
            raise ValueError(f"heads={heads} must divide d_model={d_model}")
        d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff)
        if d_ff % d_model:
            raise ValueError(f"d_ff={d_ff} must be a multiple of d_model={d_model} for the perceiver's feed-forwards")
        self.inp = _Embed(vocab, d_model, rng, max_len=max_len, positions=positions, pool="mean", dtype=dtype)
        params = _layer_module("perceiver").init_params(rng, d_model, n_latents=check_int("latents", latents),
                      latent_layers=check_int("latent_layers", latent_layers, minimum=0), ff_mult=d_ff // d_model,
                      dtype=dtype)
        self.perceiver = RegisteredLayer("perceiver", params, dict(heads=heads, latent_layers=latent_layers))
        self.head = _Head(d_model, n_classes, rng, pool="mean", dtype=dtype)

    def forward(self, ids, key_mask=None):
        x, mask = self.inp.forward(ids, key_mask)
        z = self.perceiver.forward(x, key_mask=mask)                  # (B, m, D): every latent is real
        return self.head.forward(z)

    def backward(self, dlogits):
        self.inp.backward(self.perceiver.backward(self.head.backward(dlogits)))

    def cross_attention(self):
        """The last forward's cross-attention maps (B, h, m, N) (latents x inputs), for figures."""
        return self.perceiver.spec.weights(self.perceiver.cache)

    def forward_batch(self, batch):
        return self.forward(batch["x"], batch.get("mask"))


ARCHS = ("plain", "funnel", "perceiver")
