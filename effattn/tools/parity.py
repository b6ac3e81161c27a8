"""The parity fixtures: what a peer implementation (HuggingFace, lucidrains, the official code)
computed, in effattn's argument layout, one ``.npz`` per (mechanism, peer, configuration), under
``tests/parity/fixtures``. ``tests/parity/test_parity.py`` runs effattn on each and compares;
``python -m effattn readme`` writes the README's parity table from them; the generators
(``tests/parity/peer_*.py``, run with torch and the peers installed, never in CI) write them
with :func:`save`. This module needs only NumPy.

Keys of a fixture:

- ``meta``: a JSON string: ``mechanism`` (effattn registry name), ``peer`` (e.g.
  ``"transformers.LongformerSelfAttention"``), ``peer_version``, ``torch_version``, ``case`` (a
  short name of the configuration), ``config`` (the JSON-able keyword arguments of effattn's
  forward), ``atol_out`` and ``atol_grad`` (the tolerances, 1e-10 where the maths is the same) and
  ``note`` (what the mapping does, and why a tolerance is looser if it is);
- ``input.<name>``: every differentiable input of effattn's forward (q, k, v or x, parameters),
  float64;
- ``config.<name>``: array-valued configuration (key_mask, random draws: rotations, features,
  random blocks, centroids, ...), in effattn's layout and dtype;
- ``out``: the peer's output, float64, effattn's layout;
- ``rows`` (optional): bool, broadcastable to out without its last axis: the rows to compare
  (e.g. only real tokens where the peer writes something else at padded query rows);
- ``dout``: the upstream gradient used for the backward (float64, out's shape);
- ``grad.<name>``: the peer's gradient (autograd) of sum(out * dout) for each input it has one for.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "parity" / "fixtures"


def save(name, *, mechanism, peer, peer_version, torch_version, case, config, inputs, out, dout, grads,
         array_config=None, rows=None, atol_out=1e-10, atol_grad=1e-10, note=""):
    """Write ``fixtures/<name>.npz``. ``inputs``, ``array_config``, ``grads``: dicts of arrays."""
    meta = {"mechanism": mechanism, "peer": peer, "peer_version": peer_version, "torch_version": torch_version,
            "case": case, "config": config, "atol_out": atol_out, "atol_grad": atol_grad, "note": note}
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True)), "out": np.asarray(out, np.float64),
              "dout": np.asarray(dout, np.float64)}
    if rows is not None:
        arrays["rows"] = np.asarray(rows, bool)
    arrays.update({f"input.{k}": np.asarray(v, np.float64) for k, v in inputs.items()})
    arrays.update({f"config.{k}": np.asarray(v) for k, v in (array_config or {}).items()})
    arrays.update({f"grad.{k}": np.asarray(v, np.float64) for k, v in grads.items()})
    unknown = set(grads) - set(inputs)
    if unknown:
        raise ValueError(f"grads {sorted(unknown)} are not inputs")
    if np.shape(dout) != np.shape(out):
        raise ValueError(f"dout {np.shape(dout)} must have out's shape {np.shape(out)}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    return path


def load(path):
    """A dict: meta, inputs, config (the JSON and array parts merged), out, rows (or None), dout, grads."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        config = dict(meta["config"])
        config.update({k[7:]: f[k] for k in f.files if k.startswith("config.")})
        return {"meta": meta, "config": config, "out": f["out"], "dout": f["dout"],
                "rows": f["rows"] if "rows" in f.files else None,
                "inputs": {k[6:]: f[k] for k in f.files if k.startswith("input.")},
                "grads": {k[5:]: f[k] for k in f.files if k.startswith("grad.")}}


def all_fixtures(folder=FIXTURES):
    return sorted(pathlib.Path(folder).glob("*.npz"))


def compare(path):
    """Run effattn on a fixture: {"meta", "out": max |out - peer| (on ``rows``), "grads": {name: max |diff|}}."""
    from .. import registry
    from ..backend import asarray, to_numpy

    f = load(path)
    spec = registry.get(f["meta"]["mechanism"])
    inputs = {k: asarray(v) for k, v in f["inputs"].items()}
    config = {k: asarray(v) if isinstance(v, np.ndarray) else v for k, v in f["config"].items()}
    out, cache = spec.forward(**inputs, **config)
    out = np.asarray(to_numpy(out))
    if out.shape != f["out"].shape:
        raise ValueError(f"{path.stem}: effattn's out has shape {out.shape}, the peer's {f['out'].shape}")
    diff = np.abs(out - f["out"])
    if f["rows"] is not None:
        diff = diff[np.broadcast_to(f["rows"][..., None], diff.shape)]
    grads = {}
    if f["grads"]:
        g = spec.backward(asarray(f["dout"]), cache)
        grads = {k: float(np.abs(np.asarray(to_numpy(g[k])) - want).max()) for k, want in f["grads"].items()}
    return {"meta": f["meta"], "out": float(diff.max()) if diff.size else 0.0, "grads": grads}


def markdown_table(folder=FIXTURES):
    """The README's parity table: one row per fixture, the differences measured now."""
    lines = ["| mechanism | peer (version) | configuration | max \\|out - peer\\| | max \\|grad - peer\\| | tolerance |",
             "|---|---|---|---|---|---|"]
    for path in all_fixtures(folder):
        r = compare(path)
        m = r["meta"]
        g = f"{max(r['grads'].values()):.1e}" if r["grads"] else "-"
        lines.append(f"| `{m['mechanism']}` | {m['peer']} {m['peer_version']} | {m['case']} | {r['out']:.1e} | {g} | "
                     f"{m['atol_out']:.0e} / {m['atol_grad']:.0e} |")
    return "\n".join(lines)
