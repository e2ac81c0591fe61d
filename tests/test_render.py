"""netdsl render: structure of the DOT text, real SVG/PNG/PDF files, and user errors.

Parameter counts in labels are checked against PyTorch (nn.Conv2d / nn.BatchNorm2d /
nn.Linear built to torchvision's ResNet layout) and against torchvision's published
totals (ResNet-18 11,689,512; ResNet-152 60,192,808).
"""
import re
import xml.etree.ElementTree as ET

import pytest
import torch

from helpers import SPECS, cli, compile_spec, compile_text
from netdsl.errors import NetdslError
from netdsl.render import render

NODE = re.compile(r"^\s*(n\d+) \[(.*)\]$", re.M)
CLUSTER = re.compile(r"subgraph cluster_\d+ \{\n\s*(.*)\n")
EDGE = re.compile(r"^\s*(n\d+) -> (n\d+) \[(.*)\]$", re.M)


def dot_text(g, tmp_path, name="g.dot", **kw):
    out = tmp_path / name
    render(g, out, **kw)
    return out.read_text()


def nodes(dot):
    return dict(NODE.findall(dot))


def style_of(attrs):
    m = re.search(r'\bstyle="?([\w,]+)', attrs)
    return m.group(1).split(",") if m else []


# ---- PyTorch references for the counts in labels

def torch_params(*mods):
    return sum(p.numel() for m in mods for p in m.parameters())


def torch_bottleneck(cin, c, stride):
    nn = torch.nn
    mods = [nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c), nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)]
    if stride != 1 or cin != 4 * c:
        mods += [nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c)]
    return torch_params(*mods)


def torch_basic(cin, c, stride):
    nn = torch.nn
    mods = [nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)]
    if stride != 1 or cin != c:
        mods += [nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c)]
    return torch_params(*mods)


# ---- specs

RESNET152 = f"""
import "{SPECS.as_posix()}/lib/resnet.net"
network resnet152(classes = 1000) {{
  input image: f32[N, 3, 224, 224]
  input label: i64[N]
  logits = resnet(image, bottleneck, [3, 8, 36, 3], classes, name="")
  output logits
  loss ce = cross_entropy(logits, label)
}}
"""

# GoogLeNet's pattern in small: an auxiliary classifier whose loss counts only in training
AUX = """
block aux_head(x, classes) {
  return x -> conv(8, k=1) -> relu -> flatten -> linear(classes, name="fc") -> dropout(0.7)
}
network tiny_inception(classes = 10) {
  input image: f32[N, 3, 32, 32]
  input label: i64[N]
  x = image -> conv(16, k=3, p=1) -> bn -> relu -> maxpool(k=2, s=2)
  side = aux_head(x, classes, name="aux1")
  logits = x -> conv(32, k=3, p=1) -> relu -> global_avgpool -> flatten -> linear(classes, name="fc")
  output logits
  loss ce = cross_entropy(logits, label)
  loss aux = cross_entropy(side, label) weight 0.3 phase train
}
"""

CHARLM = """
step lstm(x_t: seq, H) {
  carry h = zeros([N, H]), c = zeros([N, H])
  i, f, o, g = split(linear(concat(h, x_t), 4 * H, name="W"), 4)
  c = sigmoid(f) * c + sigmoid(i) * tanh(g)
  h = sigmoid(o) * tanh(c)
  emit h
}
network charlm(V = 65, D = 64, H = 128) {
  input text: i64[N, T]
  input next: i64[N, T]
  hs = scan lstm(embedding(text, V, D), H, name="rnn")
  logits = linear(hs, V, name="head")
  output logits
  loss ce = cross_entropy(logits, next)
}
"""


@pytest.fixture(scope="module")
def resnet18():
    return compile_spec("resnet18.net")


@pytest.fixture(scope="module")
def resnet152(tmp_path_factory):
    return compile_text(tmp_path_factory.mktemp("r152"), RESNET152)


@pytest.fixture(scope="module")
def charlm(tmp_path_factory):
    return compile_text(tmp_path_factory.mktemp("charlm"), CHARLM)


# ---- CNNs: clusters, shapes, folding, depth

