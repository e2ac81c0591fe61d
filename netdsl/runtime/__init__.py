"""Training runtime: data sources, optimisers, checkpoints and progress output.

Everything here is plain numpy; anything a user can get wrong raises NetdslError.

A training loop uses it like this (tests/test_runtime_checkpoint.py runs it and
checks that resuming gives bit-identical weights):

    ds = make_source("digits")                      # or "fashion_mnist", path=...
    rng = np.random.default_rng(seed)
    mean, std = channel_stats(ds.x_train)
    train = Loader(ds.x_train, ds.y_train, 64, rng=rng, shuffle=True, mean=mean, std=std,
                   crop_padding=0, flip=False)
    opt = make_optimizer("sgd", params, lr=0.1, momentum=0.9,
                         schedule=make_schedule("cosine", t_max=epochs * len(train), warmup_steps=100))
    for xb, yb in train:  ...; clip_grad_norm(grads, 5.0); opt.step(grads)
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


from .checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint, spec_hash  # noqa: E402
from .data import Dataset, Loader, channel_stats, make_source  # noqa: E402
from .optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm, make_optimizer, make_schedule  # noqa: E402
from .progress import MetricsLog, ProgressBar, plot_metrics, read_metrics  # noqa: E402

__all__ = [
    "Checkpoint", "load_checkpoint", "load_weights", "save_checkpoint", "spec_hash",
    "Dataset", "Loader", "channel_stats", "make_source",
    "SGD", "Adam", "AdamW", "Optimizer", "clip_grad_norm", "make_optimizer", "make_schedule",
    "MetricsLog", "ProgressBar", "plot_metrics", "read_metrics",
]
