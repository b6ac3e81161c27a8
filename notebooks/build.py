"""Build the executed notebooks from their readable sources.

Each notebook ``notebooks/NN_name.ipynb`` is assembled from the percent-format
files in ``notebooks/src/NN_name/`` (sorted by file name, so several authors
can each own a part of one notebook):

    # %% [markdown]
    # # Title
    # text ...

    # %%
    code ...

then executed (notebooks are committed executed, so they render on GitHub)
and written without widget state. Usage:

    python notebooks/build.py                 # every notebook
    python notebooks/build.py 01_fixed_patterns 03_learned_patterns
    python notebooks/build.py --no-execute 05_low_rank
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def parse_percent(text):
    """Split a percent-format file into (cell_type, source) pairs."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is not None:
            src = "\n".join(lines).strip("\n")
            if kind == "markdown":
                src = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in src.splitlines())
            if src.strip():
                cells.append((kind, src))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def assemble(name):
    folder = SRC / name
    parts = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    if not parts:
        raise SystemExit(f"no sources in {folder}")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for part in parts:
        for kind, src in parse_percent(part.read_text()):
            cell = nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
            nb.cells.append(cell)
    return nb


def build(name, execute=True, timeout=600):
    nb = assemble(name)
    t0 = time.time()
    if execute:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    nb.metadata.pop("widgets", None)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:03d}"
        cell.get("metadata", {}).pop("execution", None)
    out = HERE / f"{name}.ipynb"
    nbformat.write(nb, out)
    print(f"{out.relative_to(HERE.parent)}: {len(nb.cells)} cells, {time.time() - t0:.1f} s")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="notebook names (folders of notebooks/src); default all")
    ap.add_argument("--no-execute", action="store_true")
    args = ap.parse_args(argv)
    names = args.names or sorted(p.name for p in SRC.iterdir() if p.is_dir())
    for name in names:
        build(name, execute=not args.no_execute)


if __name__ == "__main__":
    sys.exit(main())
