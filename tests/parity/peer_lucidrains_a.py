"""Parity fixtures against lucidrains' packages, part A: linformer, local, axial, routing.

Peers (float64, eval mode, dropout 0, fixed seeds):

- ``linformer.LinformerSelfAttention`` (linformer 0.2.3) -> effattn ``linformer``: its
  ``proj_k``/``proj_v`` (seq_len, k) are E^T/F^T (k, N_max), one pair for all heads
  (``sharing="headwise"``); ``share_kv=True`` is ``sharing="key_value"`` with v = k;
  ``one_kv_head=True`` is k, v repeated over the heads. Cases ``headwise`` (N < seq_len, so the
  projections are sliced), ``share_kv``, ``one_kv_head``.
- ``local_attention.LocalAttention`` (local-attention 1.11.2) -> effattn ``local``:
  window_size = block, look_backward = look_back, look_forward = look_ahead. Cases
  ``noncausal_b4_lb1_la1``, ``causal_b4_lb2``, ``autopad_mask`` (N not a multiple of the window,
  with a key mask, which also masks the peer's zero padding keys).
- ``axial_attention.AxialAttention`` (axial-attention 0.6.1) -> effattn ``axial``: each axis of the
  peer is its own ``PermuteToFrom(SelfAttention)``; one fixture per axis module, with that module's
  q/k/v projections. Cases ``2d_column`` (the peer's axis 1 of (B, r, c, D)), ``2d_row`` (axis 2),
  ``3d_axis1`` (grid (2, 3, 4), effattn ``axis=1``).
- ``routing_transformer.routing_transformer.KmeansAttention`` (routing-transformer 1.6.1) ->
  effattn ``routing``: its k-means ``means`` (H, c, d) = ``centroids``, window_size = ``window``,
  top-k selection (``selection="topk"``). The peer attends with the q, k it is given and effattn
  layer-normalises them first, so the peer is fed LayerNorm(q), LayerNorm(k) (torch's
  ``F.layer_norm``, no affine, eps 1e-5, effattn's ``eps``) of the leaf q, k. Cases ``topk`` and
  ``topk_causal`` (the peer's forced memory key is given logit -1e4 * scale for every query of
  its cluster, i.e. exactly zero weight; its memory value is 0).

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /work/peers/bin/python
tests/parity/generate.py lucidrains_a``. Each case prints max |effattn - peer| of out and of every
gradient.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as TF
from torch import nn

import effattn

import torch_tools
from torch_tools import DT, Given, autograd, effattn_diffs, heads_to_seq, leaf, measured_tolerance, seq_to_heads, t2n

PEER = "lucidrains"


def write(case, *, mechanism, peer, package, **fixture):
    """torch_tools.write as <mechanism>__lucidrains_<package>__<case>, stamped with the package's version."""
    return torch_tools.write(f"{mechanism}__{PEER}_{package.replace('-', '_')}__{case}", mechanism=mechanism,
                             peer=peer, peer_version=torch_tools.version(package), case=case, **fixture)


