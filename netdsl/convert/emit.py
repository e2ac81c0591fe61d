"""The readable .net text that both importers write.

A converter adds statements in layer order, each `target = source -> stage -> stage`;
`render` then joins a statement into the one before it when it only continues that
pipeline (its source is the previous target and nothing else reads it), so a plain
chain of layers reads as one pipeline with a line per layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_KEYWORDS = {"network", "block", "step", "input", "output", "loss", "return", "if", "elif", "else",
             "for", "in", "as", "repeat", "const", "import", "assert", "train", "weight", "phase",
             "true", "false", "none", "and", "or", "not"}


def ident(name: str, taken: set[str] | None = None) -> str:
    """A netdsl variable name from a layer or blob name ("inception_3a/1x1" ->
    "inception_3a_1x1"), made unique against `taken` (which it joins)."""
    s = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "x"
    if s[0].isdigit() or s in _KEYWORDS:
        s = "l_" + s
    if s[0].isupper():       # a capitalised name would be read as a symbolic dimension
        s = "l_" + s
    if taken is not None:
        base, i = s, 2
        while s in taken:
            s, i = f"{base}_{i}", i + 1
        taken.add(s)
    return s


def fmt_num(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(int(v)) + ".0" if v.is_integer() and abs(v) < 1e15 else repr(v)
    return str(v)


def call(op: str, *args, **kw) -> str:
    """`op(a, b, k=v)`, attributes left out when None."""
    parts = [fmt_num(a) for a in args]
    for k, v in kw.items():
        if v is None:
            continue
        parts.append(f"{k}={fmt_str(v) if isinstance(v, str) else fmt_num(v)}")
    return f"{op}({', '.join(parts)})" if parts else op


def fmt_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Stmt:
    target: str
    source: str                      # a variable, or an expression such as concat(a, b)
    stages: list[tuple[str, str]] = field(default_factory=list)   # (stage, comment)
    comment: str = ""


@dataclass
class Spec:
    network: str
    header: list[str] = field(default_factory=list)     # comment lines at the top
    blocks: list[str] = field(default_factory=list)     # block definitions, verbatim
    inputs: list[tuple[str, str]] = field(default_factory=list)
    stmts: list[Stmt] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # comment lines before the outputs
    outputs: list[tuple[str, str]] = field(default_factory=list)   # (name, comment)
    losses: list[str] = field(default_factory=list)     # whole loss lines

    def add(self, target: str, source: str, stage: str | None = None, comment: str = "") -> str:
        st = Stmt(target, source)
        if stage is not None:
            st.stages.append((stage, comment))
        else:
            st.comment = comment
        self.stmts.append(st)
        return target

    def then(self, stage: str, comment: str = "") -> None:
        """One more stage on the last statement (an activation after its conv)."""
        self.stmts[-1].stages.append((stage, comment))

    def render(self) -> str:
        stmts = _merge(self.stmts, {n for n, _ in self.outputs}, self.losses)
        out = [f"# {h}" if h else "#" for h in self.header]
        if out:
            out.append("")
        for b in self.blocks:
            out += [b, ""]
        out.append(f"network {self.network}() {{")
        out += [f"  input {n}: {t}" for n, t in self.inputs]
        for st in stmts:
            head = f"  {st.target} = {st.source}"
            if not st.stages:
                out.append(head + (f"  # {st.comment}" if st.comment else ""))
                continue
            if st.comment:
                out.append(f"  # {st.comment}")
            pad = " " * (len(head) - 1)
            for i, (stage, comment) in enumerate(st.stages):
                line = (head if i == 0 else pad) + f" -> {stage}"
                out.append(line + (f"  # {comment}" if comment else ""))
        out += [f"  # {n}" for n in self.notes]
        for name, comment in self.outputs:
            if comment:
                out.append(f"  # {comment}")
            out.append(f"  output {name}")
        out += [f"  {l}" for l in self.losses]
        out.append("}")
        return "\n".join(out) + "\n"


def _merge(stmts: list[Stmt], outputs: set[str], losses: list[str]) -> list[Stmt]:
    """Join each statement into the previous one when it just continues that pipeline."""
    text = " ".join(s.source for s in stmts) + " " + " ".join(losses)
    uses: dict[str, int] = {}
    for tok in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
        uses[tok] = uses.get(tok, 0) + 1
    merged: list[Stmt] = []
    for s in stmts:
        prev = merged[-1] if merged else None
        if (prev is not None and s.source == prev.target and s.stages and not s.comment
                and uses.get(prev.target, 0) == 1 and prev.target not in outputs):
            prev.stages.extend(s.stages)
            prev.target = s.target
            continue
        merged.append(Stmt(s.target, s.source, list(s.stages), s.comment))
    return merged
