"""effattn against the PyTorch peers, side by side in one process (issue 19).

Run: ``python -m effattn bench --peers [OPTIONS]`` (or ``python benchmarks/peers.py [OPTIONS]``) with torch
and the peers installed (they are development tools, never dependencies of effattn)::

    pip install torch==2.13.0 local-attention reformer-pytorch routing-transformer performer-pytorch \
        sinkhorn-transformer            # and, optionally, pytorch-fast-transformers (built from source)

Protocol, the same for every row: forward + backward (effattn's ``spec.forward`` then ``spec.backward``; the
peer's forward then ``torch.autograd.grad`` of the output against a fixed random ``dout``), float32 on the CPU,
B = 1, H = 4, d = 64, ``--threads`` (2) threads on each side (``torch.set_num_threads`` and
``effattn.backend.set_blas_threads``), one untimed warm-up of each side, then ``--repeats`` (5) runs
interleaved (effattn, peer, effattn, peer, ...), each timed with ``time.perf_counter`` (wall clock), and the
median of each side kept. ``ratio`` = effattn time / peer time: below 1, effattn is faster. Both sides get the
same q, k, v and dout (the peer a copy in its own layout); random draws inside a mechanism (rotations, features,
Gumbel noise) differ, so the outputs are not equal, but the shapes, the sizes and the work correspond row by
row as listed here. The CSV (``--out``, default ``figures/peers.csv``) has one line per row; ``python -m
effattn readme`` turns it into the README's "Measured against the PyTorch peers".

Rows (mechanism, setting: effattn configuration = peer configuration; what differs):

- ``full`` ``noncausal`` / ``causal``, N = 1024, 2048, 4096: effattn ``full`` (``causal=False/True``) =
  ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)`` (scale 1/sqrt(d) on both).
  Same math. effattn materialises the (N, N) weights per head and its backward re-reads them; torch's CPU SDPA
  dispatches to its fused flash-attention CPU kernel (blocked, online softmax, nothing of size N x N kept; the
  backward recomputes), and in the causal case it skips the masked blocks, effattn computes and masks them.
- ``local`` ``causal_b128_lb1``, N = 4096, 16384: effattn ``local(block=128, causal=True, look_back=1,
  look_ahead=0)`` = ``local_attention.LocalAttention(window_size=128, causal=True, look_backward=1,
  look_forward=0)`` (no ``dim``, so no rotary embedding; ``autopad=False``, ``exact_windowsize=False``, dropout
  0; the mapping of ``tests/parity/peer_lucidrains_a.py``). Each block of 128 queries against its own and the
  previous block (256 keys), masked causally, on both sides (the first block has no previous one; the peer
  pads it with masked keys).
- ``performer`` ``noncausal_m128`` / ``causal_m128``, N = 4096: effattn ``performer(features=(H, 128, d),
  kernel="positive", causal=...)`` = ``performer_pytorch.FastAttention(dim_heads=64, nb_features=128,
  causal=..., generalized_attention=False)`` (FAVOR+ positive softmax features, m = 128). effattn draws one
  orthogonal feature matrix per head, the peer one for all heads (same work). The peer adds 1e-4 to every
  feature (and 1e-6 in the causal denominator). Causal: effattn's prefix sums run in chunks of 128 (its
  ``chunk``, two matmuls per chunk and a carried (m, d) state); the peer, with no CUDA build of
  fast-transformers, runs ``causal_linear_attention_noncuda``: it splits N into 128 chunks (of N / 128 = 32
  rows) and materialises the per-row outer products and their cumulative sum, an (N, m, d) tensor per head,
  which autograd keeps for the backward. Same result, different algorithm: the peer's own CPU path.
- ``reformer`` ``r2_c32``, N = 4096, 16384: effattn ``reformer(rotations=(H, 2, d, N/64), chunk_size=32,
  dedupe=False, chunking="sorted", causal=False)`` with shared QK (q passed as q and k) =
  ``reformer_pytorch.LSHAttention(bucket_size=32, n_hashes=2, causal=False)`` on qk = q of shape (B H, N, d).
  The correspondence: the peer's ``bucket_size`` is its chunk length (it uses N / bucket_size buckets per
  round, sorts the (rounds x N) slots by bucket and cuts them into rounds x N / bucket_size chunks of
  bucket_size), so bucket_size = 32 is effattn's chunk_size = 32 with n_buckets = N / 32 (rotations of width
  N / 64): 2 rounds x N / 32 chunks, each of 32 queries against its own and the previous chunk (64 keys) on both
  sides, keys normalised, self logit suppressed, rounds combined by log-sum-exp. ``dedupe=False`` because the
  peer's default (``allow_duplicate_attention=True``) does not correct duplicates; effattn's own default
  (``dedupe=True``, the paper's exact form) does more work and is not this row. Differences: the peer wraps
  around (its first chunk sees the last, across rounds), effattn does not; the peer scales the logits by
  d^-1/2, effattn (shared QK, HF's convention) does not; the peer draws its rotations (one set for all heads)
  inside every forward, effattn gets per-head rotations drawn once. Checked by hand at N = 1024 (not in CI):
  given the peer's own rotations (its (1, d, 2, N/64) draw, transposed) and ``scale=d**-0.5``, effattn puts
  every token in the same buckets and the outputs agree to 2.4e-7 on every row outside the first chunk of a
  round (where the peer wraps around).
- ``routing`` ``c64_w64`` (N = 4096) and ``c128_w128`` (N = 16384): effattn ``routing(centroids=(H, c, d),
  window=N/c, selection="topk", causal=False)`` = ``routing_transformer.KmeansAttention(num_clusters=c,
  window_size=N/c, num_heads=4, head_dim=64, causal=False)`` in eval mode with its means set and marked
  initialised (no k-means init or update inside the timed runs). Both: similarities of the normalised q and k
  to the c means, the top-w queries and top-w keys of every cluster, a (w x w) attention per cluster, the
  outputs scattered back and averaged over the clusters a query joined. Differences: effattn layer-normalises
  q and k first (its routing definition; an O(N d) pass and its backward), the peer routes on the q, k it is
  given; the peer's ``scatter_mean`` divides by count + 1e-5.
- ``sinkhorn`` ``b64`` (N = 4096) and ``b128`` (N = 16384): effattn ``sinkhorn(block=b, n_iters=8, tau=0.75,
  sortcut=None, causal=False)`` = ``sinkhorn_transformer.SinkhornAttention(bucket_size=b, max_seq_len=N,
  dim_heads=64, heads=4, sinkhorn_iter=8, temperature=0.75, n_sortcut=0, non_permutative=False,
  use_simple_sort_net=True)`` (the mapping of ``tests/parity/peer_lucidrains_b.py``): N / b blocks, a
  SortNet score matrix (N_B x N_B), 8 Gumbel-Sinkhorn iterations, the soft-sorted keys and values P K, P V,
  each query block against its sorted block and its own (2 b keys). b = 64 / 128 (a power of two near
  sqrt(N), so N is a multiple of it, which the peer needs; effattn's default is round(sqrt(N / 2)) = 45 / 91).
  The peer's release sorts the keys twice and uses them as the sorted values (``b_v_r = b_k_r...``); as in the
  parity generator it is run with that line fixed (``b_v_r = b_v_r...``, compiled from the installed source), so
  that both sides compute and differentiate P V. SortNets differ in shape: effattn's is a 2-layer MLP (d -> d ->
  N_B) of the block sums of k, the peer's one linear layer (2d -> N_B) of the block sums of q and k (both
  negligible next to the attention). Each side draws its own Gumbel noise (the peer inside every forward).
- ``linear`` ``noncausal`` / ``causal``, N = 4096, only with ``pytorch-fast-transformers`` (it has no CPU
  wheel; it builds from source with a C++ compiler): effattn ``linear(causal=..., eps=1e-6)`` (elu + 1 features,
  causal prefix sums in chunks of 128) = ``fast_transformers.attention.LinearAttention(64, eps=1e-6)`` /
  ``CausalLinearAttention(64, eps=1e-6)`` (``FullMask`` / ``TriangularCausalMask``, all lengths N) on (B, N, H, d),
  its layout. The causal peer runs its C++ ``causal_product_cpu`` kernel. Without the package the rows are
  skipped with a note.

Checked by hand at N = 1024 (not in CI), same inputs on both sides: ``full`` (both), ``local`` and ``linear``
(both) agree to 1e-6 (float32 rounding); ``performer`` given the peer's projection matrix agrees to its 1e-4
feature epsilon (2.5e-4 non-causal, 2.8e-3 causal, q and k scaled by 0.3).

Machines here are shared and noisy: read the ratios (both sides saw the same machine at nearly the same time),
not the absolute times.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import importlib.metadata
import importlib.util
import inspect
import io
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                 # ``python benchmarks/peers.py`` from a clone, not installed
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import effattn  # noqa: E402
from effattn import backend  # noqa: E402
from effattn.tools.bench import PEERS_INSTALL  # noqa: E402

B, H, D = 1, 4, 64
DTYPE = "float32"
DEFAULT_OUT = ROOT / "figures" / "peers.csv"
COLUMNS = ["mechanism", "setting", "peer", "peer_version", "n", "effattn_s", "peer_s", "ratio", "date", "machine",
           "torch_version", "numpy_version", "repeats", "threads"]

# mechanism -> (pip name, import name) of its peer; full's peer is torch itself
PACKAGES = {
    "full": ("torch", "torch"),
    "local": ("local-attention", "local_attention"),
    "performer": ("performer-pytorch", "performer_pytorch"),
    "reformer": ("reformer-pytorch", "reformer_pytorch"),
    "routing": ("routing-transformer", "routing_transformer"),
    "sinkhorn": ("sinkhorn-transformer", "sinkhorn_transformer"),
    "linear": ("pytorch-fast-transformers", "fast_transformers"),
}
OPTIONAL = {"linear": "pytorch-fast-transformers has no wheel; it builds from source (a C++ compiler, the "
                      "installed torch: pip install --no-build-isolation pytorch-fast-transformers)"}


def _installed(module):
    """Whether ``module`` can be imported, without importing it (``None`` in sys.modules counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(mechanisms=None):
    """The pip names of the packages the chosen rows need that are not installed (torch first)."""
    need = ["full"] + list(mechanisms or PACKAGES)
    return list(dict.fromkeys(PACKAGES[m][0] for m in need if not _installed(PACKAGES[m][1])))


def _version(pip_name):
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine():
    """platform, CPU model (when /proc/cpuinfo says) and the CPU count."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return ", ".join(x for x in (platform.platform(), model, f"{os.cpu_count()} CPUs") if x)


# --------------------------------------------------------------------------- shared pieces
def _inputs(n, seed):
    """q, k, v (B, H, n, d) and dout, float32, N(0, 1), drawn on the host."""
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((B, H, n, D)).astype(DTYPE) for _ in range(4))
    return rng, q, k, v, dout


def _effattn(name, q, k, v, dout, **config):
    """effattn's forward + backward of ``name`` on q, k, v with ``config`` (arrays and sizes)."""
    spec = effattn.get(name)

    def run():
        out, cache = spec.forward(q, k, v, **config)
        spec.backward(dout, cache)

    return run


def _leaves(*arrays):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True) for a in arrays]


