"""Parity fixtures for effattn ``perceiver`` against lucidrains' ``perceiver-ar-pytorch`` 0.0.10
(``perceiver_ar_pytorch.PerceiverAR``: its ``CausalPrefixAttention``, ``CausalAttention`` and
``FeedForward``; effattn ``causal=True``, Perceiver AR) and ``perceiver-pytorch`` 0.11.0
(``perceiver_pytorch.Perceiver``: its ``PerceiverBlock``; effattn ``causal=False``), both with
einops 0.8.2.

Both peers run in float64 on the CPU in eval mode (every dropout 0, their defaults); x is a leaf
and autograd gives the gradients of x and of every peer parameter. Sizes: D = dim = 8, heads 2,
dim_head 4 (effattn's attentions are D x D: heads * dim_head = D), B 2; effattn's FF
width 2D (peer A's ff_mult 2).

Peer A, Perceiver AR. ``PerceiverAR(num_tokens=4, dim=D, depth=L, max_seq_len=N,
cross_attn_seq_len=N - m, dim_head=D / H, heads=H, ff_mult=2, perceive_depth=1,
perceive_max_heads_process=2 or 1)``. The generator runs ``PerceiverAR.forward`` from after its
embeddings to before ``to_logits`` (``ar_latents``): x (B, N, D) is the embedded sequence (a leaf;
no token / position embedding), ``prefix, z = x[:, :N - m], x[:, N - m:]``, then each perceive
layer ``z = cross_attn(z, prefix, context_mask, rotary_pos_emb=None) + z; z = ff(z) + z`` and each
of the ``depth`` layers ``z = attn(z, rotary_pos_emb=None) + z; z = ff(z) + z``; out = z (B, m, D),
effattn's out with ``n_latents = m``, ``latent_layers = depth``. How it maps:

- The split. The peer's latents are the last m = N - cross_attn_seq_len positions, their initial
  values the positions' own vectors, as effattn's. Its cross-attention keys / values are
  ``cat(to_kv(context_norm(prefix)), to_kv(norm(z)))`` in position order, and its mask
  ``ones(m, N).triu(N - m + 1)``: latent r (position N - m + r) reads j <= N - m + r, effattn's
  ``diagonal = N - m``. The latent self-attention mask ``triu(1)`` is effattn's causal latent
  attention. Masked logits are filled with -finfo.max (weight exactly 0; every row has a key).
- Norms. CausalPrefixAttention has two LayerNorms: ``norm`` for the latents (their queries AND
  their own keys / values) and ``context_norm`` for the prefix. effattn norms the queries with
  cross_qln and every key / value row (prefix and latents) with cross_xln. The two agree when
  cross_qln = cross_xln, so the cases tie them (the same values in both effattn norms and both peer
  norms). Their gradients are then not comparable one by one (effattn splits query / key use, the
  peer latent / prefix use; measured |d cross_xln - d context_norm| ~ 2): grad.cross_qln_* and
  grad.cross_xln_* are not in the fixtures, and the generator checks their sum instead,
  |d(qln + xln) - d(norm + context_norm)| <= 6.2e-15 (asserted < 1e-10). Not matched with untied
  norms: a documented difference of design (effattn's keys / values all see one input norm).
- Biases. ``to_q``, ``to_kv`` (cross) and ``to_qkv``, ``to_out`` (latent ``CausalAttention``) and
  both FeedForward linears have no bias; the cross ``to_out`` has one. So cross_att_bq = bv = 0,
  lat{i}_att_bq = bv = bo = 0, every ff b1 = b2 = 0, and none of these gradients is compared.
- Feed-forward. ``Sequential(LayerNorm, Linear(D, 2D, bias=False), nn.GELU(), Dropout,
  Linear(2D, D, bias=False))``, its LayerNorm effattn's ``*_ffln``. ``nn.GELU()`` is the exact erf
  form; effattn's is the tanh form, so the generator replaces ``ff[2]`` by
  ``nn.GELU(approximate="tanh")`` (with the erf GELU out moves by 3.8e-4 .. 8.3e-4, printed and in
  the notes).
- Scale dim_head ** -0.5 (q * scale before q . k), heads as contiguous column blocks
  (``'b n (h d) -> b h n d'``), LayerNorm eps 1e-5: effattn's. ``perceive_max_heads_process``
  only chunks the heads of the cross-attention (1 in ``ar_l2``: each head alone; no effect).
- Masks. ``prefix_mask`` (B, N - m) masks prefix keys only; the peer pads it with True over the
  latents, which it cannot mask (and its ``CausalAttention`` takes no mask). So ``ar_prefix_mask``
  has effattn key_mask = [prefix_mask, True...]: every latent real, every row compared.
- Not matched: rotary embeddings (the peer applies them to q and k in every layer; effattn's layer
  has no positions: the peer is called with ``rotary_pos_emb=None``), the training-time
  ``cross_attn_dropout`` (a random prefix subset), the embeddings and ``to_logits``.

    cross_attn.norm / context_norm (g, b)  = cross_qln_* = cross_xln_*  (tied: sums checked only)
    cross_attn.to_q.weight.T              = cross_att_Wq
    cross_attn.to_kv.weight.T (D, 2D)     = [cross_att_Wk | cross_att_Wv]
    cross_attn.to_out.weight.T, .bias     = cross_att_Wo, cross_att_bo
    layers[i][0].norm                     = lat{i}_ln_*
    layers[i][0].to_qkv.weight.T (D, 3D)  = [lat{i}_att_Wq | Wk | Wv];  to_out.weight.T = lat{i}_att_Wo
    ff[0], ff[1].weight.T, ff[4].weight.T = *_ffln_*, *_ff_W1, *_ff_W2
    compared: grad.x, cross_att_{Wq, Wk, Wv, Wo, bo}, cross_ffln_*, cross_ff_{W1, W2},
    lat{i}_ln_*, lat{i}_att_{Wq, Wk, Wv, Wo}, lat{i}_ffln_*, lat{i}_ff_{W1, W2}

Peer B, Perceiver. ``Perceiver(num_freq_bands=1, depth=1, max_freq=1, input_channels=D,
input_axis=1, num_latents=m, latent_dim=D, cross_heads=H, latent_heads=H, cross_dim_head=D / H,
latent_dim_head=D / H, fourier_encode_data=False, self_per_cross_attn=L,
final_classifier_head=False)``, called as ``model(x, mask=key_mask, return_embeddings=True)``: its
learned latents, ``PreNorm(Attention)`` cross-attention with ``norm`` (latents) and
``norm_context`` (inputs) -- effattn's cross_qln and cross_xln, one to one, untied here -- and
L latent ``PreNorm(Attention)`` self-attention blocks (non-causal, no mask), all with ``to_q`` /
``to_kv`` without bias and ``to_out`` with one (bq = bv = 0, not compared; bo compared). One
effattn call has one cross-attention, hence depth 1 (the peer's ``depth`` repeats the cross
block; its weight tying and ``attn_residual`` are off). Its mask fills masked logits with
-finfo.max: effattn's masked keys; every latent is real, every row compared.

Its FeedForward is GEGLU (``Linear(D, 2 * 4D) -> x * gelu(gates) -> Linear(4D, D)``), which
effattn does not have, so the FFs are neutralised on both sides: the peer's last ``Linear`` has
weight 0 and bias 0 (its output is exactly 0; the block still runs its own forward), effattn's FF
has W2 = 0, b2 = 0 (output exactly 0; W1, b1 random). What this compares of the FFs: the
``*_ffln_*`` LayerNorms (PreNorm's ``norm``), whose gradients are exactly 0 on both sides (only a
check that effattn returns zeros there), and ``*_ff_b2`` (the last Linear's bias: the sum of the
upstream gradient at that residual, a real check). W1, b1 (0 on effattn's side, no same-shaped
peer weight) and W2 (different hidden activations) are not compared. So peer B checks the
cross-attention (with its separate context norm, the learned latents' batch-summed gradient and
a key mask) and the latent self-attention, with the FF sub-layers as identities.

    latents                            = Perceiver.latents
    cross_attn.norm / norm_context     = cross_qln_* / cross_xln_*
    cross_attn.fn.to_q.weight.T        = cross_att_Wq;  to_kv.weight.T = [Wk | Wv];  to_out = Wo, bo
    self_attns[i][0].norm, .fn.*       = lat{i}_ln_*, lat{i}_att_{Wq, [Wk | Wv], Wo, bo}
    cross_ff / self_attns[i][1]: norm  = *_ffln_*;  fn.net[2].bias (= 0) = *_ff_b2
    compared: grad.x, latents, cross_qln_*, cross_xln_*, cross_att_{Wq, Wk, Wv, Wo, bo}, cross_ffln_*,
    cross_ff_b2, lat{i}_ln_*, lat{i}_att_{Wq, Wk, Wv, Wo, bo}, lat{i}_ffln_*, lat{i}_ff_b2

Cases and measured max |effattn - peer| (out / worst gradient; tolerance 1e-10):
``perceiver__lucidrains_perceiver_ar__ar_l1`` (N 12, m 4, depth 1) 1.3e-15 / 8.0e-15;
``ar_l2`` (N 9, m 5, depth 2, perceive_max_heads_process 1) 2.0e-15 / 8.0e-15;
``ar_prefix_mask`` (N 12, m 4, depth 1; prefix positions 0-2 of B 0 and 5 of B 1 masked)
2.6e-15 / 6.7e-15; ``perceiver__lucidrains_perceiver__ff0_l1`` (N 11, m 4, L 1) 6.7e-16 / 3.6e-15;
``ff0_l2_key_mask`` (N 11, m 5, L 2; positions 8-10 of B 0 and 0, 4 of B 1 masked) 1.8e-15 /
9.8e-15. Without their key masks effattn's out moves by 1.3 (``ar_prefix_mask``) and 0.57
(``ff0_l2_key_mask``): the masks are exercised.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /root/peers/bin/python
tests/parity/generate.py lucidrains_perceiver``.
"""
from __future__ import annotations

