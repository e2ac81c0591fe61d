"""Text to syntax tree, files to modules: parsing, imports and syntax diagnostics."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..errors import NetdslError, Pos
from . import limits

_GRAMMAR = Path(__file__).with_name("grammar.lark")


def _cache_file(grammar: str) -> Path | None:
    """Where the LALR tables are cached: a file named by the grammar's hash, under our own
    cache directory, and only if it is writable."""
    import hashlib
    import lark
    from ..cachedir import cache_root
    base = cache_root()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(base, os.W_OK):
        return None
    key = hashlib.sha256((grammar + lark.__version__).encode()).hexdigest()[:16]
    return base / f"grammar-{key}.json"


def _to_json(x):
    """Lark's serialised tables as JSON: tuples and int-keyed dicts tagged (see _from_json)."""
    if isinstance(x, list):
        return [_to_json(e) for e in x]
    if isinstance(x, tuple):
        return {"\0t": [_to_json(e) for e in x]}
    if isinstance(x, dict):
        if all(type(k) is str for k in x):
            return {k: _to_json(v) for k, v in x.items()}
        return {"\0k": [[_to_json(k), _to_json(v)] for k, v in x.items()]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store {type(x).__name__}")


def _from_json(d: dict):
    if len(d) == 1:
        if "\0t" in d:
            return tuple(d["\0t"])
        if "\0k" in d:
            return {(tuple(k) if type(k) is list else k): v for k, v in d["\0k"]}
    return d


def _build_parser() -> Lark:
    """Building the LALR tables costs ~0.1 s; they are cached as JSON (Lark's own cache is a
    pickle, which would run whatever code a writer of the cache folder put in it). A
    cache file that does not load is rebuilt."""
    import json
    from lark.grammar import Rule
    from lark.lexer import TerminalDef
    from ..cachedir import write_atomic
    grammar = _GRAMMAR.read_text()
    path = _cache_file(grammar)
    if path is not None:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < 16 << 20:
                    d = json.loads(f.read(), object_hook=_from_json)
                    return Lark._load_from_dict(d["data"], d["memo"])
        except Exception:   # absent, damaged or foreign: build afresh
            pass
    p = Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)
    if path is not None:
        try:
            data, memo = p.memo_serialize([TerminalDef, Rule])
            write_atomic(path, json.dumps(_to_json({"data": data, "memo": memo}), separators=(",", ":")))
        except (OSError, TypeError, ValueError):
            pass
    return p


_PARSER = _build_parser()

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
# The contextual lexer lets a keyword through as a NAME wherever the keyword itself cannot
# stand (so `schedule = step(...)` works); a keyword may still never be *bound* as a name.
_RESERVED = _KEYWORDS - {"weight", "phase", "over"}
# where a rule binds names: rule -> indices of its children that are bound (None: all)
_BINDERS = {"block_def": (0,), "step_def": (0,), "network_def": (0,), "const_def": (0,), "param": (0,),
            "input_stmt": (0,), "loss_stmt": (0,), "carry_item": (0,), "import_stmt": (1,),
            "for_stmt": (2,), "repeat_stmt": (1,), "loopvars": None, "targets": None}
_TOP_LEVEL = {"import", "block", "step", "network", "const"}
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


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
        tree = _PARSER.parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    _check_names(tree, file)
    return tree


def _check_names(tree: Tree, file: str):
    """Reject reserved words used as names, and a parameter listed twice."""
    for t in tree.iter_subtrees():
        bound = _BINDERS.get(t.data, ())
        for tok in (t.children if bound is None else [t.children[i] for i in bound if i < len(t.children)]):
            if isinstance(tok, Token) and tok.type == "NAME" and tok.value in _RESERVED:
                raise NetdslError(f"'{tok.value}' is a keyword and cannot be used as a name", pos_of(tok, file),
                                  hint=f"choose another name, e.g. '{tok.value}_'")
        if t.data == "params":
            seen = {}
            for p in t.children:
                name = p.children[0]
                if name.value in seen:
                    raise NetdslError(f"parameter '{name.value}' appears twice", pos_of(name, file),
                                      notes=[_note("first listed here", seen[name.value])])
                seen[name.value] = pos_of(name, file)


