"""Teaching helpers for the notebooks: the code beside the equations, and checks of a learner's code.

- :func:`show_source` prints the lines of a function (or of a module, or a class) exactly as they are in
  the package, optionally only those between two markers, so that a notebook shows the code that
  computes an equation and never a copy of it. :func:`source_lines` returns the same text.
- :func:`check_kernel` runs a learner's attention kernel ``forward(q, k, v, **config)`` (and its
  ``backward(dout, cache)``) through the project's own checks: the output shape, the *dense check*
  (equal to full softmax attention masked by a pattern, or to a given reference formula), the
  causality probe (outputs before t unchanged when the inputs from t on change) and the *gradient
  check* (``effattn.gradcheck.check_gradients``, central finite differences in float64). It prints
  one line per check, PASS or FAIL, and returns a :class:`Report` that is truthy when all passed.
  :func:`check` does the same for any ``forward(**inputs) -> (out, cache)`` pair (a layer norm, a loss).
- :func:`load_answer` executes the worked answer of an exercise, the ``python`` code block inside the
  ``<details>`` block of a notebook source, so the notebook checks the very code it shows.
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..gradcheck import check_gradients, rel_error

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_SOURCES = ROOT / "notebooks" / "src"


# --------------------------------------------------------------------------- source
def _docstring_lines(src):
    """(first, last) 1-based line numbers of the docstring of the def/class that ``src`` starts with, or None."""
    try:
        tree = ast.parse(textwrap.dedent(src))
    except SyntaxError:
        return None
    body = tree.body
    if not body:
        return None
    node = body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].lineno, body[0].end_lineno
    return None


def source_lines(obj, start=None, stop=None, *, docstring=False, header=True):
    """The source of ``obj`` (a function, class or module) as it is in its file, dedented.

    ``start``: keep lines from the first one that contains this text; ``stop``: up to and including the
    first line at or after it that contains this text (both plain substrings, not patterns).
    ``docstring=False`` drops the docstring of a function or class (the notebook shows the equations
    beside it). ``header=True`` starts with a comment naming the file and the line numbers.
    Raises ValueError naming ``start``/``stop`` when a marker is not found.
    """
    obj = inspect.unwrap(obj) if callable(obj) else obj     # decorated kernels: the function's own file
    lines, first = inspect.getsourcelines(obj)
    if inspect.ismodule(obj):
        first = 1
    numbers = list(range(first, first + len(lines)))
    if not docstring:
        span = _docstring_lines("".join(lines))
        if span is not None:
            lo, hi = span
            keep = [i for i in range(len(lines)) if not (lo - 1 <= i <= hi - 1)]
            lines, numbers = [lines[i] for i in keep], [numbers[i] for i in keep]
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    i0, i1 = 0, len(lines)
    if start is not None:
        hits = [i for i, ln in enumerate(lines) if start in ln]
        if not hits:
            raise ValueError(f"start: {start!r} is not a line of {name}")
        i0 = hits[0]
    if stop is not None:
        hits = [i for i, ln in enumerate(lines) if i >= i0 and stop in ln]
        if not hits:
            raise ValueError(f"stop: {stop!r} is not a line of {name} after the start")
        i1 = hits[0] + 1
    chosen = lines[i0:i1]
    text = textwrap.dedent("".join(chosen)).rstrip("\n")
    if header:
        path = Path(inspect.getsourcefile(obj)).resolve()
        try:
            path = path.relative_to(ROOT)
        except ValueError:
            pass
        lo, hi = numbers[i0], numbers[i1 - 1]
        text = f"# {path}, lines {lo}-{hi}" + (" (docstring left out)" if not docstring and start is None else "") \
            + "\n" + text
    return text


def show_source(obj, start=None, stop=None, *, docstring=False):
    """Print :func:`source_lines` of ``obj``: the package's own lines, never a copy."""
    print(source_lines(obj, start, stop, docstring=docstring))


# --------------------------------------------------------------------------- checks
@dataclass
class Report:
    """What :func:`check` / :func:`check_kernel` found: ``passed``, one line per check, the errors."""

    name: str
    passed: bool = True
    lines: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)

    def add(self, what, ok, detail=""):
        self.passed = self.passed and bool(ok)
        self.lines.append(f"  {'PASS' if ok else 'FAIL'}  {what}" + (f": {detail}" if detail else ""))

    def __bool__(self):
        return self.passed

    def __str__(self):
        verdict = "all checks pass" if self.passed else "some checks FAIL"
        return "\n".join([f"{self.name}: {verdict}"] + self.lines)