import numpy as np
import torch
from perceiver_ar_pytorch import PerceiverAR
from perceiver_pytorch import Perceiver
from torch import nn

import effattn
from effattn.layers.perceiver import init_params
from torch_tools import DT, leaf, t2n, version, write

D, H, B, FF_MULT = 8, 2, 2, 2


def lin(module, w, b=None):
    """module.weight = w.T (effattn's W is (in, out)), module.bias = b."""
    module.weight.copy_(torch.tensor(np.ascontiguousarray(w.T)))
    if b is not None:
        module.bias.copy_(torch.tensor(b))


def norm(module, p, pre):
    module.weight.copy_(torch.tensor(p[pre + "g"]))
    module.bias.copy_(torch.tensor(p[pre + "b"]))


def grads_of(total, named):
    """{name: grad as NumPy} for a dict of peer tensors (weights transposed where ``transpose``)."""
    names = list(named)
    gs = torch.autograd.grad(total, [named[n][0] for n in names])
    out = {}
    for n, g in zip(names, gs):
        fn = named[n][1]
        out[n] = fn(t2n(g)) if fn is not None else t2n(g)
    return out


T = lambda a: a.T                                              # noqa: E731


# --------------------------------------------------------------------------- Perceiver AR
def ar_latents(model, x, P, prefix_mask):
    """PerceiverAR.forward after its embeddings and before ``to_logits``, without its rotary
    embeddings (effattn has none): prefix = x[:, :P], the latents x[:, P:]."""
    prefix, z = x[:, :P], x[:, P:]
    for cross_attn, ff in model.perceive_layers:
        z = cross_attn(z, prefix, context_mask=prefix_mask, rotary_pos_emb=None) + z
        z = ff(z) + z
    for attn, ff in model.layers:
        z = attn(z, rotary_pos_emb=None) + z
        z = ff(z) + z
    return z


