"""The command line: ``python -m effattn {list,figures,check,bench,train}``.

    python -m effattn list [--markdown]
    python -m effattn figures [--out DIR] [--only NAME ...]
    python -m effattn check [--backend cupy] [--only NAME ...]
    python -m effattn bench [--names ...] [--n ...] [--quick] [--causal]
    python -m effattn train --task copy --attention full ...

Errors print one clear line (``effattn: error: ...``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _registry():
    from . import registry

    return registry


def cmd_list(args):
    reg = _registry()
    if args.markdown:
        print(reg.markdown_table())
        return 0
    print(f"{'name':20s} {'title':42s} {'taxonomy':10s} {'complexity':18s} {'causal':6s} {'exact':6s} kind")
    for m in reg.all_mechanisms():
        print(f"{m.name:20s} {m.title[:42]:42s} {','.join(m.classes):10s} {m.complexity:18s} "
              f"{'yes' if m.causal else 'no':6s} {'yes' if m.exact else 'no':6s} {m.kind}")
    return 0


def cmd_readme(args):
    """Rewrite the README's mechanism table and figure gallery (between their marker comments)."""
    import glob
    import re

    reg = _registry()
    text = open(args.path).read()
    gallery = []
    figs = sorted(glob.glob(os.path.join(args.figures, "*.png")))
    for m in reg.all_mechanisms():
        own = [f for f in figs if os.path.basename(f).startswith(m.name + "_")]
        if own:
            gallery.append(f"**{m.title}** (`{m.name}`)\n\n" + " ".join(
                f'<img src="{f}" height="220" alt="{os.path.basename(f)}">' for f in own) + "\n")
    extra = [f for f in figs if os.path.basename(f).startswith(("overview", "scaling"))]
    if extra:
        gallery.append("**Overview and scaling**\n\n" + " ".join(
            f'<img src="{f}" height="260" alt="{os.path.basename(f)}">' for f in extra) + "\n")
    blocks = [("mechanisms", reg.markdown_table()), ("gallery", "\n".join(gallery))]
    scaling_csv = os.path.join(args.figures, "scaling.csv")
    if os.path.exists(scaling_csv) and "<!-- scaling:start -->" in text:
        blocks.append(("scaling", scaling_table(scaling_csv)))
    for marker, body in blocks:
        pat = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"{args.path} has no <!-- {marker}:start/end --> markers")
        text = pat.sub(lambda mt: mt.group(1) + body + "\n" + mt.group(2), text)
    open(args.path, "w").write(text)
    print(f"updated {args.path}")
    return 0


def scaling_table(csv_path):
    """Markdown summary of a bench CSV: fitted exponents and the ratios to full at the largest N."""
    import csv

    from .bench import fit_exponent

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


def _selected(only):
    reg = _registry()
    names = only or reg.names()
    for n in names:
        reg.get(n)  # unknown names raise ValueError listing the valid ones
    return names


def cmd_figures(args):
    from tqdm import tqdm

    from . import viz

    reg = _registry()
    names = _selected(args.only)
    written = []
    for name in tqdm(names, desc="figures"):
        spec = reg.get(name)
        rng = np.random.default_rng(0)
        if spec.kind == "kernel":
            written.append(viz.mechanism_pattern_figure(spec, rng, out_dir=args.out))
        if spec.figures is not None:
            written.extend(spec.figures(args.out, np.random.default_rng(0)) or [])
    if not args.only:
        written.append(overview_figure(args.out))
    for path in dict.fromkeys(written):
        print(path)
    return 0


def overview_figure(out_dir):
    """Every kernel's effective attention support at N = 32, one panel each."""
    from . import viz

    reg = _registry()
    mats, titles = [], []
    for spec in reg.all_mechanisms():
        if spec.kind != "kernel":
            continue
        case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=32, d=8, causal=False)
        _, cache = spec.forward(**case.inputs, **case.config)
        w = np.asarray(_to_host(spec.weights(cache)))
        while w.ndim > 2:
            w = w[0]
        mats.append(np.abs(w) > 1e-12 if spec.exact else np.abs(w))
        titles.append(f"{spec.name} [{','.join(spec.classes)}]")
    fig = viz.plot_patterns(mats, titles, suptitle="Effective attention of every kernel (N = 32)", ncols=6)
    return viz.save(fig, os.path.join(out_dir, "overview_patterns.png"))


