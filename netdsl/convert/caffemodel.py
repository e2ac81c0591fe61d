"""Caffe .caffemodel weights, read with the protobuf package (no Caffe installed).

A caffemodel is a binary NetParameter. Only the fields the weights need are declared,
with caffe.proto's numbers: NetParameter.layer = 100 (LayerParameter: name 1, type 2,
blobs 7) and BlobProto (data 5 packed floats, shape 7 = BlobShape.dim 1, the legacy
num/channels/height/width 1-4, double_data 8). Fields not declared are skipped by the
parser, so a full caffemodel reads as it is.
"""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError

_CLASSES = None


def messages():
    """(NetParameter, LayerParameter, BlobProto, BlobShape) message classes, built once."""
    global _CLASSES
    if _CLASSES is None:
        try:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        except ImportError:
            raise NetdslError("reading a .caffemodel needs the protobuf package",
                              hint="pip install protobuf") from None
        F = descriptor_pb2.FieldDescriptorProto
        fd = descriptor_pb2.FileDescriptorProto(name="netdsl_caffe_min.proto", package="netdsl_caffe",
                                                syntax="proto2")

        def msg(name, fields):
            m = fd.message_type.add(name=name)
            for fname, num, ftype, label, tname, packed in fields:
                f = m.field.add(name=fname, number=num, type=ftype, label=label)
                if tname:
                    f.type_name = ".netdsl_caffe." + tname
                if packed:
                    f.options.packed = True

        OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
        msg("BlobShape", [("dim", 1, F.TYPE_INT64, REP, None, True)])
        msg("BlobProto", [("num", 1, F.TYPE_INT32, OPT, None, False),
                          ("channels", 2, F.TYPE_INT32, OPT, None, False),
                          ("height", 3, F.TYPE_INT32, OPT, None, False),
                          ("width", 4, F.TYPE_INT32, OPT, None, False),
                          ("data", 5, F.TYPE_FLOAT, REP, None, True),
                          ("shape", 7, F.TYPE_MESSAGE, OPT, "BlobShape", False),
                          ("double_data", 8, F.TYPE_DOUBLE, REP, None, True)])
        msg("LayerParameter", [("name", 1, F.TYPE_STRING, OPT, None, False),
                               ("type", 2, F.TYPE_STRING, OPT, None, False),
                               ("blobs", 7, F.TYPE_MESSAGE, REP, "BlobProto", False)])
        msg("NetParameter", [("name", 1, F.TYPE_STRING, OPT, None, False),
                             ("layer", 100, F.TYPE_MESSAGE, REP, "LayerParameter", False)])
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fd)
        _CLASSES = tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName("netdsl_caffe." + n))
                         for n in ("NetParameter", "LayerParameter", "BlobProto", "BlobShape"))
    return _CLASSES


def blob_array(b) -> np.ndarray:
    if b.HasField("shape"):
        shape = tuple(int(d) for d in b.shape.dim)
    else:   # the legacy 4-d blob; leading 1s carry no meaning (an fc weight is 1x1xOxI)
        shape = (b.num, b.channels, b.height, b.width)
    data = np.asarray(b.data if len(b.data) else b.double_data, dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"holds {data.size} values for shape {list(shape)}")
    return data.reshape(shape)


def read_caffemodel(path: str) -> dict[str, list[np.ndarray]]:
    """Layer name -> its blobs."""
    Net = messages()[0]
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise NetdslError(f"cannot read weights {path}: {e.strerror}") from None
    net = Net()
    try:
        net.ParseFromString(raw)
    except Exception as e:      # DecodeError and friends: the bytes are not a NetParameter
        raise NetdslError(f"{path} is not a caffemodel (binary NetParameter): {e}") from None
    out = {}
    for layer in net.layer:
        try:
            out[layer.name] = [blob_array(b) for b in layer.blobs]
        except ValueError as e:
            raise NetdslError(f"{path}: layer '{layer.name}': a blob {e}") from None
    return out


def convert_caffemodel(path: str, mapping: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    """Parameters by netdsl path, for the layers `convert_prototxt` mapped."""
    blobs = read_caffemodel(path)
    out: dict[str, np.ndarray] = {}
    for layer, (name, kind) in mapping.items():
        if layer not in blobs:
            raise NetdslError(f"{path} holds no weights for layer '{layer}'")
        bs = blobs[layer]
        want = {"conv": 2, "conv_nobias": 1, "linear": 2, "linear_nobias": 1, "bn": 3, "scale": 2,
                "scale_nobias": 1}[kind]
        if len(bs) != want:
            raise NetdslError(f"{path}: layer '{layer}' holds {len(bs)} blobs, a {kind} has {want}")
        if kind.startswith("conv"):
            out[f"{name}.weight"] = bs[0]
            if kind == "conv":
                out[f"{name}.bias"] = bs[1].reshape(-1)
        elif kind.startswith("linear"):
            out[f"{name}.weight"] = bs[0].reshape(bs[0].shape[-2:])
            if kind == "linear":
                out[f"{name}.bias"] = bs[1].reshape(-1)
        elif kind == "bn":      # running sums, and the factor that makes them averages (0: none yet)
            f = float(bs[2].reshape(-1)[0])
            f = 0.0 if f == 0 else 1.0 / f
            out[f"{name}.running_mean"] = bs[0].reshape(-1) * np.float32(f)
            out[f"{name}.running_var"] = bs[1].reshape(-1) * np.float32(f)
        else:
            out[f"{name}.weight"] = bs[0].reshape(-1)
            out[f"{name}.bias"] = bs[1].reshape(-1) if kind == "scale" else np.zeros_like(bs[0].reshape(-1))
    return out
