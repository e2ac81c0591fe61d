"""The `netdsl` command: compile, render (and, with the runtime, run)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .errors import NetdslError

EXIT_USER = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 too; keep our format
        self.print_usage(sys.stderr)
        print(f"netdsl: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER)


def parse_sets(items) -> dict:
    """--set name=value; values are numbers, true/false or strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise NetdslError(f"--set expects name=value, got '{item}'")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k.isidentifier():
            raise NetdslError(f"--set: '{k}' is not a valid name")
        v = v.strip()
        if v in ("true", "false"):
            out[k] = v == "true"
        else:
            try:
                out[k] = int(v) if len(v) <= 40 else float(v)   # Python refuses ints past 4300 digits
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
        from .lang.limits import MAX_INT
        x = out[k]
        if isinstance(x, float) and not math.isfinite(x) or type(x) is int and abs(x) > MAX_INT:
            raise NetdslError(f"--set {k}={v[:30]}{'...' if len(v) > 30 else ''}: "
                              + ("too large" if type(x) is int or v.lstrip("+-").isdigit() else "not a finite number"),
                              hint=f"numbers are 64-bit integers (at most {MAX_INT:,}) or finite floats")
    return out


def load_graph(args):
    from .lang.elaborate import elaborate
    g, loader = elaborate(args.spec, getattr(args, "network", None), parse_sets(getattr(args, "set", None)))
    args._sources = loader.sources
    return g


def cmd_compile(args):
    from . import report
    if args.batch is not None and args.batch < 1:
        raise NetdslError(f"--batch must be positive, got {args.batch}")
    g = load_graph(args)
    if args.json:
        out = report.to_json(g)
        if args.explain:
            out["plan"] = report.plan_json(g, args.batch)
        print(json.dumps(out, indent=1))
        return 0
    print(report.table(g))
    if args.explain:
        print()
        print(report.explain(g, args.batch))
    if args.device == "cuda":
        print()
        print(report.device_memory(g, args.batch))
    return 0


def cmd_render(args):
    from .render import render
    g = load_graph(args)
    if args.backward:
        from .autodiff import build
        g = build(g).as_graph()
    scene = render(g, args.output, depth=args.depth, expand=args.expand, rankdir=args.rankdir,
                   stack=not args.each_op, legend=not args.no_legend)
    print(f"wrote {args.output} ({len(scene.boxes)} boxes)")
    return 0


def cmd_import(args):
    from .convert import import_network
    if args.weights_out and not args.weights:
        raise NetdslError("--weights-out needs --weights FILE (the weights to convert)")
    spec, wpath, n = import_network(args.file, args.output, args.weights, args.weights_out, args.network)
    print(f"wrote {spec}" + (f" and {wpath} ({n:,} values)" if wpath else ""))
    return 0


def cmd_ops(args):
    from .ops import OPS, REQUIRED
    from .ops.registry import _show
    names = sorted(OPS) if not args.name else args.name
    for n in names:
        if n not in OPS:
            from .errors import did_you_mean
            raise NetdslError(f"unknown operator '{n}'", hint=did_you_mean(n, OPS))
        op = OPS[n]
        attrs = ", ".join(a.name if a.default is REQUIRED else f"{a.name}={_show(a.default)}" for a in op.attrs)
        ins = ", ".join(op.inputs)
        flag = "" if op.differentiable else "  [no gradient]"
        print(f"{n}({ins}{'; ' if ins and attrs else ''}{attrs}){flag}")
        if op.doc:
            print("    " + op.doc.splitlines()[0])
    return 0


def cmd_run(args):
    if not args.distributed:
        return _run(args, None)
    from .runtime.distributed import connect
    if args.predict or args.sample or args.grad_flow or args.device != "cpu":
        flag = ("--predict" if args.predict else "--sample" if args.sample else "--grad-flow" if args.grad_flow
                else f"--device {args.device}")
        raise NetdslError(f"--distributed trains and evaluates on the CPU; it does not take {flag}",
                          hint="drop --distributed for this (docs/mpi.md)")
    dist = connect()    # before any work: mpi4py and an MPI launcher, or a clear error
    return dist.guarded(lambda: _run(args, dist), lambda e: e.render(getattr(args, "_sources", None)))


