"""A Transformer-XL language model: segments in order, each layer's memory carried from one to the next.

Dai et al., 2019, https://arxiv.org/abs/1901.02860 (the survey's recurrence class). The model, as the
official ``MemTransformerLM`` (post-LN, no absolute positions: the attention's relative terms are
the only position signal)::

    h^0 = E[ids]                                             (B, N, D)
    for each layer l:
        a   = transformer_xl(h^{l-1}, memory = m^{l-1})       registered layer: LN(h + RelMHA(h, [m; h]))
        h^l = LN(a + FFN(a))                                  position-wise, post-LN
        m^{l-1} <- the last mem_len rows of [m^{l-1}; h^{l-1}]    (next_memory: no gradient)
    logits = h^L W_out + b

``forward(ids)`` runs one segment with the memory the last call left (``self.memory``, one
``(memory, memory_mask)`` pair per layer, None at first); ``reset_memory()`` forgets it.
``loss_and_backward(batch)`` cuts each batch (B, T) into segments of ``segment`` tokens, starts
from an empty memory, and runs forward *and backward* segment by segment: the memory is a
constant of each segment's backward (truncated backpropagation, the paper's stop-gradient), the
gradients of the segments add up, and the loss is the mean over every counted target of the
batch. ``mem_len = 0`` is the same model without memory (each segment alone): the baseline of
"accuracy with and without memory at equal segment length". ``eval_mem_len`` lets evaluation use
a longer memory than training (the paper's Section 3.2 point: the context grows at test time for
free): :meth:`set_mem_len` (the trainer's ``--eval-mem-len``).

``cmem_len > 0`` makes every layer the registered ``compressive`` layer (Rae et al., 2020): the
states falling out of the memory are compressed by ``rate`` with a learned convolution into a
compressed memory of ``cmem_len`` rows; each segment's backward adds the attention-reconstruction
loss's gradient (its weight ``recon_weight`` = 1, once per segment and layer, in the compression's
parameters only) and ``self.recon`` lists each segment's summed reconstruction loss.
"""
from __future__ import annotations

from .. import registry
from ..backend import get_namespace
from ..layers import compressive as _compressive
from ..layers.transformer_xl import init_params
from ..nn import functional as F
from ..nn.functional import IGNORE
from ..nn.modules import Embedding, FeedForward, LayerNorm, Linear, Module
from ..validate import check_int
from .downsampling import RegisteredLayer
from .transformer import Model


class XLBlock(Module):
    """The registered recurrent attention layer (``transformer_xl``, or ``compressive`` when
    ``cmem_len`` > 0), then LN(a + FFN(a)). Its state is the layer's ``next_memory`` tuple."""

    def __init__(self, d_model, heads, d_ff, rng, *, mem_len, cmem_len=0, rate=2, dtype="float64"):
        super().__init__()
        if cmem_len:
            params = _compressive.init_params(rng, d_model, heads, rate=rate, dtype=dtype)
            self.attn = RegisteredLayer("compressive", params, {"heads": heads, "causal": True, "mem_len": mem_len,
                                                                "cmem_len": cmem_len, "rate": rate})
        else:
            self.attn = RegisteredLayer("transformer_xl", init_params(rng, d_model, heads, dtype=dtype),
                                        {"heads": heads, "causal": True, "mem_len": mem_len})
        self.ff = FeedForward(d_model, d_ff, rng, dtype=dtype)
        self.ln = LayerNorm(d_model, dtype=dtype)

    def forward(self, x, state=None, key_mask=None):
        """x (B, N, D) -> (y (B, N, D), the state for the next segment)."""
        a = self.attn.forward(x, key_mask=key_mask, **dict(zip(self.attn.spec.state_keys, state or ())))
        nxt = self.attn.spec.next_memory(self.attn.cache)
        return self.ln.forward(a + self.ff.forward(a)), nxt

    def aux_loss(self):
        """The layer's weighted reconstruction loss of the last call (0.0 for Transformer-XL)."""
        return 0.0 if self.attn.spec.aux_loss is None else float(self.attn.spec.aux_loss(self.attn.cache))

    def backward(self, dy):
        da = self.ln.backward(dy)
        return self.attn.backward(da + self.ff.backward(da))


