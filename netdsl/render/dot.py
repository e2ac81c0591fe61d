"""Scene -> Graphviz DOT text: clusters for blocks, HTML-table boxes, shape-labelled edges."""
from __future__ import annotations

import itertools

import graphviz

from ..ir.dims import fmt_shape
from . import style
from .scene import Box, Cluster, Scene
from .style import esc

FONT = "Helvetica"
SMALL = 9


def to_dot(scene: Scene, rankdir: str = "TB", legend: bool = True) -> str:
    g = scene.graph
    d = graphviz.Digraph(g.name)
    d.attr("graph", rankdir=rankdir, fontname=FONT, fontsize="12", newrank="true", nodesep="0.25",
           ranksep="0.3", labelloc="t", label=_graph_label(scene), tooltip=g.name)
    d.attr("node", fontname=FONT, fontsize="10", shape="box", style="rounded,filled", margin="0.08,0.04")
    d.attr("edge", fontname=FONT, fontsize="8", fontcolor="#555555", color="#666666", arrowsize="0.6")
    by_parent: dict[int, list[Box]] = {}
    for b in scene.boxes:
        by_parent.setdefault(id(b.parent) if b.parent is not None else id(scene.root), []).append(b)
    with d.subgraph(name="inputs") as s:      # inputs on the first rank
        s.attr(rank="source")
        for b in scene.boxes:
            if b.kind == "input":
                _node(s, b)
    _fill(d, scene.root, by_parent, itertools.count())
    for e in scene.edges:
        if e.back:
            colour = style.GRAD_EDGE if e.reverse else style.BACK_EDGE
            d.edge(e.src.id, e.dst.id, label=esc(e.label), color=colour, fontcolor=colour,
                   penwidth="1.8", constraint="false",
                   tooltip=f"gradient {e.label} of a carried state: step t+1 back to t" if e.reverse
                   else f"carried state {e.label}: step t to t+1")
        elif e.saved:
            d.edge(e.src.id, e.dst.id, label=esc(e.label), style="dotted", color=style.SAVED_EDGE,
                   fontcolor=style.SAVED_EDGE, tooltip="a forward value of the step, saved at every step for the backward")
        else:
            d.edge(e.src.id, e.dst.id, label=esc(e.label),
                   style="dashed" if e.src.train_only or e.dst.train_only else "solid")
    if legend:
        d.node("legend", label=_legend(scene), shape="plain", style="")
    return d.source


def _fill(d, cluster: Cluster, by_parent, ids):
    """Boxes and sub-clusters of `cluster`, in program order."""
    for b in by_parent.get(id(cluster), []):
        if b.kind != "input":
            _node(d, b)
    for c in cluster.children:
        if not isinstance(c, Cluster) or c.collapsed:
            continue
        inner = by_parent.get(id(c), [])
        if c.kind == "block" and len(inner) == 1 and inner[0].kind == "ops" and inner[0].loss is None \
                and not any(isinstance(s, Cluster) and not s.collapsed for s in c.children):
            _ops_node(d, inner[0], header=c)     # a block of one box: the box, titled, not a frame around it
            continue
        with d.subgraph(name=f"cluster_{next(ids)}") as s:
            s.attr(label=_cluster_label(c), **_cluster_style(c))
            _fill(s, c, by_parent, ids)


# ------------------------------------------------------------ clusters

def _name(c: Cluster) -> str:
    return c.frame.callee + (" backward" if c.backward else "")


def _title(c: Cluster) -> str:
    f = c.frame
    n = len(c.instances)
    if c.kind == "step":
        length = c.scan.attrs.get("length") if c.scan is not None else None
        over = f" over {style.dim(length)}" if length is not None else ""
        return f"↺ {_name(c)}{over}, reversed" if c.backward else f"↻ {f.callee}{over}"
    if c.kind == "loop":
        return f.scope
    return f.callee + (f" ×{n}" if n > 1 else "")


def _where(c: Cluster) -> str:
    """The path, or the run of paths of a folded block (layer3.1 … layer3.35)."""
    if len(c.instances) > 1:
        return f"{c.instances[0].path} … {c.instances[-1].path}"
    return c.path


def _cluster_label(c: Cluster) -> str:
    bits = [b for b in (_where(c) if c.kind != "loop" else "",) if b]
    if c.backward:
        states = [it.carry.name.rsplit(".", 1)[-1] for it in c.children if not isinstance(it, Cluster) and it.carry]
        if states:
            bits.append("state gradient " + ", ".join(states))
        bits.append(f"reads {_saved(c.scan)} saved per step")
    elif c.kind == "step" and c.scan is not None and c.scan.attrs.get("carries"):
        bits.append("state " + ", ".join(c.scan.attrs["carries"]))
    if c.params:
        bits.append(f"{c.params:,} params" + (" in all" if len(c.instances) > 1 else ""))
    if c.train_only:
        bits.append("train only")
    sub = f'<br/><font point-size="{SMALL}" color="#555555">{esc(" · ".join(bits))}</font>' if bits else ""
    return f"<<b>{esc(_title(c))}</b>{sub}>"


