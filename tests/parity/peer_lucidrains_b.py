"""Parity fixtures against lucidrains' packages, part B: nystromformer, performer, sinkhorn.

Peers (float64, eval mode, dropout 0, fixed seeds):

- ``nystrom_attention.NystromAttention`` (nystrom-attention 0.0.14) -> effattn ``nystromformer``:
  num_landmarks = ``landmarks``, pinv_iterations = ``iterations``, the residual depthwise
  ``res_conv`` (H, 1, kernel, 1) = ``conv_w`` (H, kernel), ``conv_kernel`` = residual_conv_kernel.
  The peer pads the sequence at the *front* to a multiple of the landmarks; without a mask the
  zero padding rows are ordinary (zero) tokens, so effattn gets the padded q, k, v (length
  ceil(N / m) m) and the fixture's out is the peer's output on every padded row (before
  ``to_out``), with dout zero on the padding rows the peer slices away. With a mask the padding is
  masked too (``mask`` padded with False) and the peer is built with ``eps=0`` (its 1e-8 in the
  landmark divisor is a constructor option). The peer's pseudo-inverse start divides by
  max row sum * max column sum over the whole batch; effattn per (batch, head): the same for one
  batch element and one head, so these fixtures have B = H = 1 (at B = H = 2 the generator prints
  the gap, no fixture: ~2e-3 on out). Cases ``divisible`` (N = 16,
  m = 4), ``front_pad`` (N = 14, m = 4), ``key_mask`` (N = 14 padded to 16, and the last two
  tokens masked).
- ``performer_pytorch.FastAttention`` (performer-pytorch 1.1.4) -> effattn ``performer``:
  its ``projection_matrix`` (nb_features, d) = ``features``, ``kernel="positive"``
  (generalized_attention=False), causal or not. The peer adds 1e-4 to every random feature (and, in
  its causal path, 1e-6 to every entry of the running key sum in the denominator); effattn has no
  such option, so the tolerance is the measured effect of those epsilons (the generator also runs the
  peer with both epsilons patched to 0 and prints that difference, which is rounding only). The
  peer's masking (in its ``Attention`` wrapper) zeroes masked values only, which is not effattn's
  key mask; the fixtures have no mask. Cases ``noncausal``, ``causal``.
- ``sinkhorn_transformer.sinkhorn_transformer.SinkhornAttention`` (sinkhorn-transformer 0.11.4) ->
  effattn ``sinkhorn``: bucket_size = ``block`` (kv_bucket_size with SortCut), sinkhorn_iter =
  ``n_iters``, temperature = ``tau``, n_sortcut = ``sortcut``, non-causal,
  ``use_simple_sort_net=True, non_permutative=False`` (the Gumbel-Sinkhorn path). Its
  ``SimpleSortNet`` is R = ReLU([sum q ; sum k] W), W (H, 2d, N_B) per head; with the q half of W
  zero and the k half the same for every head, that is effattn's SortNet with W1 = the k half,
  b1 = 0, W2 = I, b2 = 0 (its gradient ``W1`` is the sum over heads of the peer's). Two patches of
  the peer, made at generation time: (1) ``gumbel_sinkhorn`` takes log(R + 1e-6) as the logits; the
  paper's log_alpha is (R + epsilon) / tau, so it is replaced by the paper's form, keeping the
  peer's own ``sinkhorn_sorting_operator`` and Gumbel draw (``sample_gumbel``), which is passed to
  effattn as ``gumbel``; (2) the released non-SortCut path sets ``b_v_r = b_k_r.reshape(...)``
  (the sorted *keys* as sorted values), patched to ``b_v_r.reshape(...)``. Cases ``sorted_own``
  (N = 16, block 4) and ``sortcut`` (kv buckets of 4, query buckets of 8 so that the peer adds no
  own bucket, n_sortcut = 2). The generator also prints how far each patch moves the peer. The
  peer's causal path (cumulative means, differentiable top-k, null keys) and its masks (a hard
  argmax of R picks the sorted mask) are not effattn's; no fixture for them.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /work/peers/bin/python
tests/parity/generate.py lucidrains_b``. Each case prints max |effattn - peer| of out and of every
gradient.
"""
from __future__ import annotations

import contextlib
import inspect
import textwrap

import numpy as np
import torch
import torch.nn.functional as TF