def test_resnet18_clusters_shapes_and_counts(resnet18, tmp_path):
    dot = dot_text(resnet18, tmp_path)
    assert "11,689,512 params" in dot                       # torchvision's published total
    labels = CLUSTER.findall(dot)
    # resnet (inlined with name=""), four stages, two basic blocks in each
    assert len(labels) == 1 + 4 + 8
    assert sum("<b>basic</b>" in l for l in labels) == 8
    for c, s, stage in ((64, 1, 1), (128, 2, 2), (256, 2, 3), (512, 2, 4)):
        first = next(l for l in labels if f"layer{stage}.0 · " in l)
        assert f"{torch_basic(c // s if s > 1 else c, c, s):,} params" in first
    edge_labels = {m[2] for m in EDGE.findall(dot)}
    for shape in ("64×112×112", "64×56×56", "128×28×28", "256×14×14", "512×7×7", "label=512 ", "label=1000 "):
        assert any(shape in l + " " for l in edge_labels), shape
    assert not any("N×" in l for l in edge_labels)           # the batch dim is left out everywhere
    assert "f32[N, 3, 224, 224]" in dot                      # the input keeps its declaration
    assert "×2</b>" not in dot                               # nothing repeats in ResNet-18
    assert len(nodes(dot)) < 45


def test_resnet152_folds_each_stage(resnet152, tmp_path):
    dot = dot_text(resnet152, tmp_path)
    assert "60,192,808 params" in dot
    labels = CLUSTER.findall(dot)
    for stage, n, c, cin in ((1, 3, 64, 256), (2, 8, 128, 512), (3, 36, 256, 1024), (4, 3, 512, 2048)):
        folded = [l for l in labels if f"bottleneck ×{n - 1}</b>" in l and f"layer{stage}.1 … layer{stage}.{n - 1}" in l]
        assert len(folded) == 1, stage
        assert f"{(n - 1) * torch_bottleneck(cin, c, 1):,} params in all" in folded[0]
        # the first block of the stage has the projection, so it is drawn on its own
        first = [l for l in labels if f"layer{stage}.0 · " in l]
        assert len(first) == 1 and "<b>bottleneck</b>" in first[0]
    boxes = nodes(dot)
    assert len(boxes) < 60                                  # tens, not hundreds
    assert sum("downsample.0: conv 1×1" in a for a in boxes.values()) == 4

    expanded = nodes(dot_text(resnet152, tmp_path, "e.dot", expand=True))
    assert len(expanded) > 150
    assert len(expanded) > 3 * len(boxes)


def test_only_chained_repeats_fold(tmp_path):
    g = compile_text(tmp_path, """
block unit(x, c) { return x -> conv(c, k=3, p=1) -> relu }
network t() {
  input image: f32[N, 8, 16, 16]
  a = image -> unit(8) -> unit(8) -> unit(8)
  p = a -> conv(8, k=1)
  output y = unit(p, 8) + unit(p, 8)
}
""")
    dot = dot_text(g, tmp_path)
    titles = re.findall(r"<b>(unit[^<]*)</b>", dot)
    assert sorted(titles) == ["unit", "unit", "unit ×3"]     # the parallel pair is not a repetition
    folded = next(k for k, a in nodes(dot).items() if "unit ×3" in a)
    assert len([e for e in EDGE.findall(dot) if folded in e[:2]]) == 2   # in from image, out to p
    assert "0 … 2" in nodes(dot)[folded]


def test_depth_draws_deep_blocks_as_boxes(resnet152, tmp_path):
    dot = dot_text(resnet152, tmp_path, depth=1)
    boxes = nodes(dot)
    blocks = {k: a for k, a in boxes.items() if "box3d" in a or "bottleneck" in a}
    assert len(blocks) == 8                                  # per stage: the first block and the folded rest
    assert len(boxes) < 25
    assert len(CLUSTER.findall(dot)) == 1 + 4                # resnet and its four stages
    layer3 = next(a for a in blocks.values() if "layer3.1 … layer3.35" in a)
    assert "bottleneck ×35" in layer3 and "→ 1024×14×14" in layer3
    assert f"{35 * torch_bottleneck(1024, 256, 1):,} params in all" in layer3
    first = next(a for a in blocks.values() if "layer2.0<" in a)
    assert "→ 512×28×28" in first and f"{torch_bottleneck(256, 128, 2):,} params" in first
    # depth 0: the whole resnet block is one box
    assert len(nodes(dot_text(resnet152, tmp_path, "d0.dot", depth=0))) <= 6


