"""The `train { ... }` section: its keys, their types, and the constructors it may call.

Checked like the rest of the spec: an unknown key, constructor or argument, or a value
of the wrong type, is an error at its position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NetdslError, Pos, did_you_mean

_NUM, _INT, _BOOL, _STR = "number", "integer", "true/false", "string"


@dataclass
class TrainCall:
    """A constructor call in the train section, e.g. sgd(lr = 0.1)."""
    name: str
    kwargs: dict
    pos: Pos | None = None
    kwpos: dict = field(default_factory=dict)

    def to_json(self):
        return {"name": self.name, **{k: _json(v) for k, v in self.kwargs.items()}}


def _json(v):
    if isinstance(v, TrainCall):
        return v.to_json()
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    return v


# constructor -> {argument: (type, default)}; default None means required
CONSTRUCTORS = {
    "optimizer": {
        "sgd": {"lr": (_NUM, 0.01), "momentum": (_NUM, 0.0), "nesterov": (_BOOL, False),
                "weight_decay": (_NUM, 0.0), "dampening": (_NUM, 0.0)},
        "adam": {"lr": (_NUM, 1e-3), "beta1": (_NUM, 0.9), "beta2": (_NUM, 0.999), "eps": (_NUM, 1e-8),
                 "weight_decay": (_NUM, 0.0)},
        "adamw": {"lr": (_NUM, 1e-3), "beta1": (_NUM, 0.9), "beta2": (_NUM, 0.999), "eps": (_NUM, 1e-8),
                  "weight_decay": (_NUM, 1e-2)},
    },
    "schedule": {
        "constant": {},
        "step": {"every": (_INT, None), "gamma": (_NUM, 0.1)},
        "multistep": {"milestones": ("integers", None), "gamma": (_NUM, 0.1)},
        "cosine": {"eta_min": (_NUM, 0.0)},
    },
    "data": {
        "digits": {},
        "mnist": {"path": (_STR, None)},
        "fashion_mnist": {"path": (_STR, "/usr/share/datasets/fashion-mnist")},
        "cifar10": {"path": (_STR, None)},
        "npz": {"path": (_STR, None)},
        "text": {"path": (_STR, "pydoc_topics"), "seq": (_INT, 64)},
        "coco_captions": {"path": (_STR, None), "size": (_INT, 0), "max_len": (_INT, 0), "min_count": (_INT, 1),
                          "ann": (_STR, "captions"), "train": (_STR, "train"), "test": (_STR, "val")},
        "coco": {"path": (_STR, None), "ann": (_STR, "instances"), "task": (_STR, ""), "size": (_INT, 0),
                 "max_objects": (_INT, 0), "train": (_STR, "train"), "test": (_STR, "val")},
        "vg": {"path": (_STR, None), "size": (_INT, 0), "max_len": (_INT, 0), "min_count": (_INT, 1),
               "max_regions": (_INT, 0), "train": (_STR, "train"), "test": (_STR, "val")},
        "synthetic": {"size": (_INT, 256)},
        # the sequence tasks of runtime/tasks.py; the first argument is --data NAME:ARG's
        "digit_rows": {},
        "polarity": {"length": (_INT, 20), "size": (_INT, 4000), "seed": (_INT, 0)},
        "copy": {"task": (_STR, "copy"), "length": (_INT, 10), "size": (_INT, 8000), "seed": (_INT, 0)},
        "echo": {"delay": (_INT, 2), "length": (_INT, 20), "size": (_INT, 4000), "seed": (_INT, 0)},
        "count_up": {"length": (_INT, 8), "size": (_INT, 4000), "seed": (_INT, 0)},
        "translated_digits": {"canvas": (_INT, 64), "scale": (_INT, 4), "seed": (_INT, 0)},
        "recall": {"delay": (_INT, 1), "length": (_INT, 8), "size": (_INT, 2000), "seed": (_INT, 0)},
    },
    "bptt": {
        "full": {},
        "truncated": {"chunk": (_INT, None)},
    },
    "augment": {
        "crop": {"pad": (_INT, 4)},
        "flip": {},
        "affine": {"scale": (_NUM, 0.2), "translate": (_NUM, 0.2), "min_visible": (_NUM, 0.5)},
    },
    # runtime/metrics.py computes them (its METRICS has these names)
    "metrics": {"accuracy": {}, "top5": {}, "pixel_accuracy": {}, "miou": {}, "loss_per_token": {},
                "sequence_accuracy": {}, "onehot_accuracy": {}, "box_iou": {}, "pck": {}},
}

# key -> (type, default); a type naming a CONSTRUCTORS group takes one of its calls
KEYS = {
    "optimizer": ("optimizer", "sgd"),
    "schedule": ("schedule", "constant"),
    "warmup": (_INT, 0),
    "epochs": (_INT, 10),
    "batch": (_INT, 64),
    "data": ("data", "digits"),
    "clip": (_NUM, 0.0),
    "bptt": ("bptt", "full"),
    "seed": (_INT, 0),
    "augment": ("augment list", []),
    "metrics": ("metrics list", None),     # none given: chosen from the losses' tasks
    "normalize": (_BOOL, True),
    "eval_every": (_INT, 1),
}


def train_env() -> dict:
    """Names usable inside train { }: every constructor, callable or bare."""
    return {n: n for group in CONSTRUCTORS.values() for n in group}


def check_setting(key: str, value, pos: Pos | None, vpos: Pos | None):
    if key not in KEYS:
        raise NetdslError(f"unknown training setting '{key}'", pos,
                          hint=did_you_mean(key, KEYS) or "settings: " + ", ".join(KEYS))
    kind, _ = KEYS[key]
    group = kind.removesuffix(" list")
    if group in CONSTRUCTORS:
        listed = kind.endswith(" list")
        items = value if listed and isinstance(value, (list, tuple)) else [value]
        out = [_check_call(group, key, v, vpos) for v in items]
        return out if listed else out[0]
    return _check_type(key, kind, value, vpos)


def _check_call(group: str, key: str, value, pos):
    if isinstance(value, str) and value in CONSTRUCTORS[group]:
        value = TrainCall(value, {}, pos)
    if not isinstance(value, TrainCall) or value.name not in CONSTRUCTORS[group]:
        name = value.name if isinstance(value, TrainCall) else value
        what = f"unknown {group} '{name}'" if isinstance(name, str) else f"'{key}' needs a {group}, got {_show(name)}"
        raise NetdslError(f"{what}; choose {', '.join(CONSTRUCTORS[group])}",
                          getattr(value, "pos", None) or pos,
                          hint=did_you_mean(str(name), CONSTRUCTORS[group]))
    spec = CONSTRUCTORS[group][value.name]
    out = {}
    for k, v in value.kwargs.items():
        if k not in spec:
            raise NetdslError(f"{value.name}() has no argument '{k}'", value.kwpos.get(k, value.pos),
                              hint=did_you_mean(k, spec) or ("it takes " + ", ".join(spec) if spec else "it takes none"))
        out[k] = _check_type(f"{value.name}({k})", spec[k][0], v, value.kwpos.get(k, value.pos))
    for k, (t, default) in spec.items():
        if k not in out:
            if default is None:
                raise NetdslError(f"{value.name}() needs the argument '{k}'", value.pos)
            out[k] = default
    return TrainCall(value.name, out, value.pos)


def _check_type(what: str, kind: str, v, pos):
    ok = {
        _NUM: isinstance(v, (int, float)) and not isinstance(v, bool),
        _INT: isinstance(v, int) and not isinstance(v, bool),
        _BOOL: isinstance(v, bool),
        _STR: isinstance(v, str),
        "integers": isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    }[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise NetdslError(f"'{what}' must be {'a list of integers' if kind == 'integers' else article + ' ' + kind}, "
                          f"got {_show(v)}", pos)
    if kind in (_NUM, _INT) and v < 0:
        raise NetdslError(f"'{what}' must not be negative, got {v}", pos)
    if what in ("epochs", "batch") and v == 0:
        raise NetdslError(f"'{what}' must be positive", pos)
    return float(v) if kind == _NUM else (list(v) if kind == "integers" else v)


def defaults() -> dict:
    out = {}
    for k, (kind, d) in KEYS.items():
        out[k] = _check_call(kind, k, d, None) if kind in CONSTRUCTORS else d
    return out


def _show(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)