from torch_tools import DT, Given, autograd, effattn_diffs, leaf, measured_tolerance, report, t2n, version, write

PEER = "lucidrains"


# --------------------------------------------------------------------------- nystromformer
def _nystrom_case(case, *, n, m, masked_tail=0, seed=0, b=1, h=1, smooth=False, save_fixture=True):
    """NystromAttention (d = 4, 3-tap residual conv) on a length-n input.

    masked_tail > 0: a mask (the last ``masked_tail`` tokens False), and the peer's eps = 0.
    smooth: a slowly varying input (nearly collinear landmarks: an ill-conditioned A, where the
    pseudo-inverse's start matters). save_fixture=False: return effattn's differences only."""
    from nystrom_attention import NystromAttention

    torch.manual_seed(seed)
    dim, d, kernel = 6, 4, 3
    attn = NystromAttention(dim=dim, dim_head=d, heads=h, num_landmarks=m, pinv_iterations=6, residual=True,
                            residual_conv_kernel=kernel, eps=0.0 if masked_tail else 1e-8, dropout=0.0).to(DT).eval()
    with torch.no_grad():
        attn.res_conv.weight.normal_(0.0, 0.5)                    # a visible skip path
    x = torch.randn(b, n, dim, dtype=DT)
    if smooth:
        x = x.cumsum(dim=1) / n ** 0.5
    pad = (-n) % m
    npad = n + pad
    mask = None
    real = torch.ones(b, npad, dtype=torch.bool)
    real[:, :pad] = False                                         # the peer's front padding
    if masked_tail:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[:, n - masked_tail:] = False
        real[:, pad:] = mask
    with torch.no_grad():
        qkv = attn.to_qkv(TF.pad(x, (0, 0, pad, 0)))              # (B, npad, 3 h d): the peer's projection
        if masked_tail:
            qkv = qkv * real[..., None]                           # the peer zeroes masked q, k, v
    qkv = leaf(qkv)
    attn.to_qkv = Given(qkv)
    seen = {}
    attn.to_out.register_forward_pre_hook(lambda _mod, args: seen.__setitem__("out", args[0]))
    attn(x, mask=mask)
    out = seen["out"].reshape(b, npad, h, d).permute(0, 2, 1, 3)   # (B, H, npad, d) before to_out
    rng = np.random.default_rng(seed + 1)
    keep = real.numpy() if masked_tail else (np.arange(npad) >= pad)[None]
    dout = rng.standard_normal(out.shape) * keep[:, None, :, None]  # 0 on rows the peer discards / masks
    g = autograd(out, {"qkv": qkv, "conv": attn.res_conv.weight}, dout)

    def heads_of(a):                                              # (B, npad, h d) -> (B, H, npad, d)
        return a.reshape(b, npad, h, d).transpose(0, 2, 1, 3)

    q, k, v = (heads_of(a) for a in np.split(t2n(qkv), 3, axis=-1))
    dq, dk, dv = (heads_of(a) for a in np.split(g["qkv"], 3, axis=-1))
    conv_w = t2n(attn.res_conv.weight)[:, 0, :, 0]                # (H, kernel)
    inputs = {"q": q, "k": k, "v": v, "conv_w": conv_w}
    grads = {"q": dq, "k": dk, "v": dv, "conv_w": g["conv"][:, 0, :, 0]}
    config = {"landmarks": m, "iterations": 6, "conv_kernel": kernel}
    array_config = {"key_mask": real.numpy()[:, None, :]} if masked_tail else {}
    if not save_fixture:
        return effattn_diffs("nystromformer", inputs, {**config, **array_config}, t2n(out), dout, grads)[0]
    pad_note = (f"the peer front-pads N={n} to {npad} with zero tokens (q = k = v = 0, not masked), so effattn "
                f"gets the padded q, k, v and the fixture holds all {npad} rows, dout 0 on the {pad} padding rows; "
                if pad and not masked_tail else "")
    if masked_tail:
        note = (f"NystromAttention(num_landmarks={m}, pinv_iterations=6, residual_conv_kernel={kernel}, eps=0) with a "
                f"mask (N={n} front-padded to {npad} with masked tokens, the last {masked_tail} tokens masked) -> "
                "effattn key_mask over the padded length; q, k, v = the peer's to_qkv, zeroed at masked positions "
                "as the peer does; out before to_out, dout 0 on masked rows. The peer averages only the unmasked "
                "queries into the query landmarks (and keys into the key landmarks); B = H = 1 (the peer's pinv "
                "start uses batch-wide maxima).")
    else:
        note = (f"NystromAttention(num_landmarks={m}, pinv_iterations=6, residual_conv_kernel={kernel}) -> "
                f"landmarks={m}, iterations=6, conv_w = res_conv.weight[:, 0, :, 0]; q, k, v from the peer's "
                f"to_qkv; {pad_note}out before to_out. B = H = 1 (the peer's pinv start uses batch-wide maxima).")
    path, _ = write(f"nystromformer__{PEER}_nystrom_attention__{case}", mechanism="nystromformer",
                    peer="nystrom_attention.NystromAttention", peer_version=version("nystrom-attention"), case=case,
                    config=config, array_config=array_config, inputs=inputs, out=t2n(out), dout=dout, grads=grads,
                    note=note)
    return path