def _run(args, dist):
    """netdsl run; with dist, as one rank of a data-parallel MPI job (rank 0 alone writes and prints)."""
    from .kernels import native
    from .lang.training import TrainCall
    from .runtime.train import Trainer
    from .runtime.detection import check_threshold
    from .runtime.vision import is_image_path, predict_images
    if args.device == "cuda":
        from .runtime.cuda import require_gpu
        require_gpu()   # no GPU: a clear error before any work
    if args.threads is not None:
        if not 1 <= args.threads <= native.max_threads():
            raise NetdslError(f"--threads must be between 1 and {native.max_threads()}")
        native.set_num_threads(args.threads)
    g = load_graph(args)
    if args.predict and is_image_path(args.predict):     # a detector draws what it detects at training = false
        from .runtime.detection import inference_graph
        sets = parse_sets(args.set)
        g, args._sources = inference_graph(args.spec, args.network, sets, sets, g, args._sources)
    score_threshold = check_threshold(args.score_threshold)
    check_partial(args)
    cfg = dict(g.train)
    for flag, key in (("epochs", "epochs"), ("batch", "batch"), ("seed", "seed")):
        v = getattr(args, flag)
        if v is not None:
            if v < (0 if key == "seed" else 1):
                raise NetdslError(f"--{flag} must be {'0 or more' if key == 'seed' else 'positive'}, got {v}")
            cfg[key] = v
    if args.lr is not None:
        if not args.lr > 0:
            raise NetdslError(f"--lr must be positive, got {args.lr}")
        cfg["optimizer"] = TrainCall(cfg["optimizer"].name, dict(cfg["optimizer"].kwargs, lr=args.lr))
    if args.data:
        cfg["data"] = data_flag(args.data, cfg["data"])
    out = run_dir(args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.spec))[0]),
                  "--out" if args.out else "the run directory")
    spec_text = "".join(args._sources.values())
    root = dist is None or dist.root
    t = Trainer(g, cfg, out, spec_text, log=(lambda s: print(s, flush=True)) if root else (lambda s: None),
                device=args.device, training=not (args.eval or args.predict), dist=dist)
    if (args.resume or args.eval or args.predict or args.weights) and root:     # other ranks: rank 0's, below
        load_run_weights(t, args.weights, resume=args.resume, fresh=not (args.eval or args.predict),
                         partial=args.weights_partial)
    if dist is not None:
        dist.start(t)
    from .runtime.caption import is_captioner, predict_captions
    from .runtime.densecap import is_dense_captioner, predict_regions
    if args.predict and is_image_path(args.predict) and is_dense_captioner(g):
        for rec in predict_regions(t, args.predict, out, score_threshold):
            print(f"{rec['file']}: " + ("; ".join(f"{r['caption']} ({r['score']:.2f})" for r in rec["regions"])
                                        or "no region") + f"  -> {rec['overlay']}")
        return 0
    if args.predict and is_image_path(args.predict) and is_captioner(g):
        for rec in predict_captions(t, args.predict, out, sample=args.sample, seed=cfg["seed"]):
            print(f"{rec['file']}: {rec['caption']}" + (f"  (attention: {rec['attention']})" if "attention" in rec
                                                       else ""))
        return 0
    if args.predict and is_image_path(args.predict):
        written = predict_images(t, args.predict, out, score_threshold)
        print(f"{len(written)} overlay(s) written to {os.path.dirname(written[0])}: "
              + ", ".join(os.path.basename(w) for w in written[:10]) + (" ..." if len(written) > 10 else ""))
        return 0
    if args.predict:
        result = t.predict(args.predict, out)
        classes = [k for k in result if k.endswith("_classes") and result[k].ndim == 1]
        n = len(next(iter(result.values())))
        print(f"{n} predictions written to {out}/predictions.npz ({', '.join(result)})")
        if len(classes) == 1:
            preds = result[classes[0]].tolist()
            print(f"{out}/predictions.json: {preds[:20]}{' ...' if len(preds) > 20 else ''}")
        return 0
    if args.eval:
        result = t.evaluate()
        if root:
            print("  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return 0
    if root:
        ranks = f" on each of {dist.size} ranks (global batch {cfg['batch'] * dist.size})" if dist else ""
        print(f"training {g.name} on {t.data.name}: {t.data.size('train')} train / {t.data.size('test')} test, "
              f"{cfg['epochs']} epochs of batch {cfg['batch']}{ranks}, {native.get_num_threads()} threads -> {out}",
              flush=True)
    if args.grad_flow:
        t.record_grad_flow()
    from .runtime.sample import write_run_file
    if root:
        write_run_file(out, args.spec, args.network, parse_sets(args.set), data_record(args.data))
    t.fit(progress=not args.no_progress and root)
    if dist is not None and root and getattr(t, "weights_digest", None):
        print(f"weights identical on all {dist.size} ranks: sha256 {t.weights_digest}", flush=True)
    if root:
        print(f"wrote {out}/metrics.jsonl, {out}/metrics.png, {out}/checkpoint.npz")
    return 0


def cmd_data_shapes(args):
    from .datasets import shapes
    m = _generate(args, shapes, "shapes", args.images * len(shapes.SETS))
    print(f"wrote {args.out}: {args.images} images of {args.size}x{args.size} per set ("
          + ", ".join(f"{n} in {os.path.normpath(os.path.join(args.out, s['root']))}" for n, s in m["sets"].items())
          + f"); previews in {os.path.join(args.out, 'preview')}")
    return 0


def _generate(args, module, what: str, total: int, **extra) -> dict:
    """A generator run with a progress bar of `total` images, its options checked before the bar starts;
    `extra`: the generator's own options."""
    from .datasets import shapes
    from .runtime.progress import ProgressBar
    shapes.check_options(args.images, args.size, args.val_fraction)
    module.check_target(args.out)
    bar = None if args.no_progress else ProgressBar(total, what)
    try:
        return module.generate(args.out, images=args.images, size=args.size, seed=args.seed,
                               val_fraction=args.val_fraction, progress=bar.update if bar else None, **extra)
    finally:
        if bar:
            bar.close()


def cmd_data_shapes_captions(args):
    from .datasets import shapes_captions
    shapes_captions.check_order(args.order)
    m = _generate(args, shapes_captions, "shapes-captions", args.images, order=args.order)
    print(f"wrote {args.out}: {args.images} images of {args.size}x{args.size} with captions "
          f"({', '.join(m['annotations'].values())}, instances beside them); preview "
          f"{os.path.join(args.out, 'preview', 'captions.png')}")
    return 0


def cmd_data_shapes_regions(args):
    from .datasets import shapes_regions
    m = _generate(args, shapes_regions, "shapes-regions", args.images)
    print(f"wrote {args.out}: {args.images} images of {args.size}x{args.size} with {m['regions']} region "
          f"descriptions (Visual Genome's {', '.join(m['files'])}); preview "
          f"{os.path.join(args.out, 'preview', 'regions.png')}")
    return 0


def cmd_data_proposals(args):
    import time
    from .datasets import proposal_cache as pc
    from .runtime.progress import ProgressBar
    k = None
    if args.k is not None:
        try:
            k = tuple(float(v) for v in args.k.split(",") if v.strip())
        except ValueError:
            raise NetdslError(f"--k must be numbers separated by commas, got '{args.k}'", hint="e.g. --k 50,100") \
                from None
    params = pc.request(k=k, strategies=args.strategies, max_boxes=args.max_boxes, seed=args.seed)
    splits = pc.splits_of(args.dir, args.split, args.ann)        # every file checked before the bar starts
    bar = None if args.no_progress else ProgressBar(sum(len(s.images) for s in splits), "proposals")
    made = []
    try:
        for s in splits:
            t0 = time.perf_counter()
            made.append((s, pc.make_proposals(s, params, progress=bar.update if bar else None),
                         time.perf_counter() - t0))
    finally:
        if bar:
            bar.close()
    for s, p, seconds in made:
        n = len(s.images)
        r, g = pc.recall(p, s)
        print(f"wrote {p.path}: {n} images, {len(p.boxes) / max(n, 1):.0f} boxes per image on average (at most "
              f"{params['max_boxes']}), {seconds / max(n, 1):.2f} s per image"
              + (f"; recall {r:.3f} of {g} ground-truth boxes at IoU 0.5" if g else ""))
    return 0


def check_partial(args):
    """--weights-partial starts training from the named subset of --weights FILE: the rest
    keeps its initialiser, so there is nothing to evaluate, predict with or resume."""
    if not args.weights_partial:
        return
    if not args.weights:
        raise NetdslError("--weights-partial needs --weights FILE (the weights to take the shared names from)")
    for flag, on in (("--resume", args.resume), ("--eval", args.eval), ("--predict", args.predict)):
        if on:
            raise NetdslError(f"--weights-partial starts training from part of a network's weights; it does not "
                              f"take {flag}", hint=f"drop --weights-partial: {flag} needs every parameter, "
                                                   "which --weights FILE alone checks")


def load_run_weights(t, weights: str | None, *, resume: bool, fresh: bool, partial: bool = False):
    """--resume, --weights, --eval and --predict: a netdsl checkpoint resumes (or is
    evaluated) as it was saved; a weights file by name (.safetensors, .npz, or a
    checkpoint when training starts from it) only sets parameters and buffers; with
    `partial` (--weights-partial), only those whose names the network shares."""
    from .runtime.weights import by_name, load_into, refuse_pickle
    path = weights or t.ckpt_path
    if weights:
        refuse_pickle(weights)
    if not os.path.exists(path):
        raise NetdslError(f"no checkpoint at '{path}'", hint="train first, or give --weights FILE")
    if partial:
        _load_partial(t, path)
        return
    named = by_name(path)
    if resume and named:
        raise NetdslError(f"--resume continues a netdsl checkpoint; {path} holds only weights",
                          hint="drop --resume: --weights FILE alone starts training from those weights")
    if not named and (resume or not fresh):     # (a damaged checkpoint is reported as one)
        if not resume and not _same_spec(path, t.spec_text):
            # evaluating or predicting after an edit of the spec (a comment, a default the
            # parameters do not depend on): the weights load by name, shapes checked
            print(f"note: {path} was saved from an earlier version of the spec; loading its weights by name",
                  file=sys.stderr)
        else:
            t.resume(path)
            return
    load_into(t.model, path, log=lambda s: print(s, file=sys.stderr))
    print(f"loaded {len(t.g.params)} parameters and buffers by name from {path}", file=sys.stderr)


def _load_partial(t, path: str):
    from .runtime.weights import grouped_names, load_partial
    loaded, kept, unused = load_partial(t.model, path, log=lambda s: print(s, file=sys.stderr))
    print(f"loaded {len(loaded)} of the network's {len(t.g.params)} parameters and buffers by name from {path} "
          f"(--weights-partial)", file=sys.stderr)
    if kept:
        print(f"kept their initialiser ({len(kept)}): {grouped_names(kept)}", file=sys.stderr)
    if unused:
        print(f"not in the network, unused ({len(unused)}): {grouped_names(unused)}", file=sys.stderr)


def _same_spec(path: str, spec_text: str) -> bool:
    from .runtime.checkpoint import load_checkpoint, spec_hash
    return load_checkpoint(path).spec_hash == spec_hash(spec_text)


def cmd_export(args):
    """A run's checkpoint (or a spec's weights file) as a weights file by name
    (.safetensors or .npz, -o) and/or as an ONNX model of its inference graph (--onnx)."""
    from .lang.elaborate import elaborate
    from .runtime.sample import read_run_file
    from .runtime.weights import save_named
    if not args.output and not args.onnx:
        raise NetdslError("netdsl export writes -o FILE.{safetensors,npz} (weights by name), --onnx FILE.onnx, "
                          "or both", hint="e.g. netdsl export runs/resnet18 --onnx resnet18.onnx")
    if args.onnx and os.path.splitext(args.onnx)[1].lower() != ".onnx":
        raise NetdslError(f"--onnx {args.onnx}: the ONNX model's file name ends in .onnx")
    sets = parse_sets(args.set)
    if os.path.isfile(args.run) or args.run.endswith(".net"):    # a spec: its weights come from --weights
        g, loader = elaborate(args.run, args.network, sets)
        if not args.weights:
            raise NetdslError(f"{args.run} is a spec; give its weights with --weights FILE (a checkpoint, "
                              ".safetensors or .npz)", hint="or give the run directory: netdsl export RUN_DIR ...")
        path = args.weights
    else:
        info = read_run_file(args.run)
        g, loader = elaborate(info["spec"], args.network or info["network"], {**info["set"], **sets})
        path = args.weights or os.path.join(args.run, "checkpoint.npz")
    args._sources = loader.sources
    params, meta = export_weights(g, path, "".join(loader.sources.values()), given=bool(args.weights))
    if args.onnx:   # first: an operator ONNX lacks stops the command before anything is written
        from .convert.onnx_export import OPSET, export_onnx
        outputs = [o.strip() for o in args.outputs.split(",") if o.strip()] if args.outputs else None
        model = export_onnx(g, params, args.onnx, outputs)
        gr = model.graph
        print(f"wrote {args.onnx}: ONNX opset {OPSET}, {len(gr.node)} nodes, inputs "
              f"{', '.join(i.name for i in gr.input)} -> outputs {', '.join(o.name for o in gr.output)}")
    if args.output:
        names = save_named(g, params, args.output, metadata={"format": "netdsl-weights", "network": g.name, **meta})
        print(f"wrote {args.output}: {len(names)} tensors of {g.name}" + (f" (step {meta['step']})" if meta else ""))
    return 0


def export_weights(g, path: str, spec_text: str, given: bool) -> tuple[dict, dict]:
    """The parameters `netdsl export` writes: a netdsl checkpoint of this spec (and its
    step and epoch), or a weights file by name; every name and shape checked."""
    from .runtime.checkpoint import load_checkpoint
    from .runtime.weights import by_name, check_params, load_named, refuse_pickle
    refuse_pickle(path)
    if not os.path.exists(path):
        raise NetdslError(f"no weights file at '{path}'") if given else \
            NetdslError(f"no checkpoint at '{path}'", hint="train first, or give --weights FILE")
    if by_name(path):
        return load_named(g, path, log=lambda s: print(s, file=sys.stderr)), {}
    ckpt = load_checkpoint(path, spec_text=spec_text)
    check_params(g, ckpt.params, f"checkpoint {path}")
    return ckpt.params, {"step": ckpt.step, "epoch": ckpt.epoch}


def cmd_sample(args):
    from .lang.elaborate import elaborate
    from .runtime.checkpoint import load_checkpoint, load_weights
    from .runtime.model import Model
    from .runtime.sample import generate, read_run_file
    if args.n < 0:
        raise NetdslError(f"-n must be 0 or more, got {args.n}")
    info = read_run_file(args.run)
    sets = dict(info["set"])
    if args.temperature is not None:
        sets["temperature"] = args.temperature
    g, loader = elaborate(info["spec"], info["network"], sets)
    path = args.weights or os.path.join(args.run, "checkpoint.npz")
    if not os.path.exists(path):
        raise NetdslError(f"no checkpoint at '{path}'", hint="train first, or give --weights FILE")
    ckpt = load_checkpoint(path, spec_text="".join(loader.sources.values()))
    vocab = ckpt.extra.get("vocab")
    if not isinstance(vocab, str) or not vocab:
        raise NetdslError(f"checkpoint {path} holds no vocabulary: it was not trained on text()")
    m = Model(g, seed=args.seed)
    host = m.host_params()
    load_weights(host, ckpt)
    m.params = host
    print(generate(m, vocab, args.prime, args.n))
    return 0


def cmd_eval(args):
    from .kernels import native
    from .lang.elaborate import elaborate
    from .runtime.sample import read_run_file
    from .runtime.train import Trainer
    from .runtime.detection import inference_graph
    from .runtime.vision import evaluate_run
    if args.threads is not None:
        if not 1 <= args.threads <= native.max_threads():
            raise NetdslError(f"--threads must be between 1 and {native.max_threads()}")
        native.set_num_threads(args.threads)
    info = read_run_file(args.run)
    sets = {**info["set"], **parse_sets(args.set)}
    g, loader = elaborate(info["spec"], info["network"], sets)
    args._sources = loader.sources
    # a detector trained at training = true detects at training = false (same parameters)
    g, sources = inference_graph(info["spec"], info["network"], sets, parse_sets(args.set), g, loader.sources)
    args._sources = sources
    cfg = dict(g.train)
    if args.batch is not None:
        if args.batch < 1:
            raise NetdslError(f"--batch must be positive, got {args.batch}")
        cfg["batch"] = args.batch
    data = args.data or info.get("data")
    if data:
        cfg["data"] = data_flag(data, cfg["data"])
    path = args.weights or os.path.join(args.run, "checkpoint.npz")
    if not os.path.exists(path):
        raise NetdslError(f"no checkpoint at '{path}'", hint="train first, or give --weights FILE")
    t = Trainer(g, cfg, args.run, "".join(sources.values()), training=False)
    load_run_weights(t, args.weights, resume=False, fresh=False)
    _, report = evaluate_run(t, args.run)
    print(report)
    print(f"wrote {os.path.join(args.run, 'eval.json')}")
    return 0


def data_record(text: str | None) -> str | None:
    """--data as run.json keeps it: a source's path made absolute, so `netdsl eval`
    finds the data from any directory."""
    from .lang.training import CONSTRUCTORS
    if not text:
        return None
    name, colon, arg = text.partition(":")
    spec = CONSTRUCTORS["data"].get(name) or {}
    if colon and next(iter(spec), None) == "path" and not arg.startswith("~"):
        return f"{name}:{os.path.abspath(arg)}"
    return text


def data_flag(text: str, base=None):
    """--data NAME or NAME:ARG, checked like the train section's `data = NAME(...)`:
    ARG is the source's first argument (a path; synthetic's size). `base`, the spec's
    own data call: --data coco:DIR keeps its other arguments (ann, size, task, ...), so
    pose.net's coco(ann = "person_keypoints", size = size) reads another directory alike."""
    from .lang.training import CONSTRUCTORS, TrainCall, check_setting
    name, colon, arg = text.partition(":")
    spec = CONSTRUCTORS["data"].get(name)
    kwargs = {}
    if colon and spec is not None:
        if not spec:
            raise NetdslError(f"--data {text}: {name} takes no argument after ':'")
        key, (kind, _) = next(iter(spec.items()))
        if kind == "integer":
            try:
                kwargs[key] = int(arg)
            except ValueError:
                raise NetdslError(f"--data {text}: {name}'s {key} must be an integer, got '{arg}'",
                                  hint=f"e.g. --data {name}:256") from None
        else:
            kwargs[key] = arg
        if name == "coco" and base is not None and base.name == name:
            kwargs = {**{k: v for k, v in base.kwargs.items() if k != key}, **kwargs}
    try:
        return check_setting("data", TrainCall(name, kwargs), None, None)
    except NetdslError as e:
        raise NetdslError(f"--data {text}: {e.message}", hint=e.hint) from None


def run_dir(path: str, what: str) -> str:
    """The run directory, created if need be; anything that cannot hold a run is an error."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NetdslError(f"{what} {path} exists and is not a directory", hint="give a directory for the run's files")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise NetdslError(f"{what} {path} cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise NetdslError(f"{what} {path} is not writable")
    return path


def cmd_fmt(args) -> int:
    from .lang.fmt import fmt_files
    return fmt_files(args.files, write=args.write, check=args.check)


def build_parser():
    p = _Parser(prog="netdsl", description="netdsl: check, draw, train and run neural network specs")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def spec_args(sp):
        sp.add_argument("spec", help="the .net file")
        sp.add_argument("--network", help="which network, when the file defines several")
        sp.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override a network parameter or fix a symbolic dimension (repeatable)")

    c = sub.add_parser("compile", help="check a spec; print every node's shape, parameters and mult-adds")
    spec_args(c)
    c.add_argument("--json", action="store_true", help="machine-readable report (see docs/cli.md)")
    c.add_argument("--explain", action="store_true",
                   help="plan the training step: fused kernels, in-place steps, peak memory before/after planning")
    c.add_argument("--batch", type=int, help="batch size for --explain's memory figures (default: the train section's)")
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: also report the device memory a training step needs (no GPU needed)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("render", help="draw the graph with Graphviz (.svg .png .pdf .dot)")
    spec_args(r)
    r.add_argument("-o", "--output", required=True, help="output file; the extension picks the format")
    r.add_argument("--depth", type=int, default=None,
                   help="block nesting depth to draw; deeper blocks are one box (default: whole network, "
                        "with repeated blocks folded)")
    r.add_argument("--backward", action="store_true",
                   help="draw the training graph: the forward pass and the backward pass netdsl generated")
    r.add_argument("--expand", action="store_true", help="draw repeated blocks one by one instead of folding")
    r.add_argument("--rankdir", default="TB", choices=("TB", "LR", "BT", "RL"),
                   help="direction of flow: TB top to bottom (default), LR left to right")
    r.add_argument("--each-op", action="store_true",
                   help="one box per operator (default: conv -> bn -> relu chains share a box)")
    r.add_argument("--no-legend", action="store_true", help="leave out the legend")
    r.set_defaults(fn=cmd_render)
    t = sub.add_parser("run", help="train (default), evaluate or predict with a spec")
    spec_args(t)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--lr", type=float, help="learning rate (the optimizer's lr)")
    t.add_argument("--data", help="data source, NAME or NAME:ARG: digits, mnist:PATH, fashion_mnist, cifar10:PATH, "
                                   "npz:PATH, text:PATH, coco:DIR, coco_captions:DIR, vg:DIR, synthetic:SIZE, or a "
                                   "sequence task (digit_rows, polarity, copy:TASK, echo:DELAY, count_up, "
                                   "translated_digits, recall:DELAY); see docs/cli.md")
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    t.add_argument("--seed", type=int)
    t.add_argument("--out", help="run directory (default runs/SPEC)")
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    t.add_argument("--weights", metavar="FILE",
                   help="weights to evaluate/predict with or start training from: a netdsl checkpoint, or by "
                        "name a .safetensors or .npz (a PyTorch state dict converted); with --resume, the checkpoint")
    t.add_argument("--weights-partial", action="store_true",
                   help="with --weights FILE, start training from the parameters and buffers whose names the "
                        "network shares with the file (a pretrained trunk under a new head); the rest keep their "
                        "initialiser. A shared name of another shape is an error")
    t.add_argument("--sample", action="store_true",
                   help="with --predict on a captioning spec: sample each word instead of the most likely")
    t.add_argument("--eval", action="store_true", help="evaluate the checkpoint on the test split")
    t.add_argument("--predict", metavar="FILE",
                   help="run the outputs on a .npy (one input) or .npz (an array per input, named after it); "
                        "on an image or a directory of images, draw the predictions over them (overlay PNGs)")
    t.add_argument("--score-threshold", type=float, default=0.5, metavar="P",
                   help="with --predict on images, a detector draws the detections scoring at least P (default 0.5)")
    t.add_argument("--grad-flow", action="store_true",
                   help="record the norm of dL/dh_t for every recurrent state and time step; "
                        "writes grad_flow.json and grad_flow.png")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel training as one rank of an MPI job: mpirun -n K netdsl run SPEC "
                        "--distributed (batch is per rank; see docs/mpi.md)")
    t.set_defaults(fn=cmd_run)

    d = sub.add_parser("data", help="make data sets in standard formats (see docs/data.md)")
    dsub = d.add_subparsers(dest="what", required=True, parser_class=_Parser)
    for name, fn, images, per, help_ in (
            ("shapes", cmd_data_shapes, 300, "images per set",
             "synthetic COCO-format shapes, single-object and stick-figure pose sets"),
            ("shapes-captions", cmd_data_shapes_captions, 1000, "images",
             "synthetic COCO captions: one or two coloured shapes per image, captions such as "
             "'a red circle left of a blue square'"),
            ("shapes-regions", cmd_data_shapes_regions, 1000, "images",
             "synthetic dense captioning data in Visual Genome's format: regions described as "
             "'a small red circle near the top'")):
        g = dsub.add_parser(name, help=help_)
        g.add_argument("out", help="directory to write (new, empty, or one this command wrote before)")
        g.add_argument("--images", type=int, default=images, help=f"{per}, train and val together (default {images})")
        g.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
        g.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default 0)")
        g.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val (default 0.2)")
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "shapes-captions":
            g.add_argument("--order", default="both", metavar="{both,reading}",
                           help="how two shapes are named: both (default: each two-shape image captioned both "
                                "ways, the converse a second reference) or reading (one caption, the left shape "
                                "first, or the upper one when stacked)")
        g.set_defaults(fn=fn)

    dp = dsub.add_parser("proposals", help="selective search region proposals for R-CNN, cached in "
                                           "DIR/proposals/selective_search_SPLIT.npz")
    dp.add_argument("dir", help="a COCO-format data set (annotations/ANN_SPLIT.json and its images)")
    dp.add_argument("--split", action="append", help="a split to run (repeatable; default: train and val, "
                                                     "those that have annotation files)")
    dp.add_argument("--ann", default="instances", help="annotation file stem (default instances)")
    dp.add_argument("--max-boxes", type=int, default=2000, help="best boxes kept per image (default 2000)")
    dp.add_argument("--strategies", default="fast",
                    help="fast (default), quality, single, or SPACE:TERMS,... such as hsv:ctsf,lab:tsf "
                         "(see docs/proposals.md)")
    dp.add_argument("--k", help="Felzenszwalb scales, e.g. 50,100 (default: the strategies' own)")
    dp.add_argument("--seed", type=int, default=0, help="seed of the ranking's random factor (default 0)")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar")
    dp.set_defaults(fn=cmd_data_proposals)

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on its data's test split (COCO: COCOeval, mIoU, "
                                     "PCK; predictions as a COCO results file)")
    ev.add_argument("run", help="the run directory (netdsl run ... --out DIR)")
    ev.add_argument("--data", help="data source NAME or NAME:ARG (default: the run's)")
    ev.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="override a network parameter of the run's (e.g. sliding_window's stride=1)")
    ev.add_argument("--weights", help="checkpoint (default: the run's)")
    ev.add_argument("--batch", type=int, help="examples per inference batch (default: the train section's)")
    ev.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("export", help="write a run's weights by name (PyTorch's) to .safetensors or .npz, "
                                       "or its inference graph to ONNX (see docs/cli.md)")
    ex.add_argument("run", metavar="RUN_DIR|SPEC",
                    help="the run directory (netdsl run ... --out DIR), or a .net spec with --weights")
    ex.add_argument("-o", "--output", help="weights file by name; the extension picks the format")
    ex.add_argument("--onnx", metavar="FILE.onnx", help="the inference graph as an ONNX model (opset 17)")
    ex.add_argument("--weights", help="checkpoint, .safetensors or .npz (default: the run's checkpoint; "
                                      "needed with a SPEC)")
    ex.add_argument("--outputs", metavar="NAME,...", help="with --onnx: only these outputs (default: all)")
    ex.add_argument("--network", help="which network, when the spec defines several")
    ex.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="override a network parameter or fix a symbolic dimension (repeatable)")
    ex.set_defaults(fn=cmd_export)

    sm = sub.add_parser("sample", help="generate text from a trained character-level language model")
    sm.add_argument("run", help="the run directory (netdsl run ... --out DIR)")
    sm.add_argument("--prime", default="", help="text to read before sampling (default: none)")
    sm.add_argument("--temperature", type=float, help="below 1 sharpens the distribution, above 1 flattens it "
                                                      "(sets the spec's temperature)")
    sm.add_argument("-n", type=int, default=500, help="characters to generate (default 500)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--weights", help="checkpoint (default: the run's)")
    sm.set_defaults(fn=cmd_sample)

    im = sub.add_parser("import", help="convert a Darknet .cfg or Caffe .prototxt (and its weights) to a .net "
                                       "spec (see docs/cli.md)")
    im.add_argument("file", help="a darknet .cfg or a Caffe .prototxt")
    im.add_argument("-o", "--output", required=True, help="the .net file to write")
    im.add_argument("--weights", help="darknet .weights or Caffe .caffemodel to convert too")
    im.add_argument("--weights-out", help="where the converted weights go, .npz or .safetensors, by parameter "
                                          "path (default: OUT with .npz)")
    im.add_argument("--network", help="the network's name (default: from the file)")
    im.set_defaults(fn=cmd_import)

    fm = sub.add_parser("fmt", help="print specs in the canonical layout; -w rewrites them, --check lists "
                                    "those that would change (see docs/fmt.md)")
    fm.add_argument("files", nargs="+", metavar="FILE", help=".net files, directories of them, or - for stdin")
    how = fm.add_mutually_exclusive_group()
    how.add_argument("-w", "--write", action="store_true", help="rewrite the files in place (atomically)")
    how.add_argument("--check", action="store_true",
                     help="change nothing; name each file that would change and exit 1 if any would")
    fm.set_defaults(fn=cmd_fmt)

    o = sub.add_parser("ops", help="list operators with their inputs and attributes")
    o.add_argument("name", nargs="*", help="only these operators")
    o.set_defaults(fn=cmd_ops)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except NetdslError as e:
        print(e.render(getattr(args, "_sources", None)), file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