def _peer(fn, leaves, dout):
    """The peer's forward ``fn(*leaves)`` + ``torch.autograd.grad`` of every leaf against ``dout``."""
    import torch

    dout = torch.from_numpy(np.ascontiguousarray(dout))

    def run():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, dout)

    return run


@contextlib.contextmanager
def _quiet():
    """Silence what a peer prints at construction (performer-pytorch announces its non-CUDA fallback)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------- one function per row kind
def full_pair(n, causal):
    """effattn full vs torch.nn.functional.scaled_dot_product_attention (is_causal)."""
    import torch.nn.functional as F

    _, q, k, v, dout = _inputs(n, 1)
    mine = _effattn("full", q, k, v, dout, causal=causal)
    theirs = _peer(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), _leaves(q, k, v), dout)
    return mine, theirs


def local_pair(n, block=128, look_back=1):
    """effattn local (causal, block, look_back) vs local_attention.LocalAttention."""
    from local_attention import LocalAttention

    _, q, k, v, dout = _inputs(n, 2)
    mine = _effattn("local", q, k, v, dout, causal=True, block=block, look_back=look_back, look_ahead=0)
    peer = LocalAttention(window_size=block, causal=True, look_backward=look_back, look_forward=0, dropout=0.0).eval()
    return mine, _peer(peer, _leaves(q, k, v), dout)


def performer_pair(n, causal, m=128):
    """effattn performer (positive features, m) vs performer_pytorch.FastAttention."""
    from performer_pytorch import FastAttention

    from effattn.attention.performer import draw_features

    rng, q, k, v, dout = _inputs(n, 3)
    feats = draw_features(rng, m, D, heads=H).astype(DTYPE)
    mine = _effattn("performer", q, k, v, dout, features=feats, kernel="positive", causal=causal)
    with _quiet():
        peer = FastAttention(dim_heads=D, nb_features=m, causal=causal, generalized_attention=False).eval()
    return mine, _peer(peer, _leaves(q, k, v), dout)


def reformer_pair(n, chunk=32, rounds=2):
    """effattn reformer (shared QK, chunk, rounds, N / chunk buckets) vs reformer_pytorch.LSHAttention."""
    from reformer_pytorch.reformer_pytorch import LSHAttention

    from effattn.nn.lsh import draw_rotations

    rng, q, _, v, dout = _inputs(n, 4)
    rot = draw_rotations(rng, D, n // chunk, rounds, heads=H).astype(DTYPE)        # (H, R, d, N / (2 chunk))
    run_spec = _effattn("reformer", q, q, v, dout, rotations=rot, chunk_size=chunk, dedupe=False,
                        chunking="sorted", causal=False)
    peer = LSHAttention(bucket_size=chunk, n_hashes=rounds, causal=False, dropout=0.0).eval()
    qk, vv = _leaves(q.reshape(B * H, n, D), v.reshape(B * H, n, D))
    return run_spec, _peer(lambda a, b: peer(a, b)[0], [qk, vv], dout.reshape(B * H, n, D))


def routing_pair(n, clusters=None):
    """effattn routing (top-k, c clusters, window N / c) vs routing_transformer KmeansAttention."""
    import torch
    from routing_transformer.routing_transformer import KmeansAttention

    from effattn.attention.routing import draw_centroids

    c = clusters or round(math.sqrt(n))
    w = n // c
    rng, q, k, v, dout = _inputs(n, 5)
    mu = draw_centroids(rng, c, D, heads=H).astype(DTYPE)
    mine = _effattn("routing", q, k, v, dout, centroids=mu, window=w, selection="topk", causal=False)
    peer = KmeansAttention(c, w, H, D, causal=False, dropout=0.0).eval()
    with torch.no_grad():
        peer.kmeans.means.copy_(torch.from_numpy(mu))
        peer.kmeans.initted.copy_(torch.tensor(True))                  # no k-means init from the data
    return mine, _peer(lambda a, b, cc: peer(a, b, cc)[0], _leaves(q, k, v), dout)


BUGGY_VALUES = "b_v_r = b_k_r.reshape(bh, buckets, -1, d_h)"


def _sinkhorn_values_fixed():
    """sinkhorn_transformer's SinkhornAttention with its sorted values fixed (as tests/parity/peer_lucidrains_b.py
    does: compiled from the installed source); the released class, and False, if the line is not there."""
    import sinkhorn_transformer.sinkhorn_transformer as st

    src = textwrap.dedent(inspect.getsource(st.SinkhornAttention.forward))
    if BUGGY_VALUES not in src:
        return st.SinkhornAttention, False
    namespace = {}
    exec(compile(src.replace(BUGGY_VALUES, "b_v_r = b_v_r.reshape(bh, buckets, -1, d_h)"), st.__file__, "exec"),
         vars(st), namespace)
    return type("SinkhornAttentionValuesFixed", (st.SinkhornAttention,), {"forward": namespace["forward"]}), True


def sinkhorn_block(n):
    """A power of two near sqrt(N) (64 at 4096, 128 at 16384): N must be a multiple of the peer's bucket_size."""
    return 2 ** round(math.log2(math.sqrt(n)))