def _name(fn):
    return getattr(fn, "__name__", type(fn).__name__)


def _split(result):
    """forward's result -> (out, cache); a bare array is (out, None)."""
    if isinstance(result, tuple) and len(result) == 2:
        return result
    return result, None


def _call(report, what, fn, *args, **kw):
    try:
        return True, fn(*args, **kw)
    except Exception as exc:                       # the learner's code may raise anything: report it
        report.add(what, False, f"{type(exc).__name__}: {exc}")
        return False, None


def check(forward, backward=None, inputs=None, *, config=None, reference=None, expected_shape=None,
          tol=1e-8, grad_tol=1e-6, name=None, verbose=True, report=None):
    """Check ``forward(**inputs, **config)`` (returning ``out`` or ``(out, cache)``) and its ``backward``.

    - written: ``forward`` returns an array (a stub that returns None is "not written yet");
    - shape: ``out.shape == expected_shape`` when given;
    - dense check: ``rel_error(out, reference(**inputs, **config)) < tol`` when ``reference`` is given;
    - gradient check: ``backward(dout, cache)[x]`` against central differences for every ``x`` of
      ``inputs`` (float64, ``effattn.gradcheck.check_gradients``), relative error < ``grad_tol``.

    Prints the report (``verbose``) and returns it; it is truthy when every check passed.
    """
    inputs = dict(inputs or {})
    config = dict(config or {})
    report = report or Report(name or _name(forward))
    ok, result = _call(report, "forward runs", forward, **inputs, **config)
    if ok:
        out, cache = _split(result)
        if out is None:
            report.add("forward is written", False, "it returns None (a stub: write its body)")
            ok = False
        else:
            out = np.asarray(out)
    if ok and expected_shape is not None:
        shape_ok = tuple(out.shape) == tuple(expected_shape)
        report.add("output shape", shape_ok, f"{tuple(out.shape)}" + ("" if shape_ok else f", expected {tuple(expected_shape)}"))
        ok = shape_ok
    if ok and reference is not None:
        ref = np.asarray(reference(**inputs, **config))
        if ref.shape != out.shape:
            report.add("dense check", False, f"shape {out.shape} vs the reference's {ref.shape}")
        else:
            err = rel_error(out, ref)
            report.errors["dense"] = err
            report.add("dense check (equals the reference)", err < tol, f"relative error {err:.1e}")
    if ok and backward is not None:
        if cache is None:
            report.add("gradient check", False, "forward must return (out, cache) for the backward")
        else:
            good, errors = _call(report, "gradient check runs", check_gradients,
                                 lambda **kw: _split(forward(**kw)), backward, inputs, config)
            if good:
                report.errors.update({f"d{k}": e for k, e in errors.items()})
                worst = max(errors.values()) if errors else 0.0
                detail = ", ".join(f"d{k} {e:.1e}" for k, e in errors.items())
                report.add("gradient check (central differences)", worst < grad_tol, detail)
    if verbose:
        print(report)
    return report


def _dense(mask, causal):
    """The dense oracle: effattn's full attention masked by ``mask`` (an (N, M) array, a callable
    (n, m) -> array, or None), never told ``causal`` (the causal triangle is added to the mask)."""
    from ..registry import get

    full = get("full")

    def reference(q, k, v, **config):
        n, m = q.shape[-2], k.shape[-2]
        allowed = np.ones((n, m), bool)
        if mask is not None:
            allowed = allowed & np.asarray(mask(n, m) if callable(mask) else mask, bool)
        if causal:
            allowed = allowed & np.tril(np.ones((n, m), bool))
        scale = config.get("scale")
        kw = {} if scale is None else {"scale": scale}
        return full.forward(q, k, v, mask=allowed, **kw)[0]

    return reference


