"""What `netdsl compile` reports: one row per node, totals, and the stable JSON form."""
from __future__ import annotations

from .ir.dims import Sym, fmt_shape, product, subs
from .ir.graph import Graph, Node

JSON_VERSION = 1


def node_rows(g: Graph, nodes=None, depth: int = 0):
    """Rows in schedule order; nodes inside a scan are indented under it."""
    phase = g.phase_of_nodes() if nodes is None else {}
    for n in (g.nodes if nodes is None else nodes):
        yield {
            "path": n.path, "op": n.op, "depth": depth,
            "shape": [fmt_shape(v.shape) for v in n.outputs],
            "dtype": [v.dtype for v in n.outputs],
            "params": sum(product(p.shape) for p in n.params.values() if p.role != "buffer"),
            "macs": n.macs, "phase": phase.get(id(n), "all"),
            "line": n.pos.line if n.pos else None, "file": n.pos.file if n.pos else None,
            "differentiable": _differentiable(n),
        }
        if n.body is not None:
            yield from node_rows(n.body, n.body.nodes, depth + 1)


def _differentiable(n: Node) -> bool:
    from .ops import OPS
    return n.op == "scan" or OPS[n.op].differentiable


def total_macs(g: Graph):
    return sum((n.macs for n in g.nodes), 0)


def per_example(d):
    """MACs per example: the batch symbol N set to 1."""
    return subs(d, {"N": 1})


def human(n) -> str:
    if isinstance(n, Sym):
        return str(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f}{unit}"
    return str(n)


def to_json(g: Graph) -> dict:
    rows = list(node_rows(g))
    for r in rows:
        r["macs"] = str(r["macs"])
    return {
        "version": JSON_VERSION,
        "network": g.name,
        "args": {k: v for k, v in g.args.items() if isinstance(v, (int, float, str, bool))},
        "symbols": sorted(g.symbols),
        "inputs": {k: {"shape": fmt_shape(v.shape), "dtype": v.dtype} for k, v in g.inputs.items()},
        "outputs": {k: {"shape": fmt_shape(v.shape), "dtype": v.dtype} for k, v in g.outputs.items()},
        "losses": [{"name": l.name, "weight": l.weight, "phase": l.phase} for l in g.losses],
        "params": g.param_count(),
        "param_tensors": {p.name: list(p.shape) for p in g.params.values() if p.role != "buffer"},
        "buffers": {p.name: list(p.shape) for p in g.params.values() if p.role == "buffer"},
        "macs": str(total_macs(g)),
        "macs_per_example": str(per_example(total_macs(g))),
        "state": [c.name for c in g.carries],
        "train": {k: (v.to_json() if hasattr(v, "to_json") else
                      [x.to_json() if hasattr(x, "to_json") else x for x in v] if isinstance(v, list) else v)
                  for k, v in g.train.items()},
        "nodes": rows,
    }


def table(g: Graph) -> str:
    rows = list(node_rows(g))
    head = ("node", "op", "output", "params", "mult-adds")
    body = []
    for r in rows:
        mark = "" if r["phase"] == "all" else "  (train)"
        body.append(("  " * r["depth"] + r["path"], r["op"], " ".join(r["shape"]),
                     f"{r['params']:,}" if r["params"] else "", human(per_example(r["macs"])) if r["macs"] != 0 else "" ) )
        if mark:
            body[-1] = (body[-1][0] + mark,) + body[-1][1:]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(5)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    out.append("")
    out.append(f"network   {g.name}")
    for k, v in g.inputs.items():
        out.append(f"input     {k}: {v.dtype}{fmt_shape(v.shape)}")
    for k, v in g.outputs.items():
        out.append(f"output    {k}: {v.dtype}{fmt_shape(v.shape)}")
    for l in g.losses:
        out.append(f"loss      {l.name} (weight {l.weight:g}{', train only' if l.phase == 'train' else ''})")
    out.append(f"params    {g.param_count():,}")
    m = total_macs(g)
    out.append(f"mult-adds {human(per_example(m))} per example" + (f"  ({m})" if isinstance(m, Sym) else ""))
    if g.carries:
        out.append("state     " + ", ".join(c.name for c in g.carries))
    return "\n".join(out)


def _dims(g: Graph, batch: int | None):
    from .errors import NetdslError
    n = batch if batch is not None else g.train.get("batch", 1)
    if n < 1:
        raise NetdslError(f"--batch must be positive, got {n}")
    free = sorted({name for v in g.inputs.values() for d in v.shape if isinstance(d, Sym)
                   for term in d.terms for name in term} - {"N"})
    if free:
        raise NetdslError(f"memory figures need every dimension fixed; give {', '.join(free)} with --set",
                          g.pos, hint=f"e.g. --set {free[0]}=32")
    return {"N": n} if "N" in g.symbols else {}, n


def device_memory(g: Graph, batch: int | None) -> str:
    from .runtime.cuda import device_memory as dm
    dims, n = _dims(g, batch)
    opt = g.train["optimizer"]
    mem = dm(g, dims, opt.name, momentum=bool(opt.kwargs.get("momentum", 0)))
    return (f"device memory for a training step at batch {n} ({opt.name}): "
            + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()))


def _plan(g: Graph, batch: int | None):
    from .autodiff import build
    from .plan import plan
    dims, n = _dims(g, batch)
    tg = build(g)
    return tg, plan(tg.nodes, tg.keep(), dims), n


def explain(g: Graph, batch: int | None) -> str:
    from .plan import explain as explain_plan
    tg, p, n = _plan(g, batch)
    params = sum(int(product(q.shape)) * 4 for q in g.params.values())
    head = [f"training step at batch {n}: {len(tg.nodes) - tg.n_forward} backward nodes generated "
            f"for {tg.n_forward} forward nodes",
            f"parameters   {params / 2**20:.1f} MiB (+ as much again for gradients)"]
    return "\n".join(head + [explain_plan(p)])


def plan_json(g: Graph, batch: int | None) -> dict:
    from .plan import loops, replays
    tg, p, n = _plan(g, batch)
    return {"batch": n, "backward_nodes": len(tg.nodes) - tg.n_forward, "steps": len(p.steps),
            "fused": [{"at": s.nodes[-1].path, "ops": s.name} for s in p.steps if len(s.nodes) > 1],
            "inplace_steps": sum(1 for s in p.steps if s.inplace),
            "recomputed": [n.fwd.path for n in replays(p)],
            "peak_bytes_unplanned": p.peak_naive, "peak_bytes_planned": p.peak_planned, "loops": loops(p)}
