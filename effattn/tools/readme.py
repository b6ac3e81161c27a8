"""The README's generated parts: the table of mechanisms, the measured-scaling table, the timings
against the PyTorch peers (from ``figures/peers.csv``, written by ``bench --peers``; the section is added
when a README has none), the parity table (from the fixtures of ``tests/parity``), the gallery.

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
from .bench import PEERS_INSTALL, fit_exponent

PEERS_HEADING = "## Measured against the PyTorch peers"
PEERS_BEFORE = "## Parity with the peers"       # where the section goes when a README has none yet


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


def peers_section(csv_path):
    """The README's "Measured against the PyTorch peers" from ``bench --peers``'s CSV (``figures/peers.csv``):
    the protocol, the date, machine and versions of the run, one table row per CSV row; without the CSV, how
    to make it."""
    if not os.path.exists(csv_path):
        return ("Not measured here yet. With torch and the peers installed (development tools, never dependencies: "
                f"`{PEERS_INSTALL}`), `python -m effattn bench --peers` times effattn and each mechanism's PyTorch "
                "peer side by side in one process ([benchmarks/peers.py](benchmarks/peers.py) maps every row) and "
                "writes `figures/peers.csv`; `python -m effattn readme` then renders it here. Without torch the "
                "command prints that install line and exits 0.")
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return "`figures/peers.csv` holds no rows: run `python -m effattn bench --peers` again."

    def values(key, default="?"):
        return "; ".join(dict.fromkeys(r.get(key) or default for r in rows))

    repeats, threads = values("repeats", "5"), values("threads", "2")
    lines = [f"effattn (NumPy) and each mechanism's PyTorch peer, timed side by side in one process by "
             f"`python -m effattn bench --peers` ([benchmarks/peers.py](benchmarks/peers.py); its docstring states, "
             f"row by row, which settings correspond and what differs): forward + backward, float32, B = 1, H = 4, "
             f"d = 64, {threads} threads on each side, runs interleaved (effattn, peer, ...), the median of {repeats} "
             f"wall-clock runs after a warm-up. **effattn / peer < 1: effattn is faster.** Measured "
             f"{values('date')} on {values('machine')}; torch {values('torch_version')}, NumPy "
             f"{values('numpy_version')}; every row is in `figures/peers.csv`. The machine is shared: read the "
             f"ratios, not the absolute times.",
             "",
             "| mechanism | setting | peer (version) | N | effattn ms | peer ms | effattn / peer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        te, tp = float(r["effattn_s"]), float(r["peer_s"])
        lines.append(f"| `{r['mechanism']}` | {r['setting']} | `{r['peer']}` {r['peer_version']} | {int(r['n'])} | "
                     f"{te * 1e3:.1f} | {tp * 1e3:.1f} | {te / tp:.2f} |")
    return "\n".join(lines)


def _with_section(text, heading, marker, before):
    """``text`` with an empty ``heading`` section holding ``marker``'s start/end comments, placed before the
    ``before`` heading (appended when there is none); ``text`` itself when it has the markers already."""
    if f"<!-- {marker}:start -->" in text:
        return text
    section = f"{heading}\n\n<!-- {marker}:start -->\n<!-- {marker}:end -->\n\n"
    at = text.find(f"\n{before}\n")
    if at < 0:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    return text[:at + 1] + section + text[at + 1:]


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
    text = _with_section(text, PEERS_HEADING, "peers", PEERS_BEFORE)
    blocks.append(("peers", peers_section(os.path.join(figures_dir, "peers.csv"))))
    for marker, body in blocks:
        pat = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"{path} has no <!-- {marker}:start/end --> markers")
        text = pat.sub(lambda mt: mt.group(1) + body + "\n" + mt.group(2), text)
    if text != before:
        with open(path, "w") as fh:
            fh.write(text)
    return text, text != before
