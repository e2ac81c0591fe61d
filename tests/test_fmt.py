"""`netdsl fmt` (netdsl/lang/fmt.py, docs/fmt.md): every spec is in the canonical form;
formatting is idempotent, keeps the syntax tree and every comment, and the command's
-w / --check / error behaviour."""
import glob
import os
import random
import stat
from pathlib import Path

import pytest

from netdsl.cli import main
from netdsl.lang import fmt
from netdsl.lang.fmt import format_text
from netdsl.lang.parser import parse
from netdsl.errors import NetdslError

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(glob.glob(str(ROOT / "specs" / "**" / "*.net"), recursive=True))

MESSY = '''

# header comment
import   "lib/resnet.net"   as  r
const  K=3
block  f( x ,  c:int=2 ,k = 3) {   # after the brace
      y=x->conv( c,k =3,p=1 ,name = "a")->relu
   z = y [ : , 1 : ] + - x*2**k
    # before return
  return z
}



network n(classes=10 , H = 8,
          W = 8) {
input image :f32[ N,3,H,W ]
  input label: i64[N]   output q=1
  x = image -> f(
      c=4) -> flatten
    -> linear(classes)
  w = if  classes>2 {
     3 }  else { 4 }
  repeat 2 as j {
  x=x
  # end of body
  }
  t = [
    1,
    2,
    ]
  loss ce = cross_entropy( x, label ) weight   -1.0 phase  train
  train { optimizer = sgd(lr=0.1)  epochs = 1 batch=4
    data = synthetic() }
  assert classes > 1, "a # in a string is no comment"
  output x
}
# trailing file comment
'''

MESSY_FORMATTED = '''# header comment
import "lib/resnet.net" as r
const K = 3
block f(x, c: int = 2, k = 3) {    # after the brace
  y = x -> conv(c, k=3, p=1, name="a") -> relu
  z = y[:, 1:] + -x * 2 ** k
  # before return
  return z
}


network n(classes = 10, H = 8,
          W = 8) {
  input image: f32[N, 3, H, W]
  input label: i64[N]
  output q = 1
  x = image -> f(
      c=4) -> flatten
    -> linear(classes)
  w = if classes > 2 {
    3 } else { 4 }
  repeat 2 as j {
    x = x
    # end of body
  }
  t = [
    1,
    2,
  ]
  loss ce = cross_entropy(x, label) weight -1.0 phase train
  train { optimizer = sgd(lr = 0.1)  epochs = 1  batch = 4
          data = synthetic() }
  assert classes > 1, "a # in a string is no comment"
  output x
}
# trailing file comment
'''


def comments(text):
    return [t.text for line in fmt._lex(text) for t in line if t.kind == "comment"]


def code_part(line):
    """A line without its indentation and trailing comment."""
    toks = fmt._lex(line)[0]
    cut = next((t.col for t in toks if t.kind == "comment"), len(line))
    return line[:cut].strip()


def mangle(text, rng):
    """The same tokens on the same lines, with random indentation and spacing."""
    out = []
    for toks in fmt._lex(text):
        out.append(" " * rng.randrange(0, 8) + "".join(t.text + " " * rng.randrange(1, 4) for t in toks))
    return "\n".join(out)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: os.path.relpath(p, ROOT / "specs"))
def test_spec_is_formatted(path):
    """Every spec is kept in the canonical form (run `netdsl fmt -w specs` after editing one)."""
    text = Path(path).read_text()
    assert format_text(text, path) == text, f"netdsl fmt -w {os.path.relpath(path, ROOT)}"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: os.path.relpath(p, ROOT / "specs"))
def test_mangled_spec_comes_back(path):
    """Whitespace scrambled on every line (line breaks kept): the formatter gives back the
    spec's lines, the same tree and the same comments, and formatting again changes nothing."""
    text = Path(path).read_text()
    messy = mangle(text, random.Random(path))
    out = format_text(messy, path)
    assert format_text(out, path) == out
    assert parse(out, path) == parse(text, path)
    assert comments(out) == comments(text)
    assert [code_part(l) for l in out.splitlines()] == [code_part(l) for l in text.strip("\n").splitlines()]
    # statements and closing braces are indented exactly as in the spec
    heads = fmt._facts(parse(text, path)).stmts
    indent = lambda l: len(l) - len(l.lstrip())
    for n, (mine, theirs) in enumerate(zip(out.splitlines(), text.splitlines()), 1):
        if (n, indent(theirs)) in heads or theirs.lstrip().startswith("}"):
            assert indent(mine) == indent(theirs), (n, mine, theirs)


@pytest.mark.parametrize("seed", range(30))
def test_random_line_breaks(seed):
    """Breaks added anywhere between tokens and random indentation: the layout is a fixed
    point after one pass, with the same tree and comments."""
    rng = random.Random(seed)
    path = rng.choice(SPECS)
    text = Path(path).read_text()
    lines = []
    for toks in fmt._lex(text):
        line = " " * rng.randrange(0, 6)
        for t in toks:
            line += t.text
            brk = t.kind != "comment" and rng.random() < 0.2
            line += "\n" + " " * rng.randrange(0, 12) if brk else " " * rng.randrange(1, 3)
        lines.append(line)
    messy = "\n".join(lines)
    out = format_text(messy, path)
    assert format_text(out, path) == out
    assert parse(out, path) == parse(text, path)
    assert comments(out) == comments(text)


def test_messy_file():
    out = format_text(MESSY)
    assert out == MESSY_FORMATTED
    assert format_text(out) == out
    assert parse(out, "x") == parse(MESSY, "x")
    assert comments(out) == comments(MESSY) and len(comments(MESSY)) == 5


