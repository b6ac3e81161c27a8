"""Parity fixtures for effattn ``compressive`` (Compressive Transformer, Rae, Potapenko, Jayakumar,
Lillicrap 2020) against lucidrains' ``compressive-transformer-pytorch`` 0.4.0 (PyPI; it imports
``mogrifier``, installed without dependencies, not used here): the layer
``compressive_transformer_pytorch.SelfAttention`` with its ``ConvCompress``, its memory update and
its attention-reconstruction loss (``compressive_transformer_pytorch/compressive_transformer_pytorch.py``;
line numbers below are of that file in 0.4.0).

What runs. ``SelfAttention(dim=D, seq_len=N, mem_len, cmem_len, cmem_ratio=rate, heads=H)`` built with
torch's default dtype float64 (all dropouts 0, their defaults), called on the CPU as the model calls it,
``attn(x, memories=(memory, compressed), pos_emb=None, input_mask=None, calc_memory=True)``; it
returns ``(logits, Memory(new_mem, new_cmem), aux_loss)``. The fixture's ``out`` is what effattn calls
y::

    out = LayerNorm(x + logits; ln_g, ln_b, eps 1e-5)        (composed here, torch.nn.functional.layer_norm)

The peer's model (``CompressiveTransformer``, l. 291-399) is pre-norm: each layer is
``wrapper(PreNorm(dim, SelfAttention(...)))`` with wrapper = ``GRUGating`` (the default,
``gru_gated_residual=True``) or ``Residual`` (x + f(LN(x))), and the memory it stores is the
SelfAttention's own input, i.e. the *normalised* x (``queue_fifo(mem, x, ...)`` inside the layer,
l. 252). effattn's layer is post-norm with the memory holding the layer's input. The mapping
therefore feeds the peer's SelfAttention what effattn calls x (its PreNorm made the identity: it is
not called at all), passes effattn's memory / compressed memory as the peer's ``(mem, cmem)``, and
composes effattn's residual + LayerNorm around the peer's output. Then the memory rows are the same
rows on both sides. Mapping (effattn's parameters copied in)::

    to_q.weight (D, D)            = Wq.T                      (bias=False)
    to_kv.weight (2D, D)          = cat([Wk.T, Wv.T], 0)      (bias=False; .chunk(2, -1): k then v)
    to_out.weight (D, D)          = Wo.T
    to_out.bias (D,)              = 0                          (effattn's W_o has no bias: not compared)
    compress_mem_fn.conv.weight   = Wc.transpose(2, 1, 0)     (Conv1d(D, D, rate, stride=rate): weight
                                                               (D_out, D_in, rate), Wc[t] = weight[:, :, t].T)
    compress_mem_fn.conv.bias     = bc
    ln_g, ln_b                    : leaves of the composed LayerNorm
    u = vb = 0, Wr = 0            (effattn side: the positional terms vanish; see "Positions")
    the gradients, transposed back -> grad.x, grad.Wq, grad.Wk, grad.Wv, grad.Wo, grad.ln_g,
    grad.ln_b, grad.Wc, grad.bc

grad.u, grad.vb, grad.Wr are not in the fixtures (the peer has no such parameters; effattn's are
nonzero even at u = vb = Wr = 0, e.g. dWr = R^T dr). memory (B, L, D) and compressed (B, Lc, D) are
constants (the model detaches its memories, l. 396): array configuration, no gradient.

The objective is effattn's: ``sum(dout * out) + recon_weight * aux`` (the registry's ``aux_loss``: the
weighted scalar that effattn's backward adds to sum(dout * out), as for ``switch``). The peer's layer
returns the unweighted reconstruction MSE; its model multiplies by ``reconstruction_loss_weight /
num_memory_layers`` (l. 398): one memory layer here, so recon_weight = reconstruction_loss_weight.
``out`` does not depend on Wc, bc (the compression only makes the next state), so grad.Wc and
grad.bc are exactly the gradient of recon_weight * aux: the fixture checks the aux loss through them.

Conventions, each checked against the peer's source (and measured where a number is given):

- Heads, scale, causal mask. Heads are contiguous column blocks (``reshape_dim(x, -1, (-1,
  dim_h)).transpose(1, 2)``, l. 212), scale dim_head ** -0.5 (l. 180), keys / values over
  ``torch.cat((cmem, mem, x), dim=1)`` (l. 208): effattn's h~ = [compressed; memory; x]. The causal
  mask is always on: ``ones(t, t + Lc + L).triu_(1 + Lc + L)`` (l. 232), key j visible iff
  j <= Lc + L + i: effattn's causal=True. Every fixture is ``causal``; the peer has no non-causal
  mode. Masked scores are ``-finfo(float64).max`` (l. 218), not -inf: exp underflows to exactly 0.
- Positions. The peer's ``pos_emb`` is a *learned* per-head table (the model's
  ``nn.Parameter(torch.zeros(heads, seq_len + mem_len + cmem_len, dim_head))``, l. 334, zero-init,
  shared by all layers) added as ``scale * q_i . E[kv_len - 1 - (Lc + L + i - j)]`` after its
  ``shift`` (l. 55-63, l. 220-224; measured: shifted[i, j] = unshifted[i, j + t - 1 - i]): a learned
  relative embedding indexed by distance, without Transformer-XL's content / position biases u, vb and
  without a sinusoid. effattn uses Transformer-XL's (q + u).k + (q + vb).(R W_R). Not comparable:
  the peer is called with ``pos_emb=None`` (its code skips the term) and effattn with u = vb = Wr = 0.
- Memory update (l. 252). ``queue_fifo(mem, x, length=mem_len)``: all = [mem; x], new_mem = the last
  mem_len rows, old_mem = the rest (the fallen rows, oldest first): effattn's. Not done at all when
  ``self.seq_len > t`` (l. 247: a segment shorter than seq_len leaves both memories unchanged and the
  aux loss 0; effattn always updates): every case has seq_len = N = t.
- Partial groups (l. 253-256). When k = len(fallen) is not a multiple of rate the peer pads
  ``k % rate`` zero rows at the *front* (``F.pad(old_mem, (0, 0, k % rate, 0))``), not
  ``rate - k % rate``, and Conv1d then drops any incomplete tail group, i.e. the *newest* rows. Rate 2,
  k odd: ceil(k / 2) groups, the first being [0, f_0] (= bc + f_0 Wc[1]); effattn makes k // 2 groups
  from f_1 .. f_{k-1}. Rate 3, k = 5: pad 2 -> 7 rows -> groups [0, 0, f_0], [f_1, f_2, f_3], f_4
  (the newest) dropped; effattn makes one group [f_2, f_3, f_4]. :func:`divergences` measures these.
  The two agree when rate divides k: every case here has k = N = L = mem_len, a multiple of rate.
- Compressed memory. ``compress_mem_fn(old_mem.detach())`` (l. 261): the fallen rows are constants
  to the compression (no gradient reaches x through it), as effattn's. new_cmem = the last cmem_len
  rows of ``cat((cmem, compressed_mem))`` (l. 262): effattn's. Nothing is compressed (and the aux is
  ``zeros(1)``, shape (1,)) when nothing fell or cmem_len <= 0 (l. 258).
- Reconstruction loss, which rows (l. 275-276). The target attends over ``k[:, :, slice(-min(L,
  mem_len) - seq_len, -seq_len)]``: the whole previous memory (its last mem_len rows), not the fallen
  rows. The two coincide iff N = mem_len and L <= mem_len (then fallen = the memory); with N <
  mem_len (the model allows mem_len >= seq_len) the peer reconstructs attention over all L memory
  rows from the compression of only the N oldest of them (:func:`divergences` measures it). Every
  case here is that steady state: L = N = mem_len, memory full.
- Reconstruction loss, what attends (l. 269-285). q is this segment's ``to_q(x)``, old keys / values
  are the rows of the layer's own k, v (``to_kv`` of the memory), the compressed keys / values
  ``to_kv(compressed_mem)`` with the same weight; ``full_attn`` (l. 72-78) is content-only,
  non-causal, unmasked softmax(q k^T dim_head ** -0.5) v per head (no positional term even when
  pos_emb is given), ``F.mse_loss`` with the default mean over (B, H, N, d): effattn's. q, old k, old v
  are ``torch.detach``-ed (l. 278): the gradient reaches Wc, bc only, as effattn's.
- The kv stop-gradient is in place, on the parameter (l. 269): ``self.to_kv.weight.detach_()`` turns
  the Parameter's requires_grad off for good, and it runs before backward, so in training mode W_k and
  W_v get *no* gradient at all -- not from the aux loss (intended) and not from the attention output
  either (measured: ``to_kv.weight.grad`` stays None after ``(out.sum() + aux).backward()``, on the
  first training call as on every later one; ``torch.autograd.grad`` w.r.t. it raises "One of the
  differentiated Tensors does not require grad"). effattn's W_k, W_v get the gradient of the output.
  So each case runs the peer twice, on fresh modules with the same weights: in eval mode (the memory
  update runs, l. 264 returns before the aux loss) for out and grad.x / Wq / Wk / Wv / Wo / ln, and in
  training mode (every dropout 0: the same out, checked to 0) for the aux loss and grad.Wc / grad.bc
  of sum(dout * out) + recon_weight * aux; the training pass's grad.x / Wq / Wo / ln are checked equal
  to the eval pass's (the aux reaches none of them).
- Aux loss only in training mode (l. 264): in eval the peer returns ``zeros(1)``. effattn's aux_loss
  does not depend on a mode.
- Masks. The peer has no memory masks; its ``input_mask`` (l. 226-229) masks pair (i, j) of the
  segment unless query i *and* key j are real (memory keys always visible), and its memory update and
  reconstruction loss ignore it. Not in these fixtures (no key_mask case).
- Outside the layer (not compared): the model's ``enhanced_recurrence=True`` default rolls the
  memories by one layer (``torch.roll(mem, -1, 0)``, l. 371: layer l attends over layer l + 1's
  memory of the last step); ``GRUGating`` residuals by default; ``to_out`` has a bias.

What the fixture format cannot hold: the aux loss value and the next state (memory, compressed).
:func:`compressive_case` compares both with effattn's ``aux_loss(cache)`` and ``next_memory(cache)``
before saving and prints the differences; :func:`generate` raises after writing every fixture if any
is above 1e-12. Before effattn is asked, every case is also checked against a NumPy transcription of
the maths above (:func:`formula`: out, aux, next state; the peer agrees to ~1e-15).

Cases (B 2, causal, steady state L = N = mem_len, compress "conv", float64): ``h2_r2`` (D 8, H 2,
N 4, rate 2, Lc 3, cmem_len 4: one old compressed row drops out), ``h1_r3`` (D 12, H 1, N 6, rate 3,
Lc 2, cmem_len 4), ``h2_r2_n8`` (D 16, H 2, N 8, rate 2, Lc 4, cmem_len 4, recon_weight 0.5: the
compressed memory is replaced by the 4 new rows), ``h2_r3_nocmem`` (D 12, H 2, N 6, rate 3, no
compressed memory yet, cmem_len 3, recon_weight 2.0).

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /root/peers/bin/python
tests/parity/generate.py lucidrains_compressive``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from compressive_transformer_pytorch.compressive_transformer_pytorch import SelfAttention, shift

import effattn
from fixture import save
from torch_tools import DT, leaf, report, t2n, version, write

PEER = "compressive_transformer_pytorch.SelfAttention"
PKG = "compressive-transformer-pytorch"
B = 2
EPS = 1e-5


def is_registered(name):
    try:
        effattn.get(name)
        return True
    except (ValueError, ImportError, KeyError):
        return False


def init_arrays(rng, D, heads, rate):
    """effattn's inputs: projections ~ N(0, 1/D), LayerNorm jittered off 1 / 0, Wc ~ N(0, 1/(rate D)),
    bc ~ 0.1 N(0, 1); u = vb = 0 and Wr = 0 (the positional terms off: the peer's scheme differs)."""
    d = D // heads
    p = {k: rng.standard_normal((D, D)) / np.sqrt(D) for k in ("Wq", "Wk", "Wv", "Wo")}
    p.update(Wr=np.zeros((D, D)), u=np.zeros((heads, d)), vb=np.zeros((heads, d)),
             ln_g=1 + 0.1 * rng.standard_normal(D), ln_b=0.1 * rng.standard_normal(D),
             Wc=rng.standard_normal((rate, D, D)) / np.sqrt(rate * D), bc=0.1 * rng.standard_normal(D))
    return p


def peer_module(p, *, D, heads, n, mem_len, cmem_len, rate, training):
    """The peer's SelfAttention in float64 (built with the default dtype float64), effattn's weights in."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        m = SelfAttention(D, n, mem_len, cmem_len, cmem_ratio=rate, heads=heads)
    finally:
        torch.set_default_dtype(old)
    m.train(training)
    with torch.no_grad():
        m.to_q.weight.copy_(torch.tensor(p["Wq"].T))
        m.to_kv.weight.copy_(torch.tensor(np.concatenate([p["Wk"].T, p["Wv"].T], 0)))
        m.to_out.weight.copy_(torch.tensor(p["Wo"].T))
        m.to_out.bias.zero_()
        m.compress_mem_fn.conv.weight.copy_(torch.tensor(p["Wc"].transpose(2, 1, 0)))
        m.compress_mem_fn.conv.bias.copy_(torch.tensor(p["bc"]))
    assert m.to_q.weight.dtype == DT and m.compress_mem_fn.conv.weight.dtype == DT
    return m


def peer_call(m, x, memory, compressed, ln_g, ln_b):
    """(out = LN(x + SelfAttention(x)), new_mem, new_cmem, aux (unweighted)): the model's call, no pos_emb."""
    mem = None if memory is None else torch.as_tensor(memory, dtype=DT)
    cmem = None if compressed is None else torch.as_tensor(compressed, dtype=DT)
    logits, (new_mem, new_cmem), aux = m(x, memories=(mem, cmem), pos_emb=None, input_mask=None, calc_memory=True)
    out = F.layer_norm(x + logits, (x.shape[-1],), ln_g, ln_b, eps=EPS)
    return out, new_mem, new_cmem, aux


# --------------------------------------------------------------------------- effattn's maths in NumPy
def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _heads(t, heads):
    b, n, D = t.shape
    return t.reshape(b, n, heads, D // heads).transpose(0, 2, 1, 3)


def formula(x, memory, compressed, p, *, heads, mem_len, cmem_len, rate, recon_weight):
    """The documented maths (effattn's spec, positional terms off): (out, aux, memory', compressed')."""
    b, n, D = x.shape
    d = D // heads
    parts = [t for t in (compressed, memory) if t is not None]
    front = sum(t.shape[1] for t in parts)
    h = np.concatenate(parts + [x], 1)
    q, k, v = _heads(x @ p["Wq"], heads), _heads(h @ p["Wk"], heads), _heads(h @ p["Wv"], heads)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    s = np.where(np.arange(h.shape[1])[None, :] <= front + np.arange(n)[:, None], s, -np.inf)
    a = (_softmax(s) @ v).transpose(0, 2, 1, 3).reshape(b, n, D)
    z = x + a @ p["Wo"]
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    out = (z - mu) / np.sqrt(var + EPS) * p["ln_g"] + p["ln_b"]
    # next state
    allrows = x if memory is None else np.concatenate([memory, x], 1)
    keep = min(mem_len, allrows.shape[1])
    new_mem, fallen = allrows[:, allrows.shape[1] - keep:], allrows[:, :allrows.shape[1] - keep]
    kf = fallen.shape[1]
    g = kf // rate
    grp = fallen[:, kf - g * rate:].reshape(b, g, rate, D)
    C = p["bc"] + np.einsum("bgtD,tDE->bgE", grp, p["Wc"])
    cat = C if compressed is None else np.concatenate([compressed, C], 1)
    new_c = cat[:, max(0, cat.shape[1] - cmem_len):]

    def attn(kv):
        kk, vv = _heads(kv @ p["Wk"], heads), _heads(kv @ p["Wv"], heads)
        return _softmax(q @ kk.transpose(0, 1, 3, 2) / np.sqrt(d)) @ vv
    aux = recon_weight * float(((attn(fallen) - attn(C)) ** 2).mean()) if g else 0.0
    return out, aux, new_mem, new_c


# --------------------------------------------------------------------------- one case
def compressive_case(rng, case, *, D, heads, n, rate, Lc, cmem_len, recon_weight=1.0):
    mem_len = L = n                                             # the steady state: memory full, N = mem_len
    p = init_arrays(rng, D, heads, rate)
    x = rng.standard_normal((B, n, D))
    memory = rng.standard_normal((B, L, D))
    compressed = rng.standard_normal((B, Lc, D)) if Lc else None
    kw = dict(D=D, heads=heads, n=n, mem_len=mem_len, cmem_len=cmem_len, rate=rate)

    # eval pass: out, the memory update, grads of x, Wq, Wk, Wv, Wo, ln
    m = peer_module(p, training=False, **kw)
    xl, g_, b_ = leaf(x), leaf(p["ln_g"]), leaf(p["ln_b"])
    out, new_mem, new_cmem, _ = peer_call(m, xl, memory, compressed, g_, b_)
    dout = rng.standard_normal(tuple(out.shape))
    dt = torch.as_tensor(dout, dtype=DT)
    gx, gq, gkv, go, gg, gb = (t2n(t) for t in torch.autograd.grad(
        (out * dt).sum(), [xl, m.to_q.weight, m.to_kv.weight, m.to_out.weight, g_, b_]))
    gk, gv = np.split(gkv, 2, 0)

    # training pass: the aux loss and grads of Wc, bc (to_kv.weight.detach_(): no Wk / Wv grads there)
    mt = peer_module(p, training=True, **kw)
    xt, gt_, bt_ = leaf(x), leaf(p["ln_g"]), leaf(p["ln_b"])
    out_t, new_mem_t, new_cmem_t, aux = peer_call(mt, xt, memory, compressed, gt_, bt_)
    assert not mt.to_kv.weight.requires_grad, "the peer no longer detaches to_kv.weight in place"
    total = (out_t * dt).sum() + recon_weight * aux.sum()
    conv = mt.compress_mem_fn.conv
    tx, tq, to, tg, tb, gw, gbias = (t2n(t) for t in torch.autograd.grad(
        total, [xt, mt.to_q.weight, mt.to_out.weight, gt_, bt_, conv.weight, conv.bias]))
    same = max(float(np.abs(a - b).max()) for a, b in
               [(t2n(out_t), t2n(out)), (tx, gx), (tq, gq), (to, go), (tg, gg), (tb, gb),
                (t2n(new_mem_t), t2n(new_mem)), (t2n(new_cmem_t), t2n(new_cmem))])
    assert same == 0.0, f"{case}: the training pass differs from the eval pass by {same:.1e}"

    grads = {"x": gx, "Wq": gq.T, "Wk": gk.T, "Wv": gv.T, "Wo": go.T, "ln_g": gg, "ln_b": gb,
             "Wc": gw.transpose(2, 1, 0), "bc": gbias}
    out = t2n(out)
    peer_aux = recon_weight * float(aux.detach().sum())
    peer_mem, peer_cmem = t2n(new_mem), t2n(new_cmem)

    # the peer against the documented maths
    f_out, f_aux, f_mem, f_c = formula(x, memory, compressed, p, heads=heads, mem_len=mem_len, cmem_len=cmem_len,
                                       rate=rate, recon_weight=recon_weight)
    own = {"out": float(np.abs(f_out - out).max()), "aux": abs(f_aux - peer_aux),
           "memory": float(np.abs(f_mem - peer_mem).max()),
           "compressed": float(np.abs(f_c - peer_cmem).max()) if f_c.shape == peer_cmem.shape else np.inf}
    print(f"  {case}: peer vs the NumPy formula " + "  ".join(f"{k} {v:.1e}" for k, v in own.items())
          + f"; peer aux (weighted) {peer_aux:.12f}")
    assert max(own.values()) < 1e-12, f"{case}: the peer is {own} from the documented formula"

    config = {"causal": True, "heads": heads, "mem_len": mem_len, "cmem_len": cmem_len, "rate": rate,
              "compress": "conv", "recon_weight": recon_weight}
    array_config = {"memory": memory, **({} if compressed is None else {"compressed": compressed})}
    note = (f"lucidrains SelfAttention({D}, seq_len={n}, mem_len={mem_len}, cmem_len={cmem_len}, cmem_ratio={rate}, "
            f"heads={heads}) float64, dropouts 0, pos_emb=None, no input_mask, called on effattn's x (its PreNorm "
            "not used) with memories=(memory, compressed); out = LayerNorm(x + logits; ln_g, ln_b) composed in torch. "
            "to_q.weight = Wq.T, to_kv.weight = cat([Wk.T, Wv.T]), to_out.weight = Wo.T, to_out.bias = 0, "
            "conv.weight = Wc.transpose(2, 1, 0), conv.bias = bc; effattn u = vb = Wr = 0 (no grads compared). "
            f"Objective sum(dout * out) + {recon_weight} * the peer's reconstruction mse_loss: grad.Wc / grad.bc are "
            "its gradient (out does not depend on them). Steady state L = N = mem_len (the peer's target rows, "
            "the whole previous memory, are then the fallen rows; rate divides N, no partial group). Eval pass "
            "for out and the x / Wq / Wk / Wv / Wo / ln grads (in training mode the peer's to_kv.weight.detach_() "
            "leaves Wk / Wv without any gradient), training pass for the aux and Wc / bc (its other grads equal). "
            f"Peer aux (weighted) {peer_aux:.15g}; next memory = the last {mem_len} rows of [memory; x], next "
            f"compressed the last {cmem_len} rows of [compressed; conv(memory)] (not in the format: compared by "
            "the generator).")
    name = f"compressive__lucidrains_compressive_transformer__{case}"
    fx = dict(mechanism="compressive", peer=PEER, peer_version=version(PKG), case=case, config=config,
              array_config=array_config, inputs={"x": x, **p}, out=out, dout=dout, grads=grads, note=note)
    if not is_registered("compressive"):
        path = save(name, torch_version=torch.__version__, **fx)
        report(name, {"effattn": float("nan")})
        print("    (effattn has no compressive yet: saved without comparing)")
        return path, None
    path, diffs = write(name, **fx)
    # what the format cannot hold: effattn's aux loss and next state against the peer's
    spec = effattn.get("compressive")
    _, cache = spec.forward(x=x, **p, **config, **array_config)
    mod = __import__("effattn.layers.compressive", fromlist=["aux_loss", "next_memory"])
    e_aux = float(mod.aux_loss(cache))
    e_mem, e_mm, e_c, e_cm = mod.next_memory(cache)
    extra = {"aux": abs(e_aux - peer_aux)}
    for key, mine, want, mask in (("memory", e_mem, peer_mem, e_mm), ("compressed", e_c, peer_cmem, e_cm)):
        mine = None if mine is None else np.asarray(mine)
        extra[key] = (float(np.abs(mine - want).max()) if mine is not None and mine.shape == want.shape
                      else float("inf"))
        if mask is not None and not np.asarray(mask).all():
            extra[key + "_mask"] = float("inf")
    print(f"    effattn vs peer, aux {e_aux:.12f} vs {peer_aux:.12f}: "
          + "  ".join(f"{k} {v:.1e}" for k, v in extra.items())
          + ("" if e_mem is None or e_c is None else f"  (shapes memory {np.shape(e_mem)} / {peer_mem.shape}, "
             f"compressed {np.shape(e_c)} / {peer_cmem.shape})"))
    return path, {**diffs, **extra}


# --------------------------------------------------------------------------- where the peer differs (printed only)
def divergences():
    """Measure the peer's conventions off the steady state (nothing saved): partial groups (k not a
    multiple of rate), the reconstruction target when N < mem_len, and the in-place kv detach."""
    rng = np.random.default_rng(5)
    rows = {}
    for n, rate in ((5, 2), (5, 3)):
        D, heads = 8, 2
        p = init_arrays(rng, D, heads, rate)
        x, memory = rng.standard_normal((B, n, D)), rng.standard_normal((B, n, D))
        m = peer_module(p, D=D, heads=heads, n=n, mem_len=n, cmem_len=8, rate=rate, training=True)
        with torch.no_grad():
            _, _, cm, aux = peer_call(m, torch.tensor(x), memory, None, torch.tensor(p["ln_g"]), torch.tensor(p["ln_b"]))
        _, f_aux, _, f_c = formula(x, memory, None, p, heads=heads, mem_len=n, cmem_len=8, rate=rate, recon_weight=1.0)
        cm = t2n(cm)
        pad = n % rate
        padded = np.concatenate([np.zeros((B, pad, D)), memory], 1)
        groups = padded.shape[1] // rate
        grp = padded[:, :groups * rate].reshape(B, groups, rate, D)
        mine = p["bc"] + np.einsum("bgtD,tDE->bgE", grp, p["Wc"])
        rows[f"k={n} rate={rate}"] = (f"peer {cm.shape[1]} compressed rows (= front pad {pad} zeros, groups from "
                                      f"rows 0..{groups * rate - pad - 1} of the fallen: {np.abs(mine - cm).max():.0e}), "
                                      f"effattn's formula {f_c.shape[1]} rows (fallen rows {n % rate}..{n - 1}); "
                                      f"aux peer {float(aux):.6f} vs formula {f_aux:.6f}")
    # N < mem_len: the peer's target is the whole memory, effattn's the N fallen rows
    D, heads, n, mem_len, rate = 8, 2, 4, 8, 2
    p = init_arrays(rng, D, heads, rate)
    x, memory = rng.standard_normal((B, n, D)), rng.standard_normal((B, mem_len, D))
    m = peer_module(p, D=D, heads=heads, n=n, mem_len=mem_len, cmem_len=4, rate=rate, training=True)
    with torch.no_grad():
        _, nm, cm, aux = peer_call(m, torch.tensor(x), memory, None, torch.tensor(p["ln_g"]), torch.tensor(p["ln_b"]))
    _, f_aux, f_mem, f_c = formula(x, memory, None, p, heads=heads, mem_len=mem_len, cmem_len=4, rate=rate,
                                   recon_weight=1.0)
    d = D // heads
    q = _heads(x @ p["Wq"], heads)

    def attn(kv):
        return _softmax(q @ _heads(kv @ p["Wk"], heads).transpose(0, 1, 3, 2) / np.sqrt(d)) @ _heads(kv @ p["Wv"], heads)
    whole = float(((attn(memory) - attn(f_c)) ** 2).mean())
    rows[f"N={n} < mem_len={mem_len}"] = (f"next state equal ({np.abs(t2n(nm) - f_mem).max():.0e}, "
                                          f"{np.abs(t2n(cm) - f_c).max():.0e}); aux peer {float(aux):.6f} = "
                                          f"target over all {mem_len} memory rows {whole:.6f}, formula over the "
                                          f"{n} fallen rows {f_aux:.6f}")
    # the in-place detach: no Wk / Wv gradient in training mode
    mt = peer_module(p, D=D, heads=heads, n=n, mem_len=mem_len, cmem_len=4, rate=rate, training=True)
    out, _, _, aux = peer_call(mt, torch.tensor(x), memory, None, torch.tensor(p["ln_g"]), torch.tensor(p["ln_b"]))
    (out.sum() + aux.sum()).backward()
    rows["to_kv.weight.detach_()"] = (f"training mode: to_kv.weight.requires_grad {mt.to_kv.weight.requires_grad}, "
                                      f".grad {mt.to_kv.weight.grad} after backward; to_q.weight.grad set "
                                      f"{mt.to_q.weight.grad is not None}")
    # the learned relative positions: which table row lands at (i, j)
    t, kvl = 3, 7
    idx = torch.tensor([[100.0 * i + j for j in range(kvl)] for i in range(t)])[None, None]
    rows["pos_emb shift"] = f"shifted[i, j] = unshifted[i, j + t - 1 - i]: {t2n(shift(idx))[0, 0].tolist()}"
    print("  where the peer differs (not in the fixtures):")
    for k, v in rows.items():
        print(f"    {k}: {v}")
    return rows


def generate():
    divergences()
    rng = np.random.default_rng(83)
    cases = [("h2_r2", dict(D=8, heads=2, n=4, rate=2, Lc=3, cmem_len=4)),
             ("h1_r3", dict(D=12, heads=1, n=6, rate=3, Lc=2, cmem_len=4)),
             ("h2_r2_n8", dict(D=16, heads=2, n=8, rate=2, Lc=4, cmem_len=4, recon_weight=0.5)),
             ("h2_r3_nocmem", dict(D=12, heads=2, n=6, rate=3, Lc=0, cmem_len=3, recon_weight=2.0))]
    results = [compressive_case(rng, case, **kw) for case, kw in cases]
    bad = {p.stem: {k: v for k, v in d.items() if k in ("aux", "memory", "compressed", "memory_mask",
                                                        "compressed_mask") and v > 1e-12}
           for p, d in results if d}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise AssertionError(f"effattn's aux_loss / next_memory differ from the peer's: {bad}")
    return [p for p, _ in results]