def check_kernel(forward, backward=None, *, mask=None, reference=None, config=None, params=None, lead=(2, 2),
                 n=7, m=None, d=4, dv=None, seed=0, tol=1e-8, grad_tol=1e-6, name=None, verbose=True):
    """Check a learner's attention kernel ``forward(q, k, v, **params, **config)`` -> ``out`` or ``(out, cache)``.

    Draws float64 ``q (*lead, n, d)``, ``k (*lead, m, d)``, ``v (*lead, m, dv)`` (``m = n``, ``dv = d`` by
    default) from ``seed``; ``params`` are extra learnable arrays (their gradients are checked too),
    ``config`` the other keywords. The dense oracle is ``reference(q, k, v, **params, **config)`` when
    given, else full softmax attention masked by ``mask`` ((n, m) bool array or ``mask(n, m)``; None:
    no mask) and by the causal triangle when ``config["causal"]``. With ``causal`` the future is also
    perturbed: the outputs before t must not move. With ``backward`` the gradients of q, k, v and
    ``params`` are checked against central differences. Prints PASS/FAIL lines; returns the Report.
    """
    config = dict(config or {})
    params = dict(params or {})
    m = n if m is None else m
    dv = d if dv is None else dv
    rng = np.random.default_rng(seed)
    lead = tuple(lead)
    inputs = {"q": rng.standard_normal(lead + (n, d)), "k": rng.standard_normal(lead + (m, d)),
              "v": rng.standard_normal(lead + (m, dv)), **{key: np.array(a, dtype=np.float64) for key, a in params.items()}}
    causal = bool(config.get("causal", False))
    ref = reference if reference is not None else _dense(mask, causal)
    report = Report(name or _name(forward))
    rep = check(forward, None, inputs, config=config, reference=ref, expected_shape=lead + (n, dv), tol=tol,
                name=report.name, verbose=False, report=report)
    if rep.passed and causal and n == m and n > 2:
        t = n // 2
        moved = {key: a.copy() for key, a in inputs.items()}
        for key in ("q", "k", "v"):
            moved[key][..., t:, :] = rng.standard_normal(moved[key][..., t:, :].shape)
        a = np.asarray(_split(forward(**inputs, **config))[0])
        b = np.asarray(_split(forward(**moved, **config))[0])
        same = np.array_equal(a[..., :t, :], b[..., :t, :])
        rep.add(f"causal: outputs before t={t} unchanged when inputs from t on change", same,
                "" if same else f"max change {np.abs(a[..., :t, :] - b[..., :t, :]).max():.1e}")
    if rep.passed and backward is not None:
        check(forward, backward, inputs, config=config, grad_tol=grad_tol, name=report.name, verbose=False,
              report=report)
    if verbose:
        print(report)
    return report


# --------------------------------------------------------------------------- answers
_DETAILS = re.compile(r"<details>(.*?)</details>", re.S)
_FENCE = re.compile(r"```python\n(.*?)```", re.S)


def _markdown_text(source):
    """The text of the markdown cells of a percent-format source, '# ' prefixes removed (as build.py does)."""
    out, kind = [], None
    for line in source.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            continue
        if kind == "markdown":
            out.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    return "\n".join(out)


def answer_code(part, name):
    """The code of the worked answer that defines ``name``: the ``python`` block inside a ``<details>``
    block of the notebook source ``part`` (a path under notebooks/src, e.g. "00_background/95_exercise.py")."""
    path = Path(part)
    if not path.is_absolute():
        path = NOTEBOOK_SOURCES / part
    if not path.is_file():
        raise FileNotFoundError(f"part: no notebook source {path} (the answers live in the repository's notebooks/src)")
    text = _markdown_text(path.read_text())
    for block in _DETAILS.findall(text):
        for code in _FENCE.findall(block):
            if re.search(rf"^(def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*=", code, re.M):
                return code
    raise ValueError(f"name: no worked answer defining {name!r} in a <details> block of {path.name}")


def load_answer(part, *names, namespace=None):
    """Execute the worked answer that defines ``names[0]`` (``answer_code(part, names[0])``, with
    ``namespace``'s names, e.g. the notebook's ``globals()``, plus ``np`` and ``effattn``) and return
    the object it defines, or a tuple of the objects ``names`` (all defined by that block)."""
    import sys

    effattn = sys.modules[__package__.split(".")[0]]  # the package itself, loaded before any of its modules

    if not names:
        raise ValueError("names: give the name of at least one function of the answer")
    ns = {"np": np, "effattn": effattn, **(namespace or {})}
    exec(compile(answer_code(part, names[0]), f"<answer {names[0]}>", "exec"), ns)
    missing = [n for n in names if n not in ns]
    if missing:
        raise ValueError(f"names: the answer of {names[0]!r} defines no {missing[0]!r}")
    return ns[names[0]] if len(names) == 1 else tuple(ns[n] for n in names)
