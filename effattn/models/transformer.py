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

Efficiency techniques (issue 16; :class:`Stack`'s docstring has the details): ``ffn_chunk=c``
runs the feed-forwards by chunks of c positions; ``checkpoint=k`` keeps the input of every k-th
block and recomputes the rest in the backward; ``reversible=True`` makes every block a
reversible pair Y_1 = X_1 + F(X_2), Y_2 = X_2 + G(Y_1) whose backward rebuilds its input from
its output. All three are keywords of every model (passed on to the stacks).

Decoding (issue 17): the causal stacks also run one token at a time, layer by layer, with a
state per layer (:class:`StackState`: each block's self-attention state -- the kernel's own, e.g.
full attention's KV cache -- and, in the encoder-decoder, its cross-attention's projected
memory). Layer norms, feed-forwards and residuals are per token; token t gets the position
vector of its absolute position t::

    state = lm.init_state(B)                           # Decoder; EncoderDecoder: init_state(src, src_mask=...)
    logits, state = lm.prefill(prompt, state)          # (B, P, V): the prompt in one pass
    logits_t, state = lm.step(ids_t, state)            # (B, V): the next token's logits

The logits equal the causal forward's (over ``max_len`` tokens: the kernel configuration the
state is built with, see :meth:`MultiHeadAttention.init_state`). ``generate`` decodes this way
when every self-attention kernel offers ``step`` (and cross-attention is ``full``), and falls back
to re-running the forward for every token otherwise (``by_steps=False`` forces that path).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from ..backend import get_namespace, to_numpy
from ..validate import check_bool, check_choice, check_int, check_nonnegative_float
from ..nn import functional as F
from ..nn.functional import IGNORE
from ..nn.modules import Embedding, LayerNorm, Linear, Module
from .attention import CrossAttentionState, MultiHeadAttention, SelfAttentionState
from .ffn import SparseFeedForward, make_ffn


class BlockState(NamedTuple):
    """One block's decoder state."""

    attn: SelfAttentionState           # the causal self-attention's (the kernel's state inside)
    xattn: CrossAttentionState | None  # the cross-attention's projected memory, or None


class StackState(NamedTuple):
    """A causal :class:`Stack`'s decoder state: one :class:`BlockState` per layer."""

    blocks: tuple
    batch: int       # B
    t: int           # tokens seen: the absolute position of the next one



