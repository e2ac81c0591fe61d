"""A small reader of protobuf text format, enough for Caffe's .prototxt.

`name: "conv1"`, `pad: 2`, `pool: MAX`, `convolution_param { ... }` (the colon before
a brace is optional); `#` comments; strings in double or single quotes. Every field
keeps its line, so a converter can point at the layer it refuses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import NetdslError

_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<punct>[{}:<>\[\],;])|(?P<word>[^\s{}:<>\[\],;"'#]+)""")


@dataclass
class Msg:
    line: int
    fields: list[tuple[str, object, int]] = field(default_factory=list)   # (key, value, line)

    def all(self, key: str) -> list:
        return [v for k, v, _ in self.fields if k == key]

    def get(self, key: str, default=None):
        vs = self.all(key)
        return vs[-1] if vs else default

    def line_of(self, key: str) -> int:
        for k, _, n in self.fields:
            if k == key:
                return n
        return self.line

    def sub(self, key: str) -> "Msg":
        m = self.get(key)
        return m if isinstance(m, Msg) else Msg(self.line)


def parse(text: str, path: str) -> Msg:
    toks: list[tuple[str, str, int]] = []
    line, pos = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise NetdslError(f"{path}:{line}: cannot read '{text[pos:pos + 20].splitlines()[0]}'")
        kind = m.lastgroup
        if kind:
            toks.append((kind, m.group(kind), line))
        line += m.group(0).count("\n")
        pos = m.end()
    i = 0

    def message(end: str | None, start: int) -> Msg:
        nonlocal i
        msg = Msg(start)
        while True:
            if i >= len(toks):
                if end:
                    raise NetdslError(f"{path}:{start}: '{{' is never closed")
                return msg
            kind, tok, n = toks[i]
            if kind == "punct" and tok in "};,":
                i += 1
                if tok == "}":
                    if not end:
                        raise NetdslError(f"{path}:{n}: '}}' without a '{{'")
                    return msg
                continue
            if kind != "word":
                raise NetdslError(f"{path}:{n}: expected a field name, got {tok}")
            i += 1
            if i < len(toks) and toks[i][1] == ":":
                i += 1
            if i >= len(toks):
                raise NetdslError(f"{path}:{n}: field {tok} has no value")
            vkind, v, _ = toks[i]
            if v == "{" and vkind == "punct":
                i += 1
                msg.fields.append((tok, message("}", n), n))
            elif vkind == "str":
                i += 1
                msg.fields.append((tok, bytes(v[1:-1], "utf-8").decode("unicode_escape"), n))
            elif vkind == "word":
                i += 1
                msg.fields.append((tok, _scalar(v), n))
            else:
                raise NetdslError(f"{path}:{n}: field {tok} has no value")

    return message(None, 1)


def _scalar(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v, v)     # enums (MAX, TRAIN) stay words
