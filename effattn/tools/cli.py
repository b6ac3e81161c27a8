"""The command line: ``python -m effattn {list,readme,figures,check,bench,train}``.

    python -m effattn list [--markdown]
    python -m effattn figures [--out DIR] [--only NAME ...]
    python -m effattn check [--backend cupy] [--only NAME ...]
    python -m effattn bench [--names ...] [--n ...] [--quick] [--causal] [--out bench_results]
    python -m effattn train --task copy --attention full ...
    python -m effattn readme [--path README.md] [--figures figures]

How a command ends, always in at most one line on stderr and never a traceback:

====================  ======  =====================================================
what happened         status  stderr
====================  ======  =====================================================
done                  0       (nothing; ``check`` exits 1 when a mechanism fails)
bad argument / input  2       ``effattn: error: argument --repeats: ...`` (checked before any work)
training diverged     1       ``effattn: error: training diverged at step 7: loss nan ...``
Ctrl-C                130     ``effattn: interrupted`` (``train`` adds what it saved)
stdout closed early   141     nothing (``python -m effattn list | head -1``)
====================  ======  =====================================================
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from .. import registry

PROG = "effattn"
BENCH_OUT = "bench_results"      # bench's default --out: git-ignored, never the committed figures/


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line, ``effattn: error: ...``, exit status 2 (the subcommands'
    parsers inherit it)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _error(message, status=2):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------- argument types
def _number(kind, minimum, strict=False):
    """An argparse ``type=``: ``kind`` (int or float) >= ``minimum`` (> when ``strict``), finite."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__          # argparse names the type in its own messages
    return parse


positive_int = _number(int, 1)
positive_float = _number(float, 0.0, strict=True)


