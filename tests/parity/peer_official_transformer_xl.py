"""Parity fixtures for effattn ``transformer_xl`` (relative-position attention with a segment
memory) against the official Transformer-XL PyTorch code: github.com/kimiyoung/transformer-xl,
``pytorch/mem_transformer.py`` at commit 44781ed21dbaec88b280f74d9ae2877f52b492a5 (2019-04-10, the
repository's HEAD; not on PyPI), classes ``PositionalEmbedding``, ``RelMultiHeadAttn`` and
``RelPartialLearnableMultiHeadAttn`` (the paper's attention, ``attn_type=0``, the default).

The three classes are copied below verbatim (nothing in them needed a change to run on torch
2.13: ``torch.ger`` and the tuple form of ``torch.einsum`` still work). When the git mirror
``/work/.mirror/kimiyoung+transformer-xl/repo`` is present, :func:`generate` checks that each
copied class's source occurs unchanged in that commit's file. What ``MemTransformerLM._forward``
does around the layer is re-done here (it is not copied: the rest of the model, adaptive softmax
and all, is not needed), with one change that is strictly needed on torch 2.13: the causal mask
``torch.triu(ones(qlen, klen), diagonal=1 + mlen).byte()[:, :, None]`` is built as ``.bool()``
(``masked_fill`` no longer accepts a uint8 mask).

The peer runs in float64 on the CPU, eval mode, ``dropout = dropatt = 0``, ``pre_lnorm=False``
(the default: ``LayerNorm(w + o_net(attn_vec))``, eps 1e-5), ``tgt_len = ext_len = 0``,
``clamp_len`` off, ``same_length=False``: ``RelPartialLearnableMultiHeadAttn(n_head=H, d_model=D,
d_head=D / H, dropout=0, dropatt=0)`` called as the model calls each layer::

    pos_seq = torch.arange(klen - 1, -1, -1.0)          # klen = mlen + qlen, float64
    r = PositionalEmbedding(D)(pos_seq)                 # (klen, 1, D)
    attn_mask = torch.triu(ones(qlen, klen), diagonal=1 + mlen).bool()[:, :, None]
    out = layer(w, r, r_w_bias, r_r_bias, attn_mask=attn_mask, mems=mems)

with ``w = x.transpose(0, 1)`` (the official code is time-major, (N, B, D); effattn batch-major,
(B, N, D); out is transposed back) and ``mems = memory.transpose(0, 1)`` (None when L = 0, as the
model's first segment). ``PositionalEmbedding`` is built with torch's default dtype set to float64
(restored after), so its ``inv_freq = 1 / 10000 ** (arange(0, D, 2) / D)`` buffer is computed in
float64: built in float32 and cast it is 5e-8 .. 2e-7 off (relative), which moves out by 1e-9 ..
4e-8 on the memory cases (measured). In the official code ``r_w_bias`` / ``r_r_bias`` (H, d) are
parameters of ``MemTransformerLM`` shared by all layers and passed in; here they are leaf tensors
with requires_grad. Mapping (effattn's
parameters copied into the peer)::

    qkv_net.weight (3D, D)   = cat([Wq.T, Wk.T, Wv.T], 0)   (torch.chunk(.., 3, -1): q, k, v in that order)
    r_net.weight (D, D)      = Wr.T
    o_net.weight (D, D)      = Wo.T
    r_w_bias (H, d)          = u
    r_r_bias (H, d)          = vb
    layer_norm.weight, .bias = ln_g, ln_b
    the peer's gradients, transposed back (qkv_net's split in three row blocks) -> grad.x, grad.Wq,
    grad.Wk, grad.Wv, grad.Wr, grad.u, grad.vb, grad.Wo, grad.ln_g, grad.ln_b

``memory`` (B, L, D) is a constant (the model detaches its mems: the paper's stop-gradient), so it
is array configuration (``config.memory``), not an input, and has no gradient. No Linear has a bias.
Heads are contiguous column blocks on both sides (``view(qlen, bsz, n_head, d_head)``), the scale
is 1/sqrt(d_head), applied to AC + BD.

Conventions, and how the maths lines up:

- Positions. Query i (of the current segment) is at absolute position L + i, key j (memory first,
  then the segment) at j, distance L + i - j. The official BD is ``(q_i + r_r_bias) . r_net(R_t)``
  over the klen rows of ``pos_seq`` (t = klen - 1 .. 0), then ``_rel_shift``: pad one zero column on
  the left, view (klen + 1, qlen), drop the first row, view (qlen, klen). That puts at [i, j] the
  column t = klen - 1 - (j + qlen - 1 - i) = L + i - j: effattn's R_{L+i-j}, for j <= L + i.
- Causal only. For j > L + i the shifted entry is not a distance at all: it is the wrapped-around
  tail of the next query row (or the zero pad), garbage that the causal mask hides. So the official
  layer is only correct with its causal mask, and every fixture is causal (``"causal": true``).
  :func:`generate` also runs the peer with ``attn_mask=None`` and prints how far that is from the
  non-causal formula (it is not small: the garbage takes part in the softmax).
- Masking. The official ``masked_fill(mask, -inf)`` gives a masked key exactly zero weight, as
  effattn's causal mask. The official code has no key (padding) mask, so neither have the fixtures.
- Precision. The official layer casts the score to float32 before masking
  (``attn_score.float().masked_fill(...).type_as(attn_score)``, written for fp16 training): in a
  float64 run that rounds every logit (~1e-7 on out). The generator lifts that one cast: the peer
  runs under a ``TorchFunctionMode`` that makes ``Tensor.float()`` the identity on a float64 tensor;
  nothing else of the peer is changed. It also runs the peer with the cast kept and prints that
  difference (recorded in each fixture's note).
- Sinusoid. ``PositionalEmbedding(demb=D)``: R_t = [sin(t f), cos(t f)], f_k = 10000^(-2k / D),
  k = 0 .. D/2 - 1 (all sines, then all cosines; not interleaved), as effattn's
  ``effattn.nn.relative.sinusoid``.
- Not here: ``same_length=True`` (a different mask), ``clamp_len``, ``ext_len``, ``pre_lnorm=True``,
  the model's memory update (``_update_mems``: the new memory is the last mem_len hidden states,
  it does not enter the layer's output, so the config carries no ``mem_len``), the position-wise FFN
  (an ordinary sub-layer) and the other ``attn_type`` s (1: Shaw-style learnable, 2: absolute,
  3: Al-Rfou).

Before effattn is asked, each case is also checked against a direct NumPy transcription of the
formula above (:func:`formula`, O(N M) loops over the distances, no ``_rel_shift``): the official
output agrees with it to ~1e-15, so the conventions stated here are the official code's.

Cases (B 2, causal): ``causal_h2`` (L 0: ``mems=None``, N 7, D 8, H 2), ``causal_h1`` (L 0, N 5, D
16, H 1), ``mem_h2`` (L = N = 6, D 8, H 2), ``mem2x_h1`` (L = 2N = 10, N 5, D 8, H 1),
``mem2x_h2`` (L = 2N = 14, N 7, D 12, H 2), ``mem_h4`` (L = N = 9, D 16, H 4).
Measured max |effattn - peer| (float64, the cast lifted; out / worst gradient): ``causal_h2``
6.7e-16 / 3.6e-15 (Wv), ``causal_h1`` 6.7e-16 / 2.9e-15 (Wv), ``mem_h2`` 8.9e-16 / 3.6e-15 (Wv),
``mem2x_h1`` 5.6e-16 / 3.6e-15 (Wo), ``mem2x_h2`` 6.7e-16 / 2.7e-15 (Wo), ``mem_h4`` 8.9e-16 / 4.4e-15
(Wv): tolerance 1e-10. The official output is 4.4e-16 .. 8.9e-16 from :func:`formula`. With the
official float32 score cast kept, out moves by 1.7e-8 .. 6.4e-8 (printed per case). Unmasked, the
official layer is 0.19 .. 0.55 from the non-causal formula (the ``_rel_shift`` garbage). The
fixtures exercise what they should: on ``mem_h2`` effattn's out moves by 1.8 with the memory
dropped, 0.30 with its first row dropped (every distance off by one), 1.0 with ``causal=False``
and 1.2 with u and vb swapped.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /root/peers/bin/python
tests/parity/generate.py official_transformer_xl``.
"""
from __future__ import annotations