class XLDecoder(Model):
    """Transformer-XL language model: ids (B, N) -> next-token logits (B, N, V), memory across calls."""

    mode = "decoder"

    def __init__(self, vocab, rng, *, d_model=32, heads=2, layers=2, d_ff=None, segment=16, mem_len=None,
                 cmem_len=0, rate=2, dtype="float64", max_len=None):
        super().__init__()
        self.d_model, self.heads = check_int("d_model", d_model), check_int("heads", heads)
        if d_model % heads or d_model % 2:
            raise ValueError(f"d_model must be even and divisible by heads={heads}, got {d_model}")
        self.segment = check_int("segment", segment)
        self.mem_len = self.segment if mem_len is None else check_int("mem_len", mem_len, minimum=0)
        self.cmem_len = check_int("cmem_len", cmem_len, minimum=0)
        self.rate = check_int("rate", rate)
        self.max_len = max_len           # unused: no absolute positions (kept for the trainer's checks)
        d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff)
        self.embed = Embedding(check_int("vocab", vocab), d_model, rng, dtype=dtype)
        self.blocks = [self.add(f"blocks.{i}", XLBlock(d_model, heads, d_ff, rng, mem_len=self.mem_len,
                                                        cmem_len=self.cmem_len, rate=self.rate, dtype=dtype))
                       for i in range(check_int("layers", layers))]
        self.recon = []                  # the summed reconstruction loss of each segment of the last batch
        self.head = Linear(d_model, vocab, rng, dtype=dtype)
        self.memory = None

    def set_mem_len(self, mem_len):
        """Keep ``mem_len`` states per layer from now on (evaluation may use more than training)."""
        self.mem_len = check_int("mem_len", mem_len, minimum=0)
        for blk in self.blocks:
            blk.attn.options["mem_len"] = self.mem_len

    def reset_memory(self):
        self.memory = None

    def forward(self, ids, key_mask=None):
        """One segment ids (B, N) with the memory the last call left; returns logits (B, N, V)."""
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, N), got {tuple(ids.shape)}")
        held = [a for a in (self.memory[0] if self.memory else ()) if a is not None]
        if held and held[0].shape[0] != ids.shape[0]:
            raise ValueError(f"ids: a batch of {ids.shape[0]} sequences, but the memory holds "
                             f"{held[0].shape[0]}; call reset_memory() first")
        x = self.embed.forward(ids)
        mems = self.memory or [None] * len(self.blocks)
        new = []
        for blk, state in zip(self.blocks, mems):
            x, nxt = blk.forward(x, state=state, key_mask=key_mask)
            new.append(nxt)
        self.memory = new if (self.mem_len > 0 or self.cmem_len > 0) else None
        return self.head.forward(x)

    def backward(self, dlogits):
        dx = self.head.backward(dlogits)
        for blk in reversed(self.blocks):
            dx = blk.backward(dx)
        self.embed.backward(dx)

    def segments(self, n):
        """The (start, stop) of each segment of a length-n batch."""
        return [(s, min(s + self.segment, n)) for s in range(0, n, self.segment)]

    def forward_batch(self, batch):
        """Logits (B, T, V) of a whole batch, segment by segment from an empty memory (no backward)."""
        xp = get_namespace(batch["x"])
        self.reset_memory()
        out = [self.forward(batch["x"][:, a:b], None if batch.get("mask") is None else batch["mask"][:, a:b])
               for a, b in self.segments(batch["x"].shape[1])]
        self.reset_memory()
        return xp.concatenate(out, axis=1)

    def loss_and_backward(self, batch, backward=True, loss_scale=None):
        """Mean cross-entropy over the batch's counted targets, forward and backward segment by
        segment (the memory a constant of each backward); returns (loss, correct, count)."""
        x, y = batch["x"], batch["y"]
        mask = batch.get("mask")
        total = int((y != IGNORE).sum())
        scale = 1.0 if loss_scale is None else float(loss_scale)
        self.reset_memory()
        loss_sum, correct, self.recon = 0.0, 0, []
        for a, b in self.segments(x.shape[1]):
            logits = self.forward(x[:, a:b], None if mask is None else mask[:, a:b])
            self.recon.append(sum(blk.aux_loss() for blk in self.blocks))
            ys = y[:, a:b]
            count = int((ys != IGNORE).sum())
            if count == 0:
                if backward and self.cmem_len:       # the reconstruction loss still trains the compression
                    self.backward(get_namespace(logits).zeros_like(logits))
                continue
            loss, cache = F.cross_entropy_forward(logits, ys, ignore_index=IGNORE)
            loss_sum += float(loss) * count
            correct += int(((logits.argmax(axis=-1) == ys) & (ys != IGNORE)).sum())
            if backward:
                self.backward(F.cross_entropy_backward(cache).astype(logits.dtype) * (scale * count / total))
        self.reset_memory()
        return loss_sum / max(total, 1), correct, total
