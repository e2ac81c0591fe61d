"""`netdsl import`: Darknet (.cfg/.weights) and Caffe (.prototxt/.caffemodel) networks to
readable .net specs, and their weights to an .npz (or .safetensors) keyed by parameter path."""
from __future__ import annotations

import os

import numpy as np

from ..errors import NetdslError
from ..runtime.checkpoint import atomic_write


def import_network(src: str, out: str, weights: str | None = None, weights_out: str | None = None,
                   network: str | None = None) -> tuple[str, str | None, int]:
    """Write the spec (and the weights); returns (spec path, weights path or None, parameters)."""
    ext = os.path.splitext(src)[1].lower()
    if ext == ".cfg":
        from .darknet import convert_cfg, convert_weights
        text, layers = convert_cfg(src, network)
        params = convert_weights(weights, layers) if weights else None
    elif ext in (".prototxt", ".pbtxt"):
        from .caffe import convert_prototxt
        from .caffemodel import convert_caffemodel
        text, mapping = convert_prototxt(src, network)
        params = convert_caffemodel(weights, mapping) if weights else None
    else:
        raise NetdslError(f"cannot tell the format of {src}",
                          hint="netdsl import reads darknet .cfg files and Caffe .prototxt files")
    wout = weights_out or os.path.splitext(out)[0] + ".npz"
    try:
        atomic_write(out, lambda f: f.write(text.encode("utf-8")))
        if params is None:
            return out, None, 0
        save_weights(wout, params)
    except OSError as e:
        raise NetdslError(f"cannot write {e.filename or out}: {e.strerror}") from None
    return out, wout, sum(int(a.size) for a in params.values())


def save_weights(path: str, params: dict[str, np.ndarray]) -> None:
    """By parameter path: .npz (np.savez, no pickle) or .safetensors."""
    params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import save
        except ImportError:
            raise NetdslError("writing .safetensors needs the safetensors package",
                              hint="pip install safetensors, or write an .npz") from None
        atomic_write(path, lambda f: f.write(save(params)))
    elif path.endswith(".npz"):
        atomic_write(path, lambda f: np.savez(f, **params))
    else:
        raise NetdslError(f"--weights-out {path}: write .npz or .safetensors")
