"""The runtime: models and their kernels on the CPU (Numba) or CUDA, data sources,
optimisers, checkpoints and progress output. Anything a user can get wrong raises
NetdslError.

A training loop uses it like this (tests/test_runtime_checkpoint.py runs it and
checks that resuming gives bit-identical weights):

    ds = make_source("digits")                      # or "fashion_mnist", path=...
    rng = np.random.default_rng(seed)
    mean, std = channel_stats(ds.x_train)
    train = Loader(ds.train, 64, rng=rng, shuffle=True, mean=mean, std=std,
                   crop_padding=0, flip=False)   # batches: {"image": ..., "label": ...}
    opt = make_optimizer("sgd", params, lr=0.1, momentum=0.9,
                         schedule=make_schedule("cosine", t_max=epochs * len(train), warmup_steps=100))
    for batch in train:  ...; clip_grad_norm(grads, 5.0); opt.step(grads)
    save_checkpoint(path, params, opt.state_dict(), step=opt.steps, epoch=e, rng=rng, spec_text=src)
    # resume: c = load_checkpoint(path, spec_text=src); load_weights(params, c);
    #         opt.load_state_dict(c.opt_state); rng = c.make_rng()  (checkpoint at epoch ends)
"""
from __future__ import annotations

import inspect

from ..errors import NetdslError, did_you_mean


# Name-based factories (make_source, make_optimizer, make_schedule) share these two
# helpers. They are defined before the submodule imports below, which use them.

def lookup(what: str, name: str, table: dict):
    """table[name.lower()], or a NetdslError with a did-you-mean hint."""
    key = str(name).lower()
    if key not in table:
        raise NetdslError(f"unknown {what} '{name}'",
                          hint=did_you_mean(key, table) or "known: " + ", ".join(sorted(table)))
    return table[key]


def construct(what: str, fn, kwargs: dict, *args):
    """fn(*args, **kwargs), after checking the keywords against fn's signature so a
    misspelt or missing option is reported as the user's error, not a TypeError."""
    params = list(inspect.signature(fn).parameters.values())[len(args):]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k in kwargs:
        if k not in names:
            hint = did_you_mean(k, names) or ("it takes: " + ", ".join(names) if names else "it takes no options")
            raise NetdslError(f"{what} has no option '{k}'", hint=hint)
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs and p.name in names]
    if missing:
        raise NetdslError(f"{what} needs option(s): " + ", ".join(missing))
    return fn(*args, **kwargs)


# The names below load their submodule on first use (PEP 562): `optim` pulls in Numba
# and the compiled kernels (~0.5 s), which a process that only builds a Model and
# runs it must not pay before it needs them (see Model: parameter initialisation
# overlaps that import).
_LAZY = {
    "checkpoint": ["Checkpoint", "load_checkpoint", "load_weights", "save_checkpoint", "spec_hash"],
    "data": ["Dataset", "make_source"],
    "loader": ["Loader", "channel_stats"],
    "optim": ["SGD", "Adam", "AdamW", "Optimizer", "clip_grad_norm", "make_optimizer", "make_schedule"],
    "progress": ["MetricsLog", "ProgressBar", "plot_metrics", "read_metrics"],
}
_HOME = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value