def nystromformer_fixtures():
    return [_nystrom_case("divisible", n=16, m=4),
            _nystrom_case("front_pad", n=14, m=4, seed=1),
            _nystrom_case("key_mask", n=14, m=4, masked_tail=2, seed=2)]


def nystrom_batch_max_gap():
    """effattn against the peer at B = H = 2, where the peer's pinv start takes its maxima over the
    whole batch and effattn per (batch, head) (printed only, no fixture)."""
    for smooth in (False, True):
        diffs = _nystrom_case("batch2_heads2", n=16, m=4, seed=3, b=2, h=2, smooth=smooth, save_fixture=False)
        report(f"(nystromformer B = H = 2{', smooth input' if smooth else ''}: no fixture)", diffs)


# --------------------------------------------------------------------------- performer
@contextlib.contextmanager
def _performer_without_eps(fast):
    """The peer with its feature eps (1e-4) and causal denominator eps (1e-6) set to 0."""
    import performer_pytorch.performer_pytorch as pp

    kernel, fn = pp.softmax_kernel, fast.__dict__.get("causal_linear_fn")
    pp.softmax_kernel = lambda *a, **kw: kernel(*a, **{**kw, "eps": 0.0})
    if fast.causal:
        fast.causal_linear_fn = lambda q, k, v: pp.causal_linear_attention_noncuda(q, k, v, eps=0.0)
    try:
        yield
    finally:
        pp.softmax_kernel = kernel
        if fast.causal:
            fast.causal_linear_fn = fn


def _performer_case(case, *, causal, seed):
    from performer_pytorch import FastAttention

    torch.manual_seed(seed)
    b, h, n, d, m = 2, 2, 12, 4, 8
    fast = FastAttention(dim_heads=d, nb_features=m, causal=causal, generalized_attention=False).to(DT)
    q, k, v = (leaf(torch.randn(b, h, n, d, dtype=DT) * 0.5) for _ in range(3))
    out = fast(q, k, v)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    grads = autograd(out, {"q": q, "k": k, "v": v}, dout)
    inputs = {"q": t2n(q), "k": t2n(k), "v": t2n(v)}
    config = {"causal": causal, "kernel": "positive", "chunk": 4}
    array_config = {"features": t2n(fast.projection_matrix)}
    with _performer_without_eps(fast):                            # how much of the gap is the epsilons
        out0 = fast(q, k, v)
        grads0 = autograd(out0, {"q": q, "k": k, "v": v}, dout)
    rounding, _, _ = effattn_diffs("performer", inputs, {**config, **array_config}, t2n(out0), dout, grads0)
    report(f"(performer {case}, peer with eps = 0)", rounding)
    diffs, _, _ = effattn_diffs("performer", inputs, {**config, **array_config}, t2n(out), dout, grads)
    atol_out = measured_tolerance(diffs["out"])
    atol_grad = measured_tolerance(max(diffs[n] for n in ("q", "k", "v")))
    eps_text = ("1e-4 to every random feature (after its max-shift) and 1e-6 to every entry of the running key sum "
                "in the denominator" if causal else "1e-4 to every random feature (after its max-shift)")
    note = (f"FastAttention(dim_heads={d}, nb_features={m}, causal={causal}) -> features = projection_matrix "
            f"({m}, {d}), kernel='positive'; q, k, v ~ 0.5 N(0, 1) fed directly. The peer adds {eps_text}; effattn "
            f"has no such epsilon. Measured here: max |out diff| {diffs['out']:.1e}, max |grad diff| "
            f"{max(diffs[n] for n in ('q', 'k', 'v')):.1e}; with the peer's epsilons patched to 0 the differences "
            f"are {rounding['out']:.0e} / {max(rounding[n] for n in ('q', 'k', 'v')):.0e} (rounding), so the "
            "tolerance (1.5 x the measured gap) is the epsilons' effect at this size.")
    path, _ = write(f"performer__{PEER}_performer_pytorch__{case}", mechanism="performer",
                    peer="performer_pytorch.FastAttention", peer_version=version("performer-pytorch"), case=case,
                    config=config, array_config=array_config, inputs=inputs, out=t2n(out), dout=dout, grads=grads,
                    atol_out=atol_out, atol_grad=atol_grad, note=note)
    return path


