"""Compile-time values and elaboration are bounded (netdsl/lang/limits.py): a spec that
would grow without end, or a file that is not a spec, gets a located error, never a
MemoryError, a hang or a traceback."""
import os
import time

import pytest

from helpers import cli, compile_text
from netdsl.errors import NetdslError
from netdsl.lang import limits

HEAD = "network n() {\n  input x: f32[N, 3, 8, 8]\n"


def net(body, head=HEAD):
    return head + body + "\n  output x\n}\n"


# (snippet, message, line, col): each class of runaway value, at the expression that grows
CASES = {
    "string doubled": (net('  s = "ab"\n  repeat 64 { s = s + s }'), "this string would have 1,048,576 characters", 4, 19),
    "list doubled": (net('  l = [1]\n  repeat 64 { l = l + l }'), "this list would have 1,048,576 items", 4, 19),
    "tuple doubled": (net('  l = (1, 2)\n  repeat 64 { l = l + l }'), "this list would have 1,048,576 items", 4, 19),
    "list grown one by one": (net('  l = range(900000)\n  repeat 100000 { l = l + [1] }'),
                              "builds more than 50,000,000 list items", 4, 23),
    "string grown one by one": (net('  s = str(range(100000))\n  repeat 100000 { s = s + "x" }'),
                                "builds more than 50,000,000", 4, 23),
    "str of a huge list": (net('  s = str(range(1000000))'), "a string of 7,888,890 characters is longer", 3, 7),
    "huge range": (net('  l = range(1000000000000)'), "more than the 1000000 a spec may use", 3, 7),
    "huge repeat": (net('  repeat 1000000000000 { }'), "would unroll more than 100000 copies", 3, 10),
    "loops in all": (net('  for i in range(1000) { for j in range(1000) { } }'), "loops unroll more than 100000", 3, 26),
    "branching recursion": ('block t(d) {\n  if d > 0 { a = t(d - 1)\n b = t(d - 1) }\n  return 0\n}\n' + net('  z = t(60)'),
                            "called more than 100,000 times", 2, 18),
    "unbounded recursion": ('block t(x, d) {\n  return t(x, d + 1)\n}\n' + net('  x = t(x, 0)'), "nest more than 64 deep", 2, 10),
    "exponent tower": (net('  y = 10 ** 10 ** 10'), "10 ** 10000000000 is too large to compute", 3, 7),
    "2 ** 64": (net('  y = 2 ** 64'), "an integer of 20 digits is too large", 3, 7),
    "repeated squaring": (net('  y = 3\n  repeat 100 { y = y * y }'), "an integer of 31 digits is too large", 4, 20),
    "long integer literal": (net('  y = ' + "9" * 5000), "(5000 digits) is too large", 3, 7),
    "float literal overflow": (net('  y = 1e999'), "the result is inf, not a finite number", 3, 7),
    "float overflow": (net('  y = 1e308 * 10'), "not a finite number", 3, 7),
    "int of a huge float": (net('  y = int(1e300)'), "an integer of 301 digits is too large", 3, 7),
    "complex power": (net('  y = (-8) ** 0.5'), "has no real value", 3, 7),
    "symbol squared": (net('  d = x.N\n  repeat 40 { d = d * d }'), "a symbolic dimension grows too large", 4, 19),
    "symbol floor-divided": (net('  d = x.N\n  repeat 100000 { d = d // 3 + 1 }'), "longer than 10,000 characters", 4, 23),
    "symbol divided by zero": (net('  d = x.N // 0'), "division by zero", 3, 7),
    "symbol coefficient": (net('  d = x.N * 9000000000000000000 * 100'), "coefficient of the symbolic dimension", 3, 7),
    "huge input shape": (net('', head="network n() {\n  input x: f32[N, 1000000000000000000, 1000000000000000000]\n"),
                         "would have more than 2**63 elements", 2, 3),
    "huge parameter": (net('  y = x -> flatten -> linear(1000000000000000000)'), "parameter 'weight'", 3, 23),
    "huge output": (net('  y = conv(x, 1000000000000000000, k=3)'), "conv's output", 3, 7),
    "huge scan": ('step s(h0) {\n  carry h = h0\n  h = relu(h)\n  emit h\n}\n' +
                  net('  y = scan s(x -> flatten) over 1000000000000000000'), "scan s's output", 8, 7),
    "deep value": (net('  l = []\n  repeat 50000 { l = [l] }\n  s = str(l)'), "nests too deeply", 1, 9),
    "deep expression": (net('  y = 1' + " + 1" * 100000), "nests too deeply", 1, 9),
    "bad escape": (net('  s = "\\x"'), "unknown escape", 3, 7),
    "surrogate": (net('  y = relu(x, name="\\ud800")'), "is not a character", 3, 20),
    "control character in a name": (net('  y = relu(x, name="a\\nb")'), "contains a control character", 3, 15),
}


