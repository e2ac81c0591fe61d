"""`netdsl fmt`: the canonical layout of a .net file (rules in docs/fmt.md).

Conservative by design: the author's line breaks and comments stay where they are;
what changes is indentation, the spaces between tokens, trailing blanks, runs of blank
lines, and two statements sharing a line. The parser decides what is a statement, a
unary sign or a name; the text is re-laid token by token, and the result is checked
to have the same syntax tree, tokens and comments as the input before it is returned.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from lark import Token, Tree

from ..errors import NetdslError
from .parser import parse

INDENT = 2
MAX_BLANK = 2     # consecutive blank lines kept
_DEFS = {"network", "block", "step"}

# The grammar's terminals, plus comments; the parse already accepted the text, so every
# character is whitespace or one of these.
_LEX = re.compile(r"""
    (?P<ws>[ \t\f]+) | (?P<comment>\#[^\n]*) | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>->|\*\*|//|==|!=|<=|>=|[-+*/%<>=(){}\[\],:.])
""", re.X)


@dataclass(eq=False)
class _Tok:
    kind: str          # name num str op comment
    text: str
    line: int          # 1-based
    col: int           # 0-based, in the input
    new_col: int = -1  # in the output


def _lex(text: str) -> list[list[_Tok]]:
    """Tokens per input line (index 0 is line 1)."""
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip()
        toks, i = [], 0
        while i < len(line):
            m = _LEX.match(line, i)
            if m is None:   # cannot happen after a successful parse
                raise NetdslError(f"fmt: cannot read line {n} at column {i + 1}")
            if m.lastgroup != "ws":
                toks.append(_Tok(m.lastgroup, m.group(), n, i))
            i = m.end()
        out.append(toks)
    return out


@dataclass
class _Facts:
    """What the parse tree says about token positions (line, 0-based column)."""
    stmts: set = field(default_factory=set)      # first token of a statement or top-level item
    settings: set = field(default_factory=set)   # first token of a train setting
    unary: set = field(default_factory=set)      # a sign applied to one operand
    names: set = field(default_factory=set)      # a NAME (a keyword let through as a name too)
    bodies: set = field(default_factory=set)     # '{' opening a body or a train section


_STMTS = {"assign", "return_stmt", "for_stmt", "repeat_stmt", "if_stmt", "input_stmt", "output_stmt",
          "output_many", "loss_stmt", "train_stmt", "carry_stmt", "emit_stmt", "assert_stmt", "const_def",
          "import_stmt", "block_def", "step_def", "network_def"}


def _facts(tree: Tree) -> _Facts:
    f = _Facts()
    at = lambda m: (m.line, m.column - 1)
    for t in tree.iter_subtrees():
        if t.meta.empty:
            continue
        if t.data in _STMTS:
            f.stmts.add(at(t.meta))
        elif t.data == "setting":
            f.settings.add(at(t.meta))
        elif t.data == "body":
            f.bodies.add(at(t.meta))
        elif t.data == "unary":
            f.unary.add((t.children[0].line, t.children[0].column - 1))
        for c in t.children:
            if isinstance(c, Token) and c.type == "NAME":
                f.names.add((c.line, c.column - 1))
    return f


@dataclass
class _Open:
    tok: _Tok
    kind: str          # params call body expr bracket
    line_indent: int   # new indent of the output line holding the opener
    head_indent: int   # new indent of the statement (head line) it belongs to
    train: bool        # inside a train section
    first_after: _Tok | None = None   # what follows the '{' on its line, if anything


@dataclass
class _Line:
    toks: list
    indent: int = 0
    old_indent: int = 0


def format_text(text: str, file: str = "<text>") -> str:
    """The canonical form of a spec's text; NetdslError if it does not parse."""
    tree = parse(text, file)
    out = _Formatter(text, _facts(tree)).run()
    _check_same(text, tree, out, file)
    return out


class _Formatter:
    def __init__(self, text: str, facts: _Facts):
        self.f = facts
        self.src = _lex(text)
        self.stack: list[_Open] = []
        self.head: _Line | None = None     # the last line that started a statement
        self.since_head: list[_Line] = []  # it and its continuation lines so far
        self.prev: _Tok | None = None      # previous code token
        self.prev2: _Tok | None = None     # and the one before it

    def pos(self, t):
        return (t.line, t.col)

    def run(self) -> str:
        lines, blank = [], 0
        for i, toks in enumerate(self.src):
            if not toks:
                blank += 1
                continue
            if lines and blank:
                lines.extend([""] * min(blank, MAX_BLANK))
            blank = 0
            for seg in self.split(toks):
                lines.append(self.layout(seg, i))
        return "\n".join(lines) + "\n" if lines else ""

    def split(self, toks):
        """One statement per line: break before a statement that follows another on the
        same line. `{ x = f(x) }` stays (one statement, written short); a line that is
        broken also breaks after a body's '{' and before its '}'."""
        code = [t for t in toks if t.kind != "comment"]
        starts = [self.pos(t) in self.f.stmts for t in code]
        breaks = {i for i in range(1, len(code)) if starts[i] and code[i - 1].text != "{"}
        if breaks:
            opened = []
            for i, t in enumerate(code):
                if t.kind != "op":
                    continue
                if t.text == "{":
                    opened.append(i + 1 < len(code) and starts[i + 1])
                    if opened[-1]:
                        breaks.add(i + 1)
                elif t.text == "}" and i > 0 and (not opened or opened.pop()):
                    breaks.add(i)
        index = {id(t): i for i, t in enumerate(code)}
        segs, cur = [], []
        for t in toks:
            if cur and t.kind != "comment" and index[id(t)] in breaks:
                segs.append(cur)
                cur = []
            cur.append(t)
        segs.append(cur)
        return segs

    def next_code(self, line_idx):
        for toks in self.src[line_idx + 1:]:
            for t in toks:
                if t.kind != "comment":
                    return t
        return None

    # ---- indentation

    def depth_indent(self):
        for o in reversed(self.stack):
            if o.kind == "body":
                # `train { a = 1\n        b = 2 }`: the items stay aligned under the first
                return o.first_after.new_col if o.first_after is not None else o.head_indent + INDENT
        return 0

    def indent_of(self, first: _Tok, line_idx: int) -> tuple[int, bool]:
        """(indent, starts a head line) of a line whose first token is `first`."""
        lead = first
        if first.kind == "comment":
            lead = self.next_code(line_idx)
            if lead is None or lead.text == "}" and lead.kind == "op":
                return self.depth_indent(), False
        p = self.pos(lead)
        if lead.kind == "op" and lead.text == "}" and first is lead:
            return self.stack[-1].head_indent, True
        if p in self.f.stmts or p in self.f.settings:
            return self.depth_indent(), first is lead
        inner = self.stack[-1] if self.stack else None
        if inner is not None and inner.kind == "expr" and inner.tok.line < first.line \
                and (self.head is None or self.head.toks[0].line <= inner.tok.line):
            return inner.head_indent + INDENT, first is lead   # the branch of an if-expression
        return self.continuation(first), False

    def continuation(self, first: _Tok) -> int:
        head = self.head
        base = head.indent if head else 0
        if first.kind == "op" and first.text in ")]" and self.stack:
            return self.stack[-1].line_indent
        c = first.col
        inner = self.stack[-1] if self.stack else None
        if inner is not None and inner.kind != "body" and inner.tok.col + 1 == c and inner.tok.new_col >= base:
            return inner.tok.new_col + 1          # aligned just inside the open bracket
        for line in reversed(self.since_head):     # aligned under a token above
            for t in line.toks:
                if t.col == c and t.new_col > base:
                    return t.new_col
        new = c + (base - (head.old_indent if head else 0))
        return new if new > base else base + 2 * INDENT

    # ---- one output line

    def layout(self, seg, line_idx) -> str:
        indent, is_head = self.indent_of(seg[0], line_idx)
        line = _Line(seg, indent, seg[0].col)
        if is_head:
            self.head, self.since_head = line, []
        self.since_head.append(line)
        text, first = " " * indent, True
        for t in seg:
            if t.kind == "comment":
                if not first:
                    width = len(text)
                    text += " " * (t.col - width if t.col >= width + 2 else 2)
                t.new_col = len(text)
                text += t.text
                continue
            if not first:
                text += self.space(self.prev, t)
                if self.stack and self.stack[-1].tok is self.prev and self.stack[-1].kind == "body":
                    self.stack[-1].first_after = t
            t.new_col = len(text)
            text += t.text
            self.track(t, line)
            self.prev2, self.prev, first = self.prev, t, False
        return text.rstrip()

    def track(self, t: _Tok, line: _Line):
        if t.kind != "op":
            return
        if t.text in "([{":
            inner = self.stack[-1] if self.stack else None
            train = bool(inner and inner.train) or (t.text == "{" and self.prev_word == "train")
            if t.text == "{":
                kind = "body" if self.pos(t) in self.f.bodies or self.prev_word == "train" else "expr"
            elif t.text == "(" and self._is_params():
                kind = "params"
            else:
                kind = "call" if t.text == "(" else "bracket"
            head = self.head.indent if self.head else 0
            self.stack.append(_Open(t, kind, line.indent, head, train))
        elif t.text in ")]}" and self.stack:
            self.stack.pop()

    @property
    def prev_word(self):
        """The previous token if it is a word (`train` before its '{')."""
        return self.prev.text if self.prev is not None and self.prev.kind == "name" else None

    def _is_params(self):
        # called before prev moves on to `(`: `network NAME (`, the keyword not a name
        p, p2 = self.prev, self.prev2
        return (p is not None and p2 is not None and p.kind == "name" and p2.text in _DEFS
                and self.pos(p2) not in self.f.names)

    # ---- spaces between two tokens on a line

    def operand_end(self, p: _Tok) -> bool:
        if p.kind in ("num", "str"):
            return True
        if p.kind == "name":
            return self.pos(p) in self.f.names or p.text in ("true", "false", "none")
        return p.text in ")]"

    def space(self, p: _Tok, t: _Tok) -> str:
        P, T = p.text, t.text
        inner = self.stack[-1] if self.stack else None
        if self.pos(t) in self.f.settings and P != "{":
            return "  "                                   # settings sharing a line
        if p.kind == "op" and P in "([":
            return ""
        if t.kind == "op" and T in ",)]":
            return ""
        if P == "." and p.kind == "op" or T == "." and t.kind == "op":
            return ""
        if P == "{" and T == "}":
            return ""
        if "=" in (P, T) and inner is not None and inner.kind == "call" and not inner.train:
            return ""                                     # keyword argument: f(k=v)
        if t.kind == "op" and T in "([":
            return "" if self.operand_end(p) else " "
        if T == ":":
            return " " if P == "," else ""
        if P == ":":
            return "" if inner is not None and inner.tok.text == "[" else " "
        if self.pos(p) in self.f.unary:
            return ""
        return " "


def _check_same(text: str, tree: Tree, out: str, file: str):
    """Refuse to hand back a layout that changed the program or lost a comment."""
    def code(s):
        return [(t.kind, t.text) for line in _lex(s) for t in line]
    try:
        same = parse(out, file) == tree and code(out) == code(text)
    except NetdslError:
        same = False
    if not same:
        raise NetdslError(f"fmt: formatting {file} would change it; please report this as a bug",
                          hint="the file was left as it is")


# ---- files (the `netdsl fmt` command)

def _files(paths):
    """The .net files named, a directory standing for every .net file under it."""
    import os
    for p in paths:
        if p != "-" and os.path.isdir(p):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(p) for n in names if n.endswith(".net"))
            if not found:
                raise NetdslError(f"no .net files under '{p}'")
            yield from found
        else:
            yield p


