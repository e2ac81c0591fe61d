"""`netdsl run`: train, evaluate and predict from a spec (on the CPU, or a CUDA GPU with --device cuda).

The spec's train section gives the defaults; command-line flags override them. A run
directory holds metrics.jsonl, metrics.png and checkpoint.npz (written atomically).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import NetdslError
from ..ir.dims import fmt_shape
from ..ir.graph import Graph
from . import (Loader, MetricsLog, ProgressBar, channel_stats, clip_grad_norm, load_checkpoint, load_weights,
               make_optimizer, make_schedule, make_source, plot_metrics, save_checkpoint)
from .data import Dataset
from .model import Model


@dataclass
class Roles:
    """Which graph inputs take the images and the labels, and which output is the prediction."""
    image: str
    label: str | None
    logits: str | None


def roles(g: Graph) -> Roles:
    floats = [n for n, v in g.inputs.items() if v.dtype.startswith("f")]
    ints = [n for n, v in g.inputs.items() if v.dtype.startswith("i")]
    if len(floats) != 1 or len(ints) > 1:
        raise NetdslError(f"netdsl run trains networks with one image input and one label input; "
                          f"'{g.name}' has inputs {', '.join(g.inputs) or 'none'}", g.pos,
                          hint="detection, captioning and language-model data loaders are not in this version")
    logits = next((n for n, v in g.outputs.items() if v.rank == 2), None)
    return Roles(floats[0], ints[0] if ints else None, logits)


def synthetic(g: Graph, r: Roles, size: int, seed: int) -> Dataset:
    """Random images and labels shaped like the spec's inputs: for timing and smoke runs
    of networks whose real data (ImageNet) does not ship offline."""
    shape = [int(d) for d in g.inputs[r.image].shape[1:]]
    classes = int(g.outputs[r.logits].shape[1]) if r.logits else 10
    rng = np.random.default_rng(seed)
    x = rng.random((size + size // 4, *shape), dtype=np.float32)
    y = rng.integers(0, classes, len(x))
    return Dataset("synthetic", x[:size], y[:size], x[size:], y[size:], classes)


def load_data(g: Graph, r: Roles, cfg: dict, seed: int) -> Dataset:
    src = cfg["data"]
    if src.name == "synthetic":
        return synthetic(g, r, src.kwargs["size"], seed)
    if src.name in ("text", "coco"):
        raise NetdslError(f"data = {src.name}() is for recurrent and detection specs, which `netdsl run` "
                          f"does not train in this version", g.train_pos.get("data"))
    return make_source(src.name, **src.kwargs)


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
    def __init__(self, g: Graph, cfg: dict, out_dir: str, spec_text: str, log=print, device: str = "cpu"):
        self.g, self.cfg, self.out, self.spec_text, self.log = g, cfg, out_dir, spec_text, log
        self.device = device
        self.r = roles(g)
        self.model = Model(g, seed=cfg["seed"], device=device)
        self.data = load_data(g, self.r, cfg, cfg["seed"])
        self._check_data()
        self.rng = np.random.default_rng(cfg["seed"])
        mean, std = channel_stats(self.data.x_train) if cfg["normalize"] else (None, None)
        crop = next((a.kwargs["pad"] for a in cfg["augment"] if a.name == "crop"), 0)
        flip = any(a.name == "flip" for a in cfg["augment"])
        self.train_loader = Loader(self.data.x_train, self.data.y_train, cfg["batch"], rng=self.rng, shuffle=True,
                                   mean=mean, std=std, crop_padding=crop, flip=flip)
        self.test_loader = Loader(self.data.x_test, self.data.y_test, cfg["batch"], mean=mean, std=std)
        self.opt = _optimizer(cfg, self.model.trainable(), _schedule(cfg, len(self.train_loader)))
        self.clip = clip_grad_norm
        if device == "cuda":   # parameters, gradients and optimiser state stay on the device
            from . import cuda
            self.opt, self.clip = cuda.DeviceOptimizer(self.opt, self.model.trainable()), cuda.clip_grad_norm
        self.epoch = 0

    def _check_data(self):
        v = self.g.inputs[self.r.image]
        want = tuple(v.shape[1:])
        got = tuple(self.data.x_train.shape[1:])
        if want != got:
            raise NetdslError(f"the data set '{self.data.name}' has images of shape {fmt_shape(got)} but input "
                              f"'{self.r.image}' is declared {fmt_shape(v.shape)}", v.pos,
                              hint="change the input's shape or the train section's data")

    @property
    def ckpt_path(self):
        return os.path.join(self.out, "checkpoint.npz")

    def resume(self, path: str | None = None):
        c = load_checkpoint(path or self.ckpt_path, spec_text=self.spec_text)
        host = self.model.host_params()
        load_weights(host, c)
        self.model.params.update({k: self.model.target.upload(v) for k, v in host.items()})
        self.opt.load_state_dict(c.opt_state)
        self.rng.bit_generator.state = c.make_rng().bit_generator.state
        self.epoch, self.model.step = c.epoch, c.step

    def fit(self, progress: bool = True, until: int | None = None):
        """Train to the configured epoch count (or stop after epoch `until`, as an
        interrupted run would; --resume then continues it exactly)."""
        os.makedirs(self.out, exist_ok=True)
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        stop = min(self.cfg["epochs"], until or self.cfg["epochs"])
        rec = {}
        with MetricsLog(metrics_path) as mlog:
            while self.epoch < stop:
                rec = self.train_epoch(progress)
                if (self.epoch + 1) % self.cfg["eval_every"] == 0 or self.epoch + 1 == self.cfg["epochs"]:
                    rec.update(self.evaluate())
                self.epoch += 1
                rec.update(epoch=self.epoch, step=self.model.step, lr=self.opt.current_lr)
                mlog.log(**rec)
                self.log("epoch {epoch}: ".format(**rec) + "  ".join(
                    f"{k} {v:.4f}" for k, v in rec.items() if k not in ("epoch", "step", "lr")))
                save_checkpoint(self.ckpt_path, self.model.host_params(), self.opt.state_dict(), step=self.model.step,
                                epoch=self.epoch, rng=self.rng, spec_text=self.spec_text)
        plot_metrics(metrics_path, os.path.join(self.out, "metrics.png"))
        return rec

    def train_epoch(self, progress: bool):
        tot = correct = seen = 0.0
        bar = ProgressBar(len(self.train_loader), f"epoch {self.epoch + 1}/{self.cfg['epochs']}") if progress else None
        for xb, yb in self.train_loader:
            feeds = {self.r.image: xb, **({self.r.label: yb} if self.r.label else {})}
            total, _, outs, grads = self.model.train_step(feeds)
            if self.cfg["clip"]:
                self.clip(grads, self.cfg["clip"])
            self.opt.step(grads)
            del grads   # not alive while the next step makes its own (torch: zero_grad(set_to_none))
            tot += total * len(xb)
            seen += len(xb)
            if self.r.logits in outs and self.r.label:
                correct += float((outs[self.r.logits].argmax(1) == yb).sum())
            if bar:
                bar.update(1, loss=total, images=len(xb))
        if bar:
            bar.close()
        rec = {"train_loss": tot / seen}
        if self.r.logits and self.r.label:
            rec["train_acc"] = correct / seen
        return rec

    def evaluate(self) -> dict:
        tot = correct = seen = 0.0
        losses = [l for l in self.g.losses if l.phase == "all"]
        for xb, yb in self.test_loader:
            feeds = {self.r.image: xb, **({self.r.label: yb} if self.r.label else {})}
            out = self.model.infer(feeds, want=[*([self.r.logits] if self.r.logits else []),
                                                *(l.name for l in losses)])
            tot += sum(l.weight * float(out[l.name]) for l in losses) * len(xb)
            if self.r.logits and self.r.label:
                correct += float((out[self.r.logits].argmax(1) == yb).sum())
            seen += len(xb)
        rec = {"test_loss": tot / max(seen, 1)}
        if self.r.logits and self.r.label:
            rec["test_acc"] = correct / max(seen, 1)
        return rec

    def predict(self, path: str, out_path: str):
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise NetdslError(f"cannot read '{path}' as .npy/.npz: {e}") from None
        x = arr[arr.files[0]] if hasattr(arr, "files") else arr
        x = np.asarray(x, np.float32)
        want = tuple(int(d) for d in self.g.inputs[self.r.image].shape[1:])
        if x.shape == want:
            x = x[None]
        if tuple(x.shape[1:]) != want:
            raise NetdslError(f"'{path}' holds images of shape {list(x.shape)}; the network takes "
                              f"[N, {', '.join(map(str, want))}]")
        if self.cfg["normalize"]:
            mean, std = channel_stats(self.data.x_train)
            x = (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        preds = []
        for i in range(0, len(x), self.cfg["batch"]):
            logits = self.model.infer({self.r.image: x[i:i + self.cfg["batch"]]}, want=[self.r.logits])[self.r.logits]
            preds += logits.argmax(1).tolist()
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"predictions": preds}, f)
        os.replace(tmp, out_path)
        return preds