def _brackets(text: str, end: int):
    """Brackets still open at offset `end` as [(char, offset)], and the first closer
    (offset) that had nothing to close; strings and comments are skipped."""
    stack, stray, i = [], None, 0
    while i < end:
        ch = text[i]
        if ch == "#":
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl
            continue
        if ch == '"':
            j = i + 1
            while j < len(text) and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if ch in _CLOSERS:
            stack.append((ch, i))
        elif ch in ")]}":
            if stack and _CLOSERS[stack[-1][0]] == ch:
                stack.pop()
            elif stray is None:
                stray = i
        i += 1
    return stack, stray


def _offset(text: str, line: int, col: int) -> int:
    lines = text.split("\n")
    return sum(len(l) + 1 for l in lines[:line - 1]) + col - 1


def _at(text: str, file: str, offset: int) -> Pos:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return Pos(file, line, col, line, col + 1)


def _unclosed_note(text: str, file: str, end: int, closer: str | None = None):
    """A note at the innermost bracket left open before `end` (of the kind `closer` closes)."""
    stack, _ = _brackets(text, end)
    for ch, off in reversed(stack):
        if closer is None or _CLOSERS[ch] == closer:
            return ch, _note(f"this '{ch}' is not closed", _at(text, file, off))
    return None, None


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> NetdslError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        hint = None
        if ch == '"':
            return NetdslError("unterminated string", Pos(file, line, col, line, col + 1),
                               hint="add the closing '\"' on the same line")
        if ch == "'":
            hint = 'strings use double quotes: "like this"'
        elif ch == ";":
            hint = "statements need no separator; put them on separate lines"
        elif ch == "/" and text[e.pos_in_stream:e.pos_in_stream + 2] == "//":
            hint = "comments start with '#'"
        return NetdslError(f"unexpected character '{ch}'", Pos(file, line, col, line, col + 1), hint=hint)
    if isinstance(e, UnexpectedEOF) or e.token.type == "$END":
        lines = text.rstrip().splitlines() or [""]
        ch, note = _unclosed_note(text, file, len(text))
        what = f"; a '{_CLOSERS[ch]}' is missing" if ch else ""
        return NetdslError(f"unexpected end of file{what}", Pos(file, len(lines), len(lines[-1]) + 1),
                           hint=None if ch else "the file ends in the middle of a statement",
                           notes=[note] if note else [])
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    exp = _expected(e.expected)
    msg = f"unexpected {_describe(tok)}" + (f"; expected {exp}" if exp else "")
    hint, notes = None, []
    start = _offset(text, tok.line, tok.column)
    first_on_line = not text[text.rfind("\n", 0, start) + 1:start].strip()
    closer = next((c for c, t in ((")", "RPAR"), ("]", "RSQB"), ("}", "RBRACE")) if t in e.expected), None)
    if tok.value in ")]}":
        _, stray = _brackets(text, start + 1)
        if stray == start:
            hint = f"there is no '{ {')': '(', ']': '[', '}': '{'}[tok.value]}' for this '{tok.value}' to close"
    elif closer and (first_on_line or tok.value in _TOP_LEVEL):
        # the statement before ended but a bracket is still open: the closer was forgotten
        ch, note = _unclosed_note(text, file, start, closer)
        if ch:
            hint, notes = f"a '{closer}' may be missing before this", [note]
    if hint:
        pass
    elif tok.value == "//":
        hint = "comments start with '#'; '//' divides integers"
    elif tok.value in _KEYWORDS:
        hint = f"'{tok.value}' is a keyword and cannot be used as a name"
    elif tok.value == "=" and "EQUAL" not in e.expected:
        hint = "'=' assigns; compare with '=='"
    elif tok.value == "{" and "LPAR" in e.expected:
        hint = "a definition needs a parameter list, even an empty one: name() { ... }"
    elif "COMMA" in e.expected and not first_on_line:
        hint = "a ',' may be missing between the items"
    return NetdslError(msg, pos_of(tok, file), hint=hint, notes=notes)


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
        self._import_pos: list[Pos | None] = []   # where each file on the stack was imported
        self._bytes = 0                           # read so far, toward MAX_TOTAL_SOURCE_BYTES

    def load(self, path: str, pos: Pos | None = None) -> Module:
        key = os.path.realpath(path)
        if key in self._stack:
            i = self._stack.index(key)
            chain = [os.path.relpath(p) for p in self._stack[i:]] + [os.path.relpath(key)]
            notes = [_note("imported from here", p) for p in self._import_pos[i + 1:] if p]
            raise NetdslError("import cycle: " + " -> ".join(chain), pos, notes=notes,
                              hint="move the shared blocks into a file both can import")
        if key in self.modules:
            return self.modules[key]
        if len(self._stack) >= limits.MAX_IMPORT_DEPTH:
            raise NetdslError(f"imports nest more than {limits.MAX_IMPORT_DEPTH} deep", pos,
                              hint="a chain of files each importing the next; flatten it")
        text = self._read(path, pos or Pos(path, 1, 1), pos is not None)
        if "\0" in text:
            raise NetdslError(f"'{path}' is not a text file (it contains NUL bytes)", pos or Pos(path, 1, 1))
        if not text.strip():
            raise NetdslError(f"'{path}' is empty", pos or Pos(path, 1, 1),
                              hint="a spec needs `network NAME(...) { ... }`")
        shown = os.path.relpath(path) if not os.path.isabs(path) or path.startswith(os.getcwd()) else path
        self.sources[shown] = text
        tree = parse(text, shown)
        mod = Module(shown, text, tree)
        self._stack.append(key)
        self._import_pos.append(pos)
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
            self._import_pos.pop()
        self.modules[key] = mod
        return mod

    def _read(self, path: str, where: Pos, imported: bool) -> str:
        """A spec file's text: a regular file of at most limits.MAX_SOURCE_BYTES, in UTF-8.
        Opened without blocking and checked before it is read, so neither a FIFO nor
        /dev/zero nor a huge file can stall or exhaust the process."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise NetdslError(f"cannot find '{path}'", where, hint="import paths are relative to the importing file"
                              if imported else None) from None
        except OSError as e:
            raise NetdslError(f"cannot read '{path}': {e.strerror or e}", where) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise NetdslError(f"'{path}' is a directory, not a .net file", where)
            if not stat.S_ISREG(st.st_mode):
                kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                        stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
                raise NetdslError(f"'{path}' is {kind}, not a regular .net file", where)
            limit = min(limits.MAX_SOURCE_BYTES, limits.MAX_TOTAL_SOURCE_BYTES - self._bytes)
            chunks, n = [], 0
            while st.st_size <= limit and n <= limit:   # up to limit + 1: a file that grew is caught too
                chunk = os.read(fd, limit + 1 - n)
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
            data = b"".join(chunks)
        except OSError as e:
            raise NetdslError(f"cannot read '{path}': {e.strerror or e}", where) from None
        finally:
            os.close(fd)
        if st.st_size > limit or len(data) > limit:
            size = max(st.st_size, len(data))
            what = (f"{size:,} bytes, more than the {limits.MAX_SOURCE_BYTES:,} a .net file may have"
                    if limit == limits.MAX_SOURCE_BYTES else
                    f"the spec and its imports would be more than {limits.MAX_TOTAL_SOURCE_BYTES:,} bytes")
            raise NetdslError(f"'{path}' is too large: {what}", where)
        self._bytes += len(data)
        try:   # newlines as text-mode open() reads them (the graph cache hashes the text that way)
            return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as e:
            raise NetdslError(f"'{path}' is not a text file (it is not valid UTF-8 at byte {e.start})", where) from None


def _note(msg, pos):
    from ..errors import Note
    return Note(msg, pos)
