"""``python -m effattn check``: gradient and dense checks of every mechanism, as a pass/fail table.

How a user validates an install or a GPU (``--backend cupy``): the same checks as the
contract tests, at one small size, with no test framework.
"""
from __future__ import annotations

import numpy as np

from .. import backend, registry
from ..gradcheck import check_gradients

GRAD_TOL = 1e-6
DENSE_TOL = 1e-10


def check_mechanism(name, *, n=11, d=3, heads=2):
    """One row: the worst gradient relative error, the worst error against the dense form
    (``reference`` or full attention masked by ``pattern``; NaN where none applies) and the
    worst ``|out - W v|`` (kernels; NaN for layers)."""
    spec = registry.get(name)
    row = {"name": name, "grad": 0.0, "dense": float("nan"), "w@v": float("nan")}
    for causal in ([False, True] if spec.causal else [False]):
        case = spec.example(np.random.default_rng(0), batch=1, heads=heads, n=n, d=d, causal=causal)
        errs = check_gradients(spec.forward, spec.backward, case.inputs, case.config)
        row["grad"] = max(row["grad"], max(errs.values()))
        out, cache = spec.forward(**case.inputs, **case.config)
        out_h = np.asarray(backend.to_numpy(out))
        if spec.kind == "kernel":
            wv = np.asarray(backend.to_numpy(spec.weights(cache) @ case.inputs["v"]))
            row["w@v"] = max(np.nan_to_num(row["w@v"]), float(np.abs(out_h - wv).max()))
        if spec.kind == "kernel" and (spec.exact or spec.reference is not None):
            if spec.reference is not None:
                ref = spec.reference(**case.inputs, **case.config)
            else:
                i = case.inputs
                ref, _ = registry.get("full").forward(i["q"], i["k"], i["v"], causal=causal, mask=spec.pattern(cache))
            err = float(np.abs(out_h - np.asarray(backend.to_numpy(ref))).max())
            row["dense"] = max(np.nan_to_num(row["dense"]), err)
    row["ok"] = row["grad"] < GRAD_TOL and not (row["dense"] > DENSE_TOL) and not (row["w@v"] > DENSE_TOL)
    return row


def format_rows(rows):
    """The table the command prints, ending with the 'N passed, N failed' line."""
    def cell(x, width):  # "-" where the check does not apply (no dense form, or a layer)
        return f"{'-':>{width}s}" if x != x else f"{x:{width}.2e}"

    lines = [f"backend: {backend.get_backend()}",
             f"{'mechanism':20s} {'grad rel err':>12s} {'dense max err':>14s} {'out - W v':>10s}  result"]
    for r in rows:
        lines.append(f"{r['name']:20s} {cell(r['grad'], 12)} {cell(r['dense'], 14)} {cell(r['w@v'], 10)}  "
                     f"{'PASS' if r['ok'] else 'FAIL'}")
    failed = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)