class Block(Module):
    """One pre-LN block: self-attention, optional cross-attention, feed-forward, each residual."""

    def __init__(self, d_model, heads, d_ff, rng, *, attention="full", attn_config=None, causal=False,
                 cross=False, cross_attention="full", cross_config=None, max_len=512, dtype="float64",
                 ffn_chunk=None, ffn="dense", ffn_config=None):
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
        self.ff = make_ffn(ffn, d_model, d_ff, rng, config=ffn_config, causal=causal, dtype=dtype, chunk=ffn_chunk)

    def forward(self, x, key_mask=None, memory=None, memory_mask=None):
        x = x + self.attn.forward(self.ln1.forward(x), key_mask=key_mask)                  # (B, N, D)
        if self.cross:
            x = x + self.xattn.forward(self.ln2.forward(x), kv=memory, key_mask=memory_mask)  # (B, N, D)
        return x + self.ff.forward(self.ln3.forward(x), key_mask=key_mask)                   # (B, N, D)

    def init_state(self, batch, memory=None, memory_mask=None):
        """A :class:`BlockState`: the self-attention's state, and the cross-attention's memory."""
        if self.cross != (memory is not None):
            raise ValueError("memory: a block with cross-attention needs the encoder's output (B, M, D)" if self.cross
                             else "memory is given, but this block has no cross-attention")
        xattn = self.xattn.init_state(batch, memory=memory, memory_mask=memory_mask) if self.cross else None
        return BlockState(self.attn.init_state(batch), xattn)

    def prefill(self, x, state, key_mask=None):
        """``forward`` on the first P tokens x (B, P, D), filling the state: (y (B, P, D), state)."""
        a, sa = self.attn.prefill(self.ln1.forward(x), state.attn, key_mask=key_mask)
        x = x + a
        if self.cross:
            x = x + self.xattn.prefill(self.ln2.forward(x), state.xattn)[0]
        return x + self.ff.forward(self.ln3.forward(x), key_mask=key_mask), state._replace(attn=sa)

    def step(self, x_t, state, key_mask_t=None):
        """One token x_t (B, D): (y_t (B, D), state); the same sublayers as ``forward``."""
        a, sa = self.attn.step(self.ln1.forward(x_t), state.attn, key_mask_t=key_mask_t)
        x_t = x_t + a
        if self.cross:
            x_t = x_t + self.xattn.step(self.ln2.forward(x_t), state.xattn)[0]
        return x_t + self.ff.forward(self.ln3.forward(x_t), key_mask=key_mask_t), state._replace(attn=sa)

    def backward(self, dy):
        """Returns (dx, dmemory); dmemory is None without cross-attention."""
        dx = dy + self.ln3.backward(self.ff.backward(dy))
        dmem = None
        if self.cross:
            dh, dmem = self.xattn.backward(dx)
            dx = dx + self.ln2.backward(dh)
        dh, _ = self.attn.backward(dx)
        return dx + self.ln1.backward(dh), dmem

    # ----------------------------------------------------------------------- reversible
    # The block as a reversible pair (Gomez et al., 2017; Reformer, Section 3): the attention
    # sub-layers form F, the feed-forward G, with the block's own pre-LN placement:
    #     F(x) = A(LN_1 x)                                   without cross-attention
    #     F(x) = a + C(LN_2 (x + a), memory),  a = A(LN_1 x)  with it (self then cross, as forward)
    #     G(x) = FFN(LN_3 x)
    #     Y_1 = X_1 + F(X_2),   Y_2 = X_2 + G(Y_1)
    def rev_f(self, x, key_mask=None, memory=None, memory_mask=None):
        """F(x) (B, N, D): the attention sub-layers without their residual."""
        a = self.attn.forward(self.ln1.forward(x), key_mask=key_mask)
        if not self.cross:
            return a
        return a + self.xattn.forward(self.ln2.forward(x + a), kv=memory, key_mask=memory_mask)

    def rev_f_backward(self, df):
        """(dF/dx^T df, dmemory) after :meth:`rev_f`. With cross-attention, h = x + a:
        dh = LN_2'^T C'^T df, da = df + dh, dx = dh + LN_1'^T A'^T da."""
        if not self.cross:
            dh, _ = self.attn.backward(df)
            return self.ln1.backward(dh), None
        dc, dmem = self.xattn.backward(df)
        dh = self.ln2.backward(dc)                           # d(x + a)
        da, _ = self.attn.backward(df + dh)
        return dh + self.ln1.backward(da), dmem

    def rev_g(self, x, key_mask=None):
        """G(x) = FFN(LN_3 x) (B, N, D)."""
        return self.ff.forward(self.ln3.forward(x), key_mask=key_mask)

    def rev_g_backward(self, dg):
        return self.ln3.backward(self.ff.backward(dg))

    def rev_forward(self, x1, x2, key_mask=None, memory=None, memory_mask=None):
        """(X_1, X_2) -> (Y_1, Y_2) = (X_1 + F(X_2), X_2 + G(Y_1))."""
        y1 = x1 + self.rev_f(x2, key_mask, memory, memory_mask)
        return y1, x2 + self.rev_g(y1, key_mask)

    def rev_backward_stored(self, dy1, dy2):
        """The chain rule through the stored forward: returns (dX_1, dX_2, dmemory).

            dY_1' = dY_1 + G'(Y_1)^T dY_2,   dX_2 = dY_2 + F'(X_2)^T dY_1',   dX_1 = dY_1'
        """
        dy1 = dy1 + self.rev_g_backward(dy2)
        dfx, dmem = self.rev_f_backward(dy1)
        return dy1, dy2 + dfx, dmem

    def rev_backward(self, y1, y2, dy1, dy2, key_mask=None, memory=None, memory_mask=None):
        """Reconstruct the input from the output, then backpropagate: returns
        (X_1, X_2, dX_1, dX_2, dmemory). Nothing of the forward is needed but (Y_1, Y_2)::

            X_2 = Y_2 - G(Y_1)        (G re-run: its cache, then its backward)
            X_1 = Y_1 - F(X_2)        (F re-run: its cache, then its backward)

        and the gradients as :meth:`rev_backward_stored`; the caches are dropped after."""
        x2 = y2 - self.rev_g(y1, key_mask)
        dy1 = dy1 + self.rev_g_backward(dy2)
        x1 = y1 - self.rev_f(x2, key_mask, memory, memory_mask)
        dfx, dmem = self.rev_f_backward(dy1)
        self.drop_caches()
        return x1, x2, dy1, dy2 + dfx, dmem


