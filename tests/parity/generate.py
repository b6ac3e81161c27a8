"""Regenerate every parity fixture: ``python tests/parity/generate.py [peer ...]``.

Run it in an environment with torch and the peers installed (never in CI; they are not
dependencies): e.g. ``python -m venv ~/peers && ~/peers/bin/pip install torch==2.13.0 numpy
transformers linformer local-attention axial-attention routing-transformer nystrom-attention
performer-pytorch sinkhorn-transformer``, then ``PYTHONPATH=. ~/peers/bin/python
tests/parity/generate.py``. Each ``peer_<name>.py`` beside this file has a ``generate()`` that
writes its fixtures with :func:`fixture.save`; seeds are fixed, so the files are reproducible.
"""
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv):
    peers = argv or sorted(p.stem[5:] for p in HERE.glob("peer_*.py"))
    for peer in peers:
        mod = importlib.import_module(f"peer_{peer}")
        paths = mod.generate()
        print(f"{peer}: {len(paths)} fixtures")
        for p in paths:
            print("  ", pathlib.Path(p).name)


if __name__ == "__main__":
    main(sys.argv[1:])
