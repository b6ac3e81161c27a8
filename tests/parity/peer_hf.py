"""Parity fixtures against HuggingFace transformers: Longformer, BigBird, Reformer (LSH and local).

Peers (float64, dropout 0, fixed seeds; each peer's own q/k/v projections, fed back into its
attention as leaf tensors so that autograd gives d/dq, d/dk, d/dv):

- ``LongformerSelfAttention`` -> effattn ``longformer``: ``w = attention_window // 2``; the peer's
  ``query_global``/``key_global``/``value_global`` -> ``q_global, k_global, v_global``; its
  ``global_attention_mask`` -> ``global_positions``; its ``attention_mask`` -> ``key_mask``.
  N is padded to a multiple of ``attention_window`` as ``LongformerModel._pad_to_window_size``
  does (padding masked, sliced off after). Cases ``band`` (N = 13, window 4, batch 2),
  ``global`` (batch 1, globals 0 and 7, separate projections), ``padding`` (key mask, batch 2) and
  ``global_padding``. The peer's softmax runs in float32 (``dtype=torch.float32``), hence the
  tolerance 1e-6 (with the cast lifted to float64 the difference is below 5e-16).
- ``BigBirdBlockSparseAttention`` (train mode, so it draws its random blocks) -> effattn
  ``bigbird``: its ``rand_attn`` (H, n_b - 2, r), captured from
  ``_bigbird_block_rand_mask_with_head``, -> ``from_huggingface`` -> ``random_blocks`` (H, n_b, r)
  and ``global_blocks = (0, n_b - 1)``. Cases ``r1`` (n_b 10), ``r2`` (n_b 12), ``r3`` (n_b 16),
  ``padding`` (N = 21 with block 2, padded by the peer's rule, and a key mask).
- ``LSHSelfAttention`` -> effattn ``reformer``: its rotations (H, d, R, b/2), drawn by
  ``torch.randn`` after ``torch.manual_seed(hash_seed)``, -> ``rotations`` (H, R, d, b/2);
  ``chunk_size = lsh_attn_chunk_length``, ``chunks_before/after = lsh_num_chunks_before/after``,
  ``dedupe=False`` (the peer has no duplicate correction), ``chunking="sorted"``, shared QK
  (q = k = the peer's ``query_key`` projection; effattn's default key normalisation
  ``norm_eps=1e-6`` and unit scale are the peer's ``_len_and_dim_norm``; its self mask value
  -1e5 has the same effect as ``self_penalty=1e5``). The peer's chunk windows wrap around (chunk 0
  of a round sees the last chunk of the round before); effattn's do not. Cases ``r1_nowrap``
  (1 round, ``chunks_before=0``), ``r3_causal_nowrap``, ``r1_causal_padding`` and ``r3_padding``
  (one chunk of padding per batch element: the padding bucket fills the last chunk of every
  round, so the wrap only reaches masked keys; causal, the masked queries are late enough to see
  a real key: a masked query that sees none gets its own value from the peer, whose self logit
  -1e5 beats its mask -1e9, and 0 from effattn), and no fixture of the peer's defaults without padding, which
  expose the wrap (1.38 measured at 3 causal rounds: effattn has no circular chunk window).
- ``LocalSelfAttention`` (of Reformer) -> effattn ``local``: ``block = local_attn_chunk_length``,
  ``look_back = local_num_chunks_before``, ``look_ahead = local_num_chunks_after``. Its windows
  wrap around too (reaching only the future, so causal cases are exact). Cases ``causal``,
  ``causal_lookback2_padding`` and ``noncausal_padding`` (look back and ahead 1, the first and last
  chunk all padding, so the wrap only reaches masked keys).

Longformer and BigBird zero the output rows of masked queries (``is_index_masked``; ``* from_mask``);
effattn attends from a masked query like from any other. Their ``padding`` and ``global_padding``
cases therefore compare the real rows only (the fixture's ``rows``; dout is 0 on the masked
rows, so the gradients agree).

The gradient of the shared q = k of LSH attention is split by running the peer twice: once with
its key path detached (``_len_and_dim_norm`` of a detached input: d/dq) and once with its query
path detached (``_attend`` with a detached query: d/dk); their sum is checked against the peer's
undetached gradient.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /work/peers/bin/python
tests/parity/generate.py hf``. Each case prints max |effattn - peer| of out and of every gradient.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers
from torch import nn
from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
from transformers.models.reformer.modeling_reformer import LocalSelfAttention, LSHSelfAttention

from effattn.attention.bigbird import from_huggingface

import torch_tools
from torch_tools import DT, Given, autograd, effattn_diffs, heads_to_seq, leaf, seq_to_heads, t2n

H, D_HEAD = 2, 4
HIDDEN = H * D_HEAD


# --------------------------------------------------------------------------- helpers of these peers
@contextlib.contextmanager
def patched(module, **replacements):
    """Temporarily replace attributes (submodules or methods) of one peer module instance."""
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield module
    finally:
        for name, value in saved.items():
            if isinstance(value, nn.Module):
                setattr(module, name, value)
            else:
                delattr(module, name)           # a bound method: drop the instance override


def project(linear, x):
    """The peer's own projection of hidden states x (B, N, D), in effattn's layout (B, H, N, d)."""
    with torch.no_grad():
        return t2n(seq_to_heads(linear(x), H))


def hidden(rng, b, n):
    return torch.as_tensor(rng.standard_normal((b, n, HIDDEN)), dtype=DT)


def write(case, *, mechanism, peer, package, **fixture):
    """torch_tools.write as <mechanism>__hf_<package>__<case>, peer ``transformers.<peer>``."""
    return torch_tools.write(f"{mechanism}__hf_{package}__{case}", mechanism=mechanism, peer=f"transformers.{peer}",
                             peer_version=transformers.__version__, case=case, **fixture)


def upstream(rng, shape, real=None):
    """A random dout; zero at the rows of masked queries when ``real`` (B, N) bool is given (the
    peers that zero those rows' outputs pass no gradient through them)."""
    dout = rng.standard_normal(shape)
    if real is not None:
        dout = dout * real[:, None, :, None]
    return dout


# --------------------------------------------------------------------------- Longformer
LONGFORMER_NOTE = (
    "LongformerSelfAttention with attention_window = 2w; hidden states padded to a multiple of the "
    "window with masked rows (LongformerModel._pad_to_window_size), output sliced to N, before the "
    "output projection; q, k, v (and q_global, k_global, v_global) are the peer's query/key/value "
    "(query_global/...) projections fed back as leaves. The peer's softmax is computed in float32 "
    "(dtype=torch.float32), so out and grads agree to float32 rounding only (max 1.2e-7 here, atol 1e-6; "
    "with that cast lifted to float64 the difference is below 5e-16).")


def longformer_case(rng, case, *, b, n, window, gpos=(), real=None, seed):
    """One LongformerSelfAttention fixture. gpos: global positions (batch 1); real (B, N) bool or None."""
    torch.manual_seed(seed)
    cfg = transformers.LongformerConfig(hidden_size=HIDDEN, num_attention_heads=H, attention_window=[window],
                                        attention_probs_dropout_prob=0.0, num_hidden_layers=1)
    att = LongformerSelfAttention(cfg, layer_id=0).double().eval()
    npad = -(-n // window) * window
    x = hidden(rng, b, n)
    xpad = torch.cat([x, torch.zeros(b, npad - n, HIDDEN, dtype=DT)], dim=1)   # the pad rows (masked)
    names = ("query", "key", "value") + (("query_global", "key_global", "value_global") if gpos else ())
    inputs = {nm: project(getattr(att, nm), x) for nm in names}
    pads = {nm: getattr(att, nm)(xpad[:, n:]).detach() for nm in names}       # (B, Np - N, D)
    leaves = {nm: leaf(a) for nm, a in inputs.items()}

    def seq_first(nm):          # the peer's layout (Np, B, D), with our leaf rows and its pad rows
        return torch.cat([heads_to_seq(leaves[nm]), pads[nm]], dim=1).transpose(0, 1)

    # the extended attention mask LongformerModel passes down: min (masked), 0 (local), max (global)
    mask = torch.zeros(b, npad, dtype=DT)
    realpad = np.zeros((b, npad), bool)
    realpad[:, :n] = True if real is None else real
    mask[torch.as_tensor(~realpad)] = torch.finfo(DT).min
    mask[:, list(gpos)] = torch.finfo(DT).max
    reps = {nm: Given(lambda _x, nm=nm: seq_first(nm)) for nm in ("query", "key", "value", "key_global",
                                                                   "value_global") if nm in leaves}
    if gpos:                    # query_global sees only the global rows, in order
        reps["query_global"] = Given(lambda _x: seq_first("query_global")[list(gpos)])
    with patched(att, **reps):
        out = att(xpad, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=bool(gpos))[0][:, :n]
    out = seq_to_heads(out, H)
    dout = upstream(rng, out.shape, real)
    grads = autograd(out, leaves, dout)
    rename = {"query": "q", "key": "k", "value": "v", "query_global": "q_global", "key_global": "k_global",
              "value_global": "v_global"}
    inputs = {rename[k]: v for k, v in inputs.items()}
    grads = {rename[k]: v for k, v in grads.items()}
    config = {"w": window // 2}
    if gpos:
        config["global_positions"] = list(gpos)
    array_config = {} if real is None else {"key_mask": real[:, None, :]}
    note = LONGFORMER_NOTE
    if real is not None:
        note += (" The peer zeroes the output rows of masked queries (is_index_masked -> attn_probs 0), effattn "
                 "attends from them as from any query: only the real rows are compared (rows), and dout is 0 on "
                 "the masked ones, so the gradients agree.")
    return write(case, mechanism="longformer", peer="LongformerSelfAttention", package="longformer",
                 inputs=inputs, config=config, array_config=array_config, out=t2n(out), dout=dout, grads=grads,
                 note=note, atol_out=1e-6, atol_grad=1e-6, rows=None if real is None else real[:, None, :])[0]


def longformer_fixtures(rng):
    # key masks where every masked query still has a real key in its band: the peer's float32 softmax of
    # a row of float64-min logits is NaN, and its backward spreads the NaN to the leaves (float64 only)
    real = np.ones((2, 16), bool)
    real[0, :2] = real[1, [5, 6, 14, 15]] = False
    real_g = np.ones((1, 14), bool)
    real_g[0, 10:12] = False
    return [longformer_case(rng, "band", b=2, n=13, window=4, seed=1),
            longformer_case(rng, "global", b=1, n=14, window=4, gpos=(0, 7), seed=2),
            longformer_case(rng, "padding", b=2, n=16, window=4, real=real, seed=3),
            longformer_case(rng, "global_padding", b=1, n=14, window=4, gpos=(0, 7), real=real_g, seed=4)]


# --------------------------------------------------------------------------- BigBird
def _check_hf_random_blocks(rand_attn, nb):
    """HF's random blocks avoid the window, the two global blocks and repeats (so its concatenated
    key list, where a repeated block would count twice, is effattn's union)."""
    for h in range(rand_attn.shape[0]):
        for row, blocks in enumerate(rand_attn[h]):
            c = row + 1
            bad = [j for j in blocks if abs(int(j) - c) <= 1 or j in (0, nb - 1)]
            assert not bad and len(set(blocks.tolist())) == len(blocks), (c, blocks)


def bigbird_case(rng, case, *, b, block, n, r, real=None, seed):
    torch.manual_seed(seed)
    cfg = transformers.BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=H, block_size=block,
                                     num_random_blocks=r, attention_type="block_sparse", use_bias=True,
                                     attention_probs_dropout_prob=0.0)
    att = BigBirdBlockSparseAttention(cfg, seed=seed).double().train()    # train: the random blocks are drawn
    nb = -(-n // block)
    npad = nb * block
    x = hidden(rng, b, n)
    xpad = torch.cat([x, torch.zeros(b, npad - n, HIDDEN, dtype=DT)], dim=1)
    names = ("query", "key", "value")
    inputs = {nm: project(getattr(att, nm), x) for nm in names}
    pads = {nm: getattr(att, nm)(xpad[:, n:]).detach() for nm in names}
    leaves = {nm: leaf(a) for nm, a in inputs.items()}
    realpad = np.zeros((b, npad), bool)
    realpad[:, :n] = True if real is None else real
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.as_tensor(realpad, dtype=DT), block)

    drawn = []
    draw = att._bigbird_block_rand_mask_with_head

    def capture(*args, **kwargs):             # record the peer's own random draw
        out = draw(*args, **kwargs)
        drawn.append(np.stack(out).astype(np.int64))
        return out

    reps = {nm: Given(lambda _x, nm=nm: torch.cat([heads_to_seq(leaves[nm]), pads[nm]], dim=1)) for nm in names}
    with patched(att, _bigbird_block_rand_mask_with_head=capture, **reps):
        out = att(xpad, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                  to_blocked_mask=blocked)[0][:, :n]
    rand_attn = drawn[0]                                                   # (H, n_b - 2, r)
    _check_hf_random_blocks(rand_attn, nb)
    random_blocks, global_blocks = from_huggingface(rand_attn, nb)
    out = seq_to_heads(out, H)
    dout = upstream(rng, out.shape, real)
    grads = autograd(out, leaves, dout)
    inputs = {"q": inputs["query"], "k": inputs["key"], "v": inputs["value"]}
    grads = {"q": grads["query"], "k": grads["key"], "v": grads["value"]}
    config = {"block": block, "global_blocks": list(global_blocks)}
    array_config = {"random_blocks": random_blocks}
    if real is not None:
        array_config["key_mask"] = real[:, None, :]
    note = ("BigBirdBlockSparseAttention in train mode (np.random.seed(seed) then its own draw); its rand_attn "
            "(H, n_b - 2, r) -> from_huggingface -> random_blocks (H, n_b, r), global_blocks (0, n_b - 1); "
            "no drawn block repeats or falls in the window or a global block, so the peer's concatenated key "
            "list is effattn's union. q, k, v: the peer's projections fed back as leaves; out before the "
            "output projection; N padded to a multiple of block as BigBirdModel._pad_to_block_size does.")
    if real is not None:
        note += (" The peer multiplies the output by from_mask, zeroing the rows of masked queries, effattn "
                 "attends from them as from any query: only the real rows are compared (rows), and dout is 0 on "
                 "the masked ones, so the gradients agree.")
    return write(case, mechanism="bigbird", peer="BigBirdBlockSparseAttention", package="big_bird", inputs=inputs,
                 config=config, array_config=array_config, out=t2n(out), dout=dout, grads=grads, note=note,
                 rows=None if real is None else real[:, None, :])[0]


def bigbird_fixtures(rng):
    real = np.ones((2, 21), bool)
    real[0, 17:] = False
    real[1, 9:12] = False
    return [bigbird_case(rng, "r1", b=2, block=2, n=20, r=1, seed=0),
            bigbird_case(rng, "r2", b=1, block=2, n=24, r=2, seed=1),
            bigbird_case(rng, "r3", b=1, block=2, n=32, r=3, seed=2),
            bigbird_case(rng, "padding", b=2, block=2, n=21, r=2, real=real, seed=3)]


# --------------------------------------------------------------------------- Reformer: LSH
def reformer_config(**kw):
    base = dict(hidden_size=HIDDEN, num_attention_heads=H, attention_head_size=D_HEAD,
                lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                max_position_embeddings=64)
    return transformers.ReformerConfig(**dict(base, **kw))


def lsh_run(att, x, qk, v, mask, path):
    """One forward of the peer on fresh leaves; path "both", "query" (key path detached) or "key"
    (query path detached). Returns out (B, H, N, d), the peer's buckets, the leaves."""
    leaves = {"qk": leaf(qk), "v": leaf(v)}
    reps = {"query_key": Given(lambda _x: heads_to_seq(leaves["qk"])),
            "value": Given(lambda _x: heads_to_seq(leaves["v"]))}
    if path == "query":
        norm = att._len_and_dim_norm
        reps["_len_and_dim_norm"] = lambda vectors, sqrt_num: norm(vectors.detach(), sqrt_num)
    elif path == "key":
        attend = att._attend
        reps["_attend"] = lambda query_vectors, **kw: attend(query_vectors=query_vectors.detach(), **kw)
    with patched(att, **reps):
        res = att(x, attention_mask=mask)
    return seq_to_heads(res.hidden_states, H), res.buckets, leaves


def lsh_case(rng, case, *, b, n, rounds, causal, before, after=0, chunk=4, n_buckets=4, real=None, seed, wrap_note=""):
    torch.manual_seed(seed)
    cfg = reformer_config(attn_layers=["lsh"], lsh_attn_chunk_length=chunk, num_buckets=n_buckets, num_hashes=rounds,
                          lsh_num_chunks_before=before, lsh_num_chunks_after=after, is_decoder=causal, hash_seed=seed)
    att = LSHSelfAttention(cfg, layer_idx=0).double().eval()
    x = hidden(rng, b, n)
    qk, v = project(att.query_key, x), project(att.value, x)
    mask = None if real is None else torch.as_tensor(real, dtype=torch.long)
    dout = rng.standard_normal((b, H, n, D_HEAD))
    out, buckets, leaves = lsh_run(att, x, qk, v, mask, "both")
    total = autograd(out, leaves, dout)
    out_q, _, leaves_q = lsh_run(att, x, qk, v, mask, "query")
    out_k, _, leaves_k = lsh_run(att, x, qk, v, mask, "key")
    dq, dk = autograd(out_q, leaves_q, dout)["qk"], autograd(out_k, leaves_k, dout)["qk"]
    assert np.abs(dq + dk - total["qk"]).max() < 1e-12 and np.abs(t2n(out_q) - t2n(out)).max() == 0
    grads = {"q": dq, "k": dk, "v": total["v"]}
    # the peer's rotations: the same draw as its _hash_vectors (torch.manual_seed(hash_seed); randn)
    torch.manual_seed(seed)
    rot = t2n(torch.randn((H, D_HEAD, rounds, n_buckets // 2), dtype=DT)).transpose(0, 2, 1, 3)   # (H, R, d, b/2)
    config = {"causal": causal, "chunk_size": chunk, "chunks_before": before, "chunks_after": after,
              "dedupe": False, "chunking": "sorted"}
    array_config = {"rotations": np.ascontiguousarray(rot)}
    if real is not None:
        array_config["key_mask"] = real[:, None, :]
    inputs = {"q": qk, "k": qk, "v": v}
    _, _, cache = effattn_diffs("reformer", inputs, dict(config, **array_config), t2n(out), dout, grads)
    hf_buckets = t2n(buckets) - (np.arange(rounds) * (n_buckets + (real is not None and not real.all())))[:, None]
    assert (hf_buckets == np.asarray(cache.buckets)).all(), "the rotations are not the peer's"
    note = ("LSHSelfAttention (shared QK: q = k = its query_key projection, v its value projection, fed back as "
            "leaves; out before the output projection). Its rotations (H, d, R, b/2), redrawn with its hash_seed, "
            "are effattn's (H, R, d, b/2) after transpose(0, 2, 1, 3) (the buckets are checked equal). dedupe=False "
            "and chunking='sorted' as the peer; its key normalisation and unit scale are effattn's defaults; its "
            "self mask (logit replaced by -1e5) and effattn's self_penalty 1e5 both give the self key weight 0 "
            "unless it is alone. grad q: the peer with its key path detached; grad k: with its query path "
            "detached (their sum is its gradient of the shared projection).") + wrap_note
    return write(case, mechanism="reformer", peer="LSHSelfAttention", package="reformer", inputs=inputs,
                 config=config, array_config=array_config, out=t2n(out), dout=dout, grads=grads, note=note)[0]


def reformer_lsh_fixtures(rng):
    pad = np.ones((2, 16), bool)
    pad[0, 12:] = False                        # exactly one chunk (4) of padding per sequence: the padding
    pad[1, [1, 6, 7, 13]] = False              # bucket is the last chunk of every round
    late = pad.copy()                          # causal: masked queries late enough to see a real key
    late[1] = True
    late[1, [9, 11, 14, 15]] = False
    no_wrap = (" chunks_before = chunks_after = 0: no neighbouring chunk, so the peer's circular chunk "
               "windows do not matter.")
    padded = (" One chunk of padding per sequence: the padding bucket fills the last chunk of every round, "
              "so the peer's wrap-around (chunk 0 sees the last chunk of the round before) only reaches "
              "masked keys.")
    return [lsh_case(rng, "r1_nowrap", b=2, n=16, rounds=1, causal=False, before=0, seed=10, wrap_note=no_wrap),
            lsh_case(rng, "r3_causal_nowrap", b=1, n=16, rounds=3, causal=True, before=0, seed=11, wrap_note=no_wrap),
            lsh_case(rng, "r1_causal_padding", b=2, n=16, rounds=1, causal=True, before=1, real=late, seed=12,
                     wrap_note=padded),
            lsh_case(rng, "r3_padding", b=2, n=16, rounds=3, causal=False, before=1, real=pad, seed=13,
                     wrap_note=padded)]
    # Not a fixture: the peer's defaults (chunks_before=1) without padding, where its circular chunk windows
    # differ from effattn's (1.38 measured at 3 causal rounds, 0.40 at one non-causal round): ``wrap``.


# --------------------------------------------------------------------------- Reformer: local
def local_case(rng, case, *, b, n, chunk, before, after, causal, real=None, seed):
    torch.manual_seed(seed)
    cfg = reformer_config(attn_layers=["local"], local_attn_chunk_length=chunk, local_num_chunks_before=before,
                          local_num_chunks_after=after, is_decoder=causal)
    att = LocalSelfAttention(cfg, layer_idx=0).double().eval()
    x = hidden(rng, b, n)
    names = ("query", "key", "value")
    inputs = {nm: project(getattr(att, nm), x) for nm in names}
    leaves = {nm: leaf(a) for nm, a in inputs.items()}
    reps = {nm: Given(lambda _x, nm=nm: heads_to_seq(leaves[nm])) for nm in names}
    mask = None if real is None else torch.as_tensor(real, dtype=torch.long)
    with patched(att, **reps):
        out = seq_to_heads(att(x, attention_mask=mask).hidden_states, H)
    dout = upstream(rng, out.shape)
    grads = autograd(out, leaves, dout)
    inputs = {"q": inputs["query"], "k": inputs["key"], "v": inputs["value"]}
    grads = {"q": grads["query"], "k": grads["key"], "v": grads["value"]}
    config = {"causal": causal, "block": chunk, "look_back": before, "look_ahead": after}
    array_config = {} if real is None else {"key_mask": real[:, None, :]}
    note = ("Reformer's LocalSelfAttention: block = local_attn_chunk_length, look_back = local_num_chunks_before, "
            "look_ahead = local_num_chunks_after; q, k, v its projections fed back as leaves (it divides k by "
            "sqrt(d), effattn scales the logits: the same up to rounding); out before the output projection. "
            "Its chunk windows wrap around (chunk 0 looks back at the last chunk): ")
    note += ("causal, so the wrapped keys are in the future and masked." if causal else
             "here the first and last chunks are all padding, so the wrap only reaches masked keys.")
    return write(case, mechanism="local", peer="LocalSelfAttention", package="reformer", inputs=inputs,
                 config=config, array_config=array_config, out=t2n(out), dout=dout, grads=grads, note=note)[0]


def reformer_local_fixtures(rng):
    pad_tail = np.ones((2, 16), bool)
    pad_tail[1, 13:] = False
    pad_ends = np.ones((1, 24), bool)
    pad_ends[0, :4] = pad_ends[0, 20:] = False
    return [local_case(rng, "causal", b=2, n=16, chunk=4, before=1, after=0, causal=True, seed=20),
            local_case(rng, "causal_lookback2_padding", b=2, n=16, chunk=4, before=2, after=0, causal=True,
                       real=pad_tail, seed=21),
            local_case(rng, "noncausal_padding", b=1, n=24, chunk=4, before=1, after=1, causal=False, real=pad_ends,
                       seed=22)]


# --------------------------------------------------------------------------- driver
def generate():
    rng = np.random.default_rng(2024)
    paths = []
    paths += longformer_fixtures(rng)
    paths += bigbird_fixtures(rng)
    paths += reformer_lsh_fixtures(rng)
    paths += reformer_local_fixtures(rng)
    return paths