class Stack(Module):
    """Embedding + positions + L blocks + final LayerNorm: ids (B, N) -> states (B, N, D).

    Efficiency techniques (issue 16; they change how the stack runs, not what it computes,
    except ``reversible``, which is its own architecture):

    * ``ffn_chunk=c``: every block's feed-forward runs by chunks of c positions
      (:class:`~effattn.nn.modules.FeedForward`): same result, O(c D_ff) hidden memory.
    * ``checkpoint=k`` (Chen et al., 2016, https://arxiv.org/abs/1604.06174): the forward keeps
      only the input of blocks 0, k, 2k, ... and drops every block's cache; the backward re-runs
      each segment of k blocks from its saved input (caches kept this time), backpropagates
      through it and drops it again. Same gradients; activation memory ~ (L/k) x + k blocks'
      caches, O(sqrt L) for k = sqrt L, at the price of one more forward.
    * ``reversible=True`` (Gomez et al., 2017, https://arxiv.org/abs/1707.04585; Reformer,
      Kitaev et al. 2020): the input is duplicated, X_1 = X_2 = x, each block maps
      (X_1, X_2) -> (Y_1, Y_2) = (X_1 + F(X_2), X_2 + G(Y_1)) with F the block's pre-LN
      attention sub-layers (self, then cross in a decoder with memory) and G its pre-LN
      feed-forward (:meth:`Block.rev_forward`), and the last block's halves are averaged,
      h = LN_f((Y_1 + Y_2) / 2) (as reformer-pytorch). The backward reconstructs each block's
      input from its output (:meth:`Block.rev_backward`), so no block's activations are stored:
      memory does not grow with L. ``reconstruct=False`` keeps every block's caches and runs
      the plain chain rule through them instead (the oracle of the tests). After a
      reconstructing backward, ``reconstruction_error`` is max |X_rec - x| / max |x| over both
      halves at the bottom of the stack (0 in exact arithmetic).

    ``ffn="switch"`` (with ``ffn_config``) makes every block's feed-forward a mixture of experts
    (:mod:`effattn.models.ffn`, issue 15); its auxiliary losses enter the backward with their weights.

    ``checkpoint`` and ``reversible`` exclude each other. Decoding token by token
    (``prefill``/``step``) is the plain blocks' only: a reversible stack decodes by recomputing
    (``generate`` falls back to it by itself).
    """

    def __init__(self, vocab, rng, *, d_model=32, heads=2, layers=2, d_ff=None, max_len=128,
                 attention="full", attn_config=None, causal=False, cross=False, cross_attention="full",
                 cross_config=None, positions="sinusoidal", dtype="float64", ffn_chunk=None,
                 checkpoint=None, reversible=False, reconstruct=True, ffn="dense", ffn_config=None):
        super().__init__()
        self.reversible = check_bool("reversible", reversible)
        self.reconstruct = check_bool("reconstruct", reconstruct)
        self.checkpoint = None if checkpoint is None else check_int("checkpoint", checkpoint)
        if self.reversible and self.checkpoint is not None:
            raise ValueError("checkpoint: a reversible stack stores no block's activations already; "
                             "use checkpoint or reversible, not both")
        ffn_chunk = None if ffn_chunk is None else check_int("ffn_chunk", ffn_chunk)
        self.reconstruction_error = None
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
                                                     max_len=max_len, dtype=dtype, ffn_chunk=ffn_chunk,
                                                     ffn=ffn, ffn_config=ffn_config))
                       for i in range(layers)]
        self.ln_f = LayerNorm(d_model, dtype=dtype)

    def forward(self, ids, key_mask=None, memory=None, memory_mask=None):
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, N), got {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.max_len} (the positions the model has)")
        x = self.embed.forward(ids) + self._positions()[:n]  # (B, N, D) + (N, D)
        ctx = dict(key_mask=key_mask, memory=memory, memory_mask=memory_mask)
        self.cache = n
        self._ctx, self._saved = ctx, None
        if self.reversible:
            return self.ln_f.forward(self._rev_forward(x, ctx))
        for i, blk in enumerate(self.blocks):
            if self.checkpoint is not None:
                if i % self.checkpoint == 0:
                    self._saved = (self._saved or []) + [x]   # the input of each segment
                x = blk.forward(x, **ctx)
                blk.drop_caches()                            # recomputed in the backward
            else:
                x = blk.forward(x, **ctx)
        return self.ln_f.forward(x)                          # (B, N, D)

    def _rev_forward(self, x, ctx):
        x1 = x2 = x                                          # the input, duplicated
        for blk in self.blocks:
            x1, x2 = blk.rev_forward(x1, x2, **ctx)
            if self.reconstruct:
                blk.drop_caches()                            # rebuilt from (Y_1, Y_2) in the backward
        self._saved = (x1, x2, x if self.reconstruct else None)
        return 0.5 * (x1 + x2)                               # (B, N, D)

    def backward(self, dh):
        """Backprop states' gradient (B, N, D); returns d memory (summed over blocks) or None."""
        n = self.cache
        dx = self.ln_f.backward(dh)
        dmem = None
        if self.reversible:
            dx, dmem = self._rev_backward(dx)
        elif self.checkpoint is not None:
            dx, dmem = self._checkpoint_backward(dx)
        else:
            for blk in reversed(self.blocks):
                dx, dm = blk.backward(dx)
                if dm is not None:
                    dmem = dm if dmem is None else dmem + dm
        if self.positions == "learned":
            self.grads["pos"][:n] += dx.sum(axis=0)
        self.embed.backward(dx)
        return dmem

    def _checkpoint_backward(self, dx):
        """Re-run each segment of ``checkpoint`` blocks from its saved input, last segment first,
        backpropagate through it, and drop it again: (dx, dmemory)."""
        k, ctx, saved = self.checkpoint, self._ctx, self._saved
        dmem = None
        for s in reversed(range(len(saved))):
            seg = self.blocks[s * k:(s + 1) * k]
            x = saved[s]
            for blk in seg:
                x = blk.forward(x, **ctx)                    # the caches, once more
            del x
            saved[s] = None
            for blk in reversed(seg):
                dx, dm = blk.backward(dx)
                if dm is not None:
                    dmem = dm if dmem is None else dmem + dm
                blk.drop_caches()
        self._saved = None
        return dx, dmem

    def _rev_backward(self, dx):
        """Down the reversible blocks: h = (Y_1 + Y_2) / 2 gives dY_1 = dY_2 = dh / 2; each block
        reconstructs its input (or uses its stored caches with ``reconstruct=False``); the
        duplicated input gets dx = dX_1 + dX_2. Returns (dx, dmemory)."""
        y1, y2, x_in = self._saved
        self._saved = None
        dy1 = dy2 = 0.5 * dx
        dmem = None
        for blk in reversed(self.blocks):
            if self.reconstruct:
                y1, y2, dy1, dy2, dm = blk.rev_backward(y1, y2, dy1, dy2, **self._ctx)
            else:
                dy1, dy2, dm = blk.rev_backward_stored(dy1, dy2)
            if dm is not None:
                dmem = dm if dmem is None else dmem + dm
        if self.reconstruct:
            xp = get_namespace(x_in)
            big = max(float(xp.abs(x_in).max()), 1e-30) if x_in.size else 1.0
            self.reconstruction_error = max(float(xp.abs(y1 - x_in).max()), float(xp.abs(y2 - x_in).max())) / big \
                if x_in.size else 0.0
        return dy1 + dy2, dmem

    # ----------------------------------------------------------------------- decoding
    def why_no_step(self):
        """None when this stack decodes token by token (causal, every self-attention kernel with
        ``step``, cross-attention ``full``), else the reason."""
        if self.reversible:
            return "a reversible stack decodes by recomputing only (its blocks have no prefill/step)"
        for i, blk in enumerate(self.blocks):
            why = blk.attn.why_no_step() or (blk.xattn.why_no_step(cross=True) if blk.cross else None)
            if why:
                return f"blocks.{i}: {why}"
        return None

    def init_state(self, batch, *, memory=None, memory_mask=None):
        """The empty :class:`StackState` for ``batch`` sequences (``memory`` (B, M, D) and
        ``memory_mask`` (B, M): the encoder's output and the source mask, with cross-attention).
        It takes at most ``max_len`` tokens (the positions the model has)."""
        why = self.why_no_step()
        if why:
            raise ValueError(f"cannot decode step by step: {why}")
        batch = check_int("batch", batch)
        return StackState(tuple(blk.init_state(batch, memory, memory_mask) for blk in self.blocks), batch, 0)

    def prefill(self, ids, state, *, key_mask=None):
        """The prompt ids (B, P) in one pass, into a fresh state: (states (B, P, D), state) -- the
        rows of ``forward``; ``key_mask`` (B, P) bool or None."""
        state = self._check_state(state)
        if not hasattr(ids, "ndim") or ids.ndim != 2 or ids.shape[0] != state.batch or ids.shape[1] < 1:
            raise ValueError(f"ids must have shape ({state.batch}, P) with P >= 1 (B from the state), "
                             f"got {tuple(getattr(ids, 'shape', ()))}")
        if state.t != 0:
            raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"prompt length {n} exceeds max_len={self.max_len} (the positions the model has)")
        x = self.embed.forward(ids) + self._positions()[:n]                                 # (B, P, D)
        blocks = []
        for blk, st in zip(self.blocks, state.blocks):
            x, st = blk.prefill(x, st, key_mask=key_mask)
            blocks.append(st)
        return self.ln_f.forward(x), StackState(tuple(blocks), state.batch, n)

    def step(self, ids_t, state, *, key_mask_t=None):
        """One token ids_t (B,) at position t = ``state.t``: (state (B, D), state) -- row t of
        ``forward``; ``key_mask_t`` (B,) bool or None."""
        state = self._check_state(state)
        if not hasattr(ids_t, "ndim") or tuple(ids_t.shape) != (state.batch,):
            raise ValueError(f"ids_t must have shape ({state.batch},) (one token per sequence), "
                             f"got {tuple(getattr(ids_t, 'shape', ()))}")
        t = state.t
        if t >= self.max_len:
            raise ValueError(f"position {t} is past the max_len={self.max_len} positions the model has")
        x = self.embed.forward(ids_t) + self._positions()[t]                                # (B, D)
        blocks = []
        for blk, st in zip(self.blocks, state.blocks):
            x, st = blk.step(x, st, key_mask_t=key_mask_t)
            blocks.append(st)
        return self.ln_f.forward(x), StackState(tuple(blocks), state.batch, t + 1)

    def _check_state(self, state):
        if not isinstance(state, StackState):
            raise TypeError(f"state must come from init_state (or a previous prefill/step), got {type(state).__name__}")
        if len(state.blocks) != self.n_layers:
            raise ValueError(f"state has {len(state.blocks)} layers, this stack {self.n_layers}: "
                             f"it comes from another model")
        return state

    def _positions(self):
        return self.params["pos"] if self.positions == "learned" else self.pe               # (max_len, D)

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

    def loss_and_backward(self, batch, backward=True, loss_scale=None):
        """Cross-entropy (padding ignored) of one batch, then backward into ``grads``.

        Returns (loss, correct, count): mean loss, number of correct argmax
        predictions and number of counted targets. ``loss_scale`` S (a Python float, mixed
        precision: :class:`effattn.nn.precision.LossScaler`) backpropagates S * loss, so every
        gradient is S times the true one (the loss returned is the true one).
        """
        logits = self.forward_batch(batch)
        y = batch["y"]
        loss, cache = F.cross_entropy_forward(logits, y, ignore_index=IGNORE)
        valid = y != IGNORE
        correct = int(((logits.argmax(axis=-1) == y) & valid).sum())
        count = int(valid.sum())
        if backward:
            # cross_entropy_backward gives float64 for float32 logits (bool mask * float): cast back
            dlogits = F.cross_entropy_backward(cache)
            for _, ff in self.sparse_ffns():     # their auxiliary losses are scaled by S too
                ff.grad_scale = 1.0 if loss_scale is None else float(loss_scale)
            self.backward(dlogits if loss_scale is None else dlogits * float(loss_scale))
        return loss, correct, count

    def sparse_ffns(self):
        """(qualified name, :class:`~effattn.models.ffn.SparseFeedForward`) of every sparse feed-forward."""
        return [(prefix.rstrip("."), m) for prefix, m in self.modules() if isinstance(m, SparseFeedForward)]

    def aux(self):
        """The last forward's auxiliary losses: {"loss": the weighted sum over the sparse
        feed-forwards (what the backward adds to the cross-entropy; 0.0 without any),
        "layers": {name: that layer's losses and statistics}}."""
        layers = {name: ff.aux() for name, ff in self.sparse_ffns()}
        return {"loss": sum(a.get("loss", 0.0) for a in layers.values()), "layers": layers}

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

    def init_state(self, batch):
        """The empty decoder state (:meth:`Stack.init_state`) for ``batch`` sequences."""
        return self.stack.init_state(batch)

    def prefill(self, ids, state, *, key_mask=None):
        """The prompt ids (B, P) in one pass: (logits (B, P, V), state)."""
        h, state = self.stack.prefill(ids, state, key_mask=key_mask)
        return self.head.forward(h), state

    def step(self, ids_t, state, *, key_mask_t=None):
        """The next token ids_t (B,): (its next-token logits (B, V), state)."""
        h, state = self.stack.step(ids_t, state, key_mask_t=key_mask_t)
        return self.head.forward(h), state

    def generate(self, prompt, steps, *, temperature=0.0, rng=None, by_steps=None):
        """Continue ``prompt`` (B, P), P >= 1, by ``steps`` tokens: greedy (temperature 0) or
        sampled from softmax(logits / temperature) with the host generator ``rng`` (one
        ``rng.random(B)`` draw per token, in both paths). Returns (B, P + steps).

        ``by_steps=None`` (default) decodes by steps when the attention kernel offers ``step``
        (:meth:`Stack.why_no_step` is None): the prompt is prefilled in one pass, then each new
        token costs one step (O(state) attention per layer, not a forward over the context).
        ``by_steps=False`` re-runs the causal forward on the context for every token (the
        original path, kept for comparison); ``by_steps=True`` refuses a kernel without step.

        Past ``max_len``: a context longer than the model's ``max_len`` positions is cut to its
        last ``max_len`` tokens, renumbered from position 0, and recomputed for every token. A
        KV-cache state cannot reproduce that sliding window (its keys carry their positions and
        every earlier token), so decoding by steps goes as far as the positions go -- every
        token predicted from a context of at most ``max_len`` tokens -- and the remaining ones
        (and all of them when P > max_len) are recomputed on the sliding window, as before.

        The two paths give the same tokens when the kernel's configuration does not depend on
        the length (full; or sizes given in ``attn_config``); otherwise steps use the
        configuration of ``max_len`` and the recomputation that of each context length
        (:meth:`MultiHeadAttention.init_state`)."""
        steps = check_int("steps", steps, minimum=0)
        if not hasattr(prompt, "ndim") or prompt.ndim != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must have shape (B, P) with P >= 1, got {tuple(getattr(prompt, 'shape', ()))}")
        _check_sampling(temperature, rng)
        use_steps = _use_steps(self.stack, by_steps)
        n_max = self.stack.max_len
        ids, done = prompt, 0
        if use_steps and steps and prompt.shape[1] <= n_max:
            logits, state = self.prefill(prompt, self.init_state(prompt.shape[0]))
            last = logits[:, -1]                                                # (B, V)
            while True:
                ids = _append(ids, _pick(last, temperature, rng))
                done += 1
                if done == steps or ids.shape[1] > n_max:                      # no position left for a step
                    break
                last, state = self.step(ids[:, -1], state)
        for _ in range(steps - done):                                           # recompute: the last max_len tokens
            ids = _append(ids, _pick(self.forward(ids[:, -n_max:])[:, -1], temperature, rng))
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

    def init_state(self, src, *, src_mask=None):
        """Encode ``src`` (B, M) once (``src_mask`` (B, M) bool or None) and return the decoder's
        empty state (:meth:`Stack.init_state`): its cross-attentions hold the projected memory."""
        memory = self.encoder.forward(src, key_mask=src_mask)                               # (B, M, D)
        return self.decoder.init_state(src.shape[0], memory=memory, memory_mask=src_mask)

    def prefill(self, tgt, state, *, tgt_mask=None):
        """The target prefix tgt (B, P) in one pass: (logits (B, P, V), state)."""
        h, state = self.decoder.prefill(tgt, state, key_mask=tgt_mask)
        return self.head.forward(h), state

    def step(self, tgt_t, state, *, tgt_mask_t=None):
        """The next target token tgt_t (B,): (its next-token logits (B, V), state)."""
        h, state = self.decoder.step(tgt_t, state, key_mask_t=tgt_mask_t)
        return self.head.forward(h), state

    def generate(self, src, bos, steps, *, src_mask=None, temperature=0.0, rng=None, by_steps=None):
        """Decode ``steps`` tokens after ``bos`` for each source: greedy or sampled
        (see :meth:`Decoder.generate`). Returns (B, steps), without the bos column.

        ``by_steps`` as in :meth:`Decoder.generate`: by steps (default when the decoder's
        self-attention offers ``step`` and its cross-attention is ``full``), the source is
        encoded once, the cross-attentions' keys and values are projected once, and each token
        is one step; ``by_steps=False`` re-runs the encoder and the decoder for every token. The
        decoder reads bos and the tokens before the last, so ``steps`` may be at most the
        decoder's ``max_len`` (a ValueError up front otherwise, in both paths)."""
        steps = check_int("steps", steps, minimum=0)
        if steps > self.decoder.max_len:
            raise ValueError(f"steps={steps} needs {steps} decoder positions (bos and the tokens before the last), "
                             f"more than max_len={self.decoder.max_len}")
        _check_sampling(temperature, rng)
        use_steps = _use_steps(self.decoder, by_steps)
        xp = get_namespace(src)
        ids = xp.full((src.shape[0], 1), bos, dtype=src.dtype)
        if use_steps and steps:
            logits, state = self.prefill(ids, self.init_state(src, src_mask=src_mask))
            last = logits[:, -1]                                                # (B, V)
            for i in range(steps):
                ids = _append(ids, _pick(last, temperature, rng))
                if i + 1 < steps:
                    last, state = self.step(ids[:, -1], state)
        else:
            for _ in range(steps):
                ids = _append(ids, _pick(self.forward(src, ids, src_mask)[:, -1], temperature, rng))
        return ids[:, 1:]


