"""The README's generated parts: the table of mechanisms, the measured-scaling table, the parity
table (from the fixtures of ``tests/parity``), the gallery.

``python -m effattn readme`` rewrites each between its ``<!-- marker:start -->`` and
``<!-- marker:end -->`` comments; ``tests/test_readme.py`` checks they are current.
"""
from __future__ import annotations

import csv
import glob
import os
import re

from .. import registry
from . import parity
from .bench import fit_exponent


def markdown_table() -> str:
    """The README's table of mechanisms, from the registry."""
    rows = ["| name | mechanism | paper | taxonomy | complexity | causal | exact | kind | notebook |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in registry.names():
        m = registry.get(name)
        rows.append(
            f"| `{m.name}` | {m.title} | [{m.citation}]({m.url}) | {', '.join(m.classes)} | {m.complexity} | "
            f"{'yes' if m.causal else 'no'} | {'yes' if m.exact else 'approx.'} | {m.kind} | "
            f"[{m.notebook}](notebooks/{m.notebook}.ipynb) |")
    return "\n".join(rows)


def scaling_table(csv_path):
    """Markdown summary of a bench CSV: fitted exponents and the ratios to full at the largest N."""
    with open(csv_path) as fh:
        rows = [dict(r, n=int(r["n"]), time_s=float(r["time_s"]), peak_bytes=float(r["peak_bytes"]))
                for r in csv.DictReader(fh)]
    full = {r["n"]: r for r in rows if r["name"] == "full"}
    lines = ["| mechanism | N | time exponent | memory exponent | x faster than full (largest common N) | peak memory / full |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((r for r in rows if r["name"] == name), key=lambda r: r["n"])
        ns = [r["n"] for r in pts]
        common = [r for r in pts if r["n"] in full]
        last = common[-1] if common else None
        speed = f"{full[last['n']]['time_s'] / last['time_s']:.1f}" if last else "-"
        mem = f"{last['peak_bytes'] / full[last['n']]['peak_bytes']:.3f}" if last else "-"
        lines.append(f"| `{name}` | {ns[0]}-{ns[-1]} | {fit_exponent(ns, [r['time_s'] for r in pts]):.2f} | "
                     f"{fit_exponent(ns, [r['peak_bytes'] for r in pts]):.2f} | {speed} | {mem} |")
    return "\n".join(lines)


def gallery(figures_dir):
    """Markdown of every mechanism's figures (``<name>_*.png``), then the overview and scaling ones."""
    figs = sorted(glob.glob(os.path.join(figures_dir, "*.png")))
    parts = []
    for name in registry.names():
        m = registry.get(name)
        own = [f for f in figs if os.path.basename(f).startswith(m.name + "_")]
        if own:
            parts.append(f"**{m.title}** (`{m.name}`)\n\n" + " ".join(
                f'<img src="{f}" height="220" alt="{os.path.basename(f)}">' for f in own) + "\n")
    extra = [f for f in figs if os.path.basename(f).startswith(("overview", "scaling"))]
    if extra:
        parts.append("**Overview and scaling**\n\n" + " ".join(
            f'<img src="{f}" height="260" alt="{os.path.basename(f)}">' for f in extra) + "\n")
    return "\n".join(parts)


def update(path="README.md", figures_dir="figures"):
    """Rewrite the generated blocks of the README at ``path``; returns ``(text, changed)``: the new
    text, and whether it differs from what the file held (the file is written only then)."""
    with open(path) as fh:
        text = before = fh.read()
    blocks = [("mechanisms", markdown_table()), ("gallery", gallery(figures_dir))]
    scaling_csv = os.path.join(figures_dir, "scaling.csv")
    if os.path.exists(scaling_csv) and "<!-- scaling:start -->" in text:
        blocks.append(("scaling", scaling_table(scaling_csv)))
    if parity.all_fixtures() and "<!-- parity:start -->" in text:
        blocks.append(("parity", parity.markdown_table()))
    for marker, body in blocks:
        pat = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"{path} has no <!-- {marker}:start/end --> markers")
        text = pat.sub(lambda mt: mt.group(1) + body + "\n" + mt.group(2), text)
    if text != before:
        with open(path, "w") as fh:
            fh.write(text)
    return text, text != before
