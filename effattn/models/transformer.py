"""Transformers in the three modes of the survey (Tay et al., 2020, Section 2.2), trained by hand-written backprop.

* :class:`Encoder` — bidirectional self-attention, a classification head on
  mean-pooled (or [CLS], position 0) states: ListOps, pixel-sequence images.
* :class:`Decoder` — causal self-attention, a next-token head: language models.
* :class:`EncoderDecoder` — an encoder, and a causal decoder that also
  cross-attends to the encoder's output (Vaswani et al., 2017,
  https://arxiv.org/abs/1706.03762): copy, reverse.

Every block is pre-LayerNorm (as GPT-2 and most efficient-transformer code
bases; Xiong et al., 2020, https://arxiv.org/abs/2002.04745):

    x = x + MHA(LN_1(x))                        self-attention (causal in decoders)
    x = x + MHA(LN_2(x), memory)                cross-attention (encoder-decoder's decoder only)
    x = x + FFN(LN_3(x))
    h = LN_f(x)                                 after the last block

and the attention of each block is *any* registered kernel chosen by name
(``attention=``, ``attn_config=``; cross-attention separately with
``cross_attention=``, ``cross_config=``). Inputs are token embeddings plus
sinusoidal (Vaswani et al.) or learned position vectors.

The backward pass is hand-written by chaining the modules' backwards in
reverse order; the residual ``x + f(x)`` passes ``dx + f'(dx)``. Shapes:
B batch, N (target) length, M source length, D model width, V vocabulary,
C classes.
"""
from __future__ import annotations

from .. import backend
from ..backend import get_namespace, to_numpy
from ..validate import check_choice, check_int
from ..nn import functional as F
from ..nn.functional import IGNORE
from ..nn.modules import Embedding, FeedForward, LayerNorm, Linear, Module
from .attention import MultiHeadAttention



class Block(Module):
    """One pre-LN block: self-attention, optional cross-attention, feed-forward, each residual."""

    def __init__(self, d_model, heads, d_ff, rng, *, attention="full", attn_config=None, causal=False,
                 cross=False, cross_attention="full", cross_config=None, max_len=512, dtype="float64"):
        super().__init__()
        self.ln1 = LayerNorm(d_model, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, heads, rng, attention=attention, attn_config=attn_config,
                                       causal=causal, max_len=max_len, dtype=dtype)
        self.cross = cross
        if cross:
            self.ln2 = LayerNorm(d_model, dtype=dtype)
            self.xattn = MultiHeadAttention(d_model, heads, rng, attention=cross_attention,
                                            attn_config=cross_config, causal=False, max_len=max_len, dtype=dtype)
        self.ln3 = LayerNorm(d_model, dtype=dtype)
        self.ff = FeedForward(d_model, d_ff, rng, dtype=dtype)

    def forward(self, x, key_mask=None, memory=None, memory_mask=None):
        x = x + self.attn.forward(self.ln1.forward(x), key_mask=key_mask)                  # (B, N, D)
        if self.cross:
            x = x + self.xattn.forward(self.ln2.forward(x), kv=memory, key_mask=memory_mask)  # (B, N, D)
        return x + self.ff.forward(self.ln3.forward(x))                                      # (B, N, D)

    def backward(self, dy):
        """Returns (dx, dmemory); dmemory is None without cross-attention."""
        dx = dy + self.ln3.backward(self.ff.backward(dy))
        dmem = None
        if self.cross:
            dh, dmem = self.xattn.backward(dx)
            dx = dx + self.ln2.backward(dh)
        dh, _ = self.attn.backward(dx)
        return dx + self.ln1.backward(dh), dmem


class Stack(Module):
    """Embedding + positions + L blocks + final LayerNorm: ids (B, N) -> states (B, N, D)."""

    def __init__(self, vocab, rng, *, d_model=32, heads=2, layers=2, d_ff=None, max_len=128,
                 attention="full", attn_config=None, causal=False, cross=False, cross_attention="full",
                 cross_config=None, positions="sinusoidal", dtype="float64"):
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        heads, layers = check_int("heads", heads), check_int("layers", layers)
        if d_model % heads:
            raise ValueError(f"heads={heads} must divide d_model={d_model}")
        self.max_len = check_int("max_len", max_len)
        self.positions = check_choice("positions", positions, ("sinusoidal", "learned"))
        d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff)
        self.embed = Embedding(vocab, d_model, rng, dtype=dtype)
        if positions == "learned":
            self.add_param("pos", backend.asarray(rng.standard_normal((max_len, d_model)) * 0.1, dtype=dtype))
        else:  # a fixed buffer, not a parameter
            self.pe = F.sinusoidal_positions(max_len, d_model, backend.xp(), dtype=dtype)   # (max_len, D)
        self.n_layers = layers
        self.blocks = [self.add(f"blocks.{i}", Block(d_model, heads, d_ff, rng, attention=attention,
                                                     attn_config=attn_config, causal=causal, cross=cross,
                                                     cross_attention=cross_attention, cross_config=cross_config,
                                                     max_len=max_len, dtype=dtype))
                       for i in range(layers)]
        self.ln_f = LayerNorm(d_model, dtype=dtype)

    def forward(self, ids, key_mask=None, memory=None, memory_mask=None):
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, N), got {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.max_len} (the positions the model has)")
        pos = self.params["pos"] if self.positions == "learned" else self.pe
        x = self.embed.forward(ids) + pos[:n]                # (B, N, D) + (N, D)
        for blk in self.blocks:
            x = blk.forward(x, key_mask=key_mask, memory=memory, memory_mask=memory_mask)
        self.cache = n
        return self.ln_f.forward(x)                          # (B, N, D)

    def backward(self, dh):
        """Backprop states' gradient (B, N, D); returns d memory (summed over blocks) or None."""
        n = self.cache
        dx = self.ln_f.backward(dh)
        dmem = None
        for blk in reversed(self.blocks):
            dx, dm = blk.backward(dx)
            if dm is not None:
                dmem = dm if dmem is None else dmem + dm
        if self.positions == "learned":
            self.grads["pos"][:n] += dx.sum(axis=0)
        self.embed.backward(dx)
        return dmem

    def attention_layers(self):
        """[(name, MultiHeadAttention)] of every block, for attention maps."""
        out = []
        for i, blk in enumerate(self.blocks):
            out.append((f"blocks.{i}.attn", blk.attn))
            if blk.cross:
                out.append((f"blocks.{i}.xattn", blk.xattn))
        return out