def _use_steps(stack, by_steps):
    """Whether ``generate`` decodes by steps: ``by_steps`` None (when the stack can), True (it
    must: a ValueError saying why not) or False (recompute)."""
    why = stack.why_no_step()
    if by_steps is None:
        return why is None
    if check_bool("by_steps", by_steps) and why:
        raise ValueError(f"by_steps=True, but {why}; use by_steps=False (or None) to recompute instead")
    return by_steps


def _append(ids, nxt):
    """ids (B, L) and the next tokens (B,) -> (B, L + 1)."""
    xp = get_namespace(ids)
    return xp.concatenate([ids, xp.asarray(nxt, dtype=ids.dtype)[:, None]], axis=1)


def _check_sampling(temperature, rng):
    """temperature None or 0 (greedy) or > 0 with a host ``rng``; returns it as a float."""
    if temperature is None:
        return 0.0
    temperature = check_nonnegative_float("temperature", temperature)
    if temperature > 0 and rng is None:
        raise ValueError("rng (a numpy.random.Generator) is needed to sample with temperature > 0")
    return temperature


def _pick(logits, temperature, rng):
    """Greedy argmax (temperature 0) or a host draw from softmax(logits / T). logits (B, V) -> (B,)."""
    temperature = _check_sampling(temperature, rng)
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = to_numpy(logits).astype("float64") / temperature                # host (B, V)
    z = z - z.max(axis=-1, keepdims=True)
    p = (2.718281828459045 ** z)
    cdf = (p / p.sum(axis=-1, keepdims=True)).cumsum(axis=-1)
    u = rng.random(cdf.shape[0])[:, None]                                # (B, 1)
    idx = (cdf < u).sum(axis=-1)
    return backend.asarray(idx.clip(0, cdf.shape[-1] - 1))


MODES = {"encoder": Encoder, "decoder": Decoder, "encoder-decoder": EncoderDecoder}