def test_each_op_and_rankdir(resnet18, tmp_path):
    stacked = nodes(dot_text(resnet18, tmp_path))
    dot = dot_text(resnet18, tmp_path, "each.dot", stack=False, rankdir="LR", legend=False)
    assert "rankdir=LR" in dot and "legend" not in dot
    assert len(nodes(dot)) > 2 * len(stacked)


# ---- training-only heads, losses, no-grad ops

def test_train_only_head_is_dashed_and_losses_are_octagons(tmp_path):
    g = compile_text(tmp_path, AUX)
    dot = dot_text(g, tmp_path)
    boxes = nodes(dot)
    aux_cluster = next(l for l in CLUSTER.findall(dot) if "aux_head" in l)
    assert "dashed" in aux_cluster and "train only" in aux_cluster
    aux_ops = [a for a in boxes.values() if "aux1." in a]
    assert aux_ops and all("dashed" in style_of(a) for a in aux_ops)
    main = [a for a in boxes.values() if "tooltip=\"conv2 " in a or "tooltip=\"fc " in a]
    assert len(main) == 2 and not any("dashed" in style_of(a) for a in main)
    losses = {re.search(r"<b>loss (\w+)</b>", a).group(1): a for a in boxes.values() if "octagon" in a}
    assert set(losses) == {"ce", "aux"}
    assert "weight 0.3" in losses["aux"] and "train only" in losses["aux"] and "dashed" in style_of(losses["aux"])
    assert "dashed" not in style_of(losses["ce"])
    dashed_edges = [e for e in EDGE.findall(dot) if "style=dashed" in e[2]]
    assert dashed_edges and all(boxes[d].count("aux") or "loss aux" in boxes[d] for _, d, _ in dashed_edges)


# ---- recurrence

def test_lstm_scan_is_one_loop_box_with_state_back_edges(charlm, tmp_path):
    dot = dot_text(charlm, tmp_path)
    labels = CLUSTER.findall(dot)
    assert len(labels) == 1
    loop = labels[0]
    assert "↻ lstm over T" in loop and "state h, c" in loop
    # the step's weights: one W over [h; x], as nn.Linear(D + H, 4H)
    assert f"{torch_params(torch.nn.Linear(64 + 128, 4 * 128)):,} params" in loop
    boxes = nodes(dot)
    back = [e for e in EDGE.findall(dot) if "constraint=false" in e[2]]
    assert sorted(re.search(r"label=(\w+)", e[2]).group(1) for e in back) == ["c", "h"]
    for src, dst, _ in back:                      # from the new state back to the state box
        assert "<b>state " in boxes[dst]
    edge_labels = [e[2] for e in EDGE.findall(dot)]
    assert any('label="x_t 64"' in l for l in edge_labels)      # one step's slice goes in
    assert any('label="T×128"' in l for l in edge_labels)       # the whole sequence comes out
    assert sum("no grad" in a and "dotted" in style_of(a) for a in boxes.values()) == 2   # zeros()


def test_collapsed_scan_is_one_box(charlm, tmp_path):
    dot = dot_text(charlm, tmp_path, depth=0)
    assert not CLUSTER.findall(dot)
    assert sum("lstm" in a and "rnn" in a for a in nodes(dot).values()) == 1
    assert "constraint=false" not in dot


# ---- the backward of a recurrence (render --backward)

DEEP = """
step rnn(x_t: seq, H) {
  carry h = zeros([x_t.N, H])
  h = tanh(linear(h, H, bias=false, name="W_hh") + linear(x_t, H, bias=false, name="W_xh"))
  emit h
}
block layer(x, H) {
  return scan rnn(x, H, name="rnn")
}
network deep(H = 32) {
  input x: f32[N, T, 32]
  input target: f32[N, T, 32]
  y = x -> layer(H) -> layer(H)
  output y
  loss l2 = l2(y, target)
}
"""


def training(g):
    from netdsl.autodiff import build
    return build(g).as_graph()


def clusters(dot):
    """Each cluster's label line and the ids of the boxes inside it (nested clusters included)."""
    out = []
    for m in re.finditer(r"subgraph cluster_\d+ \{\n\s*(.*)\n", dot):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(dot[i], 0)
            i += 1
        out.append((m.group(1), set(dict(NODE.findall(dot[m.end():i])))))
    return out


def box(boxes, text):
    found = [k for k, a in boxes.items() if text in a]
    assert len(found) == 1, (text, found)
    return found[0]


