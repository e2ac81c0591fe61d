"""netdsl import of Caffe files: an AlexNet train_val prototxt (Data layers per phase,
grouped convs, LRN, in-place ReLUs, Dropout, SoftmaxWithLoss, a TEST-only Accuracy) and
a GoogLeNet-style deploy prototxt (Input layer, one inception module with four
branches and Concat, BatchNorm + Scale, Eltwise, average pooling, Softmax), written
here from Caffe's layer catalogue at small sizes. The spec compiles with the parameter
count computed here from the prototxt's numbers; a caffemodel written here byte by byte
(protobuf wire format, no descriptor) converts to weights that give the outputs of a
torch implementation of the same networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import cli, compile_text
from netdsl.convert.caffe import convert_prototxt
from netdsl.errors import NetdslError
from netdsl.runtime.model import Model


def layer(name, type_, bottoms=(), tops=(), body=""):
    return (f'layer {{\n  name: "{name}"\n  type: "{type_}"\n' + "".join(f'  bottom: "{b}"\n' for b in bottoms)
            + "".join(f'  top: "{t}"\n' for t in tops) + body + "}\n")


def conv(name, bottom, c, k, s=1, p=0, g=1):
    return layer(name, "Convolution", [bottom], [name],
                 f"  convolution_param {{ num_output: {c} kernel_size: {k} stride: {s} pad: {p} group: {g} }}\n")


def pool(name, bottom, k, s, kind="MAX", p=0):
    return layer(name, "Pooling", [bottom], [name], f"  pooling_param {{ pool: {kind} kernel_size: {k} stride: {s} pad: {p} }}\n")


def relu(name, blob):
    return layer(name, "ReLU", [blob], [blob])


def lrn(name, bottom):
    return layer(name, "LRN", [bottom], [name], "  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }\n")


def fc(name, bottom, n):
    return layer(name, "InnerProduct", [bottom], [name], f"  inner_product_param {{ num_output: {n} }}\n")


def data(phase, crop):
    return layer("data", "Data", [], ["data", "label"],
                 f"  include {{ phase: {phase} }}\n  transform_param {{ mirror: true crop_size: {crop} }}\n"
                 f'  data_param {{ source: "ilsvrc12_{phase.lower()}_lmdb" batch_size: 4 backend: LMDB }}\n')


ALEXNET = ('name: "AlexNet"\n' + data("TRAIN", 67) + data("TEST", 67)
           + conv("conv1", "data", 16, 11, 4) + relu("relu1", "conv1") + lrn("norm1", "conv1")
           + pool("pool1", "norm1", 3, 2) + conv("conv2", "pool1", 32, 5, p=2, g=2) + relu("relu2", "conv2")
           + lrn("norm2", "conv2") + pool("pool2", "norm2", 3, 2) + conv("conv3", "pool2", 48, 3, p=1)
           + relu("relu3", "conv3") + conv("conv4", "conv3", 48, 3, p=1, g=2) + relu("relu4", "conv4")
           + conv("conv5", "conv4", 32, 3, p=1, g=2) + relu("relu5", "conv5") + pool("pool5", "conv5", 3, 2)
           + fc("fc6", "pool5", 64) + relu("relu6", "fc6")
           + layer("drop6", "Dropout", ["fc6"], ["fc6"], "  dropout_param { dropout_ratio: 0.5 }\n")
           + fc("fc7", "fc6", 64) + relu("relu7", "fc7") + fc("fc8", "fc7", 10)
           + layer("accuracy", "Accuracy", ["fc8", "label"], ["accuracy"], "  include { phase: TEST }\n")
           + layer("loss", "SoftmaxWithLoss", ["fc8", "label"], ["loss"]))


def inception(n, bottom, c1, c3r, c3, c5r, c5, pp):
    p = f"inception_{n}/"
    return (conv(p + "1x1", bottom, c1, 1) + relu(p + "relu_1x1", p + "1x1")
            + conv(p + "3x3_reduce", bottom, c3r, 1) + relu(p + "relu_3x3_reduce", p + "3x3_reduce")
            + conv(p + "3x3", p + "3x3_reduce", c3, 3, p=1) + relu(p + "relu_3x3", p + "3x3")
            + conv(p + "5x5_reduce", bottom, c5r, 1) + relu(p + "relu_5x5_reduce", p + "5x5_reduce")
            + conv(p + "5x5", p + "5x5_reduce", c5, 5, p=2) + relu(p + "relu_5x5", p + "5x5")
            + pool(p + "pool", bottom, 3, 1, p=1) + conv(p + "pool_proj", p + "pool", pp, 1)
            + relu(p + "relu_pool_proj", p + "pool_proj")
            + layer(p + "output", "Concat", [p + "1x1", p + "3x3", p + "5x5", p + "pool_proj"], [p + "output"]))


GOOGLENET = ('name: "GoogleNet"\n'
             + layer("data", "Input", [], ["data"], "  input_param { shape: { dim: 1 dim: 3 dim: 32 dim: 32 } }\n")
             + conv("conv1/7x7_s2", "data", 16, 7, 2, 3)
             + layer("conv1/bn", "BatchNorm", ["conv1/7x7_s2"], ["conv1/7x7_s2"],
                     "  batch_norm_param { use_global_stats: true eps: 0.001 }\n")
             + layer("conv1/scale", "Scale", ["conv1/7x7_s2"], ["conv1/7x7_s2"], "  scale_param { bias_term: true }\n")
             + relu("conv1/relu_7x7", "conv1/7x7_s2") + pool("pool1/3x3_s2", "conv1/7x7_s2", 3, 2)
             + inception("3a", "pool1/3x3_s2", 8, 8, 12, 4, 4, 4)
             + conv("proj", "pool1/3x3_s2", 28, 1)
             + layer("sum", "Eltwise", ["inception_3a/output", "proj"], ["sum"], "  eltwise_param { operation: SUM }\n")
             + pool("pool5/7x7_s1", "sum", 8, 1, "AVE")
             + layer("pool5/drop", "Dropout", ["pool5/7x7_s1"], ["pool5/7x7_s1"], "  dropout_param { dropout_ratio: 0.4 }\n")
             + fc("loss3/classifier", "pool5/7x7_s1", 10)
             + layer("prob", "Softmax", ["loss3/classifier"], ["prob"]))


# ---------------------------------------------------------------- independent counts and weights

def layer_blocks(text):
    """(name, type, {key: value}) per layer, read with regular expressions."""
    import re
    out = []
    for blk in text.split("layer {")[1:]:
        name = re.search(r'name: "([^"]+)"', blk).group(1)
        typ = re.search(r'type: "([^"]+)"', blk).group(1)
        kv = dict(re.findall(r"(\w+): (\w+)", blk))
        out.append((name, typ, kv, re.findall(r'bottom: "([^"]+)"', blk)))
    return out


def blob_shapes(text, in_channels=3):
    """Layer -> the shapes of its blobs, channels followed through the bottoms."""
    ch, shapes, flat = {"data": in_channels}, {}, set()
    for name, typ, kv, bottoms in layer_blocks(text):
        if typ == "Convolution":
            c, k, g = int(kv["num_output"]), int(kv["kernel_size"]), int(kv.get("group", 1))
            shapes[name] = [(c, ch[bottoms[0]] // g, k, k), (c,)]
            ch[name] = c
        elif typ == "InnerProduct":
            k_in = ch[bottoms[0]] if bottoms[0] in flat else None    # None: C*H*W, given by the case
            shapes[name] = [(int(kv["num_output"]), k_in), (int(kv["num_output"]),)]
            ch[name] = int(kv["num_output"])
            flat.add(name)
        elif typ == "BatchNorm":
            shapes[name] = [(ch[bottoms[0]],)] * 2 + [(1,)]
        elif typ == "Scale":
            shapes[name] = [(ch[bottoms[0]],)] * 2
        elif typ == "Concat":
            ch[name] = sum(ch[b] for b in bottoms)
        elif bottoms and name not in ch:
            ch[name] = ch[bottoms[0]]
    return shapes


def _varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(num, payload):       # wire type 2: length-delimited
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def write_caffemodel(path, blobs):
    """NetParameter { layer (100) { name (1) blobs (7) { shape (7) { dim (1) } data (5) } } }."""
    msg = b""
    for name, arrays in blobs.items():
        body = _field(1, name.encode()) + _field(2, b"Whatever")
        for a in arrays:
            shape = _field(1, b"".join(_varint(d) for d in a.shape))
            body += _field(7, _field(7, shape) + _field(5, a.astype("<f4").tobytes()))
        msg += _field(100, body)
    path.write_bytes(msg)


def random_blobs(text, fc_in, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shapes in blob_shapes(text).items():
        arrs = []
        for s in shapes:
            s = tuple(fc_in[name] if d is None else d for d in s)
            if s == (1,):
                arrs.append(np.array([2.0], np.float32))       # BatchNorm's scale factor
            elif len(s) > 1:
                arrs.append((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32))
            else:
                arrs.append((rng.uniform(0.5, 1.5, s) if "bn" in name else 0.1 * rng.standard_normal(s)).astype(np.float32))
        out[name] = arrs
    return out


def count(text, fc_in):
    """Caffe's learnable parameters: conv / fc weights and biases, Scale's, not BatchNorm's statistics."""
    return sum(int(np.prod([fc_in[n] if d is None else d for d in s]))
               for n, shapes in blob_shapes(text).items() if "bn" not in n for s in shapes)