def performer_fixtures():
    return [_performer_case("noncausal", causal=False, seed=10), _performer_case("causal", causal=True, seed=11)]


# --------------------------------------------------------------------------- sinkhorn
BUGGY_VALUES = "b_v_r = b_k_r.reshape(bh, buckets, -1, d_h)"


def _patched_sinkhorn_attention():
    """SinkhornAttention with its non-SortCut value bug fixed (``b_v_r = b_k_r...`` -> ``b_v_r = b_v_r...``),
    compiled from the installed peer's own source (nothing of the peer is copied into this file)."""
    import sinkhorn_transformer.sinkhorn_transformer as st

    src = textwrap.dedent(inspect.getsource(st.SinkhornAttention.forward))
    if BUGGY_VALUES not in src:
        raise RuntimeError("sinkhorn_transformer changed: the sorted-values line to patch is not there")
    namespace = {}
    exec(compile(src.replace(BUGGY_VALUES, "b_v_r = b_v_r.reshape(bh, buckets, -1, d_h)"), st.__file__, "exec"),
         vars(st), namespace)
    return type("SinkhornAttentionValuesFixed", (st.SinkhornAttention,), {"forward": namespace["forward"]})


@contextlib.contextmanager
def _paper_gumbel_sinkhorn(noise):
    """The peer's ``gumbel_sinkhorn`` with the paper's logits: log_alpha = (R + noise) / tau, not
    (log(R + 1e-6) + noise) / tau; the peer's own ``sinkhorn_sorting_operator`` does the balancing."""
    import sinkhorn_transformer.sinkhorn_transformer as st

    original = st.gumbel_sinkhorn
    st.gumbel_sinkhorn = lambda r, n_iters=8, temperature=0.7: st.sinkhorn_sorting_operator(
        (r + noise) / temperature, n_iters)
    try:
        yield
    finally:
        st.gumbel_sinkhorn = original