import inspect
import pathlib
import subprocess

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import effattn
from fixture import save
from torch_tools import DT, leaf, report, t2n, write

PEER = "transformer-xl RelPartialLearnableMultiHeadAttn"
COMMIT = "44781ed21dbaec88b280f74d9ae2877f52b492a5"
SOURCE = "pytorch/mem_transformer.py"
MIRROR = pathlib.Path("/work/.mirror/kimiyoung+transformer-xl/repo")
B = 2


# =========================================================================== the peer
# Copied verbatim from github.com/kimiyoung/transformer-xl, pytorch/mem_transformer.py, commit
# 44781ed21dbaec88b280f74d9ae2877f52b492a5 (lines 15-31 and 143-291 there): PositionalEmbedding,
# RelMultiHeadAttn, RelPartialLearnableMultiHeadAttn. Unchanged (torch 2.13 runs them as they
# are); checked against the mirror by check_verbatim() when it is present. Apache License 2.0.

class PositionalEmbedding(nn.Module):
    def __init__(self, demb):
        super(PositionalEmbedding, self).__init__()

        self.demb = demb

        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0) / demb))
        self.register_buffer('inv_freq', inv_freq)

    def forward(self, pos_seq, bsz=None):
        sinusoid_inp = torch.ger(pos_seq, self.inv_freq)
        pos_emb = torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)

        if bsz is not None:
            return pos_emb[:,None,:].expand(-1, bsz, -1)
        else:
            return pos_emb[:,None,:]