def sinkhorn_pair(n, block=None):
    """effattn sinkhorn (block b, 8 iterations, tau 0.75) vs sinkhorn_transformer.SinkhornAttention."""
    from effattn.attention.sinkhorn import draw_gumbel, init_sortnet

    b = block or sinkhorn_block(n)
    nb = n // b
    rng, q, k, v, dout = _inputs(n, 6)
    params = {key: np.asarray(a, dtype=DTYPE) for key, a in init_sortnet(rng, d=D, width=nb, dtype=DTYPE).items()}
    gumbel = draw_gumbel(rng, (H, nb, nb)).astype(DTYPE)
    mine = _effattn("sinkhorn", q, k, v, dout, block=b, n_iters=8, tau=0.75, gumbel=gumbel, causal=False, **params)
    cls, _ = _sinkhorn_values_fixed()
    peer = cls(bucket_size=b, dim=H * D, dim_heads=D, heads=H, max_seq_len=n, temperature=0.75,
               non_permutative=False, sinkhorn_iter=8, n_sortcut=0, dropout=0.0, use_simple_sort_net=True).eval()
    return mine, _peer(peer, _leaves(q, k, v), dout)


def linear_pair(n, causal):
    """effattn linear (elu + 1) vs fast_transformers LinearAttention / CausalLinearAttention."""
    import torch
    from fast_transformers.attention import CausalLinearAttention, LinearAttention
    from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

    _, q, k, v, dout = _inputs(n, 7)
    mine = _effattn("linear", q, k, v, dout, causal=causal, eps=1e-6)
    peer = (CausalLinearAttention if causal else LinearAttention)(D, eps=1e-6)
    mask = TriangularCausalMask(n) if causal else FullMask(N=n, M=n)
    lengths = LengthMask(torch.full((B,), n), max_len=n)
    t = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (B, H, N, d) -> the peer's (B, N, H, d)
    return mine, _peer(lambda a, b, c: peer(a, b, c, mask, lengths, lengths), _leaves(t(q), t(k), t(v)), t(dout))