def test_backward_of_a_recurrence_is_a_loop_box(tmp_path):
    dot = dot_text(training(compile_spec("rnn/vanilla_rnn.net")), tmp_path)
    boxes, edges = nodes(dot), EDGE.findall(dot)
    loops = clusters(dot)
    assert len(loops) == 2
    (fwd_label, fwd), (bwd_label, bwd) = sorted(loops, key=lambda c: "backward" in c[0])
    assert "↻ rnn over T" in fwd_label and "state h" in fwd_label
    assert "↺ rnn backward over T, reversed" in bwd_label and "rnn1 · state gradient dh" in bwd_label
    assert "reads h, x_t saved per step" in bwd_label
    assert "#6741b0" in bwd_label and "#1f6fb2" in fwd_label           # violet beside the forward's blue
    assert not any("scan_grad" in a for a in boxes.values())            # no opaque node left
    # the step's VJP, inside the backward loop: dh_t + dh, then tanh's and both linears' gradients
    state = box(boxes, "<b>state dh</b>")
    add = box(boxes, "label=<add>")
    tanh_g = box(boxes, "tanh1.ew_grad: ew_grad")
    whh_g, wxh_g = box(boxes, "W_hh.linear_grad"), box(boxes, "W_xh.linear_grad")
    assert bwd == {state, add, tanh_g, whh_g, wxh_g}
    assert "128 · t+1" in boxes[state] and "#e4dcf6" in boxes[state]
    assert not bwd & fwd
    # the state's gradient goes round: W_hh's input gradient is dh for the step before
    tanh, h_state, x = next(k for k in fwd if "tanh" in boxes[k]), box(boxes, "<b>state h</b>"), box(boxes, "<b>x</b>")
    back = [(s, d, a) for s, d, a in edges if "constraint=false" in a]
    assert {(s, d, re.search(r"label=(\w+)", a).group(1)) for s, d, a in back} == {
        (tanh, h_state, "h"), (whh_g, state, "dh")}
    assert all(("#6741b0" in a) == (d == state) for _, d, a in back)
    by_pair = {(s, d): a for s, d, a in edges}
    assert 'label="dh_t 128"' in by_pair[(box(boxes, "W_hy.linear_grad"), add)]     # dL/dh_t's slice comes in
    # what the backward reads from the forward step, saved per step: dotted
    saved = {(s, d) for s, d, a in edges if "style=dotted" in a}
    assert saved == {(tanh, tanh_g), (h_state, whh_g), (x, wxh_g)}
    assert 'label="x_t 64"' in by_pair[(x, wxh_g)]
    # the parameters' gradients, summed over the steps, leave the loop for the outputs
    assert 'label="Σt 128×128"' in by_pair[(whh_g, box(boxes, "output grad rnn1.W_hh.weight"))]
    assert 'label="Σt 128×64"' in by_pair[(wxh_g, box(boxes, "output grad rnn1.W_xh.weight"))]
    assert "Σt: summed over the steps" in dot and "violet arrow" in dot


def test_backward_loop_of_an_lstm(charlm, tmp_path):
    dot = dot_text(training(charlm), tmp_path)
    boxes, edges = nodes(dot), EDGE.findall(dot)
    bwd_label, bwd = next(c for c in clusters(dot) if "backward" in c[0])
    assert "↺ lstm backward over T, reversed" in bwd_label and "state gradient dh, dc" in bwd_label
    back = {re.search(r"label=(\w+)", a).group(1): d for s, d, a in edges if "constraint=false" in a}
    assert set(back) == {"h", "c", "dh", "dc"}
    assert "<b>state dh</b>" in boxes[back["dh"]] and "<b>state dc</b>" in boxes[back["dc"]]
    assert back["dh"] in bwd and back["dc"] in bwd
    w_g = box(boxes, "W.linear_grad")
    assert w_g in bwd
    outs = {re.search(r"output grad ([\w.]+)", boxes[d]).group(1): a for s, d, a in edges if s == w_g
            and "output grad" in boxes[d]}
    assert set(outs) == {"rnn.W.weight", "rnn.W.bias"}
    assert 'label="Σt 512×192"' in outs["rnn.W.weight"] and 'label="Σt 512"' in outs["rnn.W.bias"]