class RelMultiHeadAttn(nn.Module):
    def __init__(self, n_head, d_model, d_head, dropout, dropatt=0,
                 tgt_len=None, ext_len=None, mem_len=None, pre_lnorm=False):
        super(RelMultiHeadAttn, self).__init__()

        self.n_head = n_head
        self.d_model = d_model
        self.d_head = d_head
        self.dropout = dropout

        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)

        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)

        self.layer_norm = nn.LayerNorm(d_model)

        self.scale = 1 / (d_head ** 0.5)

        self.pre_lnorm = pre_lnorm

    def _parallelogram_mask(self, h, w, left=False):
        mask = torch.ones((h, w)).byte()
        m = min(h, w)
        mask[:m,:m] = torch.triu(mask[:m,:m])
        mask[-m:,-m:] = torch.tril(mask[-m:,-m:])

        if left:
            return mask
        else:
            return mask.flip(0)

    def _shift(self, x, qlen, klen, mask, left=False):
        if qlen > 1:
            zero_pad = torch.zeros((x.size(0), qlen-1, x.size(2), x.size(3)),
                                    device=x.device, dtype=x.dtype)
        else:
            zero_pad = torch.zeros(0, device=x.device, dtype=x.dtype)

        if left:
            mask = mask.flip(1)
            x_padded = torch.cat([zero_pad, x], dim=1).expand(qlen, -1, -1, -1)
        else:
            x_padded = torch.cat([x, zero_pad], dim=1).expand(qlen, -1, -1, -1)

        x = x_padded.masked_select(mask[:,:,None,None]) \
                    .view(qlen, klen, x.size(2), x.size(3))

        return x

    def _rel_shift(self, x, zero_triu=False):
        zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]),
                               device=x.device, dtype=x.dtype)
        x_padded = torch.cat([zero_pad, x], dim=1)

        x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])

        x = x_padded[1:].view_as(x)

        if zero_triu:
            ones = torch.ones((x.size(0), x.size(1)))
            x = x * torch.tril(ones, x.size(1) - x.size(0))[:,:,None,None]

        return x

    def forward(self, w, r, attn_mask=None, mems=None):
        raise NotImplementedError