def ar_case(rng, case, *, n, m, depth, prefix_pad=None, max_heads_process=2):
    params = {k: np.asarray(v) for k, v in init_params(rng, D, latent_layers=depth, causal=True,
                                                       ff_mult=FF_MULT).items()}
    zero = ["cross_att_bq", "cross_att_bv", "cross_ff_b1", "cross_ff_b2"]
    for i in range(depth):
        zero += [f"lat{i}_att_bq", f"lat{i}_att_bv", f"lat{i}_att_bo", f"lat{i}_ff_b1", f"lat{i}_ff_b2"]
    for k in zero:
        params[k] = np.zeros_like(params[k])
    params["cross_qln_g"], params["cross_qln_b"] = params["cross_xln_g"].copy(), params["cross_xln_b"].copy()
    P = n - m
    model = PerceiverAR(num_tokens=4, dim=D, depth=depth, max_seq_len=n, cross_attn_seq_len=P, dim_head=D // H,
                        heads=H, ff_mult=FF_MULT, perceive_depth=1,
                        perceive_max_heads_process=max_heads_process).to(DT).eval()
    cross, cff = model.perceive_layers[0]
    with torch.no_grad():
        norm(cross.norm, params, "cross_qln_")
        norm(cross.context_norm, params, "cross_xln_")
        lin(cross.to_q, params["cross_att_Wq"])
        lin(cross.to_kv, np.concatenate([params["cross_att_Wk"], params["cross_att_Wv"]], axis=1))
        lin(cross.to_out, params["cross_att_Wo"], params["cross_att_bo"])
        ffs = [(cff, "cross_")]
        for i, (att, ff) in enumerate(model.layers):
            norm(att.norm, params, f"lat{i}_ln_")
            lin(att.to_qkv, np.concatenate([params[f"lat{i}_att_W{c}"] for c in "qkv"], axis=1))
            lin(att.to_out, params[f"lat{i}_att_Wo"])
            ffs.append((ff, f"lat{i}_"))
        for ff, pre in ffs:
            assert isinstance(ff[2], nn.GELU) and ff[2].approximate == "none"
            ff[2] = nn.GELU(approximate="tanh")                  # effattn's FF: GELU in its tanh form
            norm(ff[0], params, pre + "ffln_")
            lin(ff[1], params[pre + "ff_W1"])
            lin(ff[4], params[pre + "ff_W2"])
    x = rng.standard_normal((B, n, D))
    km = pmask = None
    if prefix_pad is not None:
        km = np.ones((B, n), bool)
        for b, pos in enumerate(prefix_pad):
            km[b, list(pos)] = False
        assert km[:, P:].all(), "the peer's mask covers the prefix only"
        pmask = torch.tensor(km[:, :P])
    xl = leaf(x)
    out = ar_latents(model, xl, P, pmask)
    with torch.no_grad():                                        # the peer's own exact-erf GELU, for the note
        for ff, _ in ffs:
            ff[2] = nn.GELU()
        gelu_gap = float(np.abs(t2n(ar_latents(model, torch.tensor(x), P, pmask)) - t2n(out)).max())
        for ff, _ in ffs:
            ff[2] = nn.GELU(approximate="tanh")
    dout = rng.standard_normal(tuple(out.shape))
    total = (out * torch.as_tensor(dout, dtype=DT)).sum()
    inner = D
    named = {"x": (xl, None), "cross_att_Wq": (cross.to_q.weight, T),
             "cross_att_Wkv": (cross.to_kv.weight, T), "cross_att_Wo": (cross.to_out.weight, T),
             "cross_att_bo": (cross.to_out.bias, None),
             "qln_g": (cross.norm.weight, None), "qln_b": (cross.norm.bias, None),
             "xln_g": (cross.context_norm.weight, None), "xln_b": (cross.context_norm.bias, None)}
    for ff, pre in ffs:
        named.update({pre + "ffln_g": (ff[0].weight, None), pre + "ffln_b": (ff[0].bias, None),
                      pre + "ff_W1": (ff[1].weight, T), pre + "ff_W2": (ff[4].weight, T)})
    for i, (att, _) in enumerate(model.layers):
        named.update({f"lat{i}_ln_g": (att.norm.weight, None), f"lat{i}_ln_b": (att.norm.bias, None),
                      f"lat{i}_att_Wqkv": (att.to_qkv.weight, T), f"lat{i}_att_Wo": (att.to_out.weight, T)})
    g = grads_of(total, named)
    wkv = g.pop("cross_att_Wkv")
    g["cross_att_Wk"], g["cross_att_Wv"] = wkv[:, :inner], wkv[:, inner:]
    for i in range(depth):
        wqkv = g.pop(f"lat{i}_att_Wqkv")
        for j, c in enumerate("qkv"):
            g[f"lat{i}_att_W{c}"] = wqkv[:, j * inner:(j + 1) * inner]
    tied = {k: g.pop(k) for k in ("qln_g", "qln_b", "xln_g", "xln_b")}
    config = {"causal": True, "heads": H, "latent_layers": depth, "n_latents": m}
    # the two tied LayerNorms: effattn's qln + xln gradient against the peer's norm + context_norm
    spec = effattn.get("perceiver")
    mine, cache = spec.forward(x, **params, **config, **({} if km is None else {"key_mask": km}))
    eg = spec.backward(dout, cache)
    tie_diff = max(float(np.abs(eg[f"cross_qln_{c}"] + eg[f"cross_xln_{c}"] - tied[f"qln_{c}"] - tied[f"xln_{c}"]).max())
                   for c in "gb")
    split_diff = max(float(np.abs(eg[f"cross_xln_{c}"] - tied[f"xln_{c}"]).max()) for c in "gb")
    assert tie_diff < 1e-10, tie_diff
    print(f"  {case}: tied norms: |(qln + xln) - (norm + context_norm)| grad {tie_diff:.1e} "
          f"(split apart: |xln - context_norm| {split_diff:.1e}, not compared); exact-erf GELU moves out by {gelu_gap:.1e}")
    note = (f"lucidrains PerceiverAR(dim {D}, heads {H}, dim_head {D // H}, depth {depth}, ff_mult {FF_MULT}, "
            f"cross_attn_seq_len {P} = N - n_latents, perceive_depth 1, perceive_max_heads_process "
            f"{max_heads_process}), eval, its perceive_layers and layers run as PerceiverAR.forward does after the "
            "embeddings, without rotary embeddings (rotary_pos_emb=None); nn.GELU -> nn.GELU(approximate='tanh') (with the erf GELU out "
            f"moves by {gelu_gap:.1e}). "
            "CausalPrefixAttention norms the latents' own keys/values with its query norm, effattn with cross_xln: "
            "cross_qln = cross_xln (tied values), their gradients not compared (the generator checks "
            f"qln + xln = norm + context_norm to {tie_diff:.1e}). No biases in to_q/to_kv/to_qkv/FF linears and "
            "no to_out bias in the latent attention: cross_att_bq/bv, lat*_att_bq/bv/bo, *_ff_b1/b2 = 0, not "
            "compared. Wq = to_q.weight.T, [Wk | Wv] = to_kv.weight.T, [Wq | Wk | Wv] = to_qkv.weight.T.")
    if km is not None:
        note += " prefix_mask = key_mask[:, :N - m] (the peer pads it with True over the latents: all latents real)."
    path, _ = write(f"perceiver__lucidrains_perceiver_ar__{case}", mechanism="perceiver",
                    peer="perceiver_ar_pytorch.PerceiverAR", peer_version=version("perceiver-ar-pytorch"), case=case,
                    config=config, array_config={} if km is None else {"key_mask": km}, inputs={"x": x, **params},
                    out=t2n(out), dout=dout, grads=g, note=note)
    return path


