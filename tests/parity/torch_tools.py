"""What every parity generator shares (torch on the CPU, float64): conversions, autograd, the
stand-in for a peer's projection layer, and :func:`write`, which saves a fixture and prints how far
effattn is from it (as ``tests/parity/test_parity.py`` will measure it). :func:`effattn_diffs`
measures the same before anything is saved (to set a tolerance, or to check effattn's cache).
Imported only by the generators, which run with torch and the peers installed, never in CI."""
from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import torch
from torch import nn

import effattn
from fixture import compare, save

DT = torch.float64


def t2n(t):
    """A torch tensor as a NumPy array: float64, or bool / int as they are."""
    a = t.detach().cpu().numpy()
    return a if a.dtype.kind in "biu" else a.astype(np.float64)


def leaf(a):
    """A float64 leaf tensor with requires_grad (from a NumPy array or a tensor)."""
    if isinstance(a, torch.Tensor):
        return a.detach().clone().to(DT).requires_grad_(True)
    return torch.tensor(np.asarray(a, np.float64), dtype=DT, requires_grad=True)


def autograd(out, leaves, dout):
    """{name: d/dleaf of sum(out * dout)} as NumPy arrays (zeros for a leaf out does not use)."""
    names = list(leaves)
    gs = torch.autograd.grad((out * torch.as_tensor(dout, dtype=DT)).sum(), [leaves[n] for n in names],
                             allow_unused=True)
    return {n: (np.zeros(tuple(leaves[n].shape)) if g is None else t2n(g)) for n, g in zip(names, gs)}


def heads_to_seq(t):
    """(B, H, N, e) -> (B, N, H e): the peers' layout before splitting heads."""
    b, h, n, e = t.shape
    return t.transpose(1, 2).reshape(b, n, h * e)


def seq_to_heads(t, h):
    """(B, N, H e) -> (B, H, N, e): effattn's layout."""
    b, n, he = t.shape
    return t.reshape(b, n, h, he // h).transpose(1, 2)


class Given(nn.Module):
    """Stands in for a projection layer of the peer: returns a fixed tensor, or ``fn(input)`` when
    given a function (a tensor built from our leaf q / k / v, made with the peer's own weights), so
    the peer's attention runs on the leaves and autograd reaches them."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x=None, *_args, **_kwargs):
        return self.value(x) if callable(self.value) else self.value


def version(pkg):
    return importlib.metadata.version(pkg)


def measured_tolerance(diff, floor=1e-10, factor=1.5):
    """``floor`` where the difference is float64 rounding; else ``factor`` x diff, one significant digit up."""
    if diff < 1e-12:
        return floor
    x = factor * diff
    e = math.floor(math.log10(x))
    return float(f"{math.ceil(x / 10 ** e)}e{e}")


def effattn_diffs(mechanism, inputs, config, out, dout, grads):
    """Run effattn on a fixture's arrays before it is saved (``config``: its JSON and array parts
    merged; every row compared). Returns ({"out": max |diff|, name: max |diff| of each grad},
    effattn's out, its cache)."""
    spec = effattn.get(mechanism)
    mine, cache = spec.forward(**inputs, **config)
    diffs = {"out": float(np.abs(np.asarray(mine) - out).max())}
    g = spec.backward(dout, cache)
    diffs.update({name: float(np.abs(np.asarray(g[name]) - want).max()) for name, want in grads.items()})
    return diffs, mine, cache


def report(name, diffs):
    """Print one line: max |effattn - peer| of out and of every gradient."""
    print(f"  {name}: max |effattn - peer|  " + "  ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def write(name, **fixture):
    """Save ``fixtures/<name>.npz`` (the keywords of :func:`fixture.save`; ``torch_version`` filled
    in), then print max |effattn - peer| of out and of every gradient. Returns (path, diffs)."""
    fixture.setdefault("torch_version", torch.__version__)
    path = save(name, **fixture)
    r = compare(path)
    diffs = {"out": r["out"], **r["grads"]}
    report(name, diffs)
    return path, diffs