def _sinkhorn_case(case, *, bucket, kv_bucket, sortcut, seed):
    import sinkhorn_transformer.sinkhorn_transformer as st

    torch.manual_seed(seed)
    b, h, n, d, iters, tau = 2, 2, 16, 4, 7, 0.75
    nb = n // kv_bucket
    attn = _patched_sinkhorn_attention()(bucket_size=bucket, dim=h * d, dim_heads=d, heads=h, max_seq_len=n,
                                         temperature=tau, non_permutative=False, sinkhorn_iter=iters,
                                         n_sortcut=sortcut, dropout=0.0, kv_bucket_size=kv_bucket,
                                         use_simple_sort_net=True).to(DT).eval()
    w_k = torch.randn(d, nb, dtype=DT) * 2.0                     # peaked R: P is not yet balanced after 7 iterations
    with torch.no_grad():                                         # q half zero, k half shared by the heads
        attn.sort_net.linear.zero_()
        attn.sort_net.linear[0, :, d:, :] = w_k
    q, k, v = (leaf(torch.randn(b, h, n, d, dtype=DT)) for _ in range(3))
    noise = st.sample_gumbel((b * h, nb, nb), "cpu", DT)          # the peer's own Gumbel draw
    with _paper_gumbel_sinkhorn(noise):
        out = attn(q, k, v)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    g = autograd(out, {"q": q, "k": k, "v": v, "W": attn.sort_net.linear}, dout)
    inputs = {"q": t2n(q), "k": t2n(k), "v": t2n(v), "W1": t2n(w_k), "b1": np.zeros(nb),
              "W2": np.eye(nb), "b2": np.zeros(nb)}
    grads = {"q": g["q"], "k": g["k"], "v": g["v"], "W1": g["W"][0, :, d:, :].sum(axis=0)}
    config = {"block": kv_bucket, "n_iters": iters, "tau": tau, "sortcut": sortcut or None}
    array_config = {"gumbel": t2n(noise).reshape(b, h, nb, nb)}
    shape = (f"SortCut: n_sortcut={sortcut}, kv_bucket_size={kv_bucket} (= block), bucket_size={bucket} (query "
             "buckets differ from kv buckets, so the peer adds no own bucket, as effattn's sortcut)" if sortcut
             else f"bucket_size={bucket} (= block): one softmax over the sorted and the own bucket")
    note = (f"SinkhornAttention(use_simple_sort_net=True, non_permutative=False, sinkhorn_iter={iters}, temperature="
            f"{tau}), {shape}. SimpleSortNet R = ReLU([sum q; sum k] W) with W's q half 0 and its k half shared by "
            "the heads = effattn's SortNet W1 = k half, b1 = 0, W2 = I, b2 = 0 (grad W1 = the heads' sum). Peer "
            "patched: gumbel_sinkhorn uses the paper's logits (R + g) / tau instead of (log(R + 1e-6) + g) / tau, "
            + ("" if sortcut else "its sorted values are the sorted values (the release uses the sorted keys: "
               "b_v_r = b_k_r...), ")
            + "its sample_gumbel draw is effattn's gumbel. W's k half ~ 2 N(0, 1): P's rows are far from "
            + "balanced after 7 iterations (row sums 0.5-2), so a slot bias of log(row sum) would show.")
    path, _ = write(f"sinkhorn__{PEER}_sinkhorn_transformer__{case}", mechanism="sinkhorn",
                    peer="sinkhorn_transformer.SinkhornAttention", peer_version=version("sinkhorn-transformer"),
                    case=case, config=config, array_config=array_config, inputs=inputs, out=t2n(out), dout=dout,
                    grads=grads, note=note)
    return path


def sinkhorn_unpatched_gaps():
    """How far the released peer (log of the SortNet scores; sorted keys as values) is from the
    patched one on the ``sorted_own`` configuration (printed only)."""
    import sinkhorn_transformer.sinkhorn_transformer as st

    def run(cls, paper_logits):
        torch.manual_seed(20)
        attn = cls(bucket_size=4, dim=8, dim_heads=4, heads=2, max_seq_len=16, temperature=0.75,
                   non_permutative=False, sinkhorn_iter=7, use_simple_sort_net=True).to(DT).eval()
        w_k = torch.randn(4, 4, dtype=DT) * 2.0
        with torch.no_grad():
            attn.sort_net.linear.zero_()
            attn.sort_net.linear[0, :, 4:, :] = w_k
        q, k, v = (torch.randn(2, 2, 16, 4, dtype=DT) for _ in range(3))
        noise = st.sample_gumbel((4, 4, 4), "cpu", DT)
        if paper_logits:
            with _paper_gumbel_sinkhorn(noise):
                return t2n(attn(q, k, v))
        original = st.sample_gumbel
        st.sample_gumbel = lambda *a, **kw: noise
        try:
            return t2n(attn(q, k, v))
        finally:
            st.sample_gumbel = original

    fixed = run(_patched_sinkhorn_attention(), True)
    print(f"  (sinkhorn: released sorted values (= sorted keys) vs fixed: max |out diff| "
          f"{np.abs(run(st.SinkhornAttention, True) - fixed).max():.1e}; log(R + 1e-6) logits vs the paper's: "
          f"{np.abs(run(_patched_sinkhorn_attention(), False) - fixed).max():.1e})")


def sinkhorn_fixtures():
    return [_sinkhorn_case("sorted_own", bucket=4, kv_bucket=4, sortcut=0, seed=20),
            _sinkhorn_case("sortcut", bucket=8, kv_bucket=4, sortcut=2, seed=21)]


# --------------------------------------------------------------------------- driver
def generate():
    paths = []
    paths += nystromformer_fixtures()
    nystrom_batch_max_gap()
    paths += performer_fixtures()
    paths += sinkhorn_fixtures()
    sinkhorn_unpatched_gaps()
    return paths