def test_backward_loop_collapses_and_folds(tmp_path):
    g = training(compile_spec("rnn/vanilla_rnn.net"))
    dot = dot_text(g, tmp_path, depth=0)
    boxes = nodes(dot)
    assert not CLUSTER.findall(dot) and "constraint=false" not in dot
    rnn, rnn_b = box(boxes, "<b>rnn</b>"), box(boxes, "<b>rnn backward</b>")
    assert "Σt 128×128, Σt 128×64" in boxes[rnn_b] and "#6741b0" in boxes[rnn_b]
    assert any(s == rnn and d == rnn_b and "style=dotted" in a for s, d, a in EDGE.findall(dot))
    # two chained calls of a block holding a scan fold, backward loops included
    deep = training(compile_text(tmp_path, DEEP))
    folded = dot_text(deep, tmp_path, "f.dot")
    labels = CLUSTER.findall(folded)
    assert sum("layer ×2" in l for l in labels) == 1
    assert sum("↻ rnn over T" in l for l in labels) == 1 and sum("↺ rnn backward" in l for l in labels) == 1
    expanded = CLUSTER.findall(dot_text(deep, tmp_path, "e.dot", expand=True))
    assert sum("↻ rnn over T" in l for l in expanded) == 2 and sum("↺ rnn backward" in l for l in expanded) == 2


def test_forward_unchanged_by_backward_support(charlm, tmp_path):
    """The forward loop draws the same inside the training graph as alone."""
    fwd = clusters(dot_text(charlm, tmp_path))[0]
    trained = next(c for c in clusters(dot_text(training(charlm), tmp_path, "t.dot")) if "↻" in c[0])
    assert fwd[0] == trained[0]


def test_cli_renders_backward_of_stacked_lstm(tmp_path):
    out = tmp_path / "lstm.png"
    r = cli("render", SPECS / "rnn/charlm_lstm.net", "--backward", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    dot = dot_text(training(compile_spec("rnn/charlm_lstm.net")), tmp_path)
    assert sum("↻ lstm over T" in l for l, _ in clusters(dot)) == 2                # two layers
    bwd = {re.search(r"(layer\d)\.rnn · state gradient dh, dc", l).group(1): ids
           for l, ids in clusters(dot) if "↺ lstm backward over T, reversed" in l}
    assert sorted(bwd) == ["layer1", "layer2"]
    # layer 2's backward hands dL/dh_t of layer 1's output, a step at a time, to layer 1's backward
    assert any(s in bwd["layer2"] and d in bwd["layer1"] and 'label="dh_t 256"' in a for s, d, a in EDGE.findall(dot))


# ---- real files

def test_svg_is_well_formed(resnet18, tmp_path):
    out = tmp_path / "r.svg"
    render(resnet18, out)
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    assert "11,689,512" in out.read_text()


@pytest.mark.parametrize("ext,magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-")])
def test_png_and_pdf(charlm, tmp_path, ext, magic):
    out = tmp_path / f"charlm{ext}"
    render(charlm, out)
    data = out.read_bytes()
    assert data.startswith(magic) and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == [out.name]     # no temp file left behind


def test_missing_dot_is_explained_and_leaves_old_file(charlm, tmp_path, monkeypatch):
    out = tmp_path / "old.svg"
    out.write_text("old")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NetdslError) as e:
        render(charlm, out)
    assert "dot" in e.value.message and "install Graphviz" in e.value.hint
    assert out.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


# ---- the command line

def test_cli_renders(tmp_path):
    r = cli("render", SPECS / "resnet18.net", "-o", tmp_path / "r.svg", "--depth", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "r.svg").read_bytes().lstrip().startswith(b"<?xml")


@pytest.mark.parametrize("target,message", [
    ("r.jpg", "unknown extension '.jpg'"),
    ("no/such/dir/r.svg", "cannot write"),
    ("adir.svg", "cannot write"),
])
def test_cli_user_errors(tmp_path, target, message):
    (tmp_path / "adir.svg").mkdir()
    r = cli("render", SPECS / "resnet18.net", "-o", tmp_path / target)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    if target.endswith(".jpg"):
        assert ".svg" in r.stderr and ".png" in r.stderr and ".pdf" in r.stderr and ".dot" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.svg"]


def test_cli_bad_depth(tmp_path):
    r = cli("render", SPECS / "resnet18.net", "-o", tmp_path / "r.dot", "--depth", "-1")
    assert r.returncode == 2 and "--depth" in r.stderr and "Traceback" not in r.stderr