def _to_host(a):
    from .backend import to_numpy

    return to_numpy(a)


def cmd_check(args):
    """Gradient and dense checks for every mechanism: how a user validates an install or a GPU."""
    from tqdm import tqdm

    from . import backend
    from .gradcheck import check_gradients

    if args.backend:
        backend.set_backend(args.backend)
    reg = _registry()
    names = _selected(args.only)
    results = []
    for name in tqdm(names, desc="check"):
        spec = reg.get(name)
        row = {"name": name, "grad": 0.0, "dense": float("nan"), "w@v": float("nan")}
        for causal in ([False, True] if spec.causal else [False]):
            case = spec.example(np.random.default_rng(0), batch=1, heads=2, n=11, d=3, causal=causal)
            errs = check_gradients(spec.forward, spec.backward, case.inputs, case.config)
            row["grad"] = max(row["grad"], max(errs.values()))
            out, cache = spec.forward(**case.inputs, **case.config)
            out_h = np.asarray(backend.to_numpy(out))
            if spec.kind == "kernel":
                w = spec.weights(cache)
                wv = np.asarray(backend.to_numpy(w @ case.inputs["v"]))
                row["w@v"] = max(np.nan_to_num(row["w@v"]), float(np.abs(out_h - wv).max()))
            if spec.kind == "kernel" and (spec.exact or spec.reference is not None):
                if spec.reference is not None:
                    ref = spec.reference(**case.inputs, **case.config)
                else:
                    i = case.inputs
                    ref, _ = reg.get("full").forward(i["q"], i["k"], i["v"], causal=causal, mask=spec.pattern(cache))
                err = float(np.abs(out_h - np.asarray(backend.to_numpy(ref))).max())
                row["dense"] = max(np.nan_to_num(row["dense"]), err)
        row["ok"] = row["grad"] < 1e-6 and not (row["dense"] > 1e-10) and not (row["w@v"] > 1e-10)
        results.append(row)
    print(f"backend: {backend.get_backend()}")
    print(f"{'mechanism':20s} {'grad rel err':>12s} {'dense max err':>14s} {'out - W v':>10s}  result")
    def cell(x, width):  # "-" where the check does not apply (no dense form, or a layer)
        return f"{'-':>{width}s}" if x != x else f"{x:{width}.2e}"

    for r in results:
        print(f"{r['name']:20s} {cell(r['grad'], 12)} {cell(r['dense'], 14)} {cell(r['w@v'], 10)}  "
              f"{'PASS' if r['ok'] else 'FAIL'}")
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_bench(args):
    from . import backend, bench

    if args.backend:
        backend.set_backend(args.backend)
    ns = args.n or (bench.QUICK_N if args.quick else bench.DEFAULT_N)
    rows, summary = bench.run(args.names, ns, d=args.d, causal=args.causal, repeats=1 if args.quick else args.repeats,
                              full_max_n=args.full_max_n, max_seconds=args.max_seconds, clock=args.clock,
                              threads=args.threads)
    print(bench.format_table(rows, summary))
    csv_path = bench.write_csv(rows, os.path.join(args.out, "scaling.csv"))
    paths = [csv_path] + bench.write_figures(rows, args.out)
    print("wrote " + ", ".join(paths))
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_train(args):
    from . import train

    result = train.run_train(args)
    print(json.dumps(result))
    return 0


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
    s.add_argument("--quick", action="store_true", help=f"small N {tuple(__import__('effattn.bench').bench.QUICK_N)}, one repeat")
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
    try:
        from . import train

        train.add_train_arguments(s)
    except ImportError:  # the training module is optional while it is being built
        pass
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
