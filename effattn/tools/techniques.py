"""Measurements of the model techniques of issue 16 (notebook 10, the tests' numbers, the report).

Memory is the tracemalloc peak of one forward + backward, above what was allocated before it
(the parameters and their gradient buffers are made first), so it counts the activations a
technique keeps and the temporaries of the step — the same measure ``tools/bench.py`` uses.
Every function is plain Python (no command line): the notebook calls them.

* :func:`stack_memory` — a stack of L blocks, plain, ``checkpoint=k`` or ``reversible``.
* :func:`depth_table` — the three against the depth L.
* :func:`ffn_memory` — one feed-forward, whole or by chunks of positions.
* :func:`reconstruction_error` — how far a float32 reversible stack's rebuilt input is from the real one.
* :func:`claims` — the three numbers issue 16 asks for, with their thresholds.
"""
from __future__ import annotations

import math
import tracemalloc

import numpy as np

from .. import backend
from ..models.transformer import Stack
from ..nn.modules import FeedForward


def _peak(fn):
    """tracemalloc peak of ``fn()`` in bytes, above the memory traced when it starts."""
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not started:
            tracemalloc.stop()


def make_stack(layers, *, technique="plain", k=None, n=256, d_model=64, heads=4, d_ff=None, attention="full",
               dtype="float32", seed=0, ffn_chunk=None):
    """A non-causal :class:`Stack` of ``layers`` blocks with ``technique`` "plain", "checkpoint"
    (every ``k`` blocks; default round(sqrt(L))) or "reversible" (``reversible_stored``: the same
    architecture with every block's caches kept)."""
    kw = {}
    if technique == "checkpoint":
        kw["checkpoint"] = k or max(1, round(math.sqrt(layers)))
    elif technique == "reversible":
        kw["reversible"] = True
    elif technique == "reversible_stored":
        kw.update(reversible=True, reconstruct=False)
    elif technique != "plain":
        raise ValueError(f"technique must be plain, checkpoint, reversible or reversible_stored, got {technique!r}")
    return Stack(32, np.random.default_rng(seed), d_model=d_model, heads=heads, layers=layers, d_ff=d_ff,
                 max_len=n, attention=attention, dtype=dtype, ffn_chunk=ffn_chunk, **kw)


def stack_memory(layers, *, technique="plain", k=None, n=256, d_model=64, heads=4, batch=2, d_ff=None,
                 attention="full", dtype="float32", seed=0, ffn_chunk=None):
    """Peak bytes of one forward + backward of a stack (:func:`make_stack`) on a (batch, n) input."""
    stack = make_stack(layers, technique=technique, k=k, n=n, d_model=d_model, heads=heads, d_ff=d_ff,
                       attention=attention, dtype=dtype, seed=seed, ffn_chunk=ffn_chunk)
    rng = np.random.default_rng([seed, 1])
    ids = backend.asarray(rng.integers(0, 32, (batch, n)))
    dh = backend.asarray(rng.standard_normal((batch, n, d_model)), dtype=dtype)
    stack.zero_grad()

    def step():
        h = stack.forward(ids)
        del h
        stack.backward(dh)

    return _peak(step)


def depth_table(depths=(2, 4, 8, 16), *, k=None, **kw):
    """[{"layers", "plain", "checkpoint", "k", "reversible"}] peak bytes against the depth
    (``k`` None: round(sqrt(L)) for each L)."""
    rows = []
    for L in depths:
        kk = k or max(1, round(math.sqrt(L)))
        rows.append({"layers": L, "plain": stack_memory(L, **kw),
                     "checkpoint": stack_memory(L, technique="checkpoint", k=kk, **kw), "k": kk,
                     "reversible": stack_memory(L, technique="reversible", **kw)})
    return rows


def ffn_memory(n, *, chunk=None, d_model=64, d_ff=None, batch=1, dtype="float32", seed=0):
    """One :class:`FeedForward`'s forward + backward on (batch, n, d_model): {"peak", "working"} bytes.

    ``working`` is the peak less the two (batch, n, d_model) arrays every version must return
    (the output y and the input's gradient dx): the memory the hidden (n, d_ff) activations take
    (O(n d_ff) whole, O(chunk d_ff) by chunks)."""
    d_ff = 4 * d_model if d_ff is None else d_ff
    ff = FeedForward(d_model, d_ff, np.random.default_rng(seed), dtype=dtype, chunk=chunk)
    rng = np.random.default_rng([seed, 1])
    x = backend.asarray(rng.standard_normal((batch, n, d_model)), dtype=dtype)
    dy = backend.asarray(rng.standard_normal((batch, n, d_model)), dtype=dtype)
    ff.zero_grad()

    def step():
        y = ff.forward(x)
        dx = ff.backward(dy)
        del y, dx

    peak = _peak(step)
    shared = 2 * batch * n * d_model * np.dtype(dtype).itemsize
    return {"peak": peak, "working": peak - shared}


