"""netdsl import of darknet files: a YOLOv3-style cfg written from darknet's cfg format
(a [net] header, [convolutional] with batch_normalize, residual [shortcut]s in three
stages, [route] with relative and absolute layers, [upsample], two [yolo] heads) becomes
a spec with every index-wire named; its parameter count is counted here from the cfg's
own numbers; random .weights written here in darknet's layout give the same heads as a
torch implementation of the cfg written here from the same arrays."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import cli, compile_text
from netdsl.convert.darknet import convert_cfg, convert_weights
from netdsl.errors import NetdslError
from netdsl.runtime.model import Model


def conv(filters, size, stride=1, bn=1, act="leaky"):
    return ("[convolutional]\n" + (f"batch_normalize={bn}\n" if bn else "")
            + f"filters={filters}\nsize={size}\nstride={stride}\npad=1\nactivation={act}\n")


def residual(c):
    return conv(c // 2, 1) + conv(c, 3) + "[shortcut]\nfrom=-3\nactivation=linear\n"


YOLO = ("[yolo]\nmask = {m}\nanchors = 10,13,  16,30,  33,23,  30,61,  62,45,  59,119\n"
        "classes=2\nnum=6\njitter=.3\nignore_thresh = .7\n")


def yolo_cfg(mish=False):
    """Darknet-53's shape at small widths: stem, three downsampling stages of residual
    units (1, 2, 2), a head at stride 8, an upsampled route joining stage 2 at stride 4."""
    parts = ["# a YOLOv3-style network\n[net]\nbatch=1\nwidth=32\nheight=32\nchannels=3\n", conv(4, 3)]
    for c, n in ((8, 1), (16, 2), (32, 2)):
        parts.append(conv(c, 3, 2))                      # downsample
        parts += [residual(c)] * n
    # layers: 0 stem; 1 down, 2-4 res; 5 down, 6-8, 9-11 res; 12 down, 13-15, 16-18 res
    parts += [conv(16, 1), conv(32, 3, act="mish"), conv(21, 1, bn=0, act="linear"), YOLO.format(m="3,4,5")]
    # 19, 20, 21 (head), 22 yolo; 23 route back to 19; 24 conv; 25 upsample; 26 route with stage 2 (layer 11)
    parts += ["[route]\nlayers = -4\n", conv(8, 1), "[upsample]\nstride=2\n", "[route]\nlayers = -1, 11\n",
              conv(16, 3), "[maxpool]\nsize=3\nstride=1\n", conv(21, 1, bn=0, act="linear"), YOLO.format(m="0,1,2")]
    return "\n".join(parts).replace("activation=mish", "activation=mish" if mish else "activation=leaky")


def layers_of(cfg):
    """[(kind, {key: value})] straight from the text, for the independent count and the reference."""
    out = []
    for block in cfg.split("[")[1:]:
        kind, _, body = block.partition("]")
        opts = dict(l.split("=", 1) for l in body.splitlines() if "=" in l and not l.startswith("#"))
        out.append((kind, {k.strip(): v.strip() for k, v in opts.items()}))
    return out


def reference(cfg, arrays, x):
    """Darknet's forward pass in torch; arrays: per conv layer the darknet weight blocks."""
    outs, heads, c, blocks = [], [], [], iter(arrays)
    h = x
    for i, (kind, o) in enumerate(layers_of(cfg)[1:]):
        if kind == "convolutional":
            w = next(blocks)
            k = int(o["size"])
            if "batch_normalize" in o:
                b, s, m, v, wt = (torch.from_numpy(a) for a in w)
                h = F.conv2d(h, wt, stride=int(o["stride"]), padding=k // 2)
                h = F.batch_norm(h, m, v, s, b, training=False, eps=1e-5)
            else:
                b, wt = (torch.from_numpy(a) for a in w)
                h = F.conv2d(h, wt, b, stride=int(o["stride"]), padding=k // 2)
            act = o["activation"]
            h = F.leaky_relu(h, 0.1) if act == "leaky" else h * torch.tanh(F.softplus(h)) if act == "mish" else h
        elif kind == "shortcut":
            h = h + outs[i + int(o["from"])]
        elif kind == "route":
            idx = [int(t) for t in o["layers"].split(",")]
            h = torch.cat([outs[j if j >= 0 else i + j] for j in idx], 1)
        elif kind == "upsample":
            h = F.interpolate(h, scale_factor=int(o["stride"]), mode="nearest")
        elif kind == "maxpool":
            k = int(o["size"])
            h = F.max_pool2d(h, k, int(o["stride"]), padding=(k - 1) // 2)
        elif kind == "yolo":
            heads.append(h)
        outs.append(h)
        c.append(h.shape[1])
    return heads


def conv_shapes(cfg):
    """(filters, c_in, size, batch_normalize) of every conv, channels followed through the cfg."""
    chans, out, c = [], [], 3
    for i, (kind, o) in enumerate(layers_of(cfg)[1:]):
        if kind == "convolutional":
            out.append((int(o["filters"]), c, int(o["size"]), "batch_normalize" in o))
            c = int(o["filters"])
        elif kind == "route":
            c = sum(chans[j if j >= 0 else i + j] for j in map(int, o["layers"].split(",")))
        chans.append(c)
    return out


def write_weights(path, cfg, seed=0, major=0, minor=2, extra=0):
    rng = np.random.default_rng(seed)
    header = np.array([major, minor, 0], "<i4").tobytes() + (
        np.array([12800], "<i8") if major * 10 + minor >= 2 else np.array([12800], "<i4")).tobytes()
    arrays, body = [], []
    for f, cin, k, bn in conv_shapes(cfg):
        w = (rng.standard_normal((f, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        if bn:
            blk = [rng.standard_normal(f).astype(np.float32) * 0.1, (1 + 0.2 * rng.standard_normal(f)).astype(np.float32),
                   rng.standard_normal(f).astype(np.float32) * 0.1, rng.uniform(0.5, 1.5, f).astype(np.float32), w]
        else:
            blk = [rng.standard_normal(f).astype(np.float32) * 0.1, w]
        arrays.append(blk)
        body += [a.astype("<f4").tobytes() for a in blk]
    path.write_bytes(header + b"".join(body) + b"\0" * extra)
    return arrays


def test_spec_names_every_wire_and_counts_parameters(tmp_path):
    cfg = yolo_cfg()
    (tmp_path / "y.cfg").write_text(cfg)
    text, _ = convert_cfg(str(tmp_path / "y.cfg"))
    assert "route26 = concat(up25, res11" in text and "output conv21" in text and "output conv29" in text
    assert "res4 = add(" in text and "[yolo] mask=3,4,5" in text
    g = compile_text(tmp_path, text)
    expected = sum(f * cin * k * k + (2 * f if bn else f) for f, cin, k, bn in conv_shapes(cfg))  # bn: scale, shift
    assert g.param_count() == expected
    assert [tuple(v.shape[1:]) for v in g.outputs.values()] == [(21, 4, 4), (21, 8, 8)]


@pytest.mark.parametrize("mish,minor", [(False, 2), (True, 1)])
def test_weights_match_torch_reference(tmp_path, mish, minor):
    cfg = yolo_cfg(mish)
    (tmp_path / "y.cfg").write_text(cfg)
    arrays = write_weights(tmp_path / "y.weights", cfg, major=0, minor=minor)
    r = cli("import", tmp_path / "y.cfg", "-o", tmp_path / "y.net", "--weights", tmp_path / "y.weights")
    assert r.returncode == 0, r.stderr
    g = compile_text(tmp_path, (tmp_path / "y.net").read_text(), name="y2.net")
    params = dict(np.load(tmp_path / "y.npz"))
    assert set(params) == set(g.params)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = Model(g, params=params).infer({"image": x})
    want = reference(cfg, arrays, torch.from_numpy(x))
    for (name, a), b in zip(got.items(), want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_errors(tmp_path):
    cfg = yolo_cfg()
    p = tmp_path / "y.cfg"
    p.write_text(cfg.replace("[upsample]", "[reorg]"))
    with pytest.raises(NetdslError) as e:
        convert_cfg(str(p))
    line = cfg.splitlines().index("[upsample]") + 1
    assert f"y.cfg:{line}: layer 25: unknown layer type [reorg]" in e.value.message
    r = cli("import", p, "-o", tmp_path / "y.net")
    assert r.returncode == 2 and "unknown layer type [reorg]" in r.stderr and "Traceback" not in r.stderr

    p.write_text(cfg.replace("layers = -1, 11", "layers = -1, 40"))
    with pytest.raises(NetdslError, match="refers to layer 40, which is not before layer 26"):
        convert_cfg(str(p))
    p.write_text(cfg.replace("activation=linear\n\n[yolo]", "activation=elu\n\n[yolo]", 1))
    with pytest.raises(NetdslError, match="activation elu is not converted"):
        convert_cfg(str(p))

    p.write_text(cfg)
    _, layers = convert_cfg(str(p))
    write_weights(tmp_path / "w.weights", cfg, extra=8)
    with pytest.raises(NetdslError, match="8 bytes more than the cfg's layers take"):
        convert_weights(str(tmp_path / "w.weights"), layers)
    data = (tmp_path / "w.weights").read_bytes()
    (tmp_path / "w.weights").write_bytes(data[:len(data) // 2])
    with pytest.raises(NetdslError, match="ends inside layer"):
        convert_weights(str(tmp_path / "w.weights"), layers)