# ---------------------------------------------------------------- torch references

def t(a):
    return torch.from_numpy(a)


def alexnet_ref(B, x):
    def cv(h, n, s=1, p=0, g=1):
        return F.relu(F.conv2d(h, t(B[n][0]), t(B[n][1]), s, p, groups=g))
    norm = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)
    h = F.max_pool2d(norm(cv(x, "conv1", 4)), 3, 2, ceil_mode=True)
    h = F.max_pool2d(norm(cv(h, "conv2", 1, 2, 2)), 3, 2, ceil_mode=True)
    h = cv(cv(cv(h, "conv3", 1, 1), "conv4", 1, 1, 2), "conv5", 1, 1, 2)
    h = F.max_pool2d(h, 3, 2, ceil_mode=True).flatten(1)
    h = F.relu(F.linear(h, t(B["fc6"][0]), t(B["fc6"][1])))
    h = F.relu(F.linear(h, t(B["fc7"][0]), t(B["fc7"][1])))
    return F.linear(h, t(B["fc8"][0]), t(B["fc8"][1]))


def googlenet_ref(B, x):
    def cv(h, n, p=0, s=1):
        return F.conv2d(h, t(B[n][0]), t(B[n][1]), s, p)
    h = cv(x, "conv1/7x7_s2", 3, 2)
    m, v, f = B["conv1/bn"]
    h = F.batch_norm(h, t(m / f), t(v / f), t(B["conv1/scale"][0]), t(B["conv1/scale"][1]), False, 0.0, 1e-3)
    h = F.max_pool2d(F.relu(h), 3, 2, ceil_mode=True)
    p = "inception_3a/"
    b1 = F.relu(cv(h, p + "1x1"))
    b2 = F.relu(cv(F.relu(cv(h, p + "3x3_reduce")), p + "3x3", 1))
    b3 = F.relu(cv(F.relu(cv(h, p + "5x5_reduce")), p + "5x5", 2))
    b4 = F.relu(cv(F.max_pool2d(h, 3, 1, 1, ceil_mode=True), p + "pool_proj"))
    h = torch.cat([b1, b2, b3, b4], 1) + cv(h, "proj")
    h = F.avg_pool2d(h, 8, 1, ceil_mode=True).flatten(1)
    return torch.softmax(F.linear(h, t(B["loss3/classifier"][0]), t(B["loss3/classifier"][1])), 1)