class RelPartialLearnableMultiHeadAttn(RelMultiHeadAttn):
    def __init__(self, *args, **kwargs):
        super(RelPartialLearnableMultiHeadAttn, self).__init__(*args, **kwargs)

        self.r_net = nn.Linear(self.d_model, self.n_head * self.d_head, bias=False)

    def forward(self, w, r, r_w_bias, r_r_bias, attn_mask=None, mems=None):
        qlen, rlen, bsz = w.size(0), r.size(0), w.size(1)

        if mems is not None:
            cat = torch.cat([mems, w], 0)
            if self.pre_lnorm:
                w_heads = self.qkv_net(self.layer_norm(cat))
            else:
                w_heads = self.qkv_net(cat)
            r_head_k = self.r_net(r)

            w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)
            w_head_q = w_head_q[-qlen:]
        else:
            if self.pre_lnorm:
                w_heads = self.qkv_net(self.layer_norm(w))
            else:
                w_heads = self.qkv_net(w)
            r_head_k = self.r_net(r)

            w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)

        klen = w_head_k.size(0)

        w_head_q = w_head_q.view(qlen, bsz, self.n_head, self.d_head)           # qlen x bsz x n_head x d_head
        w_head_k = w_head_k.view(klen, bsz, self.n_head, self.d_head)           # qlen x bsz x n_head x d_head
        w_head_v = w_head_v.view(klen, bsz, self.n_head, self.d_head)           # qlen x bsz x n_head x d_head

        r_head_k = r_head_k.view(rlen, self.n_head, self.d_head)                # qlen x n_head x d_head

        #### compute attention score
        rw_head_q = w_head_q + r_w_bias                                         # qlen x bsz x n_head x d_head
        AC = torch.einsum('ibnd,jbnd->ijbn', (rw_head_q, w_head_k))             # qlen x klen x bsz x n_head

        rr_head_q = w_head_q + r_r_bias
        BD = torch.einsum('ibnd,jnd->ijbn', (rr_head_q, r_head_k))              # qlen x klen x bsz x n_head
        BD = self._rel_shift(BD)

        # [qlen x klen x bsz x n_head]
        attn_score = AC + BD
        attn_score.mul_(self.scale)

        #### compute attention probability
        if attn_mask is not None and attn_mask.any().item():
            if attn_mask.dim() == 2:
                attn_score = attn_score.float().masked_fill(
                    attn_mask[None,:,:,None], -float('inf')).type_as(attn_score)
            elif attn_mask.dim() == 3:
                attn_score = attn_score.float().masked_fill(
                    attn_mask[:,:,:,None], -float('inf')).type_as(attn_score)

        # [qlen x klen x bsz x n_head]
        attn_prob = F.softmax(attn_score, dim=1)
        attn_prob = self.dropatt(attn_prob)

        #### compute attention vector
        attn_vec = torch.einsum('ijbn,jbnd->ibnd', (attn_prob, w_head_v))

        # [qlen x bsz x n_head x d_head]
        attn_vec = attn_vec.contiguous().view(
            attn_vec.size(0), attn_vec.size(1), self.n_head * self.d_head)

        ##### linear projection
        attn_out = self.o_net(attn_vec)
        attn_out = self.drop(attn_out)

        if self.pre_lnorm:
            ##### residual connection
            output = w + attn_out
        else:
            ##### residual connection + layer normalization
            output = self.layer_norm(w + attn_out)

        return output

# =========================================================================== end of the copy


def check_verbatim():
    """'verbatim (checked against the mirror)', or why it was not checked; raises if a class differs."""
    if not MIRROR.exists():
        return "not checked (no mirror)"
    git = ["git", "--git-dir", str(MIRROR)]
    text = subprocess.run(git + ["show", f"{COMMIT}:{SOURCE}"], capture_output=True, text=True, check=True).stdout
    for cls in (PositionalEmbedding, RelMultiHeadAttn, RelPartialLearnableMultiHeadAttn):
        if inspect.getsource(cls) not in text:
            raise AssertionError(f"{cls.__name__} is not a verbatim copy of {SOURCE} at {COMMIT}")
    return "verbatim (checked against the mirror)"


class LiftFloat32Cast(TorchFunctionMode):
    """``Tensor.float()`` is the identity on a float64 tensor (the official score cast to float32)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == DT:
            return args[0]
        return func(*args, **(kwargs or {}))


def is_registered(name):
    try:
        effattn.get(name)
        return True
    except (ValueError, ImportError):
        return False


def init_arrays(rng, D, heads):
    """effattn's inputs: the projections ~ N(0, 1/D), u / vb ~ 0.5 N(0, 1), LayerNorm jittered off 1 / 0."""
    d = D // heads
    W = {k: rng.standard_normal((D, D)) / np.sqrt(D) for k in ("Wq", "Wk", "Wv", "Wr", "Wo")}
    return {**W, "u": 0.5 * rng.standard_normal((heads, d)), "vb": 0.5 * rng.standard_normal((heads, d)),
            "ln_g": 1 + 0.1 * rng.standard_normal(D), "ln_b": 0.1 * rng.standard_normal(D)}