# --------------------------------------------------------------------------- linformer
def linformer_fixtures():
    """linformer.LinformerSelfAttention: headwise E, F; share_kv; one_kv_head."""
    from linformer import LinformerSelfAttention

    paths = []
    cases = [  # case, B, H, e, N, seq_len, k, share_kv, one_kv_head
        ("headwise", 2, 2, 4, 12, 16, 5, False, False),
        ("share_kv", 2, 2, 4, 16, 16, 6, True, False),
        ("one_kv_head", 1, 2, 4, 10, 12, 4, False, True),
    ]
    for seed, (case, b, h, e, n, seq_len, kk, share_kv, one_kv) in enumerate(cases):
        torch.manual_seed(100 + seed)
        dim = h * e
        peer = LinformerSelfAttention(dim, seq_len, k=kk, heads=h, one_kv_head=one_kv, share_kv=share_kv,
                                      dropout=0.0).double().eval()
        x = torch.randn(b, n, dim, dtype=DT)
        with torch.no_grad():
            q0 = peer.to_q(x)                                        # (B, N, H e)
            k0 = peer.to_k(x)                                        # (B, N, H e) or (B, N, e)
            v0 = None if share_kv else peer.to_v(x)
        kv_heads = 1 if one_kv else h
        q, k = leaf(seq_to_heads(q0, h)), leaf(seq_to_heads(k0, kv_heads))
        v = None if share_kv else leaf(seq_to_heads(v0, kv_heads))
        peer.to_q = Given(heads_to_seq(q))
        peer.to_k = Given(heads_to_seq(k))
        if not share_kv:
            peer.to_v = Given(heads_to_seq(v))
        peer.to_out = nn.Identity()                                  # compare before the output projection
        out = seq_to_heads(peer(x), h)                               # (B, H, N, e)
        dout = torch.randn(out.shape, dtype=DT).numpy()
        leaves = {"q": q}
        if not share_kv and not one_kv:
            leaves.update(k=k, v=v)
        leaves["proj_k"] = peer.proj_k
        if not share_kv:
            leaves["proj_v"] = peer.proj_v
        g = autograd(out, leaves, dout)

        k_np = t2n(k) if not one_kv else np.repeat(t2n(k), h, axis=1)     # one kv head: repeated over heads
        v_np = k_np if share_kv else (t2n(v) if not one_kv else np.repeat(t2n(v), h, axis=1))
        inputs = {"q": t2n(q), "k": k_np, "v": v_np, "E": t2n(peer.proj_k).T.copy()}
        grads = {"q": g["q"], "E": g.pop("proj_k").T.copy()}
        if not share_kv:
            inputs["F"] = t2n(peer.proj_v).T.copy()
            grads["F"] = g.pop("proj_v").T.copy()
        if "k" in g:
            grads.update(k=g["k"], v=g["v"])
        sharing = "key_value" if share_kv else "headwise"
        if share_kv:
            note = ("share_kv=True: the peer's values are its keys and proj_v is proj_k, so v = k and only E "
                    "= proj_k^T (k, N_max); grads of q and E only (the peer's key gradient is dk + dv).")
        elif one_kv:
            note = ("one_kv_head=True: the peer's single key/value head (B, N, e) is repeated over the H heads "
                    "of k, v; grads of q, E = proj_k^T, F = proj_v^T only (the peer's kv gradient sums the heads).")
        else:
            note = (f"proj_k, proj_v (seq_len={seq_len}, k) are E^T, F^T (k, N_max) shared by the heads; N={n} < "
                    "seq_len, so both slice the first N columns; out before the peer's to_out.")
        path, _ = write(case, mechanism="linformer", peer="linformer.LinformerSelfAttention", package="linformer",
                        inputs=inputs, config={"sharing": sharing}, array_config=None, out=t2n(out), dout=dout,
                        grads=grads, note=note)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- local
def local_fixtures():
    """local_attention.LocalAttention: non-causal look-ahead, causal look-back 2, autopad with a mask."""
    from local_attention import LocalAttention

    paths = []
    cases = [  # case, B, H, N, d, window, look_backward, look_forward, causal, autopad, mask
        ("noncausal_b4_lb1_la1", 1, 2, 16, 4, 4, 1, 1, False, False, False),
        ("causal_b4_lb2", 2, 1, 16, 4, 4, 2, 0, True, False, False),
        ("autopad_mask", 2, 2, 14, 4, 4, 1, 1, False, True, True),
    ]
    for seed, (case, b, h, n, d, win, lb, lf, causal, autopad, use_mask) in enumerate(cases):
        torch.manual_seed(200 + seed)
        peer = LocalAttention(window_size=win, causal=causal, look_backward=lb, look_forward=lf, dropout=0.0,
                              autopad=autopad).double().eval()
        q, k, v = (leaf(torch.randn(b, h, n, d, dtype=DT)) for _ in range(3))
        mask = None
        if use_mask:
            mask = torch.ones(b, n, dtype=torch.bool)
            mask[0, [1, 6, 13]] = False
            mask[1, [0, 9, 10]] = False
        out = peer(q, k, v, mask=mask)
        dout = torch.randn(out.shape, dtype=DT).numpy()
        grads = autograd(out, {"q": q, "k": k, "v": v}, dout)
        config = {"causal": causal, "block": win, "look_back": lb, "look_ahead": lf}
        array_config = None if mask is None else {"key_mask": t2n(mask)[:, None, :]}
        note = (f"window_size={win} -> block, look_backward={lb} -> look_back, look_forward={lf} -> look_ahead; "
                "q, k, v fed straight to the peer (it has no projections; no rotary embedding).")
        if autopad:
            note += (" autopad pads N=14 to 16 with zero keys at valid positions; the mask (padded with False) "
                     "removes them, so effattn's key_mask gives the same result.")
        path, _ = write(case, mechanism="local", peer="local_attention.LocalAttention", package="local-attention",
                        inputs={"q": t2n(q), "k": t2n(k), "v": t2n(v)}, config=config, array_config=array_config,
                        out=t2n(out), dout=dout, grads=grads, note=note)
        paths.append(path)
    autopad_without_mask_difference()
    return paths


