"""The command line: ``python -m effattn {list,readme,figures,check,bench,train}``.

    python -m effattn list [--markdown]
    python -m effattn figures [--out DIR] [--only NAME ...]
    python -m effattn check [--backend cupy] [--only NAME ...]
    python -m effattn bench [--names ...] [--n ...] [--quick] [--causal]
    python -m effattn train --task copy --attention full ...
    python -m effattn readme [--path README.md] [--figures figures]

Errors print one clear line (``effattn: error: ...``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import registry


def _selected(only):
    names = only or registry.names()
    for n in names:
        registry.get(n)  # unknown names raise ValueError listing the valid ones
    return names


def cmd_list(args):
    from . import readme

    if args.markdown:
        print(readme.markdown_table())
        return 0
    print(f"{'name':20s} {'title':42s} {'taxonomy':10s} {'complexity':18s} {'causal':6s} {'exact':6s} kind")
    for name in registry.names():
        m = registry.get(name)
        print(f"{m.name:20s} {m.title[:42]:42s} {','.join(m.classes):10s} {m.complexity:18s} "
              f"{'yes' if m.causal else 'no':6s} {'yes' if m.exact else 'no':6s} {m.kind}")
    return 0


def cmd_readme(args):
    """Rewrite the README's mechanism table, scaling table and figure gallery (between their marker comments)."""
    from . import readme

    readme.update(args.path, args.figures)
    print(f"updated {args.path}")
    return 0


def cmd_figures(args):
    from .. import figures

    for path in figures.write(args.only, args.out, progress=True):
        print(path)
    return 0


def cmd_check(args):
    """Gradient and dense checks for every mechanism: how a user validates an install or a GPU."""
    from tqdm import tqdm

    from .. import backend
    from .check import check_mechanism, format_rows

    if args.backend:
        backend.set_backend(args.backend)
    rows = [check_mechanism(name) for name in tqdm(_selected(args.only), desc="check")]
    print(format_rows(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_bench(args):
    from .. import backend
    from ..figures.scaling import scaling_figures
    from . import bench

    if args.backend:
        backend.set_backend(args.backend)
    ns = args.n or (bench.QUICK_N if args.quick else bench.DEFAULT_N)
    rows, summary = bench.run(args.names, ns, d=args.d, causal=args.causal, repeats=1 if args.quick else args.repeats,
                              full_max_n=args.full_max_n, max_seconds=args.max_seconds, clock=args.clock,
                              threads=args.threads)
    print(bench.format_table(rows, summary))
    csv_path = bench.write_csv(rows, os.path.join(args.out, "scaling.csv"))
    paths = [csv_path] + scaling_figures(rows, args.out, d=args.d)
    print("wrote " + ", ".join(paths))
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_train(args):
    from . import train

    result = train.run_train(args)
    print(json.dumps(result))
    return 0


def _quick_n():
    from .bench import QUICK_N

    return QUICK_N


def build_parser():
    p = argparse.ArgumentParser(prog="python -m effattn", description="effattn: the Efficient Transformers survey in NumPy")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="the registered mechanisms")
    s.add_argument("--markdown", action="store_true", help="the README table")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("readme", help="rewrite the README's mechanism table and gallery")
    s.add_argument("--path", default="README.md")
    s.add_argument("--figures", default="figures")
    s.set_defaults(func=cmd_readme)

    s = sub.add_parser("figures", help="render one PNG per mechanism plus overview figures")
    s.add_argument("--out", default="figures")
    s.add_argument("--only", nargs="+", metavar="NAME")
    s.set_defaults(func=cmd_figures)

    s = sub.add_parser("check", help="gradient and dense checks of every mechanism (pass/fail table)")
    s.add_argument("--backend", choices=["numpy", "cupy"])
    s.add_argument("--only", nargs="+", metavar="NAME")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("bench", help="time and memory against N, fitted exponents, ratios to full")
    s.add_argument("--names", nargs="+", metavar="NAME")
    s.add_argument("--n", nargs="+", type=int, metavar="N")
    s.add_argument("--quick", action="store_true", help=f"small N {tuple(_quick_n())}, one repeat")
    s.add_argument("--causal", action="store_true")
    s.add_argument("--d", type=int, default=64)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--full-max-n", type=int, default=16384)
    s.add_argument("--max-seconds", type=float, default=60.0)
    s.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time (default) or process CPU time (steadier on a shared machine)")
    s.add_argument("--threads", type=int, help="set the BLAS thread count first (e.g. 1 on a busy machine)")
    s.add_argument("--backend", choices=["numpy", "cupy"])
    s.add_argument("--out", default="figures")
    s.add_argument("--json", action="store_true", help="also print the summary as JSON")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="train a small transformer with any attention (see --help)")
    from . import train

    train.add_train_arguments(s)
    s.set_defaults(func=cmd_train)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"effattn: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
