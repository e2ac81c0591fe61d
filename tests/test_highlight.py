"""Syntax highlighting: the Pygments lexer (netdsl/highlight.py, found through its entry
point) and the TextMate grammar (editors/netdsl.tmLanguage.json) know the grammar's
keywords and read every spec."""
import glob
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pygments import lex
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Comment, Error, Keyword, Name

from netdsl import highlight
from netdsl.lang.parser import _KEYWORDS

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(glob.glob(str(ROOT / "specs" / "**" / "*.net"), recursive=True))
TM = ROOT / "editors" / "netdsl.tmLanguage.json"


def grammar_keywords():
    """The words grammar.lark writes as literals: its keywords."""
    text = (ROOT / "netdsl" / "lang" / "grammar.lark").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    return set(re.findall(r'"([a-z]+)"', text))


def test_keyword_lists_match_the_grammar():
    kw = grammar_keywords()
    assert len(kw) > 25
    assert set(highlight.KEYWORDS) == kw == _KEYWORDS
    assert len(highlight.KEYWORDS) == len(set(highlight.KEYWORDS))


def test_lexer_is_registered():
    """Found by name and by file name through the `pygments.lexers` entry point (after
    `pip install -e .`, which scripts/setup.sh runs)."""
    lexer = get_lexer_by_name("netdsl")
    assert type(lexer).__name__ == "NetdslLexer" and type(lexer).__module__ == "netdsl.highlight"
    assert type(get_lexer_for_filename("model.net")).__name__ == "NetdslLexer"


def test_pygmentize_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pygments", "-l", "netdsl", "-f", "html",
                          str(ROOT / "specs" / "resnet18.net")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '<span class="kd">network</span>' in out.stdout and '<span class="nf">resnet18</span>' in out.stdout


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(Path(p).relative_to(ROOT / "specs")))
def test_every_spec_lexes_without_errors(path):
    text = Path(path).read_text()
    toks = list(lex(text, get_lexer_by_name("netdsl")))
    assert [(t, v) for t, v in toks if t in Error] == []
    assert "".join(v for _, v in toks) == text


def test_roles():
    toks = [(t, v) for t, v in lex('network n(k = 3) {\n  input x: f32[N]\n  train { schedule = step(every = 30) }\n'
                                    '  y = if not k { x -> relu } else { none }  # why\n}\n$', highlight.NetdslLexer())
            if v.strip()]
    role = {v: t for t, v in toks}
    assert role["network"] is Keyword.Declaration and role["n"] is Name.Function
    assert role["f32"] is Keyword.Type and role["input"] in Keyword and role["train"] in Keyword
    assert role["step"] is Name.Function          # a keyword let through as a name
    assert role["relu"] is Name and role["none"] is Keyword.Constant and role["if"] in Keyword
    assert role["# why"] in Comment
    assert role["$"] in Error                        # not netdsl: marked, as the compiler would reject it


def test_textmate_grammar():
    g = json.loads(TM.read_text())
    assert g["scopeName"] == "source.netdsl" and "net" in g["fileTypes"]
    repo = g["repository"]
    for inc in g["patterns"]:
        assert inc["include"][1:] in repo

    def patterns(node):
        if "match" in node:
            yield node
        for p in node.get("patterns", []):
            yield from patterns(p)
    words = set()
    for name, node in repo.items():
        for p in patterns(node):
            re.compile(p["match"])       # these patterns use only syntax Oniguruma and Python share
            if name == "keyword":
                m = re.fullmatch(r"\\b\(\?:([a-z|]+)\)\\b", p["match"])
                assert m, p["match"]
                words |= set(m.group(1).split("|"))
    assert words == grammar_keywords()