def _cluster_style(c: Cluster) -> dict:
    shade = "#f7f9fc" if c.level % 2 else "#fdfdfd"
    st = {"fontname": FONT, "fontsize": "11", "labeljust": "l", "style": "rounded,filled",
          "color": "#9aa7bd", "fillcolor": shade, "penwidth": "1"}
    if c.kind == "loop":
        st.update(style="rounded,dotted", color="#888888", fillcolor="#ffffff")
    if c.kind == "step":
        st.update(color=style.BACK_EDGE, fillcolor="#eef6fb", penwidth="1.5")
    if c.backward:
        st.update(color=style.GRAD_EDGE, fillcolor=style.GRAD_LOOP)
    if len(c.instances) > 1:           # a folded run: a heavier frame, like a stack of cards
        st.update(penwidth="2.5", color="#5b6f8e")
    if c.train_only:
        st.update(style="rounded,dashed,filled", color=style.TRAIN_GREY, fontcolor="#666666")
    st["tooltip"] = f"{c.kind} {_name(c)} at {c.frame.pos}" if c.frame.pos else c.kind
    return st


def _saved(g) -> str:
    """What a backward step reads from its forward step: `h, x_t and 5 more`."""
    from ..autodiff import step_grad
    res = step_grad(g.fwd).residuals
    named = list(dict.fromkeys(v.name for v in res if v.name))
    more = sum(not v.name for v in res)
    if not named:
        return f"{more} values"
    return ", ".join(named) + (f" and {more} more" if more else "")


# ------------------------------------------------------------ boxes

def _node(d, b: Box):
    if b.kind == "input":
        v = b.value
        d.node(b.id, label=f"<<b>{esc(b.name)}</b><br/><font point-size='{SMALL}'>"
                           f"{esc(v.dtype + fmt_shape(v.shape))}</font>>".replace("'", '"'),
               shape="ellipse", style="filled,bold", fillcolor=style.INPUT[0], color=style.INPUT[1],
               tooltip=f"input {b.name}")
    elif b.kind == "output":
        d.node(b.id, label=_lines(f"<b>output {esc(b.name)}</b>", style.shape_label(b.value.shape, b.value.dtype)),
               shape="ellipse", peripheries="2", style="filled", fillcolor="#ffffff", color="#333333",
               tooltip=f"output {b.name}")
    elif b.kind == "loss":
        _loss_node(d, b, _loss_text(b.loss))
    elif b.kind == "block":
        _block_node(d, b)
    elif b.kind == "state":
        c, rev = b.items[0].carry, b.items[0].backward
        colours = style.GRAD_STATE if rev else style.STATE
        d.node(b.id, label=_lines(f"<b>state {esc(c.name.rsplit('.', 1)[-1])}</b>",
                                  style.shape_label(c.step_in.shape, c.step_in.dtype) + (" · t+1" if rev else " · t−1")),
               fillcolor=colours[0], color=colours[1], style="rounded,filled,bold",
               tooltip=f"gradient of carried state {c.name}: what reaches it from the step after" if rev
               else f"carried state {c.name}: its value from the previous step")
    elif b.loss is not None:
        _loss_node(d, b, _loss_text(b.loss) + [style.op_text(b.items[0].node)])
    else:
        _ops_node(d, b)


def _lines(title: str, *rest: str) -> str:
    tail = "".join(f'<br/><font point-size="{SMALL}">{esc(r)}</font>' for r in rest if r)
    return f"<{title}{tail}>"


def _flags(b: Box) -> list[str]:
    return (["train only"] if b.train_only else []) + (["no grad"] if b.no_grad else [])


def _border(b: Box, base: str) -> str:
    return ",".join([base] + (["dashed"] if b.train_only else ["dotted"] if b.no_grad else []))