def autopad_without_mask_difference():
    """Printed only: autopad without a mask attends to its zero padding keys (no fixture)."""
    from local_attention import LocalAttention

    torch.manual_seed(299)
    b, h, n, d, win = 1, 1, 14, 4, 4
    peer = LocalAttention(window_size=win, causal=False, look_backward=1, look_forward=1, autopad=True).double()
    q, k, v = (torch.randn(b, h, n, d, dtype=DT) for _ in range(3))
    out = t2n(peer(q, k, v))
    mine, _ = effattn.get("local").forward(t2n(q), t2n(k), t2n(v), block=win, look_back=1, look_ahead=1)
    rows = sorted({int(i) for i in np.nonzero(np.abs(mine - out).max(-1) > 1e-12)[-1]})
    print(f"  (local autopad without mask, N={n}, window {win}: max |effattn - peer| = "
          f"{np.abs(mine - out).max():.2e} on query rows {rows})")


# --------------------------------------------------------------------------- axial
def axial_fixtures():
    """axial_attention.AxialAttention: one fixture per axis module (2-D column, 2-D row, 3-D axis 1)."""
    from axial_attention import AxialAttention

    paths = []
    cases = [  # case, grid, which axis module, effattn axis
        ("2d_column", (3, 4), 0, "column"),
        ("2d_row", (3, 4), 1, "row"),
        ("3d_axis1", (2, 3, 4), 1, 1),
    ]
    b, h, e = 2, 2, 4
    dim = h * e
    for seed, (case, grid, which, axis) in enumerate(cases):
        torch.manual_seed(300 + seed)
        peer = AxialAttention(dim, num_dimensions=len(grid), heads=h, dim_index=-1,
                              sum_axial_out=True).double().eval()
        x = torch.randn(b, *grid, dim, dtype=DT)                    # (B, *grid, D), dim last
        module = peer.axial_attentions[which]                       # PermuteToFrom(permutation, SelfAttention)
        attn = module.fn
        n = int(np.prod(grid))
        with torch.no_grad():
            q0 = attn.to_q(x).reshape(b, n, dim)                    # raster order of the grid
            k0, v0 = attn.to_kv(x).reshape(b, n, 2 * dim).chunk(2, dim=-1)
        q, k, v = (leaf(seq_to_heads(t, h)) for t in (q0, k0, v0))

        def peer_layout(t):                                         # (B, H, N, e) -> the permuted (-1, t, H e)
            full = heads_to_seq(t).reshape(b, *grid, dim).permute(*module.permutation)
            return full.reshape(-1, full.shape[-2], dim)

        attn.to_q = Given(peer_layout(q))
        attn.to_kv = Given(torch.cat([peer_layout(k), peer_layout(v)], dim=-1))
        attn.to_out = nn.Identity()                                 # compare before the output projection
        out = seq_to_heads(module(x).reshape(b, n, dim), h)
        dout = torch.randn(out.shape, dtype=DT).numpy()
        grads = autograd(out, {"q": q, "k": k, "v": v}, dout)
        peer_axis = module.permutation[-2]
        note = (f"the peer's axis module {which} (attends along tensor axis {peer_axis} of (B, *{grid}, D)) with its "
                f"own to_q/to_kv; effattn shape={grid}, axis={axis!r}, positions in raster order; out before "
                "to_out. AxialAttention(sum_axial_out=True) sums such per-axis outputs (separate softmaxes), "
                "which is NOT effattn's axis='both' (one softmax over the union).")
        path, _ = write(case, mechanism="axial", peer="axial_attention.AxialAttention", package="axial-attention",
                        inputs={"q": t2n(q), "k": t2n(k), "v": t2n(v)},
                        config={"shape": list(grid), "axis": axis, "causal": False}, array_config=None,
                        out=t2n(out), dout=dout, grads=grads, note=note)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- routing