class Model(Module):
    """Shared training surface: ``forward_batch``, ``targets``, ``loss_and_backward``."""

    def loss_and_backward(self, batch, backward=True):
        """Cross-entropy (padding ignored) of one batch, then backward into ``grads``.

        Returns (loss, correct, count): mean loss, number of correct argmax
        predictions and number of counted targets.
        """
        logits = self.forward_batch(batch)
        y = batch["y"]
        loss, cache = F.cross_entropy_forward(logits, y, ignore_index=IGNORE)
        valid = y != IGNORE
        correct = int(((logits.argmax(axis=-1) == y) & valid).sum())
        count = int(valid.sum())
        if backward:
            # cross_entropy_backward gives float64 for float32 logits (bool mask * float): cast back
            self.backward(F.cross_entropy_backward(cache))
        return loss, correct, count

    def attention_layers(self):
        out = []
        for prefix, m in self.modules():
            if isinstance(m, MultiHeadAttention):
                out.append((prefix.rstrip("."), m))
        return out


class Encoder(Model):
    """Classifier: ids (B, N) [+ key_mask (B, N)] -> logits (B, C).

    pool="mean": average of the final states over real tokens; pool="cls" (BERT):
    a learned [CLS] token (an extra embedding row, id ``vocab``) is put before
    the sequence (one more position) and its final state is classified.
    """

    mode = "encoder"

    def __init__(self, vocab, n_classes, rng, *, pool="mean", **kw):
        super().__init__()
        self.pool = check_choice("pool", pool, ("mean", "cls"))
        self.vocab = check_int("vocab", vocab)
        if pool == "cls":                    # one more token id and one more position for [CLS]
            kw = {**kw, "max_len": kw.get("max_len", 128) + 1}
        self.stack = Stack(vocab + (pool == "cls"), rng, causal=False, cross=False, **kw)
        self.head = Linear(self.stack.d_model, check_int("n_classes", n_classes), rng, dtype=kw.get("dtype", "float64"))

    def forward(self, ids, key_mask=None):
        xp = get_namespace(ids)
        if self.pool == "cls":
            if ids.size and int(ids.max()) >= self.vocab:
                raise ValueError(f"ids must lie in [0, {self.vocab}), got a maximum of {int(ids.max())}")
            ids = xp.concatenate([xp.full((ids.shape[0], 1), self.vocab, dtype=ids.dtype), ids], axis=1)  # (B, 1 + N)
            if key_mask is not None:
                key_mask = xp.concatenate([xp.ones((ids.shape[0], 1), dtype=bool), key_mask], axis=1)
        h = self.stack.forward(ids, key_mask=key_mask)       # (B, N, D) (B, 1 + N, D) with [CLS]
        if self.pool == "cls":
            pooled = h[:, 0]                                 # (B, D): the [CLS] state
            w = None
        else:
            w = xp.ones(ids.shape, dtype=h.dtype) if key_mask is None else key_mask.astype(h.dtype)
            w = w / xp.maximum(w.sum(axis=1, keepdims=True), 1.0)       # (B, N): 1/count on real tokens
            pooled = (h * w[..., None]).sum(axis=1)          # (B, D)
        self.cache = (h.shape, w)
        return self.head.forward(pooled)                     # (B, C)

    def backward(self, dlogits):
        shape, w = self.cache
        dpooled = self.head.backward(dlogits)                # (B, D)
        xp = get_namespace(dpooled)
        if w is None:
            dh = xp.zeros(shape, dtype=dpooled.dtype)
            dh[:, 0] = dpooled
        else:
            dh = dpooled[:, None, :] * w[..., None]          # (B, N, D)
        self.stack.backward(dh)

    def forward_batch(self, batch):
        return self.forward(batch["x"], batch.get("mask"))