@pytest.mark.parametrize("case", CASES)
def test_a_runaway_value_is_a_located_error(tmp_path, case):
    text, msg, line, col = CASES[case]
    t = time.process_time()          # the work done, not the machine's load
    with pytest.raises(NetdslError) as e:
        compile_text(tmp_path, text)
    assert msg in e.value.message
    assert (e.value.pos.line, e.value.pos.col) == (line, col)
    assert time.process_time() - t < 30


def test_large_but_legal_values_elaborate(tmp_path):
    g = compile_text(tmp_path, net('  l = range(1000000)\n  s = str(range(100000))\n  y = 2 ** 62 + (2 ** 62 - 1)\n'
                                   '  assert len(l) == 1000000 and len(s) > 500000 and y == 9223372036854775807\n'
                                   '  y = relu(x, name="é€😀")'))
    assert [n.path for n in g.nodes] == ["é€😀"]


def _import(tmp_path, target):
    spec = tmp_path / "m.net"
    spec.write_text(f'import "{target}"\n' + net(""))
    return cli("compile", spec), spec


@pytest.mark.parametrize("kind, msg", [
    ("dev_zero", "'/dev/zero' is a device, not a regular .net file"),
    ("fifo", "is a FIFO, not a regular .net file"),
    ("directory", "is a directory, not a .net file"),
    ("binary", "is not a text file (it is not valid UTF-8 at byte 128)"),
    ("latin1", "is not a text file (it is not valid UTF-8 at byte 5)"),
    ("nul", "is not a text file (it contains NUL bytes)"),
    ("huge", f"more than the {limits.MAX_SOURCE_BYTES:,} a .net file may have"),
    ("chain", f"imports nest more than {limits.MAX_IMPORT_DEPTH} deep"),
    ("symlink_loop", "Too many levels of symbolic links"),
])
def test_an_import_that_is_not_a_spec_file(tmp_path, kind, msg):
    target = {"dev_zero": "/dev/zero", "directory": str(tmp_path)}.get(kind, str(tmp_path / f"{kind}.net"))
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "binary":
        open(target, "wb").write(bytes(range(256)) * 8)
    elif kind == "latin1":
        open(target, "wb").write("# caf\xe9\nconst a = 1\n".encode("latin-1"))
    elif kind == "nul":
        open(target, "wb").write(b"const a = 1\n\0")
    elif kind == "huge":
        with open(target, "w") as f:
            f.write(("#" * 999 + "\n") * (limits.MAX_SOURCE_BYTES // 1000 + 1))
    elif kind == "chain":
        for k in range(100):
            (tmp_path / f"c{k}.net").write_text(f'import "c{k + 1}.net"\nconst c{k} = 1\n')
        (tmp_path / "c100.net").write_text("const last = 1\n")
        target = str(tmp_path / "c0.net")
    elif kind == "symlink_loop":
        os.symlink(target, target)
    r, spec = _import(tmp_path, target)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    first = r.stderr.splitlines()[0]
    assert msg in first, r.stderr
    where = f"{tmp_path / 'c62.net'}:1:8:" if kind == "chain" else f"{spec}:1:8:"
    assert first.startswith(where + " error: "), r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_spec_that_is_a_fifo_or_a_device_is_not_waited_on(tmp_path, kind):
    """The error names the file; showing its source line must not read it either."""
    target = "/dev/zero" if kind == "dev_zero" else str(tmp_path / "x.net")
    if kind == "fifo":
        os.mkfifo(target)
    t = time.perf_counter()
    r = cli("compile", target)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"{target}:1:1: error: '{target}' is a ") and time.perf_counter() - t < 30


def test_a_crlf_spec_is_read_as_text_mode_reads_it(tmp_path):
    p = tmp_path / "m.net"
    p.write_bytes(net("  y = relu(x)").replace("\n", "\r\n").encode())
    r = cli("compile", p)
    assert r.returncode == 0, r.stderr
