"""The coco_captions data source in training: it binds to captioning.net's inputs at the
spec's image size (feeds.bind), names the --set a too-small vocabulary needs, and
`netdsl run` trains captioning.net and captioning_attention_small.net from the CLI."""
import json

import numpy as np
import pytest

from helpers import SPECS, cli
from netdsl.datasets import captions as cap
from netdsl.datasets.shapes_captions import generate
from netdsl.errors import NetdslError
from netdsl.lang.elaborate import elaborate
from netdsl.runtime.data import make_source
from netdsl.runtime.feeds import bind

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("captions") / "set"
    generate(str(out), images=40, size=SIZE, seed=5, val_fraction=0.25)
    return out


def test_binds_to_captioning_net_at_the_specs_size(data):
    from netdsl.datasets.captions import fit_to_spec
    g, _ = elaborate(str(SPECS / "rnn/captioning.net"), None, {"vocab": 19, "H": 16, "embed": 8})
    kwargs = fit_to_spec(g, {"path": str(data), "size": 0, "max_len": 0})
    assert kwargs["size"] == [224, 224] and kwargs["max_len"] == 0      # captions: i64[N, T], T free
    ds = make_source("coco_captions", **kwargs)
    assert bind(g, ds) == {"image": "image", "captions": "captions"}
    assert ds.train["image"].shape[1:] == (3, 224, 224)
    g, _ = elaborate(str(SPECS / "rnn/captioning.net"), None, {"vocab": 12, "H": 16, "embed": 8})
    with pytest.raises(NetdslError, match=r"has 19 words .* takes 12") as e:
        bind(g, make_source("coco_captions", **fit_to_spec(g, {"path": str(data)})))
    assert "--set vocab=19" in e.value.hint


def test_captioning_trains_one_epoch_from_the_cli(data, tmp_path):
    """At a small size and width of the spec's VGG trunk (its parameters): 3 training images."""
    small = tmp_path / "small"
    generate(str(small), images=4, size=SIZE, seed=1)
    vocab = len(cap.coco_captions(str(small)).vocab)
    out = tmp_path / "run"
    r = cli("run", SPECS / "rnn/captioning.net", "--data", f"coco_captions:{small}", "--set", f"vocab={vocab}",
            "--set", "H=16", "--set", "embed=8", "--set", "size=32", "--set", "width=4", "--epochs", "1",
            "--batch", "8", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["test_loss"])
    from netdsl.runtime.checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "checkpoint.npz")).extra["vocab"] == cap.coco_captions(str(small)).vocab


def test_attention_from_images_trains_from_the_cli(data, tmp_path):
    out = tmp_path / "run"
    r = cli("run", SPECS / "rnn/captioning_attention_small.net", "--data", f"coco_captions:{data}",
            "--set", f"size={SIZE}", "--set", "width=4", "--set", "H=16", "--set", "A=8", "--set", "embed=8",
            "--epochs", "2", "--batch", "16", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[1]["train_loss"] < recs[0]["train_loss"] < np.log(19) + 0.5


def test_eval_scores_the_greedy_captions_and_where_the_attention_looked(data, tmp_path):
    """netdsl eval RUN_DIR on a captioning run: exact match and BLEU-4 of the greedy
    captions of the held-out images (equal to caption_scores of decode_batch's captions;
    test_caption_decode.py: it equals decode image by image), and the attention check
    over the grounded words of the data, done here by hand."""
    from netdsl.datasets.cocofile import read_json
    from netdsl.runtime.caption import attention_peak_in_box, decode_batch
    from netdsl.runtime.model import Model
    from netdsl.runtime.checkpoint import load_checkpoint
    out = tmp_path / "run"
    args = ["--data", f"coco_captions:{data}", "--set", f"size={SIZE}", "--set", "width=4", "--set", "H=16",
            "--set", "A=8", "--set", "embed=8"]
    spec = SPECS / "rnn/captioning_attention_small.net"
    r = cli("run", spec, *args, "--epochs", "3", "--batch", "8", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("eval", out)
    assert r.returncode == 0, r.stderr[-3000:]
    figs = json.loads((out / "eval.json").read_text())
    assert "exact match" in r.stdout and "attention peak" in r.stdout
    ds = cap.coco_captions(str(data), size=SIZE)
    g, _ = elaborate(str(spec), None, {"vocab": len(ds.vocab), "size": SIZE, "width": 4, "H": 16, "A": 8,
                                       "embed": 8})
    ck = load_checkpoint(str(out / "checkpoint.npz"))
    m = Model(g, params=ck.params)
    first, refs = ds.per_image("test")
    from netdsl.runtime.loader import channel_stats
    mean, std = channel_stats(ds.train["image"])       # the trainer normalises its images so
    images = (ds.test["image"][first] - mean[:, None, None]) / std[:, None, None]
    got = decode_batch(m, ds.vocab, images.astype(np.float32), ds.max_len)
    want = cap.caption_scores([" ".join(w) for w, _ in got], refs)
    assert figs["exact_match"] == pytest.approx(want["exact_match"])
    assert figs["bleu4"] == pytest.approx(want["bleu4"], abs=1e-9)
    # the attention check by hand: grounded words the caption has right, where the reference
    # sharing most words with it names them
    caps = read_json(str(data / "annotations" / "captions_val.json"), "")
    boxes = {a["id"]: a["bbox"] for a in read_json(str(data / "annotations" / "instances_val.json"), "")["annotations"]}
    hits = total = 0
    for image_id, (words, maps) in zip(ds.meta["test"]["image_ids"][first].tolist(), got):
        anns = [a for a in caps["annotations"] if a["image_id"] == image_id]
        best = max(anns, key=lambda a: sum(x == y for x, y in zip(words, a["caption"].split())))
        for i, ann in best["grounding"]:
            if i < len(words) and words[i] == best["caption"].split()[i]:
                total += 1
                hits += attention_peak_in_box(maps[i], (SIZE, SIZE), boxes[ann])
    if total:
        assert figs["attention_in_box"] == pytest.approx(hits / total)
    else:
        assert "attention_in_box" not in figs
