"""Task metrics, chosen from a spec's losses (or declared: `train { metrics = [...] }`).

Each cross-entropy loss that runs at inference tells the task by its logits' rank:
[N, C] with labels [N] is classification (accuracy, and top-5 past 5 classes);
[N, C, H, W] with labels [N, H, W] is dense labelling (pixel accuracy and mean IoU
over the classes present in prediction or truth, as FCN reports them); [N, T, C] with
[N, T] is a sequence (accuracy per token, loss per token and perplexity; exact match of
whole sequences when declared). Labels may be an input or a slice of one (seq2seq's
tgt[:, 1:]): the metric applies the same slice to the input's batch. An L2 loss of a
prediction against a one-hot target input of its shape (vanilla_rnn's recall task)
offers `onehot_accuracy` when declared. Labels equal to the loss's ignore index count
nowhere. The segmentation, recurrent and detection issues add
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
    # what else `update` reads from a batch: these data fields by name (PCK's "box"), and
    # as `weight=` the input holding the loss's weight (pose's visible), when it has one
    fields: tuple[str, ...] = ()
    weight: str | None = None

    def __init__(self, pred: Value, label: str, loss: str, ignore: int, classes: int, index: tuple | None = None):
        self.pred, self.label, self.loss, self.ignore, self.classes = pred, label, loss, ignore, classes
        self.index = index      # the slice of the label input the loss reads, or None: all of it
        self.reset()

    def update(self, logits, labels, loss):
        self.add(logits, labels if self.index is None else labels[self.index], loss)

    def reset(self):
        self.num = self.den = 0.0

    def result(self) -> dict:
        return dict(zip(self.keys, self.values()))

    def values(self) -> tuple:
        return (self.num / max(self.den, 1),)


class Accuracy(Metric):
    """Top-k accuracy per example, or per token of a sequence ([N, T, C] logits)."""
    tasks, keys = ("classification", "sequence"), ("acc",)
    k = 1

    def add(self, logits, labels, loss):
        keep = labels != self.ignore
        if self.k == 1:
            hit = logits.argmax(-1) == labels
        else:
            top = np.argpartition(-logits, self.k - 1, axis=-1)[..., :self.k]
            hit = (top == labels[..., None]).any(-1)
        self.num += float((hit & keep).sum())
        self.den += float(keep.sum())


class Top5(Accuracy):
    tasks, keys, k = ("classification",), ("top5",), 5

    @property
    def default(self):
        return self.classes > 5


class PixelAccuracy(Metric):
    tasks, keys = ("dense",), ("pixel_acc",)

    def add(self, logits, labels, loss):
        keep = labels != self.ignore
        self.num += float(((logits.argmax(1) == labels) & keep).sum())
        self.den += float(keep.sum())


class MeanIoU(Metric):
    tasks, keys = ("dense",), ("miou",)

    def reset(self):
        self.confusion = np.zeros((self.classes, self.classes), np.int64)   # [truth, prediction]

    def add(self, logits, labels, loss):
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

    def add(self, logits, labels, loss):
        n = float((labels != self.ignore).sum())
        self.num += loss * n
        self.den += n

    def values(self) -> tuple:
        per = self.num / max(self.den, 1)
        return per, math.exp(min(per, 700.0))


class SequenceAccuracy(Metric):
    """Exact match: the fraction of sequences whose every scored token is right
    (copy/reverse, captions). Declared only: for a language model's long chunks it is ~0."""
    tasks, keys, default = ("sequence",), ("seq_acc",), False

    def add(self, logits, labels, loss):
        wrong = (logits.argmax(-1) != labels) & (labels != self.ignore)
        scored = (labels != self.ignore).any(1)
        self.num += float((~wrong.any(1) & scored).sum())
        self.den += float(scored.sum())


