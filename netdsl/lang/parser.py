"""Text to syntax tree, files to modules: parsing, imports and syntax diagnostics."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..errors import NetdslError, Pos

_GRAMMAR = Path(__file__).with_name("grammar.lark")
_PARSER = Lark(_GRAMMAR.read_text(), parser="lalr", propagate_positions=True,
               maybe_placeholders=True, cache=False)

# how terminals are named in messages
_TOKEN_NAMES = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "NAME": "a name", "NUMBER": "a number",
    "STRING": "a string", "DOT": "'.'", "COMP_OP": "a comparison", "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*' or '/'", "__ANON_0": "'->'", "$END": "end of file", "RARROW": "'->'",
}
_KEYWORDS = {"import", "block", "step", "network", "const", "return", "for", "in", "as", "repeat",
             "if", "elif", "else", "input", "output", "loss", "weight", "phase", "train", "carry",
             "emit", "assert", "or", "and", "not", "true", "false", "none", "scan", "over"}


def pos_of(node, file: str) -> Pos | None:
    """Source span of a tree or token."""
    if isinstance(node, Token):
        return Pos(file, node.line, node.column, node.end_line or node.line,
                   node.end_column or node.column + len(node))
    meta = getattr(node, "meta", None)
    if meta is None or getattr(meta, "empty", True):
        return None
    return Pos(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok.value}'" if tok.value else tok.type


def _expected(names) -> str:
    shown = sorted({_TOKEN_NAMES.get(n, f"'{n.lower()}'" if n.lower() in _KEYWORDS else n) for n in names})
    if len(shown) > 6:
        return ""
    return " or ".join(shown)


def parse(text: str, file: str) -> Tree:
    try:
        return _PARSER.parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> NetdslError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        hint = None
        if ch == "'":
            hint = 'strings use double quotes: "like this"'
        elif ch == ";":
            hint = "statements need no separator; put them on separate lines"
        elif ch == "/" and text[e.pos_in_stream:e.pos_in_stream + 2] == "//":
            hint = "comments start with '#'"
        return NetdslError(f"unexpected character '{ch}'", Pos(file, line, col, line, col + 1), hint=hint)
    if isinstance(e, UnexpectedEOF):
        lines = text.splitlines() or [""]
        return NetdslError("unexpected end of file; a '}' or ')' may be missing",
                           Pos(file, len(lines), len(lines[-1]) + 1),
                           hint="check that every '{' and '(' is closed")
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    if tok.type == "$END":
        lines = text.splitlines() or [""]
        return NetdslError("unexpected end of file; a '}' or ')' may be missing",
                           Pos(file, len(lines), len(lines[-1]) + 1),
                           hint="check that every '{' and '(' is closed")
    exp = _expected(e.expected)
    msg = f"unexpected {_describe(tok)}" + (f"; expected {exp}" if exp else "")
    hint = None
    if tok.value in _KEYWORDS:
        hint = f"'{tok.value}' is a keyword and cannot be used as a name"
    elif tok.value == "=" and "RPAR" in e.expected:
        hint = "'=' assigns; compare with '=='"
    elif tok.value == "{" and "LPAR" in e.expected:
        hint = "a definition needs a parameter list, even an empty one: name() { ... }"
    return NetdslError(msg, pos_of(tok, file), hint=hint)


@dataclass
class Module:
    path: str                      # as shown in diagnostics
    text: str
    tree: Tree
    defs: dict = field(default_factory=dict)      # name -> (kind, tree)
    imports: list = field(default_factory=list)   # (alias or None, Module, pos)


class Loader:
    """Loads a file and its imports once each; reports cycles with the chain."""

    def __init__(self):
        self.modules: dict[str, Module] = {}
        self.sources: dict[str, str] = {}
        self._stack: list[str] = []

    def load(self, path: str, pos: Pos | None = None) -> Module:
        key = os.path.realpath(path)
        if key in self._stack:
            chain = [os.path.relpath(p) for p in self._stack[self._stack.index(key):]] + [os.path.relpath(key)]
            raise NetdslError("import cycle: " + " -> ".join(chain), pos,
                              hint="move the shared blocks into a file both can import")
        if key in self.modules:
            return self.modules[key]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise NetdslError(f"cannot find '{path}'", pos) from None
        except IsADirectoryError:
            raise NetdslError(f"'{path}' is a directory, not a .net file", pos) from None
        except (OSError, UnicodeDecodeError) as e:
            raise NetdslError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}", pos) from None
        shown = os.path.relpath(path) if not os.path.isabs(path) or path.startswith(os.getcwd()) else path
        self.sources[shown] = text
        tree = parse(text, shown)
        mod = Module(shown, text, tree)
        self._stack.append(key)
        try:
            for item in tree.children:
                if item.data == "import_stmt":
                    target, alias = item.children
                    rel = target.value[1:-1]
                    ipos = pos_of(target, shown)
                    full = os.path.join(os.path.dirname(path), rel)
                    mod.imports.append((alias.value if alias else None, self.load(full, ipos), ipos))
                else:
                    name = item.children[0]
                    if name.value in mod.defs:
                        prev = mod.defs[name.value][1]
                        raise NetdslError(f"'{name.value}' is defined twice in this file", pos_of(name, shown),
                                          notes=[_note(f"first definition of '{name.value}'", pos_of(prev, shown))])
                    mod.defs[name.value] = (item.data, item)
        finally:
            self._stack.pop()
        self.modules[key] = mod
        return mod


def _note(msg, pos):
    from ..errors import Note
    return Note(msg, pos)