# --------------------------------------------------------------------------- the rows
# mechanism -> [(setting, default N, peer name, make(n) -> (effattn run, peer run))]
ROWS = {
    "full": [("noncausal", (1024, 2048, 4096), "torch.nn.functional.scaled_dot_product_attention",
              lambda n: full_pair(n, False)),
             ("causal", (1024, 2048, 4096), "torch.nn.functional.scaled_dot_product_attention",
              lambda n: full_pair(n, True))],
    "local": [("causal_b128_lb1", (4096, 16384), "local_attention.LocalAttention", local_pair)],
    "performer": [("noncausal_m128", (4096,), "performer_pytorch.FastAttention", lambda n: performer_pair(n, False)),
                  ("causal_m128", (4096,), "performer_pytorch.FastAttention", lambda n: performer_pair(n, True))],
    "reformer": [("r2_c32", (4096, 16384), "reformer_pytorch.LSHAttention", reformer_pair)],
    "routing": [("c{c}_w{w}", (4096, 16384), "routing_transformer.KmeansAttention", routing_pair)],
    "sinkhorn": [("b{b}", (4096, 16384), "sinkhorn_transformer.SinkhornAttention", sinkhorn_pair)],
    "linear": [("noncausal", (4096,), "fast_transformers.attention.LinearAttention", lambda n: linear_pair(n, False)),
               ("causal", (4096,), "fast_transformers.attention.CausalLinearAttention",
                lambda n: linear_pair(n, True))],
}