CASES = {"alexnet": (ALEXNET, {"fc6": 32 * 1 * 1}, (2, 3, 67, 67), alexnet_ref),
         "googlenet": (GOOGLENET, {"loss3/classifier": 28}, (2, 3, 32, 32), googlenet_ref)}


@pytest.mark.parametrize("net", CASES)
def test_compiles_with_caffe_parameter_count(tmp_path, net):
    text, fc_in, _, _ = CASES[net]
    (tmp_path / "n.prototxt").write_text(text)
    spec, _ = convert_prototxt(str(tmp_path / "n.prototxt"))
    g = compile_text(tmp_path, spec)
    assert g.param_count() == count(text, fc_in)
    if net == "alexnet":
        assert "loss l_loss = cross_entropy(fc8, label)" in spec and "left out: layer accuracy" in spec
        assert "groups=2" in spec and "lrn(size=5, alpha=0.0001, beta=0.75, k=1.0" in spec
    else:
        assert 'concat(inception_3a_relu_1x1' in spec and "conv1_bn" in spec


@pytest.mark.parametrize("net", CASES)
def test_caffemodel_matches_torch_reference(tmp_path, net):
    text, fc_in, shape, ref = CASES[net]
    (tmp_path / "n.prototxt").write_text(text)
    B = random_blobs(text, fc_in)
    write_caffemodel(tmp_path / "n.caffemodel", B)
    r = cli("import", tmp_path / "n.prototxt", "-o", tmp_path / "n.net", "--weights", tmp_path / "n.caffemodel")
    assert r.returncode == 0, r.stderr
    g = compile_text(tmp_path, (tmp_path / "n.net").read_text(), name="n2.net")
    params = dict(np.load(tmp_path / "n.npz"))
    assert set(params) == set(g.params)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    got = Model(g, params=params).infer({"image": x})
    out = got[list(g.outputs)[0]]
    np.testing.assert_allclose(out, ref(B, t(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_errors(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text(ALEXNET.replace('type: "LRN"', 'type: "SPP"', 1))
    line = ALEXNET.splitlines().index('  type: "LRN"') + 1
    with pytest.raises(NetdslError) as e:
        convert_prototxt(str(p))
    assert f"n.prototxt:{line}: layer 'norm1': unknown layer type 'SPP'" in e.value.message
    r = cli("import", p, "-o", tmp_path / "n.net")
    assert r.returncode == 2 and "unknown layer type 'SPP'" in r.stderr and "Traceback" not in r.stderr
    p.write_text(ALEXNET.replace('bottom: "pool1"', 'bottom: "pool9"'))
    with pytest.raises(NetdslError, match="bottom 'pool9' is no earlier layer's top"):
        convert_prototxt(str(p))
    p.write_text(ALEXNET + 'layer {\n  name: "cut"\n')
    with pytest.raises(NetdslError, match="is never closed"):
        convert_prototxt(str(p))
    p.write_text(ALEXNET)
    (tmp_path / "bad.caffemodel").write_bytes(b"\xff\xff\xff")
    r = cli("import", p, "-o", tmp_path / "n.net", "--weights", tmp_path / "bad.caffemodel")
    assert r.returncode == 2 and "is not a caffemodel" in r.stderr
    write_caffemodel(tmp_path / "part.caffemodel", {"conv1": random_blobs(ALEXNET, {"fc6": 32})["conv1"]})
    r = cli("import", p, "-o", tmp_path / "n.net", "--weights", tmp_path / "part.caffemodel")
    assert r.returncode == 2 and "holds no weights for layer 'conv2'" in r.stderr