def _read(path: str) -> str:
    import sys
    from ..errors import Pos
    from .parser import Loader
    if path == "-":
        return sys.stdin.read()
    # the loader's checks: a regular file, not too large, UTF-8; newlines as text mode reads them
    return Loader()._read(path, Pos(path, 1, 1), False)


def write_atomic(path: str, text: str) -> None:
    """Replace the file's content at once: a temporary file beside it, flushed to disk,
    then renamed over it. Keeps the file's permissions; through a symlink the target is
    rewritten, the link kept. A reader or a crash never sees half a file."""
    import os
    import tempfile
    real = os.path.realpath(path)
    mode = os.stat(real).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".fmt-", suffix=".net")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fmt_files(paths, write: bool = False, check: bool = False, out=None, err=None) -> int:
    """Print (or, with write, rewrite) each file's canonical form; with check, name the
    files that would change. Exit status: 2 if a file has an error (the others are still
    done), else 1 if check found a file to change, else 0."""
    import sys
    out, err = out or sys.stdout, err or sys.stderr
    status = 0
    try:
        files = list(_files(paths))
    except NetdslError as e:
        print(e.render(), file=err)
        return 2
    for path in files:
        text = None
        try:
            text = _read(path)
            new = format_text(text, path)
            if check:
                if new != text:
                    print(f"would reformat {path}", file=out)
                    status = max(status, 1)
            elif write and path != "-":
                if new != text:
                    try:
                        write_atomic(path, new)
                    except OSError as e:
                        raise NetdslError(f"cannot write '{path}': {e.strerror or e}") from None
            else:
                out.write(new)
        except NetdslError as e:
            print(e.render({path: text} if text is not None else None), file=err)
            status = 2
    return status
