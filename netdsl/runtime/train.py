"""`netdsl run`: train, evaluate and predict from a spec (on the CPU, or a CUDA GPU with --device cuda).

The spec's train section gives the defaults; command-line flags override them. A run
directory holds metrics.jsonl, metrics.png and checkpoint.npz (written atomically).
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np

from ..errors import NetdslError
from ..ir.graph import Graph
from . import (MetricsLog, ProgressBar, clip_grad_norm, load_checkpoint, load_weights, make_optimizer,
               make_schedule, make_source, plot_metrics, save_checkpoint)
from . import metrics as task_metrics
from .data import Dataset
from .feeds import GROUND_TRUTH, bind, check_shape, convert, describe_inputs, index_rules, synthetic
from .loader import Loader, StreamLoader, channel_stats
from .model import Model, inputs_of


def load_data(g: Graph, cfg: dict, seed: int) -> Dataset:
    src = cfg["data"]
    if src.name == "synthetic":
        return synthetic(g, src.kwargs["size"], seed)
    kwargs = dict(src.kwargs)
    if src.name == "coco_captions":
        from ..datasets.captions import fit_to_spec
        kwargs = fit_to_spec(g, kwargs)     # the image size and caption length a spec fixes
    if src.name == "coco":      # Mask R-CNN's per-object masks and keypoints, when the spec takes them
        from .detection import detection_outputs
        kwargs.update({f: True for n, f in (("gt_masks", "masks"), ("gt_keypoints", "keypoints")) if n in g.inputs})
        if "keypoints" in detection_outputs(g):     # evaluation: the people are read per object too
            kwargs["keypoints"] = True
    if src.name == "text" and chunk(cfg):
        kwargs["seq"] = chunk(cfg)      # truncated BPTT reads the text in chunks of that length
    if src.name == "vg":        # dense captioning: the spec's image size and phrase length, its vocabulary
        from ..datasets.vg import fit_data, fit_to_spec
        return fit_data(g, make_source(src.name, **fit_to_spec(g, kwargs)))
    return make_source(src.name, **kwargs)


def _bind(g: Graph, ds: Dataset) -> dict[str, str]:
    """feeds.bind, its error naming the COCO task when the data is COCO-format (a spec
    for one task given another task's data)."""
    try:
        return bind(g, ds)
    except NetdslError as e:
        task = getattr(ds, "task", None)
        if not task:
            raise
        raise NetdslError(f"{e.message} (the COCO data at {ds.source} is read as task '{task}': "
                          f"{', '.join(ds.train)})", e.pos,
                          hint="coco(task = ...) chooses the task; segmentation specs read a set's root, "
                               "cls_loc its single/, pose its pose/ with ann = \"person_keypoints\"") from None


def chunk(cfg: dict) -> int | None:
    """The chunk length of truncated backpropagation through time, or None (full BPTT)."""
    b = cfg.get("bptt")
    return b.kwargs.get("chunk") if b is not None and b.name == "truncated" else None


def _schedule(cfg: dict, steps_per_epoch: int):
    s, total = cfg["schedule"], cfg["epochs"] * steps_per_epoch
    kw = {}
    if s.name == "step":
        kw = {"step_size": s.kwargs["every"] * steps_per_epoch, "gamma": s.kwargs["gamma"]}
    elif s.name == "multistep":
        kw = {"milestones": [m * steps_per_epoch for m in s.kwargs["milestones"]], "gamma": s.kwargs["gamma"]}
    elif s.name == "cosine":
        kw = {"t_max": max(total, 1), "eta_min": s.kwargs["eta_min"]}
    return make_schedule(s.name, warmup_steps=cfg["warmup"] * steps_per_epoch, **kw)


def _optimizer(cfg: dict, params: dict, schedule):
    o = dict(cfg["optimizer"].kwargs)
    if cfg["optimizer"].name in ("adam", "adamw"):
        o["betas"] = (o.pop("beta1"), o.pop("beta2"))
    return make_optimizer(cfg["optimizer"].name, params, schedule=schedule, **o)


class Trainer:
    def __init__(self, g: Graph, cfg: dict, out_dir: str, spec_text: str, log=print, device: str = "cpu",
                 training: bool = True, dist=None):
        """training=False: for evaluation and prediction (the training step's memory is not checked).
        dist: a distributed.DataParallel (--distributed): this process is one rank of an MPI job,
        reading its slice of every batch of cfg["batch"] x ranks examples."""
        self.g, self.cfg, self.out, self.spec_text, self.log = g, cfg, out_dir, spec_text, log
        self.device, self.dist = device, dist
        self.writes = dist is None or dist.root     # rank 0 alone writes the run directory
        self.model = Model(g, seed=cfg["seed"], device=device)
        if dist is not None:
            dist.attach(self)
        if training:
            self.check_memory()     # before the data is loaded
        self.data = load_data(g, cfg, cfg["seed"])
        self.fields = _bind(g, self.data)               # input name -> data field
        self.metrics = task_metrics.choose(g, _metric_names(cfg), g.train_pos.get("metrics"),
                                           fields=list(self.data.train))
        self.rng = np.random.default_rng(cfg["seed"])
        # float [N, C, H, W] inputs are images (normalised, flipped), but not Mask R-CNN's gt masks
        images = [f for n, f in self.fields.items()
                  if g.inputs[n].dtype.startswith("f") and g.inputs[n].rank == 4 and n not in GROUND_TRUTH]
        self.norm = {f: channel_stats(self.data.train[f]) for f in images} if cfg["normalize"] else {}
        crop = next((a.kwargs["pad"] for a in cfg["augment"] if a.name == "crop"), 0)
        flip = any(a.name == "flip" for a in cfg["augment"])
        scaling = next((a for a in cfg["augment"] if a.name == "affine"), None)
        dense, mirror, objects = self._dense_fields(images, crop, flip, scaling) if crop or flip or scaling \
            else ({}, None, {})
        # the bound fields, and the fields metrics read besides (PCK's box); affine drops objects by their labels
        self.used = [*dict.fromkeys([*self.fields.values(), *(f for m in self.metrics for f in m.fields),
                                     *(["boxes", "labels"] if objects else [])])]
        affine = self._affine(scaling, images, dense, objects) if scaling else None
        used = {f: self.data.train[f] for f in self.used}
        # truncated BPTT carries the recurrent state from one batch to the next (reset each epoch)
        self.carry_state = self.data.streams is not None and chunk(cfg) is not None and bool(g.carries)
        batch = cfg["batch"] * (dist.size if dist else 1)     # the global batch: each rank reads its slice
        if self.data.streams is not None:     # read in order, as parallel streams
            self.train_loader = StreamLoader.of(self.data, "train", batch)
            self.test_loader = StreamLoader.of(self.data, "test", batch)
        else:
            self.train_loader = Loader(used, batch, rng=self.rng, shuffle=True, images=images, dense=dense,
                                       mean=_part(self.norm, 0), std=_part(self.norm, 1), crop_padding=crop,
                                       flip=flip, mirror=mirror, affine=affine)
            self.test_loader = Loader({f: self.data.test[f] for f in self.used}, batch,
                                      images=images, mean=_part(self.norm, 0), std=_part(self.norm, 1))
        if dist is not None:
            self.train_loader.shard = self.test_loader.shard = (dist.rank, dist.size)
        self.opt = _optimizer(cfg, self.model.trainable(), _schedule(cfg, len(self.train_loader)))
        self.clip = clip_grad_norm
        if device == "cuda":   # parameters, gradients and optimiser state stay on the device
            from . import cuda
            params = self.model.trainable()
            flat = self.model.flat      # one launch for all parameters (runtime/cuda_flat.py)
            self.opt = cuda.DeviceOptimizer(self.opt, params, flat)
            self.clip = lambda grads, max_norm: cuda.clip_grad_norm(grads, max_norm, flat)
        self.epoch = 0
        self.grad_flow = None       # record_grad_flow() turns it on (--grad-flow)

    def record_grad_flow(self):
        """Record |dL/dh_t| per recurrent state and time step each epoch (gradflow.py)."""
        if not self.g.carries:
            raise NetdslError(f"--grad-flow: network '{self.g.name}' has no recurrent state (no scan carries)",
                              self.g.pos)
        from .gradflow import GradFlow
        self.grad_flow = GradFlow(self.out)

    def _dense_fields(self, images: list[str], crop: int, flip: bool, affine) -> tuple[dict, object, dict]:
        """(fields cropped, flipped and scaled with the images: [N, H, W] integer maps
        of the images' size, padded with their loss's ignore index; the flip that also
        moves a COCO data set's boxes and joints, or None; the per-object fields that
        affine moves: data field -> its role in affine.Affine). Any other field that is
        not one value per example cannot follow the augmentation: an error (synthetic
        data's are random, and stay as they are)."""
        sizes = {self.data.train[f].shape[2:] for f in images}
        ignore = {n: next((i for _, i, _ in r if i is not None), -1) for n, r in index_rules(self.g).items()}
        dense, moved, objects = {}, [], {}
        rows = self.data.train["boxes"].shape[:2] if "boxes" in self.data.train else None
        for name, f in self.fields.items():
            a = self.data.train[f]
            if f in images or a.ndim == 1:
                continue
            if a.dtype.kind in "iu" and a.ndim == 3 and a.shape[1:] in sizes:
                dense[f] = ignore.get(name, -1)
                continue
            if self.data.name == "synthetic":
                continue        # random numbers that describe nothing: left as they are
            can = {"crop": not crop,
                   "flip": not flip or (f in MIRRORED and hasattr(self.data, "flip")),
                   "affine": not affine or (rows is not None and a.shape[:2] == rows and "labels" in self.data.train)}
            if all(can.values()):
                if flip:
                    moved.append(f)
                if affine:
                    objects[f] = OBJECT_ROLES.get(f, "rows")
                continue
            what = next(k for k, ok in can.items() if not ok)
            raise NetdslError(f"augment = [{what}] cannot transform input '{name}' "
                              f"({self.g.inputs[name].dtype}{list(a.shape[1:])} per example) with the images",
                              self.g.train_pos.get("augment"), hint=AUGMENT_HINTS[what])
        if objects and "boxes" not in objects:      # masks or keypoints bound without the boxes
            objects["boxes"] = "boxes"
        return dense, (self.data.flip if moved else None), objects

    def _affine(self, call, images: list[str], dense: dict, objects: dict):
        """The affine.Affine of `augment = [affine(...)]`: images filled with their
        training mean (0 once normalised), label maps with their ignore index."""
        from .affine import Affine, check
        kw = call.kwargs
        check(kw["scale"], kw["translate"], kw["min_visible"], self.g.train_pos.get("augment"))
        roles = {r: [f for f, rr in objects.items() if rr == r] for r in ("masks", "keypoints", "rows")}
        return Affine(kw["scale"], kw["translate"], kw["min_visible"],
                      images={f: self.norm[f][0] if f in self.norm else 0.0 for f in images}, dense=dense,
                      boxes="boxes" if objects else None, labels="labels" if objects else None, **roles)

    def _feeds(self, batch: dict) -> dict:
        return {n: batch[f] for n, f in self.fields.items()}

    def _measure(self, batch: dict, values: dict, losses: dict):
        for m in self.metrics:
            extra = {f: batch[f] for f in m.fields}
            if m.weight is not None:
                extra["weight"] = batch[self.fields[m.weight]]
            m.update(values[m.pred], batch[self.fields[m.label]], losses[m.loss], **extra)

    def _report(self, prefix: str) -> dict:
        out = {}
        for m in self.metrics:
            out.update({f"{prefix}{k}": v for k, v in m.result().items()})
            m.reset()
        return out

    @property
    def ckpt_path(self):
        return os.path.join(self.out, "checkpoint.npz")

    def resume(self, path: str | None = None):
        c = load_checkpoint(path or self.ckpt_path, spec_text=self.spec_text)
        host = self.model.host_params()
        load_weights(host, c)
        if self.model.device == "cuda":     # into the arrays the optimiser holds (views of one buffer)
            for k, v in host.items():
                self.model.params[k].copy_to_device(np.ascontiguousarray(v))
        else:
            self.model.params.update({k: self.model.target.upload(v) for k, v in host.items()})
        self.opt.load_state_dict(c.opt_state, f"checkpoint {c.path}")
        c.restore_rng(self.rng)     # in place: the loader holds this generator
        self.epoch, self.model.step = c.epoch, c.step

    def check_memory(self):
        """Refuse a training step that cannot fit in this machine's memory, before
        anything is allocated: the planner's peak for the step's intermediates, plus
        the parameters, their gradients and two optimiser slots per parameter."""
        from ..plan import BYTES, plan
        tg = self.model.training_graph
        # dimensions other than the batch (a sequence's T) are known only from the data: a
        # lower bound at 1 still refuses what cannot fit
        dims = {**{s: 1 for s in self.g.symbols}, "N": self.cfg["batch"]}
        peak = plan(tg.nodes, tg.keep(), dims, self.model.fuse).peak_planned
        weights = sum(math.prod(p.shape) * BYTES.get(p.dtype, 4) for p in self.g.params.values())
        need, have = peak + 4 * weights, machine_memory()
        if need > have:
            big = max(self.g.inputs.values(), key=lambda v: math.prod(d if isinstance(d, int) else 1 for d in v.shape))
            raise NetdslError(f"a training step of batch {self.cfg['batch']} needs {_gib(need)} "
                              f"({_gib(peak)} of intermediates, {_gib(4 * weights)} of weights, gradients and "
                              f"optimiser state), and this machine has {_gib(have)} of memory", big.pos,
                              hint="lower the batch (--batch) or the input size")

    def fit(self, progress: bool = True, until: int | None = None):
        """Train to the configured epoch count (or stop after epoch `until`, as an
        interrupted run would; --resume then continues it exactly)."""
        os.makedirs(self.out, exist_ok=True)
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        stop = min(self.cfg["epochs"], until or self.cfg["epochs"])
        rec = {}
        if self.dist is not None:
            self.dist.start(self)       # rank 0's weights, optimiser and random state on every rank
        with MetricsLog(metrics_path) if self.writes else contextlib.nullcontext() as mlog:
            while self.epoch < stop:
                rec = self.train_epoch(progress)
                if self.dist is not None:   # batch-norm statistics averaged; weights checked identical
                    self.weights_digest = self.dist.end_epoch(self)
                if (self.epoch + 1) % self.cfg["eval_every"] == 0 or self.epoch + 1 == self.cfg["epochs"]:
                    rec.update(self.evaluate())
                self.epoch += 1
                rec.update(epoch=self.epoch, step=self.model.step, lr=self.opt.current_lr)
                if not self.writes:
                    continue
                mlog.log(**rec)
                self.log("epoch {epoch}: ".format(**rec) + "  ".join(
                    f"{k} {v:.4f}" for k, v in rec.items() if k not in ("epoch", "step", "lr")))
                save_checkpoint(self.ckpt_path, self.model.host_params(), self.opt.state_dict(), step=self.model.step,
                                epoch=self.epoch, rng=self.rng, spec_text=self.spec_text,
                                extra={"vocab": self.data.vocab} if self.data.vocab is not None else None)
        if self.writes:
            plot_metrics(metrics_path, os.path.join(self.out, "metrics.png"))
        return rec

    def train_epoch(self, progress: bool):
        tot = seen = 0.0
        seq = self.data.streams is not None
        bar = ProgressBar(len(self.train_loader), f"epoch {self.epoch + 1}/{self.cfg['epochs']}",
                          unit="tok" if seq else "img") if progress else None
        preds = [m.pred for m in self.metrics]
        parts = _parts(self.g.losses)       # each of several losses, shown and logged on its own
        carry = None
        for batch in self.train_loader:
            n = mine = len(next(iter(batch.values())))
            if self.dist is None:
                total, losses, outs, grads = self.model.train_step(self._feeds(batch), extra=preds, carry=carry,
                                                                   grad_flow=self.grad_flow is not None)
            else:   # the losses and gradients of every rank's examples (n of them)
                total, losses, outs, grads = self.dist.train_step(self._feeds(batch), mine, extra=preds, carry=carry)
                n = self.dist.last_n
            if self.carry_state:
                carry = self.model.carries
            if self.grad_flow is not None:
                self.grad_flow.add(self.model.grad_flow)
            if self.cfg["clip"]:
                self.clip(grads, self.cfg["clip"])
            self.opt.step(grads)
            del grads   # not alive while the next step makes its own (torch: zero_grad(set_to_none))
            tot += total * n
            seen += n
            for k in parts:
                parts[k] += losses[k] * n
            if mine:
                self._measure(batch, outs, losses)
            if bar:     # this step's losses, the epoch's metrics so far (distributed: rank 0's)
                bar.update(1, loss=total, images=next(iter(batch.values())).size * n // max(mine, 1) if seq else n,
                           **{_shown(k): losses[k] for k in parts},
                           **{k: v for m in self.metrics for k, v in m.result().items()})
        if bar:
            bar.close()
        if self.grad_flow is not None:
            self.grad_flow.end_epoch(self.epoch + 1)
        if self.dist is not None:
            self.dist.merge_metrics(self.metrics)
        return {"train_loss": tot / seen, **{f"train_{k}_loss": v / seen for k, v in parts.items()},
                **self._report("train_")}

    def evaluate(self) -> dict:
        tot = seen = 0.0
        losses = [l for l in self.g.losses if l.phase == "all"]
        parts = _parts(losses)
        carry = None
        for batch in self.test_loader:
            if not len(next(iter(batch.values()))):
                continue    # this rank's part of a short last batch (distributed) is empty
            out = self.model.infer(self._feeds(batch), want=[*{id(m.pred): m.pred for m in self.metrics}.values(),
                                                             *(l.name for l in losses)], carry=carry)
            if self.carry_state:
                carry = self.model.carries
            values = {l.name: float(out[l.name]) for l in losses}
            n = len(next(iter(batch.values())))
            tot += sum(l.weight * values[l.name] for l in losses) * n
            seen += n
            for k in parts:
                parts[k] += values[k] * n
            self._measure(batch, out, values)
        if self.dist is not None:   # every rank's part of the test set
            tot, seen, *sums = self.dist.sum([tot, seen, *parts.values()])
            parts = dict(zip(parts, sums))
            self.dist.merge_metrics(self.metrics)
        return {"test_loss": tot / max(seen, 1), **{f"test_{k}_loss": v / max(seen, 1) for k, v in parts.items()},
                **self._report("test_")}

    def predict(self, path: str, out_dir: str) -> dict:
        """Run the outputs on the inputs in `path`: a .npy for a spec whose outputs read
        one input, or an .npz with an array per input, named after it. Writes every
        output to predictions.npz (with class ids, argmax over the class axis, for
        logits) and the class ids of a classifier's logits to predictions.json."""
        from .checkpoint import atomic_write, read_arrays
        needed = [n for n, v in self.g.inputs.items()
                  if any(id(v) in inputs_of(self.g, o) for o in self.g.outputs.values())]
        arrays = read_arrays(path)
        if len(arrays) == 1 and len(needed) == 1:
            arrays = {needed[0]: next(iter(arrays.values()))}
        missing = [n for n in needed if n not in arrays]
        if missing:
            raise NetdslError(f"{path} has no array for input{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)}; found {', '.join(arrays) or 'none'}",
                              hint=f"the outputs read {describe_inputs(self.g)}; give an .npz with arrays named "
                                   "after the inputs")
        feeds = {}
        for n in needed:
            v, a = self.g.inputs[n], arrays[n]
            if a.ndim == v.rank - 1:        # one example
                a = a[None]
            a = convert(v, n, a, f"{path}: '{n}'")
            check_shape(self.g, n, a, f"{path}: '{n}'", {})
            if len(a) == 0:
                raise NetdslError(f"{path}: '{n}' holds no examples")
            f = self.fields.get(n)
            if f in self.norm:
                mean, std = self.norm[f]
                a = (a - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
            feeds[n] = a
        sizes = {len(a) for a in feeds.values()}
        if len(sizes) > 1:
            raise NetdslError(f"{path}: the inputs hold different numbers of examples: "
                              + ", ".join(f"{n} {len(a)}" for n, a in feeds.items()))
        total, b = sizes.pop(), self.cfg["batch"]
        parts: dict[str, list] = {n: [] for n in self.g.outputs}
        for i in range(0, total, b):
            out = self.model.infer({n: a[i:i + b] for n, a in feeds.items()}, want=list(self.g.outputs))
            for n, y in out.items():
                parts[n].append(y)
        result = {n: np.concatenate(p) for n, p in parts.items()}
        classes = {f"{n}_classes": y.argmax(1) for n, y in result.items()
                   if self.g.outputs[n].dtype.startswith("f") and y.ndim in (2, 4) and y.shape[1] > 1}
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, "predictions.npz"), lambda f: np.savez(f, **result, **classes))
        logits = [n for n in result if f"{n}_classes" in classes and result[n].ndim == 2]
        if len(logits) == 1:
            preds = classes[f"{logits[0]}_classes"].tolist()
            atomic_write(os.path.join(out_dir, "predictions.json"),
                         lambda f: f.write(json.dumps({"predictions": preds}).encode()))
        return {**result, **classes}


