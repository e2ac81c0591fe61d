"""The front end's caches hold data, never code: a damaged or hostile entry is a miss.

The graph cache ($NETDSL_CACHE_DIR/graphs/*.json, netdsl/ir/serial.py) and the parser
tables ($NETDSL_CACHE_DIR/grammar-*.json) are JSON; whatever a writer of the cache
folder puts there is read as data, checked, and if it does not check out the spec is
elaborated afresh.
"""
import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest

from helpers import ROOT
from netdsl.ir import serial
from netdsl.lang.elaborate import elaborate
from test_startup import _fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    return tmp_path / "cache"


class _Boom:
    """Unpickling this runs `touch MARKER`: what a hostile pickle would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _entry(cache):
    entry, = (cache / "graphs").glob("*.json")
    head, _, body = entry.read_bytes().partition(b"\n")
    return entry, json.loads(head), body


def _rewrite(entry, head, body: bytes):
    """Store `body` under the entry's own key and files, with a matching digest, as an attacker can."""
    key, files, _ = head
    entry.write_bytes(json.dumps([key, files, hashlib.sha256(body).hexdigest()]).encode() + b"\n" + body)


def _hostile_bodies(doc, marker):
    yield pickle.dumps(_Boom(marker))                                    # code, not data
    yield pickle.dumps(_Boom(marker))[:-1] + b"\n"                       # damaged code
    yield b"\xff\xfe not json"
    yield b"[" * 100_000 + b"]" * 100_000                               # nesting past any stack
    yield json.dumps({**doc, "format": 99}).encode()

    def mutate(f):
        d = json.loads(json.dumps(doc))
        f(d)
        return json.dumps(d).encode()

    yield mutate(lambda d: d["values"][0].__setitem__(0, "abc"))         # a shape that is not a list
    yield mutate(lambda d: d["values"][0][0].__setitem__(0, {"s": [[["N"], "1"]]}))   # a coefficient string
    yield mutate(lambda d: d["nodes"][0][1].__setitem__(0, 10 ** 9))     # a value out of range
    yield mutate(lambda d: d["nodes"][0][1].__setitem__(0, -1))
    yield mutate(lambda d: d["nodes"][0].__setitem__(2, {"x": 1}))       # an unknown tag
    yield mutate(lambda d: d["nodes"][0].__setitem__(2, {"c": {"name": "sgd", "kwargs": {"d": []}, "evil": 1}}))
    yield mutate(lambda d: d["nodes"][0].pop())                          # a field missing
    yield mutate(lambda d: d["values"][-1].__setitem__(2, 0))            # a producer that does not output it
    yield mutate(lambda d: d["graph"].__setitem__("train", [1]))
    yield mutate(lambda d: d["graph"].pop("losses"))
    yield mutate(lambda d: d.__setitem__("pos", [[0, "1", 1, 1, 1]]))
    yield mutate(lambda d: d["graph"]["nodes"].append(len(d["nodes"])))  # a node that does not exist


def test_a_hostile_or_damaged_graph_entry_is_a_miss(cache, tmp_path):
    path = "specs/digits_cnn.net"
    fresh, _ = elaborate(path)
    entry, head, body = _entry(cache)
    doc = json.loads(body)
    marker = tmp_path / "ran"
    n = 0
    for bad in _hostile_bodies(doc, marker):
        _rewrite(entry, head, bad)
        g, _ = elaborate(path)                      # a miss: elaborated again, and stored again
        assert _fingerprint(g) == _fingerprint(fresh)
        assert _entry(cache)[2] == body
        n += 1
    assert n == 17 and not marker.exists()
    entry.write_bytes(b"")                          # empty, and a header of the wrong shape
    assert _fingerprint(elaborate(path)[0]) == _fingerprint(fresh)
    entry.write_bytes(b'{"a": 1}\n{}')
    assert _fingerprint(elaborate(path)[0]) == _fingerprint(fresh)


def test_every_decoding_error_is_invalid():
    """decode() raises Invalid, whatever it is given, and nothing else."""
    doc = serial.encode(elaborate(str(ROOT / "specs" / "digits_cnn.net"))[0])
    for bad in (None, [], {}, {"format": 1}, {**doc, "files": "x"}, {**doc, "nodes": [[None] * 11]},
                {**doc, "frames": [[1, 2, 3, 4, 5]]}, {**doc, "graph": []}):
        with pytest.raises(serial.Invalid):
            serial.decode(bad)


def test_a_scan_graph_round_trips_through_json():
    """Bodies of scans, carries, Sym dims and the train section survive encode/decode."""
    g, _ = elaborate(str(ROOT / "specs" / "rnn" / "charlm_lstm.net"))
    assert any(n.body is not None for n in g.nodes) and g.carries
    again = serial.decode(json.loads(json.dumps(serial.encode(g))))
    assert _fingerprint(again) == _fingerprint(g)


def test_a_hostile_parser_cache_is_rebuilt(cache, tmp_path):
    """The LALR tables are JSON: a pickle or garbage in their place is ignored, never run."""
    code = ("from netdsl.lang.elaborate import elaborate\n"
            "g, _ = elaborate('specs/digits_cnn.net')\nprint(len(g.nodes))\n")
    env = dict(os.environ, NETDSL_CACHE_DIR=str(cache))
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    first = run()
    assert first.returncode == 0, first.stderr
    tables, = cache.glob("grammar-*.json")
    good = tables.read_bytes()
    marker = tmp_path / "ran"
    for bad in (pickle.dumps(_Boom(marker)), b"{}", b'{"data": 1, "memo": 2}', good[:len(good) // 2]):
        tables.write_bytes(bad)
        for f in (cache / "graphs").glob("*.json"):
            f.unlink()                                # a graph-cache miss, so the parser is needed
        r = run()
        assert r.returncode == 0 and r.stdout == first.stdout, r.stderr
        assert "data" in json.loads(tables.read_bytes())   # rebuilt and stored again (in its own order)
    assert not marker.exists()


def test_the_front_end_does_not_import_the_kernels(tmp_path):
    """The cache folder's helper is netdsl.cachedir: parsing, elaborating and the graph
    cache (cold and warm) import nothing of netdsl.kernels."""
    code = ("import sys\nfrom netdsl.lang.elaborate import elaborate\n"
            "g, _ = elaborate('specs/resnet18.net')\n"
            "print(sorted(m for m in sys.modules if m.startswith('netdsl.kernels')))\n")
    env = dict(os.environ, NETDSL_CACHE_DIR=str(tmp_path))
    for _ in ("cold", "warm"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
        assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
