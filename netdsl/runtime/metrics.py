"""Task metrics, chosen from a spec's losses (or declared: `train { metrics = [...] }`).

Each cross-entropy loss that runs at inference tells the task by its logits' rank:
[N, C] with labels [N] is classification (accuracy, and top-5 past 5 classes);
[N, C, H, W] with labels [N, H, W] is dense labelling (pixel accuracy and mean IoU
over the classes present in prediction or truth, as FCN reports them); [N, T, C] with
[N, T] is a sequence (loss per token and perplexity). Labels equal to the loss's
ignore index count nowhere. The segmentation, recurrent and detection issues add
their metrics to METRICS.

A metric accumulates over an epoch: `update(batch)` per batch, `result()` at the end,
under keys such as "acc", "top5", "miou"; the trainer prefixes "train_" / "test_"
(and the loss's name when a spec has several such losses).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import NetdslError
from ..ir.graph import Graph, Value

TASKS = {2: "classification", 4: "dense", 3: "sequence"}


class Metric:
    """One loss's metric: `pred` is the logits value it reads, `label` the input
    feeding the loss's labels, `loss` the loss's name."""
    tasks: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    default = True

    def __init__(self, pred: Value, label: str, loss: str, ignore: int, classes: int):
        self.pred, self.label, self.loss, self.ignore, self.classes = pred, label, loss, ignore, classes
        self.reset()

    def reset(self):
        self.num = self.den = 0.0

    def result(self) -> dict:
        return dict(zip(self.keys, self.values()))

    def values(self) -> tuple:
        return (self.num / max(self.den, 1),)


class Accuracy(Metric):
    tasks, keys = ("classification",), ("acc",)
    k = 1

    def update(self, logits, labels, loss):
        keep = labels != self.ignore
        if self.k == 1:
            hit = logits.argmax(1) == labels
        else:
            top = np.argpartition(-logits, self.k - 1, axis=1)[:, :self.k]
            hit = (top == labels[:, None]).any(1)
        self.num += float((hit & keep).sum())
        self.den += float(keep.sum())


class Top5(Accuracy):
    keys, k = ("top5",), 5

    @property
    def default(self):
        return self.classes > 5


class PixelAccuracy(Metric):
    tasks, keys = ("dense",), ("pixel_acc",)

    def update(self, logits, labels, loss):
        keep = labels != self.ignore
        self.num += float(((logits.argmax(1) == labels) & keep).sum())
        self.den += float(keep.sum())


class MeanIoU(Metric):
    tasks, keys = ("dense",), ("miou",)

    def reset(self):
        self.confusion = np.zeros((self.classes, self.classes), np.int64)   # [truth, prediction]

    def update(self, logits, labels, loss):
        keep = labels != self.ignore
        t, p = labels[keep], logits.argmax(1)[keep]
        self.confusion += np.bincount(t * self.classes + p, minlength=self.classes ** 2).reshape(self.confusion.shape)

    def values(self) -> tuple:
        c = self.confusion
        union = c.sum(0) + c.sum(1) - np.diag(c)
        present = union > 0
        return (float((np.diag(c)[present] / union[present]).mean()) if present.any() else 0.0,)


class LossPerToken(Metric):
    """The loss averaged over every counted token of the epoch (each batch's mean
    loss weighted by its token count), and its exponential, the perplexity."""
    tasks, keys = ("sequence",), ("loss_per_token", "perplexity")

    def update(self, logits, labels, loss):
        n = float((labels != self.ignore).sum())
        self.num += loss * n
        self.den += n

    def values(self) -> tuple:
        per = self.num / max(self.den, 1)
        return per, math.exp(min(per, 700.0))


# name in `train { metrics = [...] }` -> class
METRICS = {"accuracy": Accuracy, "top5": Top5, "pixel_accuracy": PixelAccuracy, "miou": MeanIoU,
           "loss_per_token": LossPerToken}


def choose(g: Graph, declared: list | None = None, pos=None) -> list[Metric]:
    """The metrics of g's inference-time cross-entropy losses: the declared ones, or
    every default metric of each loss's task."""
    inputs = {id(v): n for n, v in g.inputs.items()}
    heads = []
    for l in g.losses:
        node = l.value.producer
        if l.phase != "all" or node is None or node.op != "cross_entropy":
            continue
        logits, labels = node.inputs
        if id(labels) not in inputs or logits.rank not in TASKS:
            continue
        classes = logits.shape[-1 if logits.rank == 3 else 1]
        if isinstance(classes, int):
            heads.append((l.name, TASKS[logits.rank], logits, inputs[id(labels)], node.attrs["ignore_index"], classes))
    out = []
    for name in declared or []:
        cls = METRICS[name]
        fits = [h for h in heads if h[1] in cls.tasks]
        if not fits:
            raise NetdslError(f"metric '{name}' is for {' or '.join(cls.tasks)} losses, and this spec has "
                              + (", ".join(f"a {h[1]} loss '{h[0]}'" for h in heads) or "no cross-entropy loss "
                                 "that runs at inference"), pos)
        out += [cls(logits, label, loss, ignore, classes) for loss, _, logits, label, ignore, classes in fits]
    if declared is None:
        for loss, task, logits, label, ignore, classes in heads:
            out += [m for m in (cls(logits, label, loss, ignore, classes) for cls in METRICS.values()
                                if task in cls.tasks) if m.default]
    if len({m.loss for m in out}) > 1:
        for m in out:
            m.keys = tuple(f"{m.loss}_{k}" for k in m.keys)
    return out


def panel(key: str) -> str | None:
    """Which panel of metrics.png shows a metrics.jsonl key (None: not plotted)."""
    if "perplexity" in key:
        return "perplexity"
    if "loss" in key:
        return "loss"
    if any(k in key for k in ("acc", "top5", "miou")):
        return "accuracy"
    return None