# --------------------------------------------------------------------------- Perceiver (non-causal)
def perceiver_case(rng, case, *, n, m, latent_layers, pad=None):
    params = {k: np.asarray(v) for k, v in init_params(rng, D, n_latents=m, latent_layers=latent_layers,
                                                       ff_mult=FF_MULT).items()}
    zero = ["cross_att_bq", "cross_att_bv", "cross_ff_W2", "cross_ff_b2"]
    for i in range(latent_layers):
        zero += [f"lat{i}_att_bq", f"lat{i}_att_bv", f"lat{i}_ff_W2", f"lat{i}_ff_b2"]
    for k in zero:
        params[k] = np.zeros_like(params[k])
    model = Perceiver(num_freq_bands=1, depth=1, max_freq=1.0, input_channels=D, input_axis=1, num_latents=m,
                      latent_dim=D, cross_heads=H, latent_heads=H, cross_dim_head=D // H, latent_dim_head=D // H,
                      num_classes=1, fourier_encode_data=False, self_per_cross_attn=latent_layers,
                      final_classifier_head=False).to(DT).eval()
    block = model.layers[0]
    ca = block.cross_attn
    with torch.no_grad():
        model.latents.copy_(torch.tensor(params["latents"]))
        norm(ca.norm, params, "cross_qln_")
        norm(ca.norm_context, params, "cross_xln_")
        lin(ca.fn.to_q, params["cross_att_Wq"])
        lin(ca.fn.to_kv, np.concatenate([params["cross_att_Wk"], params["cross_att_Wv"]], axis=1))
        lin(ca.fn.to_out, params["cross_att_Wo"], params["cross_att_bo"])
        ffs = [(block.cross_ff, "cross_")]
        for i, (sa, sff) in enumerate(block.self_attns):
            norm(sa.norm, params, f"lat{i}_ln_")
            lin(sa.fn.to_q, params[f"lat{i}_att_Wq"])
            lin(sa.fn.to_kv, np.concatenate([params[f"lat{i}_att_Wk"], params[f"lat{i}_att_Wv"]], axis=1))
            lin(sa.fn.to_out, params[f"lat{i}_att_Wo"], params[f"lat{i}_att_bo"])
            ffs.append((sff, f"lat{i}_"))
        for ff, pre in ffs:                                       # GEGLU FF: its last Linear zero, output 0
            norm(ff.norm, params, pre + "ffln_")
            ff.fn.net[2].weight.zero_()
            ff.fn.net[2].bias.zero_()
    x = rng.standard_normal((B, n, D))
    km = None
    if pad is not None:
        km = np.ones((B, n), bool)
        for b, pos in enumerate(pad):
            km[b, list(pos)] = False
    xl = leaf(x)
    out = model(xl, mask=None if km is None else torch.tensor(km), return_embeddings=True)
    dout = rng.standard_normal(tuple(out.shape))
    total = (out * torch.as_tensor(dout, dtype=DT)).sum()
    named = {"x": (xl, None), "latents": (model.latents, None),
             "cross_qln_g": (ca.norm.weight, None), "cross_qln_b": (ca.norm.bias, None),
             "cross_xln_g": (ca.norm_context.weight, None), "cross_xln_b": (ca.norm_context.bias, None),
             "cross_att_Wq": (ca.fn.to_q.weight, T), "cross_att_Wkv": (ca.fn.to_kv.weight, T),
             "cross_att_Wo": (ca.fn.to_out.weight, T), "cross_att_bo": (ca.fn.to_out.bias, None)}
    for ff, pre in ffs:
        named.update({pre + "ffln_g": (ff.norm.weight, None), pre + "ffln_b": (ff.norm.bias, None),
                      pre + "ff_b2": (ff.fn.net[2].bias, None)})
    for i, (sa, _) in enumerate(block.self_attns):
        named.update({f"lat{i}_ln_g": (sa.norm.weight, None), f"lat{i}_ln_b": (sa.norm.bias, None),
                      f"lat{i}_att_Wq": (sa.fn.to_q.weight, T), f"lat{i}_att_Wkv": (sa.fn.to_kv.weight, T),
                      f"lat{i}_att_Wo": (sa.fn.to_out.weight, T), f"lat{i}_att_bo": (sa.fn.to_out.bias, None)})
    g = grads_of(total, named)
    for pre in ["cross_att_"] + [f"lat{i}_att_" for i in range(latent_layers)]:
        wkv = g.pop(pre + "Wkv")
        g[pre + "Wk"], g[pre + "Wv"] = wkv[:, :D], wkv[:, D:]
    for ff, pre in ffs:
        assert not g[pre + "ffln_g"].any() and not g[pre + "ffln_b"].any()
    config = {"causal": False, "heads": H, "latent_layers": latent_layers}
    note = (f"lucidrains Perceiver(depth 1, num_latents {m}, latent_dim {D}, input_channels {D}, input_axis 1, "
            f"fourier_encode_data=False, cross_heads = latent_heads = {H}, dim_head {D // H}, self_per_cross_attn "
            f"{latent_layers}, final_classifier_head=False), eval, called with return_embeddings=True. Its FeedForward "
            "is GEGLU (no effattn counterpart): its last Linear is set to 0 (output exactly 0) and effattn's FF has "
            "W2 = b2 = 0; compared of the FFs: ffln g/b (zero on both sides) and b2 (the residual's upstream sum); "
            "W1, b1, W2 not compared. to_q/to_kv have no bias: bq = bv = 0, not compared. latents = "
            "Perceiver.latents, cross_qln/xln = PreNorm norm/norm_context, Wq = to_q.weight.T, [Wk | Wv] = "
            "to_kv.weight.T, Wo/bo = to_out.")
    if km is not None:
        note += " mask = key_mask (masked inputs are masked keys on both sides; every latent row real)."
    path, _ = write(f"perceiver__lucidrains_perceiver__{case}", mechanism="perceiver",
                    peer="perceiver_pytorch.Perceiver", peer_version=version("perceiver-pytorch"), case=case,
                    config=config, array_config={} if km is None else {"key_mask": km}, inputs={"x": x, **params},
                    out=t2n(out), dout=dout, grads=g, note=note)
    return path


def generate():
    rng = np.random.default_rng(14)
    return [ar_case(rng, "ar_l1", n=12, m=4, depth=1),
            ar_case(rng, "ar_l2", n=9, m=5, depth=2, max_heads_process=1),
            ar_case(rng, "ar_prefix_mask", n=12, m=4, depth=1, prefix_pad=((0, 1, 2), (5,))),
            perceiver_case(rng, "ff0_l1", n=11, m=4, latent_layers=1),
            perceiver_case(rng, "ff0_l2_key_mask", n=11, m=5, latent_layers=2, pad=((8, 9, 10), (0, 4)))]