class Decoder(Model):
    """Language model: ids (B, N) -> next-token logits (B, N, V) with causal self-attention."""

    mode = "decoder"

    def __init__(self, vocab, rng, **kw):
        super().__init__()
        self.stack = Stack(vocab, rng, causal=True, cross=False, **kw)
        self.head = Linear(self.stack.d_model, vocab, rng, dtype=kw.get("dtype", "float64"))

    def forward(self, ids, key_mask=None):
        return self.head.forward(self.stack.forward(ids, key_mask=key_mask))     # (B, N, V)

    def backward(self, dlogits):
        self.stack.backward(self.head.backward(dlogits))

    def forward_batch(self, batch):
        return self.forward(batch["x"], batch.get("mask"))

    def generate(self, prompt, steps, *, temperature=0.0, rng=None):
        """Continue ``prompt`` (B, P) by ``steps`` tokens: greedy (temperature 0) or sampled
        from softmax(logits / temperature) with the host generator ``rng``. Re-runs the
        causal forward on the last ``max_len`` tokens each step. Returns (B, P + steps)."""
        ids = prompt
        xp = get_namespace(prompt)
        for _ in range(check_int("steps", steps, minimum=0)):
            ctx = ids[:, -self.stack.max_len:]
            nxt = _pick(self.forward(ctx)[:, -1], temperature, rng)             # (B,)
            ids = xp.concatenate([ids, xp.asarray(nxt, dtype=ids.dtype)[:, None]], axis=1)
        return ids


class EncoderDecoder(Model):
    """Seq2seq: src (B, M), tgt_in (B, N) -> logits (B, N, V_tgt); the decoder's
    blocks cross-attend to the encoder's final states (masked by ``src_mask``).

    ``attention``/``attn_config`` choose the self-attention of both stacks (the
    decoder's unless ``decoder_attention``/``decoder_config`` are given);
    ``cross_attention``/``cross_config`` the decoder's cross-attention."""

    mode = "encoder-decoder"

    def __init__(self, src_vocab, tgt_vocab, rng, *, cross_attention="full", cross_config=None,
                 decoder_attention=None, decoder_config=None, **kw):
        super().__init__()
        self.encoder = Stack(src_vocab, rng, causal=False, cross=False, **kw)
        if decoder_attention is not None:   # the decoder's causal self-attention, if not the encoder's
            kw = {**kw, "attention": decoder_attention, "attn_config": decoder_config}
        self.decoder = Stack(tgt_vocab, rng, causal=True, cross=True, cross_attention=cross_attention,
                             cross_config=cross_config, **kw)
        self.head = Linear(self.decoder.d_model, tgt_vocab, rng, dtype=kw.get("dtype", "float64"))

    def forward(self, src, tgt, src_mask=None, tgt_mask=None):
        memory = self.encoder.forward(src, key_mask=src_mask)                               # (B, M, D)
        h = self.decoder.forward(tgt, key_mask=tgt_mask, memory=memory, memory_mask=src_mask)  # (B, N, D)
        return self.head.forward(h)                                                          # (B, N, V)

    def backward(self, dlogits):
        dmem = self.decoder.backward(self.head.backward(dlogits))
        self.encoder.backward(dmem)

    def forward_batch(self, batch):
        return self.forward(batch["src"], batch["tgt"], batch.get("src_mask"), batch.get("tgt_mask"))

    def generate(self, src, bos, steps, *, src_mask=None, temperature=0.0, rng=None):
        """Decode ``steps`` tokens after ``bos`` for each source: greedy or sampled
        (see :meth:`Decoder.generate`). Returns (B, steps), without the bos column."""
        xp = get_namespace(src)
        ids = xp.full((src.shape[0], 1), bos, dtype=src.dtype)
        for _ in range(check_int("steps", steps, minimum=0)):
            nxt = _pick(self.forward(src, ids, src_mask)[:, -1], temperature, rng)
            ids = xp.concatenate([ids, xp.asarray(nxt, dtype=ids.dtype)[:, None]], axis=1)
        return ids[:, 1:]


def _pick(logits, temperature, rng):
    """Greedy argmax (temperature 0) or a host draw from softmax(logits / T). logits (B, V) -> (B,)."""
    if temperature is None or temperature == 0:
        return logits.argmax(axis=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if rng is None:
        raise ValueError("rng (a numpy.random.Generator) is needed to sample with temperature > 0")
    z = to_numpy(logits).astype("float64") / float(temperature)         # host (B, V)
    z = z - z.max(axis=-1, keepdims=True)
    p = (2.718281828459045 ** z)
    cdf = (p / p.sum(axis=-1, keepdims=True)).cumsum(axis=-1)
    u = rng.random(cdf.shape[0])[:, None]                                # (B, 1)
    idx = (cdf < u).sum(axis=-1)
    return backend.asarray(idx.clip(0, cdf.shape[-1] - 1))


MODES = {"encoder": Encoder, "decoder": Decoder, "encoder-decoder": EncoderDecoder}