def _setting(template, n):
    c = round(math.sqrt(n))
    return template.format(c=c, w=n // c, b=sinkhorn_block(n))


def _unfit(mechanism, n):
    """Why length n does not suit the row (None if it does)."""
    need = {"local": 128, "reformer": 64, "sinkhorn": sinkhorn_block(n)}.get(mechanism)
    if need and n % need:
        return f"N = {n} is not a multiple of {need}"
    return None


def time_pair(mine, theirs, repeats):
    """Medians of ``repeats`` interleaved wall-clock runs (effattn, peer, effattn, ...) after one warm-up each."""
    mine()
    theirs()
    times = ([], [])
    for _ in range(repeats):
        for run, acc in ((mine, times[0]), (theirs, times[1])):
            gc.collect()
            t0 = time.perf_counter()
            run()
            acc.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def run(mechanisms=None, ns=None, *, repeats=5, threads=2, log=sys.stderr):
    """Time every chosen row. Returns (rows, notes): the CSV rows (dicts of COLUMNS) and what was skipped."""
    import torch

    torch.set_num_threads(threads)
    notes = []
    if not backend.set_blas_threads(threads):
        notes.append(f"could not set NumPy's BLAS to {threads} threads (no OpenBLAS found): it runs with its default")
    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "torch_version": torch.__version__,
             "numpy_version": np.__version__, "repeats": repeats, "threads": threads}
    rows, load = [], _load()
    for mech in mechanisms or list(ROWS):
        pip_name, module = PACKAGES[mech]
        if not _installed(module):
            notes.append(f"{mech}: skipped, {pip_name} is not installed"
                         + (f" ({OPTIONAL[mech]})" if mech in OPTIONAL else f" (pip install {pip_name})"))
            continue
        version = _version(pip_name)
        for template, default_ns, peer_name, make in ROWS[mech]:
            for n in ns or default_ns:
                why = _unfit(mech, n)
                if why:
                    notes.append(f"{mech}: N = {n} skipped ({why})")
                    continue
                setting = _setting(template, n)
                t0 = time.perf_counter()
                mine, theirs = make(n)
                te, tp = time_pair(mine, theirs, repeats)
                del mine, theirs
                gc.collect()
                rows.append({"mechanism": mech, "setting": setting, "peer": peer_name, "peer_version": version, "n": n,
                             "effattn_s": te, "peer_s": tp, "ratio": te / tp, **stamp})
                print(f"peers: {mech} {setting} N={n}: effattn {te * 1e3:.1f} ms, peer {tp * 1e3:.1f} ms, "
                      f"ratio {te / tp:.2f} ({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
    if load:
        notes.append(f"load average (1, 5, 15 min) at the start {load}, at the end {_load()}: on a shared machine "
                     f"other jobs slow both sides, and the {threads} threads of each contend with them")
    return rows, notes


def _load():
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def format_table(rows):
    lines = [f"{'mechanism':10s} {'setting':16s} {'peer':52s} {'N':>6s} {'effattn ms':>11s} {'peer ms':>10s} "
             f"{'effattn/peer':>12s}"]
    for r in rows:
        lines.append(f"{r['mechanism']:10s} {r['setting']:16s} {r['peer'][:52]:52s} {r['n']:6d} "
                     f"{r['effattn_s'] * 1e3:11.1f} {r['peer_s'] * 1e3:10.1f} {r['ratio']:12.2f}")
    return "\n".join(lines)


def write_csv(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "effattn_s": f"{r['effattn_s']:.6g}", "peer_s": f"{r['peer_s']:.6g}",
                        "ratio": f"{r['ratio']:.4g}"})
    return path