def out_folder(text):
    """An argparse ``type=``: a folder to write into (made if missing); an existing file is refused."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


class _TwoOrMore(argparse.Action):
    """``nargs="+"`` that needs at least two distinct values (an exponent is a slope: two points at least)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) < 2:
            raise argparse.ArgumentError(self, f"give at least two distinct lengths (a scaling exponent cannot be "
                                               f"fitted from one N), got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


def _no_bar(progress=True):
    """tqdm's ``disable=``: True when progress is off or ``TQDM_DISABLE`` is set, else None (a bar on a
    terminal only, never into a log). tqdm reads ``TQDM_DISABLE`` only when no ``disable=`` is given."""
    off = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return True if off else None


# --------------------------------------------------------------------------- commands
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

    _, changed = readme.update(args.path, args.figures)
    print(f"updated {args.path}" if changed else f"{args.path} is up to date")
    return 0


def cmd_figures(args):
    from .. import figures

    paths = figures.write(args.only, args.out, progress=True)
    for path in paths:
        print(path)
    count = len(dict.fromkeys(args.only)) if args.only else len(registry.names())
    print(f"wrote {len(paths)} files for {count} mechanism{'s' if count != 1 else ''} into "
          f"{os.path.join(args.out, '')}")
    return 0


def cmd_check(args):
    """Gradient and dense checks for every mechanism: how a user validates an install or a GPU."""
    from tqdm import tqdm

    from .. import backend
    from .check import check_mechanism, format_rows

    if args.backend:
        backend.set_backend(args.backend)
    names = _selected(args.only)
    rows = [check_mechanism(name) for name in tqdm(names, desc="check", unit="mechanism", disable=_no_bar())]
    print(format_rows(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_bench(args):
    from . import bench

    if args.peers is not None:                     # the options after --peers are benchmarks/peers.py's
        return bench.run_peers((["--names", *args.names] if args.names and "--names" not in args.peers else [])
                               + args.peers)
    from .. import backend
    from ..figures.scaling import scaling_figures

    if args.backend:
        backend.set_backend(args.backend)
    if args.decode:
        return _decode_bench(args, bench)
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


def _decode_bench(args, bench):
    """``bench --decode``: time per generated token and state size against the position."""
    from ..figures.scaling import decode_figures

    prompt, steps = (256, 256) if args.quick else (args.prompt, args.steps)
    rows, traces = bench.decode_run(args.names, prompt=prompt, steps=steps, d=args.d, clock=args.clock,
                                    window=max(1, min(256, steps // 4)))
    print(bench.format_decode_table(rows))
    path = os.path.join(args.out, "decode.csv")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote " + ", ".join([path] + decode_figures(traces, args.out, d=args.d)))
    if args.json:
        print(json.dumps(rows))
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
    p = _Parser(prog="python -m effattn", description="effattn: the Efficient Transformers survey in NumPy")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="the registered mechanisms")
    s.add_argument("--markdown", action="store_true", help="the README table")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("readme", help="rewrite the README's mechanism table and gallery")
    s.add_argument("--path", default="README.md")
    s.add_argument("--figures", default="figures")
    s.set_defaults(func=cmd_readme)

    s = sub.add_parser("figures", help="render one PNG per mechanism plus overview figures")
    s.add_argument("--out", default="figures", type=out_folder)
    s.add_argument("--only", nargs="+", metavar="NAME")
    s.set_defaults(func=cmd_figures)

    s = sub.add_parser("check", help="gradient and dense checks of every mechanism (pass/fail table)")
    s.add_argument("--backend", choices=["numpy", "cupy"])
    s.add_argument("--only", nargs="+", metavar="NAME")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("bench", help="time and memory against N, fitted exponents, ratios to full",
                       description="Forward + backward time and peak memory of every mechanism against N. The "
                                   "defaults (N = 1024..16384, 3 repeats) take minutes: --quick for a first look. "
                                   "Progress: a bar on a terminal, else one line per mechanism on stderr.")
    s.add_argument("--names", nargs="+", metavar="NAME")
    s.add_argument("--n", nargs="+", type=positive_int, action=_TwoOrMore, metavar="N",
                   help="sequence lengths, at least two distinct (the exponents are fitted through them)")
    s.add_argument("--quick", action="store_true", help=f"small N {tuple(_quick_n())}, one repeat")
    s.add_argument("--causal", action="store_true")
    s.add_argument("--d", type=positive_int, default=64, help="head size (default 64)")
    s.add_argument("--repeats", type=positive_int, default=3, help="timed runs per point, the median is kept")
    s.add_argument("--full-max-n", type=positive_int, default=16384, help="skip full above this N")
    s.add_argument("--max-seconds", type=positive_float, default=60.0,
                   help="a mechanism whose point took longer skips its larger N")
    s.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time (default) or process CPU time (steadier on a shared machine)")
    s.add_argument("--threads", type=positive_int, help="set the BLAS thread count first (e.g. 1 on a busy machine)")
    s.add_argument("--backend", choices=["numpy", "cupy"])
    s.add_argument("--out", default=BENCH_OUT, type=out_folder,
                   help=f"folder for scaling.csv and the curves (default {BENCH_OUT}/, git-ignored, so a run never "
                        f"overwrites the committed figures/scaling.*; to refresh those and the README's table: "
                        f"python -m effattn bench --out figures && python -m effattn readme)")
    s.add_argument("--json", action="store_true", help="also print the summary as JSON")
    s.add_argument("--decode", action="store_true",
                   help="instead: decode --steps tokens after a --prompt-token prefill, time per token and state size")
    s.add_argument("--prompt", type=positive_int, default=4096, help="--decode: prompt length (default 4096)")
    s.add_argument("--steps", type=positive_int, default=4096, help="--decode: tokens generated (default 4096)")
    s.add_argument("--peers", nargs=argparse.REMAINDER, metavar="OPTION",
                   help="instead: effattn against the PyTorch peers in one process, ratio effattn / peer "
                        "(benchmarks/peers.py; needs torch and the peers, else prints what to install). Every "
                        "option after --peers is its own: --names, --n, --repeats (5), --threads (2), --out "
                        "(figures/peers.csv); see --peers --help")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="train a small transformer with any attention (see --help)")
    from . import train

    train.add_train_arguments(s)
    s.set_defaults(func=cmd_train)
    return p


def _silence_stdout():
    """The reader of stdout went away (``| head``): point stdout at devnull so that Python's own
    flush at exit does not raise a second BrokenPipeError (the recipe in the Python docs of `signal`)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout is not a real file (captured)
        pass


def main(argv=None):
    """Parse and run one command; returns its exit status (see the module docstring's table).
    A usage error raises SystemExit(2) after its one line, as argparse does."""
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args)
        sys.stdout.flush()                  # a closed pipe shows here, not at exit
        return status
    except KeyboardInterrupt as exc:
        detail = f" ({exc})" if str(exc) else ""
        print(f"{PROG}: interrupted{detail}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except MemoryError as exc:
        return _error(f"out of memory ({exc or 'an allocation failed'}); use smaller sizes")
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return _error(msg, getattr(exc, "exit_status", 2))


if __name__ == "__main__":
    sys.exit(main())