def chunk_table(n=4096, chunks=(None, 2048, 512, 128, 32), **kw):
    """[{"chunk", "peak", "working"}] of :func:`ffn_memory` against the chunk size (None: whole)."""
    return [{"chunk": c, **ffn_memory(n, chunk=c, **kw)} for c in chunks]


def reconstruction_error(layers=8, *, n=128, d_model=64, heads=4, batch=2, dtype="float32", seed=0):
    """max |X_rec - x| / max |x| at the bottom of a reversible stack after one backward
    (``input_error``), and ||g_rec - g_stored|| / ||g_stored|| over all parameters' gradients
    together against the same stack run with every cache stored (``grad_error``)."""
    rng = np.random.default_rng([seed, 1])
    ids = backend.asarray(rng.integers(0, 32, (batch, n)))
    dh = backend.asarray(rng.standard_normal((batch, n, d_model)), dtype=dtype)
    grads = {}
    err = None
    for tech in ("reversible", "reversible_stored"):
        st = make_stack(layers, technique=tech, n=n, d_model=d_model, heads=heads, dtype=dtype, seed=seed)
        st.zero_grad()
        st.forward(ids)
        st.backward(dh)
        grads[tech] = {k: backend.to_numpy(g) for k, g in st.gradients()}
        if tech == "reversible":
            err = st.reconstruction_error
    # One relative error over all gradients together, ||a - b|| / ||b||: a per-parameter ratio would
    # divide rounding noise by zero for the key biases, whose gradient vanishes in exact arithmetic
    # (softmax ignores a constant added to a row's logits, and q . b_k is one).
    a, b = grads["reversible"], grads["reversible_stored"]
    diff = math.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in b))
    norm = math.sqrt(sum(float((b[k].astype(np.float64) ** 2).sum()) for k in b))
    gerr = diff / max(norm, 1e-300)
    return {"layers": layers, "dtype": dtype, "input_error": err, "grad_error": gerr}


def claims(*, n=256, d_model=64, heads=4, batch=2, ffn_n=16384, ffn_d_model=64):
    """The numbers of issue 16 (one run each, tracemalloc peaks):

    * reversible, 16 blocks / 2 blocks: at most 1.3;
    * checkpointing k = 4 over 16 blocks / plain 16 blocks: at most 0.4;
    * the FFN at N = ``ffn_n``, d_ff = 4 d_model, chunk 128 / whole: at most 1/20 (working memory;
      the peak with the shared input/output arrays is reported beside it).
    """
    kw = dict(n=n, d_model=d_model, heads=heads, batch=batch)
    rev16, rev2 = stack_memory(16, technique="reversible", **kw), stack_memory(2, technique="reversible", **kw)
    plain16 = stack_memory(16, **kw)
    ck16 = stack_memory(16, technique="checkpoint", k=4, **kw)
    whole, chunked = ffn_memory(ffn_n, d_model=ffn_d_model), ffn_memory(ffn_n, chunk=128, d_model=ffn_d_model)
    return {
        "reversible_16_over_2": rev16 / rev2, "reversible_limit": 1.3,
        "plain_16_over_2": plain16 / stack_memory(2, **kw),
        "checkpoint_4_of_16_over_plain": ck16 / plain16, "checkpoint_limit": 0.4,
        "ffn_chunk128_over_whole": chunked["working"] / whole["working"], "ffn_limit": 1 / 20,
        "ffn_peak_ratio_with_io": chunked["peak"] / whole["peak"],
        "bytes": {"reversible_16": rev16, "reversible_2": rev2, "plain_16": plain16, "checkpoint_16_k4": ck16,
                  "ffn_whole": whole, "ffn_chunk128": chunked},
        "sizes": {**kw, "ffn_n": ffn_n, "ffn_d_model": ffn_d_model, "dtype": "float32"},
    }


