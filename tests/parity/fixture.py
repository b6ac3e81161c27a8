"""The parity fixture format: one ``.npz`` per (mechanism, peer, configuration).

A fixture holds what a peer implementation (HuggingFace, lucidrains, the official code) computed,
in effattn's argument layout, so that ``tests/parity/test_parity.py`` can run effattn on the same
inputs and draws and compare, without torch or the peer installed. Keys:

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
- ``dout``: the upstream gradient used for the backward (float64, out's shape);
- ``grad.<name>``: the peer's gradient (autograd) of sum(out * dout) for each input it has one for.

This module needs only NumPy: the generators (``tests/parity/peer_*.py``, run in an environment
with torch and the peers, never in CI) call :func:`save`; the CI test calls :func:`load`.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def save(name, *, mechanism, peer, peer_version, torch_version, case, config, inputs, out, dout, grads,
         array_config=None, atol_out=1e-10, atol_grad=1e-10, note=""):
    """Write ``fixtures/<name>.npz``. ``inputs``, ``array_config``, ``grads``: dicts of arrays."""
    meta = {"mechanism": mechanism, "peer": peer, "peer_version": peer_version, "torch_version": torch_version,
            "case": case, "config": config, "atol_out": atol_out, "atol_grad": atol_grad, "note": note}
    json.dumps(meta)                                               # the config must be JSON-able
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True)), "out": np.asarray(out, np.float64),
              "dout": np.asarray(dout, np.float64)}
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
    """(meta, inputs, config, out, dout, grads) of one fixture; config merges the JSON and array parts."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        inputs = {k[6:]: f[k] for k in f.files if k.startswith("input.")}
        config = dict(meta["config"])
        config.update({k[7:]: f[k] for k in f.files if k.startswith("config.")})
        grads = {k[5:]: f[k] for k in f.files if k.startswith("grad.")}
        return meta, inputs, config, f["out"], f["dout"], grads


def all_fixtures():
    return sorted(FIXTURES.glob("*.npz"))