def build_parser():
    p = argparse.ArgumentParser(prog="python -m effattn bench --peers",
                                description="effattn against the PyTorch peers in one process: forward + backward, "
                                            "float32, B = 1, H = 4, d = 64, interleaved runs, ratio effattn / peer "
                                            "(see benchmarks/peers.py's docstring for every row's correspondence).")
    p.add_argument("--names", nargs="+", choices=list(ROWS), metavar="NAME",
                   help=f"mechanisms (default: all of {', '.join(ROWS)})")
    p.add_argument("--n", nargs="+", type=int, metavar="N", help="lengths instead of each row's own")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side, the median is kept (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads of torch and of NumPy's BLAS (default 2)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"the CSV (default {DEFAULT_OUT.relative_to(ROOT)} of "
                                                           "the repository; then python -m effattn readme)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads), *(("--n", n) for n in args.n or ())):
        if value < 1:
            print(f"effattn: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if "torch" in missing_packages(args.names):
        print(f"bench --peers needs torch and the peers, which are not dependencies of effattn: {PEERS_INSTALL}")
        return 0
    rows, notes = run(args.names, args.n, repeats=args.repeats, threads=args.threads)
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if rows:
        print(f"wrote {write_csv(rows, args.out)} (the README's table: python -m effattn readme)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
