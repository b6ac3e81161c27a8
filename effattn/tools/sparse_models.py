"""Measurements of the sparse models of issue 15 (notebook 09, the report): what a Switch layer and a
product-key memory cost against the dense layers they stand for.

* :func:`costs` — parameters and multiply-adds per token of a dense FFN, Switch (top-1, top-2),
  a product-key memory, and a dense read of the same K memory values (counted, not measured).
* :func:`time_switch` — forward + backward of a Switch layer with E experts against the dense FFN
  of one expert's size, on the same tokens.
* :func:`time_pkm` — forward + backward of a product-key memory of K slots against full attention
  of the same queries over the same K values.
* :func:`claims` — the two numbers issue 15 asks for, with their thresholds.

Times are the median over interleaved repeats (the two sides alternate, so a busy machine slows
both alike) on the process CPU clock by default (set one BLAS thread first for a steady count:
``effattn.backend.set_blas_threads(1)``). Run ``python -m effattn.tools.sparse_models`` for the table.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .. import registry
from ..layers import pkm, switch
from ..nn.modules import FeedForward

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def costs(d_model=512, d_ff=2048, *, experts=8, keys=65536, heads=4, dq=256, topk=32):
    """Rows {name, params, flops}: learnable numbers and multiply-adds per token of one layer (biases
    counted in the parameters, not in the FLOPs). Dense FFN: 2 D F. Switch top-k: D E (router) +
    k 2 D F, with E (2 D F + F + D) + D E parameters. PKM: D H dq (query) + H sqrtK dq (sub-key
    scores) + H (k^2 + k D) (candidates, the bag); parameters K D + D H dq + H dq + H sqrtK dq.
    "dense read": one query of size dq scored against all K keys and a weighted sum of the K values,
    K (dq + D) (what attention over the memory would cost, its keys K dq parameters more)."""
    D, F, E, K, H = d_model, d_ff, experts, keys, heads
    sq = math.isqrt(K)
    if sq * sq != K:
        raise ValueError(f"keys must be a square (K = sqrtK^2), got {keys}")
    expert = 2 * D * F + F + D
    return [
        {"name": "dense FFN", "params": expert, "flops": 2 * D * F},
        {"name": f"Switch top-1, E={E}", "params": E * expert + D * E, "flops": D * E + 2 * D * F},
        {"name": f"GShard top-2, E={E}", "params": E * expert + D * E, "flops": D * E + 2 * 2 * D * F},
        {"name": f"PKM K={K}, H={H}, k={topk}", "params": K * D + D * H * dq + H * dq + H * sq * dq,
         "flops": D * H * dq + H * (sq * dq + topk * topk + topk * D)},
        {"name": f"dense read of K={K} values", "params": K * D + K * dq, "flops": K * (dq + D)},
    ]


def _interleaved(fns, repeats, clock):
    """Median time of each function, the functions alternating repeat by repeat (one warm-up each)."""
    tick = CLOCKS[clock]
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = tick()
            f()
            times[i].append(tick() - t0)
    return [float(np.median(t)) for t in times]


def time_switch(tokens=4096, *, d_model=256, d_ff=1024, experts=8, k=1, capacity_factor=1.25, repeats=5,
                clock="cpu", dtype="float32", seed=0):
    """{dense_s, switch_s, ratio, params_ratio}: forward + backward of one Switch layer (E experts of
    width d_ff, top-k, auxiliary losses on) against the dense FFN of one expert's size, on the same
    (1, tokens, d_model) input."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, tokens, d_model)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ffn = FeedForward(d_model, d_ff, rng, dtype=dtype)
    params = switch.init_params(rng, d_model, d_ff, experts, dtype=dtype)
    spec = registry.get("switch")
    opts = {"k": k, "capacity_factor": capacity_factor, "aux_weight": 1e-2, "z_weight": 1e-3}

    def dense():
        ffn.forward(x)
        ffn.backward(dy)

    def sparse():
        _, cache = spec.forward(x, **opts, **params)
        spec.backward(dy, cache)

    t_dense, t_switch = _interleaved([dense, sparse], repeats, clock)
    n_switch = sum(int(np.size(a)) for a in params.values())
    return {"dense_s": t_dense, "switch_s": t_switch, "ratio": t_switch / t_dense,
            "params_ratio": n_switch / ffn.num_parameters(), "tokens": tokens, "experts": experts, "k": k}


def time_pkm(n=1024, *, keys=65536, d=64, d_model=256, topk=32, repeats=3, clock="cpu", dtype="float32", seed=0):
    """{full_s, pkm_s, ratio}: forward + backward of a product-key memory (one head, query size d,
    K = keys slots, top-k) against ``full`` attention of n queries of size d over the same K values
    (keys (K, d), values (K, d_model)); ratio = full / pkm (how many times faster PKM is)."""
    rng = np.random.default_rng(seed)
    sq = math.isqrt(keys)
    x = rng.standard_normal((1, n, d_model)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    p = pkm.init_params(rng, d_model, sqrtK=sq, dq=d, heads=1, dtype=dtype)
    q = (x @ p["Wq"])[:, None]                                            # (1, 1, n, d)
    kk = rng.standard_normal((1, 1, keys, d)).astype(dtype)
    v = p["values"][None, None]                                           # (1, 1, K, D)
    dout = dy[:, None]
    full, mem = registry.get("full"), registry.get("pkm")

    def dense():
        _, cache = full.forward(q, kk, v)
        full.backward(dout, cache)

    def sparse():
        _, cache = mem.forward(x, topk=topk, **p)
        mem.backward(dy, cache)

    t_full, t_pkm = _interleaved([dense, sparse], repeats, clock)
    return {"full_s": t_full, "pkm_s": t_pkm, "ratio": t_full / t_pkm, "n": n, "keys": keys, "topk": topk}


def claims(*, tokens=4096, n=1024, repeats=5, clock="cpu"):
    """Issue 15's numbers: Switch (8 experts, top-1) per token within 1.5x of the dense FFN, and
    PKM (K = 65536) at least 20x faster than dense attention over the same K values."""
    s = time_switch(tokens, repeats=repeats, clock=clock)
    m = time_pkm(n, repeats=max(2, repeats // 2), clock=clock)
    return [
        {"claim": "Switch E=8 top-1 / dense FFN time per token", "value": s["ratio"], "threshold": 1.5,
         "ok": s["ratio"] <= 1.5, "detail": f"{s['params_ratio']:.1f}x the parameters, {tokens} tokens"},
        {"claim": "dense attention over K=65536 values / PKM time", "value": m["ratio"], "threshold": 20.0,
         "ok": m["ratio"] >= 20.0, "detail": f"N={n}, topk={m['topk']}"},
    ]


def main():
    from ..backend import set_blas_threads

    set_blas_threads(1)
    print(f"{'layer':34s} {'params':>12s} {'flops/token':>12s}")
    for r in costs():
        print(f"{r['name']:34s} {r['params']:12,d} {r['flops']:12,d}")
    for c in claims():
        print(f"{c['claim']}: {c['value']:.2f} (threshold {c['threshold']}, {'ok' if c['ok'] else 'NOT MET'}; "
              f"{c['detail']})")


if __name__ == "__main__":
    main()