def peer_modules(p, *, D, heads):
    """The official layer and PositionalEmbedding in float64 (built with the default dtype float64),
    effattn's parameters copied in; r_w_bias / r_r_bias as leaves (the model's parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        pos_emb = PositionalEmbedding(D)
        layer = RelPartialLearnableMultiHeadAttn(heads, D, D // heads, 0.0, dropatt=0.0).eval()
    finally:
        torch.set_default_dtype(old)
    assert pos_emb.inv_freq.dtype == DT and layer.qkv_net.weight.dtype == DT
    with torch.no_grad():
        layer.qkv_net.weight.copy_(torch.tensor(np.concatenate([p["Wq"].T, p["Wk"].T, p["Wv"].T], 0)))
        layer.r_net.weight.copy_(torch.tensor(p["Wr"].T))
        layer.o_net.weight.copy_(torch.tensor(p["Wo"].T))
        layer.layer_norm.weight.copy_(torch.tensor(p["ln_g"]))
        layer.layer_norm.bias.copy_(torch.tensor(p["ln_b"]))
    return pos_emb, layer, leaf(p["u"]), leaf(p["vb"])


def peer_call(pos_emb, layer, r_w_bias, r_r_bias, x, memory, *, causal=True):
    """MemTransformerLM._forward's call of one layer (attn_type 0), batch-major in and out."""
    w = x.transpose(0, 1)
    mems = None if memory is None else torch.as_tensor(memory, dtype=DT).transpose(0, 1)
    qlen = w.size(0)
    mlen = 0 if mems is None else mems.size(0)
    klen = mlen + qlen
    attn_mask = torch.triu(w.new_ones(qlen, klen), diagonal=1 + mlen).bool()[:, :, None] if causal else None
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=w.dtype)
    r = pos_emb(pos_seq)
    return layer(w, r, r_w_bias, r_r_bias, attn_mask=attn_mask, mems=mems).transpose(0, 1)


