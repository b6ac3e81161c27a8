"""Parity fixtures for effattn ``pkm`` against lucidrains' ``product-key-memory`` 0.3.0
(``product_key_memory.PKM``; it imports ``colt5_attention``, hence also colt5-attention 0.11.2,
local-attention 1.11.2 and hyper-connections 0.4.11 in the peers' venv, none of them used here).

The peer runs in float64 on the CPU in eval mode: ``PKM(dim, heads, num_keys, topk, dim_head,
use_layernorm=True)`` with every dropout 0 (its defaults), ``pre_layernorm=False``,
``norm_output=False``, ``differentiable_topk=False``, ``concat_values_and_combine=False`` (values an
``EmbeddingBag(num_keys ** 2, dim, mode='sum')``: no output projection) and softmax gates
(``non_competitive_gates=False``); ``gumbel_noise_scale=0``. Its query norm ``pkm.norm`` (a
LayerNorm(dim_head) on each half query of each head; with ``use_layernorm=False`` a BatchNorm1d,
which mixes the tokens of a batch) is replaced by ``nn.Identity()``: effattn's query is the plain
``x Wq + bq`` (see effattn/layers/pkm.py, "Not here"). x is a leaf; autograd gives the gradients of
x and of every peer parameter. Mapping (effattn's parameters copied into the peer; dh = dim_head,
dq = 2 dh, H = heads, num_keys = sqrtK):

    to_queries.weight.T[:, p H dh + h dh + j] = Wq[:, h dq + p dh + j]   ((p h d) -> effattn's (h p d))
    bq = 0                                                             (to_queries has no bias)
    keys[h, :, 0, :] = keys1[h],   keys[h, :, 1, :] = keys2[h]
    values.weight = values
    the peer's gradients, permuted back the same way, -> grad.x, grad.Wq, grad.keys1, grad.keys2,
    grad.values (dense: the EmbeddingBag's weight gradient, nonzero on the chosen rows only)

grad.bq is not in the fixtures (the peer has no query bias). The search is the same on both sides:
torch ``topk`` of each half's sub-key scores, candidates ``scores_x[:, None] + scores_y[None, :]``
(rank in the first half major, effattn's order too), index ``ix * num_keys + iy``, a second topk,
softmax without a scale, the bag summed over heads. Ties would be broken differently only on exactly
equal scores (not met by random float64 inputs).

Masks. The peer's ``input_mask`` only feeds the BatchNorm's statistics (``use_layernorm=False``);
with the LayerNorm (here the identity) it is not used, and a padding token reads memory like any
other. effattn's padding token reads nothing (output 0, gradient 0). The layer is per token, so the
``key_mask`` case compares the real rows only (``rows`` = key_mask) and its dout is 0 on the padding
rows; then the peer's gradients come from the real tokens only, which is effattn's convention.

Cases (dim 16, dim_head 8, num_keys 16 -> K = 256, topk 4, B 2, N 5): ``heads1`` (H 1), ``heads4``
(H 4), ``key_mask`` (H 4, a key mask with padding in both batch elements).

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /root/peers/bin/python
tests/parity/generate.py lucidrains_pkm``.
"""
from __future__ import annotations

import numpy as np
import torch
from product_key_memory import PKM
from torch import nn

from effattn.layers.pkm import init_params
from torch_tools import DT, leaf, t2n, version, write

PEER = "product_key_memory.PKM"
DIM, DIM_HEAD, NUM_KEYS, TOPK, B, N = 16, 8, 16, 4, 2, 5


def column_order(heads, dh):
    """perm with Wq[:, c] = to_queries.weight.T[:, perm[c]]: effattn's column h dq + p dh + j is the
    peer's p H dh + h dh + j."""
    h, p, j = np.meshgrid(np.arange(heads), np.arange(2), np.arange(dh), indexing="ij")   # effattn (h, p, j)
    return (p * heads * dh + h * dh + j).reshape(-1)


def pkm_case(rng, case, *, heads, masked=False):
    params = {k: np.asarray(v) for k, v in init_params(rng, DIM, sqrtK=NUM_KEYS, dq=2 * DIM_HEAD, heads=heads).items()}
    params["bq"] = np.zeros_like(params["bq"])
    perm = column_order(heads, DIM_HEAD)
    m = PKM(DIM, heads=heads, num_keys=NUM_KEYS, topk=TOPK, dim_head=DIM_HEAD, use_layernorm=True).to(DT).eval()
    m.norm = nn.Identity()
    with torch.no_grad():
        wt = np.empty_like(params["Wq"])
        wt[:, perm] = params["Wq"]
        m.to_queries.weight.copy_(torch.tensor(wt.T))
        m.keys.copy_(torch.tensor(np.stack([params["keys1"], params["keys2"]], axis=2)))
        m.values.weight.copy_(torch.tensor(params["values"]))
    x = rng.standard_normal((B, N, DIM))
    km = None
    if masked:
        km = np.ones((B, N), bool)
        km[0, 3:] = False
        km[1, 1] = False
    xl = leaf(x)
    out = m(xl, input_mask=None if km is None else torch.tensor(km))
    dout = rng.standard_normal(out.shape)
    if km is not None:
        dout = dout * km[..., None]
    total = (out * torch.as_tensor(dout, dtype=DT)).sum()
    gx, gq, gk, gv = (t2n(t) for t in torch.autograd.grad(total, [xl, m.to_queries.weight, m.keys, m.values.weight]))
    grads = {"x": gx, "Wq": gq.T[:, perm], "keys1": gk[:, :, 0, :], "keys2": gk[:, :, 1, :], "values": gv}
    note = (f"lucidrains PKM(dim {DIM}, heads {heads}, num_keys {NUM_KEYS}, topk {TOPK}, dim_head {DIM_HEAD}), eval, "
            "pkm.norm = Identity; Wq = to_queries.weight.T with columns (p h d) -> (h p d), bq = 0 (no bias grad), "
            "keys1/keys2 = keys[:, :, 0/1, :], values = values.weight.")
    if km is not None:
        note += (" The peer's input_mask only feeds its BatchNorm (unused here): its padding tokens read memory, "
                 "effattn's read nothing; out is compared on real rows (rows = key_mask), dout is 0 on padding.")
    path, _ = write(f"pkm__lucidrains_product_key_memory__{case}", mechanism="pkm", peer=PEER,
                    peer_version=version("product-key-memory"), case=case,
                    config={"causal": False, "heads": heads, "topk": TOPK},
                    array_config={} if km is None else {"key_mask": km}, inputs={"x": x, **params},
                    out=t2n(out), dout=dout, grads=grads, rows=km, note=note)
    return path


def generate():
    rng = np.random.default_rng(12)
    return [pkm_case(rng, "heads1", heads=1), pkm_case(rng, "heads4", heads=4),
            pkm_case(rng, "key_mask", heads=4, masked=True)]