def test_rules():
    f = lambda s: format_text(s)
    # one statement per line; a body of one statement written on its line stays
    assert f("network n() { input x: f32[N]  y = x -> relu  output y }\n") == \
        "network n() {\n  input x: f32[N]\n  y = x -> relu\n  output y\n}\n"
    assert f("block b(x) {\n  y = if x { 1 } else { 2 }  return y }\n") == \
        "block b(x) {\n  y = if x { 1 } else { 2 }\n  return y\n}\n"
    assert f("block b(x) {  return  x }\n") == "block b(x) { return x }\n"
    # items after a '{' on its line: the others align under the first
    assert f("network n() {\n train { epochs = 1\n   batch = 4 }\n}\n") == \
        "network n() {\n  train { epochs = 1\n          batch = 4 }\n}\n"
    # keyword arguments tight, definition defaults and train settings spaced
    assert f("block b(x, k=3) { return conv(x, k = k) }\n") == "block b(x, k = 3) { return conv(x, k=k) }\n"
    # a keyword let through as a name is a call; unary signs bind
    assert f("network n() {\n train { schedule = step(every=3)  lr = - 1 }\n}\n") == \
        "network n() {\n  train { schedule = step(every = 3)  lr = -1 }\n}\n"
    # blank lines: none at either end, at most two in a row
    assert f("\n\nconst a = 1\n\n\n\n\nconst b = 2\n\n") == "const a = 1\n\n\nconst b = 2\n"
    # a continuation aligned under an open bracket follows it when the line moves
    assert f("network n(a=1,\n          b=2) {\n}\n") == "network n(a = 1,\n          b = 2) {\n}\n"
    assert f("   const c = f(a,\n               b)\n") == "const c = f(a,\n            b)\n"
    # trailing comments: an aligned column is kept, otherwise two spaces
    assert f("const a = 1      # one\nconst bb = 22    # two\n") == "const a = 1      # one\nconst bb = 22    # two\n"
    assert f("const a=1 # one\n") == "const a = 1  # one\n"
    assert f("") == ""


def test_ast_check_refuses_a_changed_program(monkeypatch):
    """If a layout bug ever changed the program, fmt says so rather than hand it back."""
    monkeypatch.setattr(fmt._Formatter, "run", lambda self: "const a = 2\n")
    with pytest.raises(NetdslError, match="would change it"):
        format_text("const a = 1\n")


def test_syntax_error_is_located(tmp_path, capsys):
    p = tmp_path / "bad.net"
    p.write_text("network n() {\n  x = conv(\n  output x\n")
    before = p.read_bytes()
    assert main(["fmt", "-w", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:" in err and "error:" in err and "Traceback" not in err
    assert p.read_bytes() == before
    assert main(["fmt", str(tmp_path / "missing.net")]) == 2
    assert "cannot find" in capsys.readouterr().err
    (tmp_path / "bin.net").write_bytes(b"const a = \xff\n")
    assert main(["fmt", "--check", str(tmp_path / "bin.net")]) == 2
    assert "UTF-8" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fmt", str(empty)]) == 2
    assert "no .net files" in capsys.readouterr().err


def test_print_check_and_write(tmp_path, capsys):
    messy, tidy = tmp_path / "messy.net", tmp_path / "tidy.net"
    messy.write_text(MESSY)
    tidy.write_text(MESSY_FORMATTED)
    # default: print, change nothing
    assert main(["fmt", str(messy)]) == 0
    assert capsys.readouterr().out == MESSY_FORMATTED
    assert messy.read_text() == MESSY
    # --check: exit 1 naming only the file that would change; nothing written
    assert main(["fmt", "--check", str(messy), str(tidy)]) == 1
    out = capsys.readouterr().out
    assert str(messy) in out and str(tidy) not in out
    assert messy.read_text() == MESSY
    assert main(["fmt", "--check", str(tidy)]) == 0
    # a directory stands for its .net files
    assert main(["fmt", "--check", str(tmp_path)]) == 1
    # -w rewrites in place, keeps the mode, leaves a formatted file untouched
    messy.chmod(0o640)
    ino_tidy, mtime_tidy = tidy.stat().st_ino, tidy.stat().st_mtime_ns
    assert main(["fmt", "-w", str(messy), str(tidy)]) == 0
    assert messy.read_text() == MESSY_FORMATTED
    assert stat.S_IMODE(messy.stat().st_mode) == 0o640
    assert (tidy.stat().st_ino, tidy.stat().st_mtime_ns) == (ino_tidy, mtime_tidy)
    assert main(["fmt", "--check", str(messy)]) == 0
    # -w and --check together is a usage error
    with pytest.raises(SystemExit) as e:
        main(["fmt", "-w", "--check", str(messy)])
    assert e.value.code == 2


def test_write_is_atomic(tmp_path, monkeypatch):
    """The new text goes to a temporary file renamed over the old: a failure leaves the
    file as it was and no temporary behind; a symlink stays a link to the rewritten file."""
    p = tmp_path / "a.net"
    p.write_text(MESSY)

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    assert main(["fmt", "-w", str(p)]) == 2
    assert p.read_text() == MESSY
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.net"]
    monkeypatch.undo()

    link = tmp_path / "link.net"
    link.symlink_to(p.name)
    ino = p.stat().st_ino
    assert main(["fmt", "-w", str(link)]) == 0
    assert link.is_symlink() and p.read_text() == MESSY_FORMATTED
    assert p.stat().st_ino != ino       # replaced by rename, not written through
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.net", "link.net"]


def test_stdin(monkeypatch, capsys):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("const a=1\n"))
    assert main(["fmt", "-"]) == 0
    assert capsys.readouterr().out == "const a = 1\n"