def routing_fixtures():
    """routing_transformer KmeansAttention: top-k clusters, non-causal and causal."""
    import routing_transformer.routing_transformer as rt

    from effattn.attention.routing import draw_centroids

    paths = []
    cases = [  # case, B, H, N, d, clusters, window, causal
        ("topk", 2, 2, 16, 8, 4, 4, False),
        ("topk_causal", 1, 2, 16, 8, 4, 4, True),
    ]
    eps = 1e-5
    for seed, (case, b, h, n, d, c, w, causal) in enumerate(cases):
        torch.manual_seed(400 + seed)
        rng = np.random.default_rng(400 + seed)
        peer = rt.KmeansAttention(c, w, h, d, causal=causal, dropout=0.0).double().eval()
        mu = draw_centroids(rng, c, d, heads=h)                      # (H, c, d)
        peer.kmeans.means.data.copy_(torch.tensor(mu))
        peer.kmeans.initted.data.copy_(torch.tensor(True))           # no k-means init from the data
        q, k, v = (leaf(torch.randn(b, h, n, d, dtype=DT)) for _ in range(3))
        qn = TF.layer_norm(q, (d,), eps=eps)                         # effattn's Q <- LayerNorm(Q)
        kn = TF.layer_norm(k, (d,), eps=eps)

        picked = []                                                  # record the peer's memberships
        distribution = rt.distribution
        rt.distribution = lambda dists, wsz: picked.append(distribution(dists, wsz)) or picked[-1]
        try:
            if causal:
                neutralise_memory_key(peer, qn, mu, w)
            out, _aux = peer(qn, kn, v)
        finally:
            rt.distribution = distribution
        dout = torch.randn(out.shape, dtype=DT).numpy()
        grads = autograd(out, {"q": q, "k": k, "v": v}, dout)

        inputs = {"q": t2n(q), "k": t2n(k), "v": t2n(v)}
        config = {"causal": causal, "window": w, "selection": "topk", "eps": eps}
        array_config = {"centroids": mu}
        diffs, mine, cache = effattn_diffs("routing", inputs, dict(config, **array_config), t2n(out), dout, grads)
        same_sets(picked, cache, c, w)
        # the only difference is the peer's scatter_mean: numer / (count + 1e-5); undo it to show the rest
        count = np.asarray(cache.count)
        undone = t2n(out) * np.where(count > 0, (count + 1e-5) / np.maximum(count, 1), 1.0)
        shrink = np.where(count > 0, count / (count + 1e-5), 1.0)                 # the peer's d out / d so
        g2 = effattn.get("routing").backward(dout * shrink, cache)
        gd = max(float(np.abs(np.asarray(g2[kk]) - grads[kk]).max()) for kk in grads)
        print(f"  (routing {case}: with the peer's count + 1e-5 undone, max |out diff| = "
              f"{np.abs(mine - undone).max():.2e}, max |grad diff| = {gd:.2e})")
        atol_out = measured_tolerance(diffs["out"], factor=2.0)         # twice the peer's epsilon's effect
        atol_grad = measured_tolerance(max(v for kk, v in diffs.items() if kk != "out"), factor=2.0)
        note = ("the peer is fed LayerNorm(q), LayerNorm(k) (no affine, eps 1e-5 = effattn's eps) of the leaf q, k "
                "and routes on their l2-normalised rows with means = centroids (H, c, d), window_size = window, "
                "top-k per cluster (selection='topk'; same memberships checked). Tolerance ~1e-5 relative: the "
                "peer's scatter_mean divides by count + 1e-5 (effattn by count); undoing it leaves < 1e-14 in out "
                "and grads.")
        if causal:
            note += (" Causal: the peer forces one memory key/value per cluster; its key is set to -1e4 u with "
                     "q.u = 1 for every query of the cluster (logit -1e4/sqrt(d): exactly zero weight) and its "
                     "value to 0.")
        path, _ = write(case, mechanism="routing", peer="routing_transformer.routing_transformer.KmeansAttention",
                        package="routing-transformer", inputs=inputs, config=config, array_config=array_config,
                        out=t2n(out), dout=dout, grads=grads, note=note, atol_out=atol_out, atol_grad=atol_grad)
        paths.append(path)
    routing_key_mask_difference()
    return paths


