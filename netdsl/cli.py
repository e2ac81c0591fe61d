"""The `netdsl` command: compile, render (and, with the runtime, run)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import NetdslError

EXIT_USER = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 too; keep our format
        self.print_usage(sys.stderr)
        print(f"netdsl: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER)


def parse_sets(items) -> dict:
    """--set name=value; values are numbers, true/false or strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise NetdslError(f"--set expects name=value, got '{item}'")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k.isidentifier():
            raise NetdslError(f"--set: '{k}' is not a valid name")
        v = v.strip()
        if v in ("true", "false"):
            out[k] = v == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def load_graph(args):
    from .lang.elaborate import elaborate
    g, loader = elaborate(args.spec, getattr(args, "network", None), parse_sets(getattr(args, "set", None)))
    args._sources = loader.sources
    return g


def cmd_compile(args):
    from . import report
    g = load_graph(args)
    if args.json:
        print(json.dumps(report.to_json(g), indent=1))
    else:
        print(report.table(g))
    return 0


def cmd_render(args):
    from .render import render
    g = load_graph(args)
    render(g, args.output, depth=args.depth, expand=args.expand)
    print(f"wrote {args.output}")
    return 0


def cmd_ops(args):
    from .ops import OPS, REQUIRED
    from .ops.registry import _show
    names = sorted(OPS) if not args.name else args.name
    for n in names:
        if n not in OPS:
            from .errors import did_you_mean
            raise NetdslError(f"unknown operator '{n}'", hint=did_you_mean(n, OPS))
        op = OPS[n]
        attrs = ", ".join(a.name if a.default is REQUIRED else f"{a.name}={_show(a.default)}" for a in op.attrs)
        ins = ", ".join(op.inputs)
        flag = "" if op.differentiable else "  [no gradient]"
        print(f"{n}({ins}{'; ' if ins and attrs else ''}{attrs}){flag}")
        if op.doc:
            print("    " + op.doc.splitlines()[0])
    return 0


def build_parser():
    p = _Parser(prog="netdsl", description="netdsl: check, draw, train and run neural network specs")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def spec_args(sp):
        sp.add_argument("spec", help="the .net file")
        sp.add_argument("--network", help="which network, when the file defines several")
        sp.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override a network parameter or fix a symbolic dimension (repeatable)")

    c = sub.add_parser("compile", help="check a spec; print every node's shape, parameters and mult-adds")
    spec_args(c)
    c.add_argument("--json", action="store_true", help="machine-readable report (see docs/cli.md)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("render", help="draw the graph with Graphviz (.svg .png .pdf .dot)")
    spec_args(r)
    r.add_argument("-o", "--output", required=True, help="output file; the extension picks the format")
    r.add_argument("--depth", type=int, default=None,
                   help="block nesting depth to draw; deeper blocks are one box (default: whole network, "
                        "with repeated blocks folded)")
    r.add_argument("--expand", action="store_true", help="draw repeated blocks one by one instead of folding")
    r.set_defaults(fn=cmd_render)
    o = sub.add_parser("ops", help="list operators with their inputs and attributes")
    o.add_argument("name", nargs="*", help="only these operators")
    o.set_defaults(fn=cmd_ops)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NetdslError as e:
        print(e.render(getattr(args, "_sources", None)), file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
