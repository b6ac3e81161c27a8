"""Parity fixtures against PyTorch's own attention: effattn ``full`` and ``flash`` (tiled, with
tiles smaller than the sequence so that the online softmax runs over several) against
``torch.nn.functional.scaled_dot_product_attention`` (the reference every fused kernel is held to).

Mapping: q, k, v (B, H, N, d) as they are; ``is_causal=True`` -> ``causal=True``; a boolean
``attn_mask`` (B, 1, 1, M) with True = take part -> ``key_mask`` (B, 1, M) (causal with a key mask:
SDPA takes one mask, so the key mask and the lower triangle are joined into it); the default scale
1/sqrt(d) on both sides. Cases ``plain``, ``causal``, ``key_mask`` and ``cross`` (N != M), and for
``flash`` also ``causal_key_mask``.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /work/peers/bin/python
tests/parity/generate.py torch``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as TF

from torch_tools import autograd, leaf, t2n, write


def sdpa_case(rng, case, *, b, h, n, m, d, causal=False, masked=False, mechanism="full", tiles=None):
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, m, d)), rng.standard_normal((b, h, m, d))
    leaves = {"q": leaf(q), "k": leaf(k), "v": leaf(v)}
    km = None
    if masked:
        km = rng.random((b, 1, m)) > 0.3
        km[..., 0] = True
    mask = None if km is None else torch.tensor(km[:, :, None, :])            # (B, 1, 1, M)
    if causal and mask is not None:           # SDPA takes one or the other: the causal mask written out (N = M)
        mask = mask & torch.ones(n, m, dtype=torch.bool).tril()
    out = TF.scaled_dot_product_attention(leaves["q"], leaves["k"], leaves["v"], attn_mask=mask,
                                          is_causal=causal and mask is None)
    dout = rng.standard_normal(out.shape)
    path, _ = write(f"{mechanism}__torch_sdpa__{case}", mechanism=mechanism,
                    peer="torch.nn.functional.scaled_dot_product_attention", peer_version=torch.__version__,
                    case=case, config={"causal": causal, **(tiles or {})}, array_config={} if km is None else {"key_mask": km},
                    inputs={"q": q, "k": k, "v": v}, out=t2n(out), dout=dout, grads=autograd(out, leaves, dout),
                    note="q, k, v as they are; is_causal -> causal; boolean attn_mask (B, 1, 1, M) -> key_mask "
                         "(B, 1, M)." + ("" if tiles is None else f" flash's tiles {tiles}: several per row."))
    return path


def generate():
    rng = np.random.default_rng(7)
    return [sdpa_case(rng, "plain", b=2, h=2, n=9, m=9, d=4),
            sdpa_case(rng, "causal", b=2, h=2, n=11, m=11, d=4, causal=True),
            sdpa_case(rng, "key_mask", b=2, h=2, n=10, m=10, d=4, masked=True),
            sdpa_case(rng, "cross", b=1, h=2, n=6, m=13, d=4, masked=True)] + generate_flash()


def generate_flash():
    rng = np.random.default_rng(8)
    t = {"block_q": 4, "block_k": 3}
    return [sdpa_case(rng, "plain", b=2, h=2, n=9, m=9, d=4, mechanism="flash", tiles=t),
            sdpa_case(rng, "causal", b=2, h=2, n=11, m=11, d=4, causal=True, mechanism="flash", tiles=t),
            sdpa_case(rng, "key_mask", b=2, h=2, n=10, m=10, d=4, masked=True, mechanism="flash", tiles=t),
            sdpa_case(rng, "causal_key_mask", b=1, h=2, n=13, m=13, d=4, causal=True, masked=True,
                      mechanism="flash", tiles=t),
            sdpa_case(rng, "cross", b=1, h=2, n=6, m=13, d=4, masked=True, mechanism="flash", tiles=t)]