def formula(x, memory, p, *, heads, causal=True):
    """The maths of the docstring in NumPy, term by term (no _rel_shift): y (B, N, D)."""
    b, n, D = x.shape
    L = 0 if memory is None else memory.shape[1]
    d = D // heads
    h = x if memory is None else np.concatenate([memory, x], 1)
    q, k, v = x @ p["Wq"], h @ p["Wk"], h @ p["Wv"]
    f = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    out = np.zeros((b, n, D))
    for hd in range(heads):
        c = slice(hd * d, (hd + 1) * d)
        for i in range(n):
            t = L + i - np.arange(L + n)                                          # the distances of row i
            R = np.concatenate([np.sin(t[:, None] * f), np.cos(t[:, None] * f)], -1)
            r = (R @ p["Wr"])[:, c]
            s = (((q[:, i, c] + p["u"][hd])[:, None, :] * k[:, :, c]).sum(-1)
                 + ((q[:, i, c] + p["vb"][hd]) @ r.T)) / np.sqrt(d)
            if causal:
                s = np.where(np.arange(L + n) <= L + i, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            P = s / s.sum(-1, keepdims=True)
            out[:, i, c] = np.einsum("bj,bje->be", P, v[:, :, c])
    z = x + out @ p["Wo"]
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * p["ln_g"] + p["ln_b"]


def xl_case(rng, case, *, n, L, D, heads, copy):
    p = init_arrays(rng, D, heads)
    x = rng.standard_normal((B, n, D))
    memory = rng.standard_normal((B, L, D)) if L else None
    pos_emb, layer, rwb, rrb = peer_modules(p, D=D, heads=heads)
    with torch.no_grad():
        out32 = t2n(peer_call(pos_emb, layer, rwb, rrb, torch.tensor(x), memory))   # with the float32 cast
    xl = leaf(x)
    with LiftFloat32Cast():
        out = peer_call(pos_emb, layer, rwb, rrb, xl, memory)
    dout = rng.standard_normal(tuple(out.shape))
    total = (out * torch.as_tensor(dout, dtype=DT)).sum()
    plist = [xl, layer.qkv_net.weight, layer.r_net.weight, rwb, rrb, layer.o_net.weight,
             layer.layer_norm.weight, layer.layer_norm.bias]
    gx, gqkv, gr, gu, gvb, go, gg, gb = (t2n(t) for t in torch.autograd.grad(total, plist))
    gq, gk, gv = np.split(gqkv, 3, 0)
    grads = {"x": gx, "Wq": gq.T, "Wk": gk.T, "Wv": gv.T, "Wr": gr.T, "u": gu, "vb": gvb, "Wo": go.T,
             "ln_g": gg, "ln_b": gb}
    out = t2n(out)
    cast = float(np.abs(out32 - out).max())
    own = float(np.abs(formula(x, memory, p, heads=heads) - out).max())
    with torch.no_grad(), LiftFloat32Cast():                                        # the official layer unmasked
        nc = t2n(peer_call(pos_emb, layer, rwb, rrb, torch.tensor(x), memory, causal=False))
    noncausal = float(np.abs(nc - formula(x, memory, p, heads=heads, causal=False)).max())
    print(f"  {case}: official vs the NumPy formula {own:.1e}; with its float32 score cast out moves {cast:.1e}; "
          f"unmasked (_rel_shift garbage) vs the non-causal formula {noncausal:.1e}")
    assert own < 1e-12, f"{case}: the official output is {own:.1e} from the documented formula"
    note = (f"official RelPartialLearnableMultiHeadAttn (kimiyoung/transformer-xl {SOURCE} @ {COMMIT[:7]}, "
            f"PositionalEmbedding / RelMultiHeadAttn / RelPartialLearnableMultiHeadAttn copied {copy}; "
            f"n_head={heads}, d_model={D}, d_head={D // heads}, dropout=dropatt=0, pre_lnorm=False, eval, float64) "
            "called as MemTransformerLM._forward calls a layer (attn_type 0): r = PositionalEmbedding(D)"
            "(arange(klen-1, -1, -1)), attn_mask = triu(ones(qlen, klen), 1 + mlen) (as bool), "
            f"mems = {'memory (time-major)' if L else 'None'}; time-major transposed to batch-major. Its "
            f"attn_score.float() cast lifted (Tensor.float the identity on float64; with the cast out differs by "
            f"{cast:.1e}). qkv_net.weight = cat([Wq.T, Wk.T, Wv.T]), r_net.weight = Wr.T, o_net.weight = Wo.T, "
            "r_w_bias = u, r_r_bias = vb (leaves), layer_norm = ln_g/ln_b; memory a constant (config.memory, no grad). "
            f"Causal only: _rel_shift leaves garbage above the band (unmasked, the official layer is {noncausal:.1e} "
            "from the non-causal formula).")
    config = {"causal": True, "heads": heads}
    array_config = {} if memory is None else {"memory": memory}
    name = f"transformer_xl__official__{case}"
    fx = dict(mechanism="transformer_xl", peer=PEER, peer_version=f"git {COMMIT}", case=case, config=config,
              array_config=array_config, inputs={"x": x, **p}, out=out, dout=dout, grads=grads, note=note)
    if is_registered("transformer_xl"):
        path, diffs = write(name, **fx)
        return path, diffs
    path = save(name, torch_version=torch.__version__, **fx)
    report(name, {"effattn": float("nan")})
    print("    (effattn has no transformer_xl yet: saved without comparing)")
    return path, None


def generate():
    copy = check_verbatim()
    print(f"  the copied classes: {copy}")
    rng = np.random.default_rng(71)
    cases = [("causal_h2", dict(n=7, L=0, D=8, heads=2)),
             ("causal_h1", dict(n=5, L=0, D=16, heads=1)),
             ("mem_h2", dict(n=6, L=6, D=8, heads=2)),
             ("mem2x_h1", dict(n=5, L=10, D=8, heads=1)),
             ("mem2x_h2", dict(n=7, L=14, D=12, heads=2)),
             ("mem_h4", dict(n=9, L=9, D=16, heads=4))]
    return [xl_case(rng, case, copy=copy, **kw)[0] for case, kw in cases]