class OneHotAccuracy(Metric):
    """An L2 loss's prediction read as scores against a one-hot target: a step counts
    as right when its largest output is where the target's 1 is; all-zero targets
    are not scored. Declared only: an L2 target is not one-hot in general."""
    tasks, keys, default = ("onehot",), ("acc",), False

    def add(self, pred, target, loss):
        keep = target.any(-1)
        self.num += float(((pred.argmax(-1) == target.argmax(-1)) & keep).sum())
        self.den += float(keep.sum())


class BoxIoU(Metric):
    """Mean IoU of each example's predicted box with its true one (x1, y1, x2, y2): an
    L2 loss of a [N, 4] prediction against an input named `box` (cls_loc's box head)."""
    tasks, keys = ("box",), ("box_iou",)

    def add(self, pred, box, loss):
        from ..datasets.evaluate import box_iou
        self.num += float(box_iou(pred, box).sum())
        self.den += len(box)


class PCK(Metric):
    """PCK@0.2: the share of labelled joints (weight > 0) predicted within 0.2 times the
    person's size, the larger side of its ground-truth box, of the truth, as
    datasets/evaluate.py's pck: an L2 loss of [N, K, 2] against an input named `joints`
    (pose.net). The box is the data's `box` field (the COCO reader's pose data has it)."""
    tasks, keys, fields = ("joints",), ("pck",), ("box",)
    alpha = 0.2

    def update(self, pred, joints, loss, box=None, weight=None):
        from ..datasets.evaluate import pck
        seen = np.ones(joints.shape[:2], bool) if weight is None else weight > 0
        self.num += pck(pred, joints, seen, box, self.alpha) * float(seen.sum())
        self.den += float(seen.sum())


# name in `train { metrics = [...] }` -> class
METRICS = {"accuracy": Accuracy, "top5": Top5, "pixel_accuracy": PixelAccuracy, "miou": MeanIoU,
           "loss_per_token": LossPerToken, "sequence_accuracy": SequenceAccuracy, "onehot_accuracy": OneHotAccuracy,
           "box_iou": BoxIoU, "pck": PCK}


def choose(g: Graph, declared: list | None = None, pos=None, fields=None) -> list[Metric]:
    """The metrics of g's inference-time cross-entropy losses: the declared ones, or
    every default metric of each loss's task. `fields`: the data's field names, when
    known (a metric that needs a field the data lacks is left out, or is an error when
    declared)."""
    heads = []
    for l in g.losses:
        node = l.value.producer
        if l.phase != "all" or node is None or node.op not in ("cross_entropy", "l2"):
            continue
        logits, labels = node.inputs[:2]
        label, index = _label_input(g, labels)
        if node.op == "l2":
            if label is None or len(node.inputs) > 2 or logits.rank not in (2, 3) or logits.shape != labels.shape:
                continue
            task, ignore = "onehot", None
        elif label is None or logits.rank not in TASKS:
            continue
        else:
            task, ignore = TASKS[logits.rank], node.attrs["ignore_index"]
        classes = logits.shape[-1 if logits.rank in (2, 3) else 1]
        if isinstance(classes, int):
            heads.append((l.name, task, logits, label, ignore, classes, index))
    heads += _regression_heads(g)
    out = []
    for name in declared or []:
        cls = METRICS[name]
        fits = [h for h in heads if h[1] in cls.tasks]
        if not fits:
            raise NetdslError(f"metric '{name}' is for {' or '.join(cls.tasks)} losses, and this spec has "
                              + (", ".join(f"a {h[1]} loss '{h[0]}'" for h in heads) or "no cross-entropy loss "
                                 "that runs at inference"), pos)
        out += [cls(logits, label, loss, ignore, classes, index) for loss, _, logits, label, ignore, classes, index
                in fits]
    if declared is None:
        for loss, task, logits, label, ignore, classes, index in heads:
            out += [m for m in (cls(logits, label, loss, ignore, classes, index) for cls in METRICS.values()
                                if task in cls.tasks) if m.default]
    out = _with_fields(g, out, fields, declared, pos)
    if len({m.loss for m in out}) > 1:
        for m in out:       # cls_loc's box loss: box_iou, not box_box_iou
            m.keys = tuple(k if k.startswith(f"{m.loss}_") else f"{m.loss}_{k}" for k in m.keys)
    return out