# the fields a COCO data set's flip moves with the images (datasets/coco.py, flip_horizontal)
MIRRORED = ("box", "boxes", "labels", "joints", "visible", "masks", "keypoints")
# what affine does with each per-object field of coco() and vg() data; any other field
# with a row per object (vg's captions) follows its object (runtime/affine.py)
OBJECT_ROLES = {"boxes": "boxes", "labels": "labels", "masks": "masks", "keypoints": "keypoints"}
AUGMENT_HINTS = {
    "crop": "crop moves images and per-pixel label maps; affine(scale, translate) also moves the objects "
            "(boxes, masks, keypoints) of coco() and vg() data",
    "flip": "flip moves images and per-pixel label maps, and the boxes and joints of coco() data",
    "affine": "affine moves images, per-pixel label maps and the objects of coco() and vg() detection data "
              "(boxes with labels, masks, keypoints: a row per object, so that one moved out of the image "
              "becomes padding); a single object's box or joints has no row to drop it into",
}


def _parts(losses) -> dict[str, float]:
    """Running sums of each loss (unweighted) when there are several (Faster R-CNN's
    rpn_cls, rpn_box, cls, box); none for one loss, which the total already is."""
    return {l.name: 0.0 for l in losses} if len(losses) > 1 else {}


def _shown(name: str) -> str:
    """A loss's name in the progress bar (suffixed where it is one of update's own arguments)."""
    return f"{name}_loss" if name in ("steps", "loss", "images") else name


def _metric_names(cfg: dict):
    m = cfg.get("metrics")
    return None if m is None else [c.name for c in m]


def _part(norm: dict, i: int) -> dict:
    return {f: ms[i] for f, ms in norm.items()}


def machine_memory() -> int:
    """Bytes of physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
