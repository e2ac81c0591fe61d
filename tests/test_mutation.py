"""Mutation testing of the front end: break real specs at random, expect diagnostics.

Every spec under specs/ (whichever exist when the test runs) and the library files they
import are mutated one edit at a time: delete, duplicate or swap tokens, replace a
number, drop or swap lines. Compiling a mutant may succeed or raise NetdslError; any
other exception is a bug in netdsl, and the failing mutant is printed.
"""
import re
import shutil
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from netdsl.errors import NetdslError
from netdsl.lang.elaborate import elaborate

SPECS = Path(__file__).resolve().parent.parent / "specs"
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|[A-Za-z_]\w*'
                    r'|->|==|!=|<=|>=|//|\*\*|\S')
NUMBERS = ["0", "-1", "1000000000000", "0.5", "3"]


def _tokens(text):
    return [m for m in _TOKEN.finditer(text) if not m.group().startswith("#")]


def _splice(text, m, new):
    return text[:m.start()] + new + text[m.end():]


def mutate(text: str, data) -> str:
    """One random edit of `text`, drawn from `data`."""
    toks = _tokens(text)
    names = [m for m in toks if m.group()[0].isalpha() or m.group()[0] == "_"]
    numbers = [m for m in toks if m.group()[0].isdigit()]
    lines = text.split("\n")
    kind = data.draw(st.sampled_from(["delete", "duplicate", "swap_names", "number", "drop_line", "swap_lines"]))
    if kind == "swap_names" and len(set(m.group() for m in names)) > 1:
        a, b = data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique_by=lambda m: m.group()))
        if a.start() > b.start():
            a, b = b, a
        return text[:a.start()] + b.group() + text[a.end():b.start()] + a.group() + text[b.end():]
    if kind == "number" and numbers:
        return _splice(text, data.draw(st.sampled_from(numbers)), data.draw(st.sampled_from(NUMBERS)))
    if kind in ("drop_line", "swap_lines") and len(lines) > 1:
        i, j = (data.draw(st.integers(0, len(lines) - 1)) for _ in range(2))
        if kind == "drop_line":
            return "\n".join(lines[:i] + lines[i + 1:])
        lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    m = data.draw(st.sampled_from(toks))
    return _splice(text, m, "" if kind == "delete" else m.group() + " " + m.group())


def _specs(root=SPECS):
    return sorted(root.glob("*.net"))


def _imports(spec: Path):
    """Library files a spec imports (directly), relative to specs/."""
    return [m.group(1) for m in re.finditer(r'^\s*import\s+"([^"]+)"', spec.read_text(), re.M)
            if (spec.parent / m.group(1)).is_file()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A private copy of specs/ (a snapshot: others may be adding specs meanwhile), so
    mutants never touch the real files and every example sees the same set."""
    root = tmp_path_factory.mktemp("mut") / "specs"
    shutil.copytree(SPECS, root)
    return root


def test_there_are_specs_to_mutate():
    assert _specs(), "no specs under specs/"


@seed(20240611)
@settings(max_examples=400, deadline=None, database=None, derandomize=False,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutants_compile_or_diagnose(tree, data):
    spec = data.draw(st.sampled_from(_specs(tree)), label="spec")
    libs = _imports(spec)
    # mostly mutate the spec itself; sometimes one library file it imports
    target = spec.name
    if libs and data.draw(st.integers(0, 3), label="lib?") == 0:
        target = data.draw(st.sampled_from(libs), label="library")
    original = (tree / target).read_text()
    mutant = mutate(original, data)
    (tree / target).write_text(mutant)
    try:
        elaborate(str(tree / spec.name))
    except NetdslError as e:
        shown = e.render()
        assert isinstance(shown, str) and e.message and shown.strip(), repr(e)
        assert e.pos is not None, f"diagnostic without a position: {shown}\n--- mutant of {target}:\n{mutant}"
    except Exception:
        pytest.fail(f"{target} mutant raised a Python exception:\n{traceback.format_exc()}\n"
                    f"--- mutant of {target}:\n{mutant}")
    finally:
        (tree / target).write_text(original)