# --------------------------------------------------------------------------- low precision
def format_table():
    """[{"format", "mantissa bits", "spacing at 1", "largest", "smallest normal"}] of float32,
    bfloat16 and float16, measured from the rounding functions (not typed in)."""
    from ..nn.precision import round_bf16, round_fp16

    rows = []
    for name, rnd, bits in (("float32", lambda x: np.asarray(x, np.float32), 23), ("bfloat16", round_bf16, 7),
                            ("float16", round_fp16, 10)):
        one_up = float(rnd(np.float32(1.0) + np.float32(2.0 ** -bits)))
        big = [2.0 ** e * (2 - 2.0 ** -bits) for e in range(200)]
        largest = max(v for v in big if v < 3.5e38 and np.isfinite(rnd(np.float32(v))) and float(rnd(np.float32(v))) == v)
        # the smallest power of two that still has every mantissa bit (below it: subnormals, fewer bits)
        tiny = min(2.0 ** -e for e in range(1, 127)
                   if float(rnd(np.float32(2.0 ** -e * (1 + 2.0 ** -bits)))) == 2.0 ** -e * (1 + 2.0 ** -bits))
        rows.append({"format": name, "mantissa bits": bits, "spacing at 1": one_up - 1.0, "largest": largest,
                     "smallest normal": tiny})
    return rows


def rounding_error(x, precision):
    """max |round(x) - x| / |x| over the nonzero entries of ``x`` (float32), for "bf16" or "fp16"."""
    from ..nn.precision import rounder

    x = np.asarray(x, np.float32)
    r = rounder(precision)(x)
    nz = x != 0
    return float(np.max(np.abs(r[nz] - x[nz]) / np.abs(x[nz])))


def error_table(ns=(64, 256, 1024), logit_scales=(0.5, 1.0, 2.0, 4.0), *, formats=("bf16", "fp16", "int8"), d=64,
                seed=0):
    """[{"format", "n", "logit scale", "error"}]: attention in a low-precision format against float64
    attention, max |out_low - out| / max |out|, on Gaussian q, k, v whose logits are multiplied by
    ``logit scale`` (a sharper softmax: a few large weights and many small ones). "bf16"/"fp16":
    :func:`effattn.nn.precision.lowp_attention` (16-bit storage, float32 sums); "int8":
    :func:`effattn.nn.precision.int8_attention` (whose per-row scale of P rounds small weights to zero)."""
    from ..nn.precision import int8_attention, lowp_attention

    rows = []
    for n in ns:
        rng = np.random.default_rng([seed, n])
        q, k, v = (rng.standard_normal((1, n, d)) for _ in range(3))
        for c in logit_scales:
            s = c * (q @ k.transpose(0, 2, 1)) / math.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            ref = (p / p.sum(-1, keepdims=True)) @ v
            q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
            for fmt in formats:
                if fmt == "int8":
                    out = int8_attention(q32, k32, v32, scale=c / math.sqrt(d))
                else:
                    out = lowp_attention(q32, k32, v32, precision=fmt, scale=c / math.sqrt(d))
                rows.append({"format": fmt, "n": n, "logit scale": c,
                             "error": float(np.abs(out - ref).max() / np.abs(ref).max())})
    return rows


def loss_scale_trace(steps=120, *, scale=2.0 ** 24, growth_interval=20, seed=0):
    """A real float16 training run (the ``lm`` task, a 1-layer decoder, ``train --precision fp16``'s
    settings) with a loss scale that starts too large: returns {"scale": [S per step], "applied":
    [bool per step], "loss": [(step, loss) of the applied steps]}. The first steps overflow and are
    skipped while S halves; then S doubles every ``growth_interval`` good steps until it overflows
    again: the sawtooth of dynamic loss scaling."""
    import argparse

    from ..nn.precision import LossScaler
    from . import train as T

    ap = argparse.ArgumentParser()
    T.add_train_arguments(ap)
    s = T.settings_from_args(ap.parse_args(["--task", "lm", "--steps", str(steps), "--d-model", "32", "--heads", "2",
                                            "--layers", "1", "--seq-len", "32", "--batch-size", "16",
                                            "--precision", "fp16", "--seed", str(seed)]))
    task, model, opt, sched = T.build(s)
    scaler = LossScaler(scale=scale, growth_interval=growth_interval)
    with np.errstate(over="ignore", invalid="ignore"):
        h = T.fit(model, task, opt, sched, np.random.default_rng([seed, 2]), steps=steps, batch_size=16,
                  progress=False, scaler=scaler)
    return {"scale": [u for u, _ in scaler.history], "applied": [ok for _, ok in scaler.history],
            "loss": list(zip(h["step"], h["loss"]))}
