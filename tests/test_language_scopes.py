"""What names mean where: network parameters inside blocks, `--set` of top-level
constants, the name bound by `for ... as stage`, and unknown operators (docs/language.md)."""
import json

import pytest

from helpers import ROOT, cli, compile_text
from netdsl.errors import NetdslError
from netdsl.lang.elaborate import elaborate

LIB = """
const base = 4
# reads `width` and `act6` from whichever network it is elaborated for
block unit(x, k = width // 2 * 2 + 1) {
  return x -> conv(base * width, k=k, p=k // 2) -> relu
}
block plain(x, width) {          # its own parameter hides the network's
  return conv(x, width, k=1)
}
"""


def _write(tmp_path, spec, lib=LIB):
    (tmp_path / "lib.net").write_text(lib)
    p = tmp_path / "m.net"
    p.write_text(spec)
    return str(p)


TWO = """import "lib.net"
import "lib.net" as L
network wide(width = 4) {
  input x: f32[N, 3, 16, 16]
  y = unit(x)
  z = L.unit(y, name="again")
  output z
}
network thin(width = 1, classes = 10) {
  input x: f32[N, 3, 16, 16]
  y = unit(x) -> plain(7)
  output y
}
"""


def test_network_parameters_are_seen_in_blocks_of_an_imported_file(tmp_path):
    path = _write(tmp_path, TWO)
    wide, _ = elaborate(path, "wide")
    assert wide.outputs["z"].shape[1] == 16
    conv = next(n for n in wide.nodes if n.op == "conv")
    assert conv.attrs["k"] == (5, 5) and conv.path == "0.conv1"     # a default computed from it
    assert "again.conv1" in [n.path for n in wide.nodes]            # through a namespace too
    thin, _ = elaborate(path, "thin")
    first, second = [n for n in thin.nodes if n.op == "conv"]
    assert first.outputs[0].shape[1] == 4 and first.attrs["k"] == (1, 1)
    assert second.outputs[0].shape[1] == 7                          # plain's own `width`
    assert elaborate(path, "thin", {"width": 3})[0].nodes[0].outputs[0].shape[1] == 12


def test_a_cached_graph_follows_the_network_and_its_overrides(tmp_path, monkeypatch):
    """The graph cache is keyed by network and overrides: a block reading a network
    parameter gets each network's value, on a miss and on a hit."""
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path, TWO)
    for _ in ("miss", "hit"):
        assert elaborate(path, "wide")[0].outputs["z"].shape[1] == 16
        assert elaborate(path, "thin")[0].nodes[0].outputs[0].shape[1] == 4
        assert elaborate(path, "thin", {"width": 2})[0].nodes[0].outputs[0].shape[1] == 8
    assert len(list((tmp_path / "cache" / "graphs").glob("*.json"))) == 3


def test_network_parameters_are_seen_in_steps(tmp_path):
    g = compile_text(tmp_path, """
step cell(x_t: seq) {
  carry h = zeros([N, H])
  h = tanh(linear(concat(h, x_t), H))
  emit h
}
network n(H = 12) {
  input x: f32[N, T, 5]
  hs = scan cell(x)
  output hs
}""")
    assert g.outputs["hs"].shape[2] == 12


def test_operators_builtins_and_the_file_come_before_network_parameters(tmp_path):
    """A network parameter named like an operator, a built-in or a name of the block's
    file does not change what that name means in a block."""
    g = compile_text(tmp_path, """
const base = 2
block b(x) { return x -> relu -> dropout(0.5) -> conv(base + len([1]), k=1) }
network n(relu = 3, dropout = 0.1, base = 100, len = 7) {
  input x: f32[N, 3, 4, 4]
  y = b(x)
  output y
}""")
    assert [n.op for n in g.nodes] == ["relu", "dropout", "conv"]
    assert g.nodes[1].attrs["p"] == 0.5 and g.outputs["y"].shape[1] == 3


def test_a_block_sees_the_network_parameters_not_its_variables(tmp_path):
    spec = """
block b(x) { return conv(x, c, k=1) }
network n(classes = 10) {
  input x: f32[N, 3, 4, 4]
  c = 8
  y = b(x)
  output y
}"""
    with pytest.raises(NetdslError, match="unknown name 'c'") as e:
        compile_text(tmp_path, spec)
    assert e.value.pos.line == 2 and "variable of network 'n'" in e.value.hint
    assert "pass it to the block as an argument" in e.value.hint
    with pytest.raises(NetdslError, match="unknown name 'widht'") as e:
        compile_text(tmp_path, spec.replace("conv(x, c", "conv(x, widht").replace("classes", "width"))
    assert "did you mean 'width'" in e.value.hint


