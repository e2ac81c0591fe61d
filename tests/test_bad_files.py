"""Damaged and hostile files: checkpoints through the CLI, .npy/.npz through the reader.

Each case must end in a NetdslError that names the file (and the member), and on the
command line in exit status 2 with no traceback; never MemoryError, KeyError, ...
"""
import io
import json
import os
import shutil
import struct
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from helpers import SPECS, cli
from netdsl.errors import NetdslError
from netdsl.runtime import npyfile
from netdsl.runtime.checkpoint import load_checkpoint, load_weights, read_arrays, read_npz
from netdsl.runtime.optim import make_optimizer

SPEC = SPECS / "digits_cnn.net"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of digits_cnn: a real checkpoint to damage copies of."""
    out = tmp_path_factory.mktemp("digits1")
    r = cli("run", SPEC, "--epochs", "1", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out / "checkpoint.npz"


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:   # our own file: trusted
        return {k: z[k] for k in z.files}


def _damage(trained, tmp_path, meta=None, arrays=None, raw_meta=None):
    """A copy of the checkpoint with `meta(dict)` / `arrays(dict)` applied (in place)."""
    a = _arrays(trained)
    m = json.loads(a["__meta__"].tobytes())
    if meta:
        meta(m)
    a["__meta__"] = np.frombuffer(json.dumps(m).encode(), np.uint8) if raw_meta is None else raw_meta
    if arrays:
        arrays(a)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **a)
    return bad


def _refused(path, tmp_path, *phrases, mode="--eval"):
    extra = ["--epochs", "1"] if mode == "--resume" else []
    r = cli("run", SPEC, "--out", tmp_path / "run", "--weights", path, mode, *extra)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert str(path) in r.stderr, r.stderr
    for p in phrases:
        assert p in r.stderr, r.stderr
    return r.stderr


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _set_rng(*path_and_value):
    *path, value = path_and_value

    def f(m):
        d = m["rng"]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


def _mt19937_state(m):
    m["rng"] = json.loads(json.dumps(np.random.MT19937(1).state, default=lambda a: {
        "__ndarray__": a.tolist(), "dtype": a.dtype.str}))


META_DAMAGE = [
    ("epoch-string", _set("epoch", "3"), ["'epoch' is \"3\", expected an integer"]),
    ("epoch-float", _set("epoch", 1.5), ["'epoch' is 1.5, expected an integer"]),
    ("epoch-bool", _set("epoch", True), ["'epoch' is true, expected an integer"]),
    ("step-missing", lambda m: m.pop("step"), ["'step' is missing"]),
    ("step-negative", _set("step", -4), ["'step' is -4"]),
    ("step-huge", _set("step", 2 ** 70), ["'step' is 1180591620717411303424"]),
    ("step-null", _set("step", None), ["'step' is null"]),
    ("rng-garbled", _set_rng("state", "state", "garbage"), ["'rng' is not a usable PCG64 state"]),
    ("rng-key-missing", lambda m: m["rng"].pop("state"), ["'rng' is not a usable PCG64 state"]),
    ("rng-unknown", _set_rng("bit_generator", "Mersenne"), ["'rng' names no known bit generator"]),
    ("rng-list", _set("rng", [1, 2]), ["'rng' is [1, 2], expected an object or null"]),
    ("rng-object-array", lambda m: (_mt19937_state(m), m["rng"]["state"]["key"].__setitem__("dtype", "|O")),
     ["'rng' is not a usable MT19937 state"]),
    ("rng-short-key", lambda m: (_mt19937_state(m), m["rng"]["state"]["key"].__setitem__("__ndarray__", [1, 2])),
     ["'rng' is not a usable MT19937 state"]),
    ("spec-hash-int", _set("spec_hash", 12), ["'spec_hash' is 12, expected a string or null"]),
    ("spec-hash-text", _set("spec_hash", "not a hash"), ["'spec_hash' is not a SHA-256 hex digest"]),
    ("extra-list", _set("extra", []), ["'extra' is [], expected an object"]),
    ("unknown-field", _set("stpe", 3), ["unexpected field 'stpe'"]),
    ("two-problems", lambda m: (m.pop("epoch"), m.__setitem__("step", "x")), ["'epoch' is missing", "'step' is"]),
    ("version-string", _set("version", "1"), ["'version' is \"1\", expected an integer"]),
]


@pytest.mark.parametrize("damage,phrases", [c[1:] for c in META_DAMAGE], ids=[c[0] for c in META_DAMAGE])
def test_damaged_metadata(trained, tmp_path, damage, phrases):
    bad = _damage(trained, tmp_path, meta=damage)
    _refused(bad, tmp_path, f"checkpoint {bad} is damaged", *phrases)


def test_damaged_metadata_on_resume(trained, tmp_path):
    bad = _damage(trained, tmp_path, meta=_set("epoch", "1"))
    _refused(bad, tmp_path, "is damaged", "'epoch'", mode="--resume")
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_newer_format_version(trained, tmp_path):
    bad = _damage(trained, tmp_path, meta=_set("version", 2))
    _refused(bad, tmp_path, "format version 2, this netdsl reads version 1")


RAW_META = [
    ("not-json", np.frombuffer(b"{not json", np.uint8), ["is damaged", "not UTF-8 JSON"]),
    ("not-utf8", np.frombuffer(b"\xff\xfe{}", np.uint8), ["is damaged", "not UTF-8 JSON"]),
    ("float-array", np.zeros(4), ["is damaged", "'__meta__' is float64 [4]"]),
    ("2d", np.zeros((2, 2), np.uint8), ["is damaged", "'__meta__' is uint8 [2, 2]"]),
    ("nested", np.frombuffer(b'{"format": "netdsl-checkpoint", "extra": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                             np.uint8), ["is damaged", "not UTF-8 JSON"]),
    ("a-list", np.frombuffer(b"[1, 2]", np.uint8), ["not a netdsl checkpoint"]),
    ("other-format", np.frombuffer(b'{"format": "keras"}', np.uint8), ["not a netdsl checkpoint"]),
]


@pytest.mark.parametrize("raw,phrases", [c[1:] for c in RAW_META], ids=[c[0] for c in RAW_META])
def test_unreadable_metadata(trained, tmp_path, raw, phrases):
    _refused(_damage(trained, tmp_path, raw_meta=raw), tmp_path, *phrases)


def _put(key, value):
    return lambda a: a.__setitem__(key, value)


ARRAY_DAMAGE = [
    ("no-meta", lambda a: a.pop("__meta__"), ["not a netdsl checkpoint"]),
    ("stray-array", _put("weights", np.zeros(3)), ["is damaged: unexpected array(s) 'weights'"]),
    ("empty-param-name", _put("param/", np.zeros(3)), ["is damaged: unexpected array(s) 'param/'"]),
    ("missing-weight", lambda a: a.pop("param/conv1.bias"), ["1 missing", "missing: conv1.bias"]),
    ("extra-weight", _put("param/conv9.weight", np.zeros(3, np.float32)), ["1 unexpected", "conv9.weight"]),
    ("wrong-shape", _put("param/conv1.bias", np.zeros(31, np.float32)),
     ["wrong shape: conv1.bias is (31,), expected (32,)"]),
    ("int-weights", _put("param/conv1.bias", np.zeros(32, np.int64)),
     ["wrong dtype: conv1.bias is int64, expected float32"]),
    ("string-weights", _put("param/conv1.bias", np.array(["x"] * 32)), ["wrong dtype: conv1.bias is <U1"]),
    ("complex-weights", _put("param/conv1.bias", np.zeros(32, np.complex64)), ["wrong dtype: conv1.bias"]),
    ("nan-weights", lambda a: a["param/conv2.weight"].__setitem__((0, 0, 0), np.nan),
     ["non-finite weights: conv2.weight (3 NaN/inf)"]),
]


@pytest.mark.parametrize("damage,phrases", [c[1:] for c in ARRAY_DAMAGE], ids=[c[0] for c in ARRAY_DAMAGE])
def test_damaged_arrays(trained, tmp_path, damage, phrases):
    _refused(_damage(trained, tmp_path, arrays=damage), tmp_path, *phrases)


OPT_DAMAGE = [
    ("buffer-shape", _put("opt/exp_avg/conv1.weight", np.zeros((3, 3), np.float32)),
     ["'exp_avg/conv1.weight' has shape (3, 3), its parameter (32, 1, 3, 3)"]),
    ("no-step", lambda a: a.pop("opt/step"), ["no 'step' entry"]),
    ("step-vector", _put("opt/step", np.array([45, 46])), ["'step' is int64 [2], expected one integer >= 0"]),
    ("step-float", _put("opt/step", np.array(4.5)), ["'step' is float64 []"]),
    ("step-negative", _put("opt/step", np.array(-1)), ["'step' is int64 [] = -1"]),
    ("sgd-buffer", _put("opt/momentum/conv1.bias", np.zeros(32, np.float32)),
     ["'momentum/conv1.bias': Adam keeps exp_avg, exp_avg_sq"]),
    ("unknown-param", _put("opt/exp_avg/conv7.bias", np.zeros(32, np.float32)),
     ["'exp_avg/conv7.bias' is for a parameter the network does not train"]),
    ("half-pair", lambda a: a.pop("opt/exp_avg_sq/linear1.bias"),
     ["'linear1.bias' has exp_avg but not exp_avg_sq"]),
    ("string-buffer", _put("opt/exp_avg/conv1.bias", np.array(["a"] * 32)),
     ["'exp_avg/conv1.bias' is <U1, expected floating point"]),
]


def _refused_opt(path, tmp_path, phrases, mode="--eval"):
    """Like _refused, without requiring the file name."""
    r = cli("run", SPEC, "--out", tmp_path / "run", "--weights", path, mode, "--epochs", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "(optimiser state) is damaged" in r.stderr or "optimiser state is damaged" in r.stderr, r.stderr
    for p in phrases:
        assert p in r.stderr, r.stderr
    return r.stderr


@pytest.mark.parametrize("damage,phrases", [c[1:] for c in OPT_DAMAGE], ids=[c[0] for c in OPT_DAMAGE])
def test_damaged_optimiser_state(trained, tmp_path, damage, phrases):
    _refused_opt(_damage(trained, tmp_path, arrays=damage), tmp_path, phrases, mode="--resume")


def test_damaged_optimiser_state_names_the_file(trained, tmp_path):
    bad = _damage(trained, tmp_path, arrays=OPT_DAMAGE[0][1])
    assert f"checkpoint {bad} (optimiser state) is damaged" in _refused_opt(bad, tmp_path, [])


def test_checkpoint_of_another_bit_generator(trained, tmp_path):
    bad = _damage(trained, tmp_path, meta=_mt19937_state)
    _refused(bad, tmp_path, "holds a MT19937 random-generator state; this run draws from PCG64")


FILE_DAMAGE = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), ["is damaged", "cut short"]),
    ("bit-flip", lambda p: p.write_bytes(_flip(p.read_bytes(), 2000)), ["is damaged", "CRC"]),
    ("empty-zip", lambda p: zipfile.ZipFile(p, "w").close(), ["not a netdsl checkpoint"]),
    ("not-zip", lambda p: p.write_text("hello"), ["is not an .npz file"]),
    ("empty-file", lambda p: p.write_bytes(b""), ["is not an .npz file"]),
    ("npy", lambda p: np.save(open(p, "wb"), np.zeros(3)), ["is a .npy file (one array)"]),
    ("directory", lambda p: (p.unlink(), p.mkdir()), ["is a directory"]),
    ("huge-member", lambda p: _zip(p, {"__meta__.npy": _npy("<f8", (1274019840,), b"12345678")}),
     ["member '__meta__.npy' is damaged", "9.5 GiB", "holds 8 bytes"]),
    ("pickle", lambda p: np.savez(p, __meta__=np.array([{"a": 1}], dtype=object)),
     ["member '__meta__.npy' holds Python objects"]),
]


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("damage,phrases", [c[1:] for c in FILE_DAMAGE], ids=[c[0] for c in FILE_DAMAGE])
def test_damaged_checkpoint_file(trained, tmp_path, damage, phrases):
    bad = tmp_path / "bad.npz"
    shutil.copy(trained, bad)
    damage(bad)
    _refused(bad, tmp_path, *phrases)


def test_damaged_checkpoint_for_predict(trained, tmp_path):
    bad = _damage(trained, tmp_path, meta=_set("epoch", []))
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    r = cli("run", SPEC, "--out", tmp_path / "run", "--weights", bad, "--predict", tmp_path / "x.npy")
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"checkpoint {bad} is damaged" in r.stderr


def test_intact_copy_still_loads(trained, tmp_path):
    """The damage helpers change only what each case names."""
    good = _damage(trained, tmp_path)
    r = cli("run", SPEC, "--out", tmp_path / "run", "--weights", good, "--eval")
    assert r.returncode == 0 and "test_acc" in r.stdout, r.stderr


# ---------------------------------------------------------------- .npy / .npz, member by member

def _npy(descr, shape, data=b"", fortran=False, version=(1, 0)):
    b = io.BytesIO()
    write = npy_format.write_array_header_1_0 if version == (1, 0) else npy_format.write_array_header_2_0
    write(b, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return b.getvalue() + data


def _zip(path, members, method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _err(fn, path, *phrases, **kw):
    with pytest.raises(NetdslError) as e:
        fn(path, "data file", **kw)
    assert f"data file {path}" in e.value.message
    for p in phrases:
        assert p in e.value.message, e.value.message
    return e.value.message


def test_header_claiming_more_than_the_member_holds(tmp_path):
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        p = _zip(tmp_path / "huge.npz", {"x_train.npy": _npy("<f8", (1274019840,), b"12345678")}, method)
        _err(read_npz, p, "member 'x_train.npy' is damaged", "float64 [1274019840] (9.5 GiB)", "holds 8 bytes")
    p = _zip(tmp_path / "short.npz", {"a.npy": _npy("<i4", (3,), b"\0" * 16)})   # one item too many
    _err(read_npz, p, "member 'a.npy' is damaged", "int32 [3] (12 bytes)", "holds 16 bytes")
    big = tmp_path / "huge.npy"
    big.write_bytes(_npy("<f4", (100000, 100000), b"1234"))
    _err(read_arrays, big, "is damaged", "float32 [100000, 100000] (37.3 GiB)")


def _patch_central(path, offset, fmt, value):
    """Overwrite a field of the first central-directory entry (the sizes zipfile believes)."""
    data = bytearray(path.read_bytes())
    at = data.rindex(b"PK\x01\x02")
    struct.pack_into(fmt, data, at + offset, value)
    path.write_bytes(bytes(data))


def test_zip_sizes_that_the_bytes_cannot_back(tmp_path, monkeypatch):
    member = _npy("<f8", (64,), bytes(512))
    p = _zip(tmp_path / "stored.npz", {"a.npy": member})
    _patch_central(p, 24, "<I", len(member) + 100)            # uncompressed size
    _err(read_npz, p, "member 'a.npy' is damaged", "stored uncompressed, yet its sizes differ")
    p = _zip(tmp_path / "past.npz", {"a.npy": member})
    _patch_central(p, 20, "<I", 1 << 30)                       # compressed size
    _err(read_npz, p, "member 'a.npy' is damaged", "past the end of the file")
    p = _zip(tmp_path / "bomb.npz", {"a.npy": member}, zipfile.ZIP_DEFLATED)
    _patch_central(p, 24, "<I", 0xFFFFFF00)
    _err(read_npz, p, "member 'a.npy' is damaged", "more than deflate can produce")
    # A real, honest archive bigger than the memory left: refused before reading a byte.
    p = tmp_path / "zeros.npz"
    np.savez_compressed(p, a=np.zeros(1 << 20))
    monkeypatch.setattr(npyfile, "available_memory", lambda: 1 << 20)
    _err(read_npz, p, "holds 8.0 MiB of arrays, more than the 1.0 MiB of memory")
    monkeypatch.undo()
    assert read_npz(p)["a"].shape == (1 << 20,)


def test_zip_members_that_are_not_plain_arrays(tmp_path):
    _err(read_npz, _zip(tmp_path / "t.npz", {"notes.txt": b"hi"}), "member 'notes.txt' is not a .npy array")
    p = tmp_path / "dup.npz"
    with zipfile.ZipFile(p, "w") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("a.npy", _npy("<i1", (1,), b"\0"))
        zf.writestr("a.npy", _npy("<i1", (1,), b"\1"))
    _err(read_npz, p, "member 'a.npy' appears twice")
    p = _zip(tmp_path / "bz.npz", {"a.npy": _npy("<i1", (1,), b"\0")}, zipfile.ZIP_BZIP2)
    _err(read_npz, p, "uses zip compression method 12")
    p = _zip(tmp_path / "enc.npz", {"a.npy": _npy("<i1", (1,), b"\0")})
    _patch_central(p, 8, "<H", 1)                              # the "encrypted" flag
    _err(read_npz, p, "member 'a.npy' is encrypted")
    np.savez(tmp_path / "obj.npz", a=np.array([None, 1], dtype=object))
    _err(read_npz, tmp_path / "obj.npz", "member 'a.npy' holds Python objects")
    p = _zip(tmp_path / "s.npz", {"a.npy": _npy([("x", "<i4"), ("y", "<f8")], (2,), bytes(24))})
    _err(read_npz, p, "member 'a.npy' has a structured dtype")
    p = _zip(tmp_path / "sub.npz", {"a.npy": _npy(("<i4", (2,)), (2,), bytes(16))})
    _err(read_npz, p, "member 'a.npy' has a structured dtype")
    p = _zip(tmp_path / "v0.npz", {"a.npy": _npy("|V0", (5,))})
    _err(read_npz, p, "zero-sized items")
    p = _zip(tmp_path / "neg.npz", {"a.npy": _npy("<i1", (-2, -3), bytes(6))})
    _err(read_npz, p, "negative dimension")
    _err(read_npz, _zip(tmp_path / "magic.npz", {"a.npy": b"hello, not an array"}), "member 'a.npy' is damaged")
    p = _zip(tmp_path / "hdr.npz", {"a.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'} \n"})
    _err(read_npz, p, "member 'a.npy' is damaged")
    p = _zip(tmp_path / "v3.npz", {"a.npy": b"\x93NUMPY\x03\x00" + _npy("<i1", (1,), b"\0")[8:]})
    _err(read_npz, p, "format version 3.0 is not read")


def test_text_arrays_only_where_numbers_are_not_needed(tmp_path):
    np.savez(tmp_path / "t.npz", names=np.array(["cat", "dog"]), x=np.arange(3))
    assert list(read_npz(tmp_path / "t.npz")["names"]) == ["cat", "dog"]
    _err(read_npz, tmp_path / "t.npz", "member 'names.npy' holds <U3 values", numeric=True)
    _err(read_arrays, tmp_path / "t.npz", "member 'names.npy' holds <U3 values")
    np.save(tmp_path / "dates.npy", np.array(["2024-01-01"], dtype="datetime64[D]"))
    _err(read_arrays, tmp_path / "dates.npy", "datetime64")


def test_layouts_numpy_writes_all_read_back(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f": np.asfortranarray(rng.random((3, 4))), "be": np.arange(6, dtype=">i4").reshape(2, 3),
              "empty": np.zeros((0, 5), np.float32), "scalar": np.array(7, np.int16), "bool": rng.random(5) > 0.5,
              "c": (rng.random(3) + 1j).astype(np.complex64), "u8": rng.integers(0, 255, (2, 2, 2), np.uint8)}
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "all.npz", **arrays)
        got = read_npz(tmp_path / "all.npz")
        assert got.keys() == arrays.keys()
        for k, v in arrays.items():
            assert got[k].shape == v.shape and got[k].dtype == v.dtype.newbyteorder("=")
            assert got[k].flags.c_contiguous and got[k].dtype.isnative and got[k].flags.writeable
            np.testing.assert_array_equal(got[k], v)
    p = _zip(tmp_path / "v2.npz", {"a.npy": _npy("<i2", (2,), b"\1\0\2\0", version=(2, 0))})
    np.testing.assert_array_equal(read_npz(p)["a"], [1, 2])
    np.save(tmp_path / "one.npy", arrays["f"])
    got = read_arrays(tmp_path / "one.npy")
    assert list(got) == ["one"] and got["one"].flags.c_contiguous
    np.testing.assert_array_equal(got["one"], arrays["f"])
    assert read_arrays(tmp_path / "all.npz").keys() == arrays.keys()
    zipfile.ZipFile(tmp_path / "dirs.npz", "w").writestr("sub/", b"")   # a directory entry is skipped
    assert read_npz(tmp_path / "dirs.npz") == {}


def test_whole_file_problems(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    _err(read_npz, tmp_path / "a.npy", "is a .npy file (one array); expected an .npz archive")
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    _err(read_npz, tmp_path / "junk", "is not an .npz file")
    _err(read_arrays, tmp_path / "junk", "is neither a .npy file nor an .npz archive")
    (tmp_path / "empty").write_bytes(b"")
    _err(read_arrays, tmp_path / "empty", "is neither a .npy file nor an .npz archive")
    zipfile.ZipFile(tmp_path / "none.npz", "w").close()
    assert read_npz(tmp_path / "none.npz") == {}
    _err(read_arrays, tmp_path / "none.npz", "holds no arrays")
    _err(read_npz, tmp_path, "is a directory")
    _err(read_arrays, tmp_path / "missing.npz", "not found")
    _err(read_arrays, "/dev/zero", "is not a regular file")
    os.mkfifo(tmp_path / "fifo")
    _err(read_npz, tmp_path / "fifo", "is not a regular file")   # would block in open() otherwise
    np.savez(tmp_path / "t.npz", a=np.arange(1000.0))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    _err(read_npz, tmp_path / "cut.npz", "is damaged", "cut short")
    (tmp_path / "cut.npy").write_bytes(_npy("<f8", (10,), bytes(40)))
    _err(read_arrays, tmp_path / "cut.npy", "is damaged", "holds 40 bytes")


def test_every_byte_flip_and_cut_is_a_clean_error(tmp_path):
    """Each single-byte corruption and truncation of a small archive and .npy reads
    correctly (a byte zip does not check) or gives a NetdslError: nothing else."""
    np.savez_compressed(tmp_path / "src.npz", x=np.arange(24, dtype=np.int16).reshape(2, 3, 4), y=np.ones(3))
    np.save(tmp_path / "src.npy", np.arange(12.0).reshape(3, 4))
    tried = 0
    for src in ("src.npz", "src.npy"):
        data = (tmp_path / src).read_bytes()
        variants = [data[:n] for n in range(len(data))] + [_flip(data, i) for i in range(len(data))]
        for v in variants:
            (tmp_path / "v").write_bytes(v)
            try:
                read_arrays(tmp_path / "v")
            except NetdslError as e:
                assert str(tmp_path / "v") in e.message
            tried += 1
    assert tried > 1000


def test_every_corruption_of_the_metadata_is_a_clean_error(tmp_path):
    """Each one-character change and each cut of a small checkpoint's metadata JSON
    (re-saved, so the zip's CRC cannot catch it first) loads and restores weights,
    optimiser state and RNG, or gives a NetdslError naming the file: nothing else."""
    from netdsl.runtime.checkpoint import save_checkpoint
    params = {"w": np.ones((2, 3), np.float32)}
    opt = make_optimizer("adam", params, lr=0.1)
    opt.step({"w": np.ones((2, 3), np.float32)})
    save_checkpoint(tmp_path / "c.npz", params, opt.state_dict(), step=1, epoch=1, rng=np.random.default_rng(0),
                    spec_text="net t {}")
    arrays = _arrays(tmp_path / "c.npz")
    meta = arrays["__meta__"].tobytes()
    variants = [meta[:n] for n in range(len(meta))]
    variants += [meta[:i] + c + meta[i + 1:] for i in range(len(meta)) for c in (b"x", b"9", b'"', b"-", b"{", b"]")]
    outcomes = {"ok": 0, "error": 0}
    for v in variants:
        np.savez(tmp_path / "v.npz", **{**arrays, "__meta__": np.frombuffer(v, np.uint8)})
        try:
            c = load_checkpoint(tmp_path / "v.npz")
            fresh = {"w": np.zeros((2, 3), np.float32)}
            load_weights(fresh, c)
            make_optimizer("adam", fresh, lr=0.1).load_state_dict(c.opt_state, f"checkpoint {c.path}")
            c.restore_rng(np.random.default_rng())
            outcomes["ok"] += 1
        except NetdslError as e:
            assert str(tmp_path / "v.npz") in e.message, e.message
            outcomes["error"] += 1
    assert outcomes["error"] > len(variants) // 2 and outcomes["ok"] > 10, outcomes
