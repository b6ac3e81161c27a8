"""Parity fixtures against fast-transformers (idiap, the Linear Transformer's own code): linear.

Peers (pytorch-fast-transformers 0.4.0, built from source for the CPU):

- ``fast_transformers.attention.LinearAttention`` -> effattn ``linear``: the default feature map
  elu(x) + 1, ``eps=1e-6`` = effattn's ``eps``, its ``key_lengths`` (a ``LengthMask``) = effattn's
  ``key_mask`` (a prefix of real keys), ``attn_mask`` a ``FullMask``. The peer's layout is
  (batch, length, heads, dim); effattn's (batch, heads, length, dim). float64. Case
  ``noncausal_key_lengths`` (N = 10 queries, M = 8 keys, key lengths 8 and 5).
- ``fast_transformers.attention.CausalLinearAttention`` -> effattn ``linear`` with ``causal=True``
  (``attn_mask`` a ``TriangularCausalMask``). Its causal product is a C++ kernel that takes float32
  only (``accessor<float, 4>``, built with -ffast-math), so this peer runs in float32: the fixture
  holds the float32 inputs exactly (as float64) and the peer's float32 output and gradients; the
  tolerance is the measured float32 rounding of the peer, 1.5 x rounded up. Case
  ``causal_key_lengths`` (N = 10, key lengths 10 and 7).

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /work/peers/bin/python
tests/parity/generate.py fast_transformers``.
"""
from __future__ import annotations

import numpy as np
import torch

import effattn

from torch_tools import effattn_diffs, measured_tolerance, t2n, version, write


def to_effattn(a):
    """(batch, length, heads, dim) -> (batch, heads, length, dim)."""
    return np.ascontiguousarray(np.swapaxes(a, 1, 2))


def _linear_case(case, *, causal, lengths, n, m, seed):
    from fast_transformers.attention import CausalLinearAttention, LinearAttention
    from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

    torch.manual_seed(seed)
    dtype = torch.float32 if causal else torch.float64            # the causal C++ kernel is float32 only
    b, h, d, dv = 2, 2, 4, 3
    attn = (CausalLinearAttention if causal else LinearAttention)(d, eps=1e-6)
    q = torch.randn(b, n, h, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, m, h, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, m, h, dv, dtype=dtype, requires_grad=True)
    key_lengths = LengthMask(torch.tensor(lengths), max_len=m)
    attn_mask = TriangularCausalMask(n) if causal else FullMask(N=n, M=m)
    out = attn(q, k, v, attn_mask, LengthMask(torch.full((b,), n)), key_lengths)   # (b, n, h, dv)
    dout = np.random.default_rng(seed).standard_normal(tuple(out.shape)).astype(np.float32 if causal else np.float64)
    (out * torch.as_tensor(dout)).sum().backward()
    inputs = {name: to_effattn(t2n(t)) for name, t in (("q", q), ("k", k), ("v", v))}
    grads = {name: to_effattn(t2n(t.grad)) for name, t in (("q", q), ("k", k), ("v", v))}
    key_mask = (np.arange(m)[None, :] < np.asarray(lengths)[:, None])[:, None, :]       # (b, 1, m)
    config = {"causal": causal, "eps": 1e-6, "chunk": 4}
    out_e, dout_e = to_effattn(t2n(out)), to_effattn(dout.astype(np.float64))
    peer = "CausalLinearAttention" if causal else "LinearAttention"
    if causal:                                                    # the tolerance: the measured float32 rounding
        diffs, _, _ = effattn_diffs("linear", inputs, dict(config, key_mask=key_mask), out_e, dout_e, grads)
        atol_out = measured_tolerance(diffs["out"])
        atol_grad = measured_tolerance(max(diffs[k_] for k_ in grads))
        precision = (f"The peer's causal product is float32 only, so the peer ran in float32 (inputs stored exactly); "
                     f"the gap is its float32 rounding: max |out diff| {diffs['out']:.1e}, max |grad diff| "
                     f"{max(diffs[k_] for k_ in grads):.1e}, tolerance 1.5 x that (the same peer in float64, its C++ "
                     f"product replaced by a dense float64 one: {causal_in_float64_check(seed, n, lengths):.0e}).")
    else:
        atol_out = atol_grad = 1e-10
        precision = "float64."
    note = (f"fast_transformers {peer}(query_dimensions={d}, eps=1e-6), elu(x) + 1 feature map -> effattn linear "
            f"causal={causal}, eps=1e-6; key_lengths {list(lengths)} (LengthMask) -> key_mask (b, 1, M); layout "
            f"(batch, length, heads, dim) transposed to (batch, heads, length, dim). {precision}")
    path, _ = write(f"linear__fast_transformers__{case}", mechanism="linear", peer=f"fast_transformers.{peer}",
                    peer_version=version("pytorch-fast-transformers"), case=case, config=config,
                    array_config={"key_mask": key_mask}, inputs=inputs, out=out_e, dout=dout_e, grads=grads,
                    atol_out=atol_out, atol_grad=atol_grad, note=note)
    return path


def causal_in_float64_check(seed=41, n=10, lengths=(10, 7)):
    """The causal peer in float64 with only its float32 C++ product replaced by a dense float64
    tril((Q K^T)) V: effattn's difference is then rounding (printed only, no fixture)."""
    import fast_transformers.attention.causal_linear_attention as cla
    from fast_transformers.masking import LengthMask, TriangularCausalMask

    def dense_causal_product(Q, K, V):                            # (b, l, h, d): sum_{s <= l} (Q_l . K_s) V_s
        a = torch.einsum("blhd,bshd->bhls", Q, K).tril()
        return torch.einsum("bhls,bshm->blhm", a, V)

    torch.manual_seed(seed)
    b, h, d, dv = 2, 2, 4, 3
    q, k = torch.randn(b, n, h, d, dtype=torch.float64), torch.randn(b, n, h, d, dtype=torch.float64)
    v = torch.randn(b, n, h, dv, dtype=torch.float64)
    original, cla.causal_linear = cla.causal_linear, dense_causal_product
    try:
        out = cla.CausalLinearAttention(d, eps=1e-6)(q, k, v, TriangularCausalMask(n), LengthMask(torch.full((b,), n)),
                                                     LengthMask(torch.tensor(lengths), max_len=n))
    finally:
        cla.causal_linear = original
    key_mask = (np.arange(n)[None, :] < np.asarray(lengths)[:, None])[:, None, :]
    mine, _ = effattn.get("linear").forward(*(to_effattn(t2n(t)) for t in (q, k, v)), causal=True, eps=1e-6,
                                            chunk=4, key_mask=key_mask)
    gap = float(np.abs(mine - to_effattn(t2n(out))).max())
    print(f"  (linear causal, peer in float64 with a dense causal product: max |out diff| {gap:.1e})")
    return gap


def generate():
    try:
        import fast_transformers  # noqa: F401
    except ImportError:
        print("  fast_transformers: skipped: pytorch-fast-transformers is not installed")
        return []
    paths = [_linear_case("noncausal_key_lengths", causal=False, lengths=(8, 5), n=10, m=8, seed=40),
             _linear_case("causal_key_lengths", causal=True, lengths=(10, 7), n=10, m=10, seed=41)]
    return paths