def routing_key_mask_difference():
    """Printed only: the peer selects masked keys into a cluster's top-w (then masks them); effattn
    ranks masked keys last, so the memberships differ (no fixture)."""
    import routing_transformer.routing_transformer as rt

    from effattn.attention.routing import draw_centroids

    torch.manual_seed(499)
    rng = np.random.default_rng(499)
    b, h, n, d, c, w = 1, 1, 16, 8, 4, 4
    peer = rt.KmeansAttention(c, w, h, d, causal=False).double().eval()
    mu = draw_centroids(rng, c, d, heads=h)
    peer.kmeans.means.data.copy_(torch.tensor(mu))
    peer.kmeans.initted.data.copy_(torch.tensor(True))
    q, k, v = (torch.randn(b, h, n, d, dtype=DT) for _ in range(3))
    qn, kn = (TF.layer_norm(t, (d,), eps=1e-5) for t in (q, k))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, ::3] = False
    with torch.no_grad():
        out = t2n(peer(qn, kn, v, key_mask=mask)[0])
    mine, _ = effattn.get("routing").forward(t2n(q), t2n(k), t2n(v), centroids=mu, window=w, selection="topk",
                                             key_mask=t2n(mask)[:, None, :])
    print(f"  (routing with key_mask, every 3rd key masked: max |effattn - peer| = {np.abs(mine - out).max():.2e})")


def neutralise_memory_key(peer, qn, mu, w):
    """Give the causal peer's forced memory key zero weight: per (head, cluster) a direction u with
    q . u = 1 for each of the cluster's w queries (batch 1, w <= d: min-norm solve); key = -1e4 u."""
    b, h, n, d = qn.shape
    assert b == 1 and w <= d
    with torch.no_grad():
        x = TF.normalize(qn, dim=-1)
        dists = torch.einsum("bhnd,hcd->bhnc", x, torch.as_tensor(mu))
        top = dists.topk(k=w, dim=-2).indices                       # (1, H, w, c), the peer's own rule
        for head in range(h):
            for cl in range(mu.shape[1]):
                rows = qn[0, head, top[0, head, :, cl]]            # (w, d)
                u = torch.linalg.pinv(rows) @ torch.ones(w, dtype=DT)
                assert torch.allclose(rows @ u, torch.ones(w, dtype=DT))
                peer.mem_key.data[head, cl, :] = -1e4 * u
        peer.mem_value.data.zero_()


def same_sets(picked, cache, c, w):
    """The peer's query and key memberships equal effattn's (as sets per cluster)."""
    ind_q, ind_k = picked                                           # (B, H, c * w): cluster-major
    for mine, theirs in ((cache.q_idx, ind_q), (cache.k_idx, ind_k)):
        theirs = np.sort(t2n(theirs).astype(int).reshape(*theirs.shape[:2], c, w), axis=-1)
        mine = np.sort(np.broadcast_to(np.asarray(mine), theirs.shape), axis=-1)
        assert (mine == theirs).all(), "routing memberships differ"


# --------------------------------------------------------------------------- driver
def generate():
    return linformer_fixtures() + local_fixtures() + axial_fixtures() + routing_fixtures()