def test_a_block_cannot_change_a_network_parameter(tmp_path):
    """Assigning the name in a block makes a variable of the block; the network's stays."""
    g = compile_text(tmp_path, """
block b(x) {
  width = width * 2
  return conv(x, width, k=1)
}
network n(width = 3) {
  input x: f32[N, 3, 4, 4]
  y = b(x) -> b
  z = conv(y, width, k=1)
  output z
}""")
    assert [n.outputs[0].shape[1] for n in g.nodes] == [6, 6, 3]


# ---- --set of a top-level const

CONSTS = """import "lib.net"
const depth = 2
const widths = [8, 16, 32]
const stem = widths[0] * depth
block unit(x) { return conv(x, stem, k=1) }
network n(classes = 10) {
  input x: f32[N, 3, 8, 8]
  const inner = 3
  for i in range(depth) { x = unit(x) }
  y = x -> global_avgpool -> flatten -> linear(classes)
  output y
}
"""


def _shapes(r):
    assert r.returncode == 0, r.stderr
    return [n["shape"][0] for n in json.loads(r.stdout)["nodes"]]


def test_set_a_top_level_const_through_the_cli(tmp_path):
    path = _write(tmp_path, CONSTS)
    base = _shapes(cli("compile", path, "--json"))
    assert base == ["[N, 16, 8, 8]"] * 2 + ["[N, 16, 1, 1]", "[N, 16]", "[N, 10]"]
    got = _shapes(cli("compile", path, "--json", "--set", "depth=3", "--set", "classes=5"))
    assert got == ["[N, 24, 8, 8]"] * 3 + ["[N, 24, 1, 1]", "[N, 24]", "[N, 5]"]   # `stem` follows `depth`
    assert _shapes(cli("compile", path, "--json", "--set", "stem=7"))[0] == "[N, 7, 8, 8]"


@pytest.mark.parametrize("name, why", [
    ("inner", "'inner' is a const inside a body, and only the file's top-level ones can be set"),
    ("base", "'base' is a const of "),
    ("unit", "'unit' is a block"),
    ("dpeth", "did you mean 'depth'"),
])
def test_set_of_what_cannot_be_set_says_what_can(tmp_path, name, why):
    path = _write(tmp_path, CONSTS)
    r = cli("compile", path, "--set", f"{name}=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"{path}:6:9: error: --set {name}: network 'n' has no parameter, dimension or "
                               "top-level const"), r.stderr
    assert why in r.stderr
    assert "--set can set: parameters classes; dimensions N; constants depth, widths, stem" in r.stderr


def test_set_numbers_must_be_64_bit_or_finite(tmp_path):
    path = _write(tmp_path, CONSTS)
    for v, msg in (("1e999", "not a finite number"), ("nan", "not a finite number"),
                   ("9" * 30, "too large"), ("9" * 5000, "too large")):
        r = cli("compile", path, "--set", f"depth={v}")
        assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr


# ---- for ... as stage


def test_the_as_name_is_the_iterations_path_component(tmp_path):
    g = compile_text(tmp_path, """
network n() {
  input x: f32[N, 3, 4, 4]
  names = []
  for c in [4, 8] as stage {
    x = conv(x, c, k=1, name="conv_" + stage)
    names = names + [stage]
  }
  repeat 2 as extra { x = relu(x, name=extra) }
  assert names == ["stage1", "stage2"], "the values are the scopes' names"
  assert stage == "stage2"
  output x
}""")
    assert [n.path for n in g.nodes] == ["stage1.conv_stage1", "stage2.conv_stage2", "extra1.extra1",
                                         "extra2.extra2"]


# ---- unknown operators and blocks


@pytest.mark.parametrize("expr, name, col, hint", [
    ("relu7(x)", "relu7", 7, "'relu'"),
    ("x -> relu7", "relu7", 12, "'relu'"),
    ("x -> relu7(name=\"r\")", "relu7", 12, "'relu'"),
    ("x -> untis(4)", "untis", 12, "'unit'"),
    ("qqqq(x)", "qqqq", 7, "`netdsl ops` lists the operators"),
])
def test_an_unknown_function_is_an_unknown_operator_or_block(tmp_path, expr, name, col, hint):
    with pytest.raises(NetdslError) as e:
        compile_text(tmp_path, "block unit(x, c) { return conv(x, c, k=1) }\n"
                               f"network n() {{\n  input x: f32[N, 3, 4, 4]\n  y = {expr}\n  output y\n}}\n")
    assert e.value.message == f"unknown operator or block '{name}'"
    assert (e.value.pos.line, e.value.pos.col) == (4, col)
    assert hint in e.value.hint


def test_an_unknown_value_is_still_an_unknown_name(tmp_path):
    with pytest.raises(NetdslError, match="unknown name 'relu7'"):
        compile_text(tmp_path, "network n() {\n  input x: f32[N, 3]\n  y = relu(relu7)\n  output y\n}\n")
