"""Syntax highlighting of .net specs for Pygments (`pygmentize -l netdsl FILE`, Sphinx,
MkDocs, and anything else built on Pygments). Registered by pyproject.toml's
`pygments.lexers` entry point; imports nothing of netdsl's compiler, so loading the
lexer costs nothing. The keyword list is netdsl/lang/grammar.lark's (a test compares)."""
from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

__all__ = ["NetdslLexer"]

# Every keyword of the grammar, by role.
DECLARATIONS = ("network", "block", "step", "const")
STATEMENTS = ("input", "output", "loss", "train", "carry", "emit", "assert", "return", "weight", "phase")
CONTROL = ("for", "in", "as", "repeat", "if", "elif", "else", "scan", "over")
OPERATOR_WORDS = ("and", "or", "not")
CONSTANTS = ("true", "false", "none")
NAMESPACE = ("import",)
KEYWORDS = DECLARATIONS + STATEMENTS + CONTROL + OPERATOR_WORDS + CONSTANTS + NAMESPACE
DTYPES = ("f16", "f32", "f64", "i32", "i64", "bool")   # netdsl/lang/elaborator.py's DTYPES

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# keywords never followed by '(' where they are keywords: before '(' they are a call (`step(every = 30)`)
_CALLABLE = tuple(k for k in KEYWORDS if k not in {"if", "elif", "in", "return", "scan", "for", "not", "and", "or",
                                                   "assert", "weight", "over", "repeat"})


class NetdslLexer(RegexLexer):
    """netdsl network specs (.net)."""
    name = "netdsl"
    aliases = ["netdsl"]
    filenames = ["*.net"]
    mimetypes = ["text/x-netdsl"]

    tokens = {
        "root": [
            (r"[ \t\f]+", Whitespace),
            (r"\n", Whitespace),
            (r"#[^\n]*", Comment.Single),
            (r'"(?:[^"\\\n]|\\.)*"', String.Double),
            # a definition's name, and an input's dtype
            (rf"\b(network|block|step)(\s+)({_NAME})", bygroups(Keyword.Declaration, Whitespace, Name.Function)),
            (rf"\b(const)(\s+)({_NAME})", bygroups(Keyword.Declaration, Whitespace, Name.Constant)),
            (rf"(:)(\s*)({'|'.join(DTYPES)})(\s*)(\[)",
             bygroups(Punctuation, Whitespace, Keyword.Type, Whitespace, Punctuation)),
            # `step(...)` and the like: a keyword where it cannot stand is a name (the contextual lexer)
            (words(_CALLABLE, prefix=r"\b", suffix=r"(?=\s*\()"), Name.Function),
            (words(NAMESPACE, prefix=r"\b", suffix=r"\b"), Keyword.Namespace),
            (words(CONSTANTS, prefix=r"\b", suffix=r"\b"), Keyword.Constant),
            (words(OPERATOR_WORDS, prefix=r"\b", suffix=r"\b"), Operator.Word),
            (words(DECLARATIONS + STATEMENTS + CONTROL, prefix=r"\b", suffix=r"\b"), Keyword),
            (rf"{_NAME}(?=\s*\()", Name.Function),
            (_NAME, Name),
            (r"\d+(?:\.\d*)?[eE][-+]?\d+|\.\d+[eE][-+]?\d+|\d+\.\d*|\.\d+", Number.Float),
            (r"\d+", Number.Integer),
            (r"->|\*\*|//|==|!=|<=|>=|[-+*/%<>=.]", Operator),
            (r"[(){}\[\],:]", Punctuation),
            # anything else is an Error token, as Pygments marks what no rule matches
        ],
    }