def _ops_node(d, b: Box, header: Cluster | None = None):
    """Operators as one box; several (conv -> bn -> relu) or a titled block: one coloured row each."""
    fams = [style.family(it.node.op) for it in b.items]
    fill, line, _ = style.FAMILIES[fams[0]]
    flags = _flags(b)
    tooltip = "\\n".join(f"{it.node.path}  {it.node.op}  {fmt_shape(it.node.outputs[0].shape) if it.node.outputs else ''}"
                        f"  {it.params:,} params" + (f"  ({it.node.pos})" if it.node.pos else "")
                        for it in b.items)
    common = dict(color=line, style=_border(b, "rounded,filled"), tooltip=tooltip,
                  fontcolor="#555555" if b.train_only else "black")
    params = header.params if header is not None else b.params
    foot = ([f"{params:,} params" + (" in all" if header is not None and len(header.instances) > 1 else "")]
            if params else []) + flags
    small = f'<font point-size="{SMALL - 1}" color="#555555">{{}}</font>'
    if len(b.items) == 1 and header is None:
        text = esc(style.op_text(b.items[0].node, b.items[0].frames)) + "".join(f"<br/>{small.format(esc(f))}" for f in foot)
        d.node(b.id, label=f"<{text}>", fillcolor=fill, **common)
        return
    rows = "".join(f'<tr><td bgcolor="{style.FAMILIES[f][0]}" align="left">{esc(style.op_text(it.node, it.frames))}</td></tr>'
                   for f, it in zip(fams, b.items))
    if header is not None:
        rows = (f'<tr><td align="left"><b>{esc(_title(header))}</b> '
                f'{small.format(esc(_where(header)))}</td></tr>') + rows
    if foot:
        rows += f'<tr><td align="left">{small.format(esc(" · ".join(foot)))}</td></tr>'
    d.node(b.id, label=f'<<table border="0" cellborder="0" cellspacing="1" cellpadding="2">{rows}</table>>',
           fillcolor="#ffffff", margin="0.03", **common)


def _loss_text(loss) -> list[str]:
    out = [f"weight {loss.weight:g}" if loss.weight != 1 else ""]
    if loss.phase == "train":
        out.append("train only")
    return [" · ".join(x for x in out if x)]


def _loss_node(d, b: Box, rest: list[str]):
    fill, line, _ = style.FAMILIES["loss"]
    name = b.loss.name if b.loss else b.name
    d.node(b.id, label=_lines(f"<b>loss {esc(name)}</b>", *rest), shape="octagon",
           style="filled,dashed" if b.loss.phase == "train" else "filled", fillcolor=fill, color=line,
           penwidth="1.8", tooltip=f"loss {name} at {b.loss.pos}")


def _block_node(d, b: Box):
    c = b.block
    n = len(c.instances)
    title = f"<b>{esc(_name(c))}{f' ×{n}' if n > 1 else ''}</b>"
    rest = [_where(c)] + (["→ " + ", ".join(b.out_shapes)] if b.out_shapes else [])
    rest += ([f"{b.params:,} params" + (" in all" if n > 1 else "")] if b.params else []) + _flags(b)
    fill, line = (style.GRAD_LOOP, style.GRAD_EDGE) if c.backward else style.BLOCK
    d.node(b.id, label=_lines(title, *rest), shape="box3d" if n > 1 else "box",
           style=_border(b, "filled" if n > 1 else "rounded,filled"), fillcolor=fill,
           color=line, penwidth="1.5" if n > 1 else "1",
           tooltip=f"{c.kind} {_name(c)} ({_where(c)}), drawn as one box")


# ------------------------------------------------------------ legend and title

def _graph_label(scene: Scene) -> str:
    g = scene.graph
    bits = [f"{g.param_count():,} params"]
    if g.carries:
        bits.append("state " + ", ".join(c.name for c in g.carries))
    return f'<<b>{esc(g.name)}</b><font point-size="10">  ·  {esc(" · ".join(bits))}</font>>'


def _legend(scene: Scene) -> str:
    fams = []
    for b in scene.boxes:
        for it in b.items if b.kind == "ops" else []:
            f = style.family(it.node.op)
            if f not in fams:
                fams.append(f)
    rows = [f'<tr><td bgcolor="{style.FAMILIES[f][0]}" border="1" color="{style.FAMILIES[f][1]}">  </td>'
            f'<td align="left">{esc(style.FAMILIES[f][2])}</td></tr>' for f in style.FAMILIES if f in fams]
    notes = ["dashed: train only (dropped at inference)", "dotted: no gradient",
             "octagon: loss (weight)", "edges: shapes without the batch N"]
    if any(len(c.instances) > 1 for c in scene.clusters()) or any(
            b.kind == "block" and len(b.block.instances) > 1 for b in scene.boxes):
        notes.append("×n: n identical block calls folded")
    if any(b.kind == "state" and not b.items[0].backward for b in scene.boxes):
        notes.append("blue arrow: state carried to the next step")
    if any(b.kind == "state" and b.items[0].backward for b in scene.boxes):
        notes.append("violet arrow: a state's gradient, handed back to the step before")
    if any(e.saved for e in scene.edges):
        notes.append("dotted violet: a forward value saved at each step for the backward")
    if any(e.label.startswith("Σt") for e in scene.edges):
        notes.append("Σt: summed over the steps")
    rows += [f'<tr><td colspan="2" align="left"><font point-size="{SMALL}">{esc(n)}</font></td></tr>' for n in notes]
    return ('<<table border="1" color="#bbbbbb" cellborder="0" cellspacing="2" cellpadding="2">'
            f'<tr><td colspan="2"><b>legend</b></td></tr>{"".join(rows)}</table>>')