def _regression_heads(g: Graph) -> list[tuple]:
    """The L2 heads of box and joint regression (regression_head)."""
    heads = []
    for l in g.losses:
        node = l.value.producer
        if l.phase != "all" or node is None:
            continue
        head = regression_head(g, node)
        if head is not None:
            task, pred, label = head
            heads.append((l.name, task, pred, label, None, 4 if task == "box" else pred.shape[1], None))
    return heads


def regression_head(g: Graph, node) -> tuple[str, Value, str] | None:
    """(task, prediction, label input) of an L2 loss node that regresses boxes or joints,
    by the names the COCO reader gives its fields: a [N, 4] prediction against an input
    named `box` ("box"), [N, K, 2] against `joints` ("joints"). Both sides may be scaled
    by the same factor (cls_loc's l2(coords / size, box / size), a loss in fractions of
    the image): the metric reads the unscaled prediction and the input."""
    if node.op != "l2":
        return None
    pred, target = node.inputs[:2]
    p, t = pred.producer, target.producer
    if p is not None and t is not None and p.op == t.op == "scale" and p.attrs["factor"] == t.attrs["factor"]:
        pred, target = p.inputs[0], t.inputs[0]
    label, index = _label_input(g, target)
    if index is not None or pred.shape != target.shape:
        return None
    if label == "box" and pred.rank == 2 and pred.shape[1] == 4:
        return "box", pred, label
    if label == "joints" and pred.rank == 3 and pred.shape[2] == 2:
        return "joints", pred, label
    return None


def _with_fields(g: Graph, out: list, fields, declared, pos) -> list:
    """Give each metric its loss's weight input; leave out (or, declared, refuse) one
    that needs a data field the data lacks."""
    kept = []
    for m in out:
        node = next(l.value.producer for l in g.losses if l.name == m.loss)
        if m.tasks == ("joints",) and node.op == "l2" and len(node.inputs) > 2:
            m.weight = _label_input(g, node.inputs[2])[0]
        lacking = [f for f in m.fields if fields is not None and f not in fields]
        if lacking and declared is not None:
            name = next(n for n, c in METRICS.items() if isinstance(m, c))
            raise NetdslError(f"metric '{name}' needs the data field '{lacking[0]}', which this data set does not "
                              f"have (it has {', '.join(fields)})", pos,
                              hint="the COCO reader's pose data (coco(task='pose')) has it")
        if not lacking:
            kept.append(m)
    return kept


def _label_input(g: Graph, v: Value) -> tuple[str | None, tuple | None]:
    """(the input v is, or is a fixed slice of, and that numpy index); (None, None) otherwise."""
    inputs = {id(x): n for n, x in g.inputs.items()}
    if id(v) in inputs:
        return inputs[id(v)], None
    node = v.producer
    if node is None or node.op != "slice" or id(node.inputs[0]) not in inputs:
        return None, None
    index = []
    for ix in node.attrs["index"]:
        parts = ix if isinstance(ix, tuple) else (ix,)
        if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
            return None, None   # a symbolic bound: not reproducible on the batch here
        index.append(slice(*ix) if isinstance(ix, tuple) else ix)
    return inputs[id(node.inputs[0])], tuple(index)


def panel(key: str) -> str | None:
    """Which panel of metrics.png shows a metrics.jsonl key (None: not plotted)."""
    if "perplexity" in key:
        return "perplexity"
    if "loss" in key:
        return "loss"
    if any(k in key for k in ("acc", "top5", "iou", "pck")):
        return "accuracy"
    return None
