"""Parity fixtures for effattn ``funnel`` (pool-query-only attention) against HuggingFace
transformers' ``FunnelRelMultiheadAttention`` with ``FunnelAttentionStructure`` (transformers
5.25.0, ``models/funnel/modeling_funnel.py``).

The peer runs in float64 on the CPU in eval mode, called as ``FunnelEncoder.forward`` calls the
first layer of block 1 (the pooling layer): ``FunnelConfig(d_model=D, n_head=H, d_head=D / H,
block_sizes=[1, 1], attention_type=..., pooling_type=..., separate_cls=True, truncate_seq=False,
pool_q_only=True, hidden_dropout=0, attention_dropout=0, activation_dropout=0,
layer_norm_eps=1e-5)`` (HF's default eps is 1e-9, effattn's LayerNorm 1e-5);
``attention_inputs = structure.init_attention_inputs(x, attention_mask, token_type_ids=None)``,
``pooled, attention_inputs = structure.pre_attention_pooling(x, attention_inputs)`` (its
``pool_tensor``), then ``FunnelRelMultiheadAttention(config, block_index=1)(pooled, x, x,
attention_inputs)``. Its positional and token-type parameters are zero (``r_w_bias = r_r_bias =
r_kernel = r_s_bias = seg_embed = 0``, their init values, left so), so the positional score is
exactly 0 in both ``relative_shift`` and ``factorized`` form and the score is the plain content
score ``(q / sqrt(d_head)) . k``; the token-type score is 0 (no token_type_ids). x is a leaf;
autograd gives the gradients of x and of every peer parameter. Mapping (effattn's parameters
copied into the peer):

    q_head.weight (D, D)    = Wq.T,   bq = 0     (q_head has no bias: grad.bq not compared)
    k_head.weight           = Wk.T,   k_head.bias = a random vector (effattn has no key bias: it
                                                  adds q . b_k to every logit of a row, which the
                                                  softmax cancels; its peer gradient is printed, ~1e-16)
    v_head.weight, .bias    = Wv.T, bv
    post_proj.weight, .bias = Wo.T, bo
    layer_norm.weight, .bias = ln_g, ln_b
    the peer's gradients, transposed back, -> grad.x, grad.Wq, grad.Wk, grad.Wv, grad.bv,
    grad.Wo, grad.bo, grad.ln_g, grad.ln_b

Heads are contiguous column blocks on both sides (HF's ``view(B, N, n_head, d_head)``), the scale
is 1/sqrt(d_head), the residual is the pooled query: ``LayerNorm(pooled + post_proj(...))``.

Conventions, and how each case meets them:

- Pooling groups. With ``separate_cls=True`` HF's ``pool_tensor`` prepends x_0 again
  (``cat([x[:, :1], x])``) and pools by stride 2 with ``avg_pool2d`` / ``max_pool2d``
  (``ceil_mode=True``): groups {0, 0}, {1, 2}, {3, 4}, ...: the [CLS] alone (its mean / max is
  x_0), effattn's groups. ``truncate_seq=False`` keeps the last position (HF's default True drops
  it first so that N' = N / 2). For even N the last group {N - 1} is a partial window, which
  ``avg_pool2d`` divides by its in-bounds count (measured: 1 member -> the member itself), as
  effattn; the ``max_h2`` and ``mean_h1`` cases have N = 10 (a short last group), the others N = 11.
- Precision. HF casts the score to float32 before its masked softmax (``attn_score =
  attn_score.float()``, "precision safe in case of mixed precision training", then ``softmax(...,
  dtype=float64)``): a float32 rounding of every logit (~1e-7 on out). The generator lifts that one
  cast: the peer runs under a ``TorchFunctionMode`` that makes ``Tensor.float()`` the identity on a
  float64 tensor (the mask's ``.float()`` is a 0/1 cast, exact either way); nothing else of the
  peer is changed. It also runs the peer with the cast and prints that difference (max |out diff|
  up to ~1e-7: the float32 rounding, recorded in each fixture's note).
- Masks. HF subtracts INF * (1 - mask) (INF = 1e6) from the logits of padded keys: exp(-1e6) is 0
  in float64, so a padded key has exactly zero weight, as effattn's masked key. But the query
  pooling differs: HF pools the hidden states with the padding in (and pools the mask with
  ``min`` after the layer: a pooled position is real only if all members are), effattn pools the
  real members only (real if any member is). They agree on the pooled rows whose members are all
  real; so the ``key_mask`` cases pad at the end in whole groups (every group all real or all
  padding: B 0 real 0..6, B 1 real 0..8, N 11), compare the real pooled rows only (``rows`` =
  the pooled mask) and set dout 0 on the padded pooled rows. A group that mixes real and padding
  tokens is not matched (HF averages the padding in).
- Not here: the rest of ``FunnelLayer`` (its position-wise FFN, an ordinary sub-layer), the
  relative-position and token-type terms (effattn's layer has content terms only: see
  effattn/layers/funnel.py, "Positions"), ``pool_q_only=False`` (pooled keys too) and
  ``truncate_seq=True``.

Cases (D 8, B 2, stride 2, separate [CLS]): ``mean_h2`` (N 11, H 2, mean, relative_shift),
``max_h2`` (N 10, H 2, max, factorized), ``mean_h1`` (N 10, H 1, mean, relative_shift),
``key_mask`` (N 11, H 2, mean, padding in whole groups), ``key_mask_max`` (the same with max).
Measured max |effattn - peer| (float64, the cast lifted; out / worst gradient): ``mean_h2`` 6.7e-16 /
6.2e-15 (Wk), ``max_h2`` 4.4e-16 / 2.2e-15, ``mean_h1`` 1.3e-15 / 2.2e-15, ``key_mask`` 6.7e-16 / 3.3e-15,
``key_mask_max`` 7.8e-16 / 3.6e-15: tolerance 1e-10. With HF's float32 score cast kept, out moves by
1.5e-8 .. 6.0e-8 (printed per case). The peer's gradient of k_head.bias is <= 7.8e-16 (it cancels).
Dropping the key mask from the ``key_mask`` fixture moves effattn's real rows by 1.8: the mask is
exercised.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /root/peers/bin/python
tests/parity/generate.py hf_funnel``.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from torch.overrides import TorchFunctionMode
from transformers import FunnelConfig
from transformers.models.funnel.modeling_funnel import FunnelAttentionStructure, FunnelRelMultiheadAttention

from effattn.layers.funnel import init_params
from effattn.nn.pooling import pool_groups
from torch_tools import DT, leaf, t2n, write

PEER = "transformers.FunnelRelMultiheadAttention"
D, B = 8, 2


class LiftFloat32Cast(TorchFunctionMode):
    """``Tensor.float()`` is the identity on a float64 tensor (HF's score cast to float32)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == DT:
            return args[0]
        return func(*args, **(kwargs or {}))


def peer_modules(params, kbias, *, heads, pool, attention_type):
    cfg = FunnelConfig(d_model=D, n_head=heads, d_head=D // heads, d_inner=2 * D, block_sizes=[1, 1],
                       attention_type=attention_type, pooling_type=pool, separate_cls=True, truncate_seq=False,
                       pool_q_only=True, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       layer_norm_eps=1e-5)
    structure = FunnelAttentionStructure(cfg).eval()
    att = FunnelRelMultiheadAttention(cfg, block_index=1).to(DT).eval()
    with torch.no_grad():
        for name in ("r_w_bias", "r_r_bias", "r_kernel", "r_s_bias", "seg_embed"):
            getattr(att, name).zero_()
        att.q_head.weight.copy_(torch.tensor(params["Wq"].T))
        att.k_head.weight.copy_(torch.tensor(params["Wk"].T))
        att.k_head.bias.copy_(torch.tensor(kbias))
        att.v_head.weight.copy_(torch.tensor(params["Wv"].T))
        att.v_head.bias.copy_(torch.tensor(params["bv"]))
        att.post_proj.weight.copy_(torch.tensor(params["Wo"].T))
        att.post_proj.bias.copy_(torch.tensor(params["bo"]))
        att.layer_norm.weight.copy_(torch.tensor(params["ln_g"]))
        att.layer_norm.bias.copy_(torch.tensor(params["ln_b"]))
    return structure, att


def peer_call(structure, att, xl, mask):
    """FunnelEncoder.forward's pooling layer (block 1, layer 0): pooled queries, unpooled keys / values."""
    am = torch.ones(xl.shape[:2], dtype=DT) if mask is None else torch.tensor(mask).to(DT)
    inputs = structure.init_attention_inputs(xl, attention_mask=am, token_type_ids=None)
    pooled, inputs = structure.pre_attention_pooling(xl, inputs)
    return att(pooled, xl, xl, inputs)[0]


def funnel_case(rng, case, *, n, heads, pool, attention_type, real=None):
    params = {k: np.asarray(v) for k, v in init_params(rng, D).items()}
    params["bq"] = np.zeros_like(params["bq"])
    kbias = 0.1 * rng.standard_normal(D)
    x = rng.standard_normal((B, n, D))
    km = None
    if real is not None:
        km = np.arange(n)[None, :] < np.asarray(real)[:, None]
    structure, att = peer_modules(params, kbias, heads=heads, pool=pool, attention_type=attention_type)
    with torch.no_grad():
        out32 = t2n(peer_call(structure, att, torch.tensor(x), km))        # HF as released: float32 scores
    xl = leaf(x)
    with LiftFloat32Cast():
        out = peer_call(structure, att, xl, km)
    rows = None
    if km is not None:
        g = pool_groups(n, 2, True)
        rows = (km[:, np.where(g >= 0, g, 0)] & (g >= 0)).any(-1)            # effattn's pooled mask
        full = (km[:, np.where(g >= 0, g, 0)] | (g < 0)).all(-1)
        assert np.array_equal(rows, full), "a pooled group mixes real and padding tokens"
    dout = rng.standard_normal(tuple(out.shape))
    if rows is not None:
        dout = dout * rows[..., None]
    total = (out * torch.as_tensor(dout, dtype=DT)).sum()
    plist = [xl, att.q_head.weight, att.k_head.weight, att.v_head.weight, att.v_head.bias, att.post_proj.weight,
             att.post_proj.bias, att.layer_norm.weight, att.layer_norm.bias, att.k_head.bias]
    gx, gq, gk, gv, gbv, go, gbo, gg, gb, gkb = (t2n(t) for t in torch.autograd.grad(total, plist))
    grads = {"x": gx, "Wq": gq.T, "Wk": gk.T, "Wv": gv.T, "bv": gbv, "Wo": go.T, "bo": gbo, "ln_g": gg, "ln_b": gb}
    cmp = np.abs(out32 - t2n(out))
    if rows is not None:
        cmp = cmp[np.broadcast_to(rows[..., None], cmp.shape)]
    print(f"  {case}: HF with its float32 score cast: max |out diff| {cmp.max():.1e}; "
          f"peer grad of k_head.bias (cancels): {np.abs(gkb).max():.1e}")
    note = (f"HF FunnelRelMultiheadAttention (block_index 1, {attention_type}, pooling_type {pool}, separate_cls, "
            "truncate_seq=False, pool_q_only, eval, layer_norm_eps 1e-5) with r_w_bias = r_r_bias = r_kernel = "
            "r_s_bias = seg_embed = 0, called as FunnelEncoder calls its pooling layer (query = pool_tensor(x), "
            "key = value = x); its attn_score.float() cast lifted (Tensor.float the identity on float64; with the "
            f"cast out differs by {cmp.max():.1e}). Wq = q_head.weight.T, bq = 0 (no q bias: no grad), "
            "Wk = k_head.weight.T (k_head.bias random: cancels in the softmax), Wv/bv = v_head, Wo/bo = post_proj, "
            "ln_g/ln_b = layer_norm.")
    if km is not None:
        note += (" Padding at the end in whole pooled groups (HF pools the padding in, effattn only real members: "
                 "equal on all-real groups); out compared on the real pooled rows (rows), dout 0 on the others.")
    path, _ = write(f"funnel__hf_funnel__{case}", mechanism="funnel", peer=PEER, peer_version=transformers.__version__,
                    case=case, config={"causal": False, "heads": heads, "stride": 2, "pool": pool, "separate_cls": True},
                    array_config={} if km is None else {"key_mask": km}, inputs={"x": x, **params}, out=t2n(out),
                    dout=dout, grads=grads, rows=rows, note=note)
    return path


def generate():
    rng = np.random.default_rng(13)
    return [funnel_case(rng, "mean_h2", n=11, heads=2, pool="mean", attention_type="relative_shift"),
            funnel_case(rng, "max_h2", n=10, heads=2, pool="max", attention_type="factorized"),
            funnel_case(rng, "mean_h1", n=10, heads=1, pool="mean", attention_type="relative_shift"),
            funnel_case(rng, "key_mask", n=11, heads=2, pool="mean", attention_type="relative_shift", real=(7, 9)),
            funnel_case(rng, "key_mask_max", n=11, heads=2, pool="max", attention_type="factorized", real=(7, 9))]
