"""Image captioning data in the COCO captions format, its word vocabulary, and caption scores.

    ds = coco_captions("data/shapes_captions")         # annotations/captions_{train,val}.json
    ds = coco_captions("/data/coco", train="train2017", test="val2017", size=224, min_count=5)

Layout as coco() reads (coco.py): PATH/annotations/{ann}_{split}.json, each an object
with `images` (id, file_name, width, height) and `annotations` (id, image_id, caption),
images in PATH/images/{split}/ or PATH/{split}/. pycocotools' COCO(path) reads the same
files. One example per (image, caption) pair, images in the file's order, each image's
captions in theirs; an image with no caption gives no example.

Fields: `image` f32[N, 3, H, W] in [0, 1] (every image resized to `size`), `captions`
i64[N, T]: <start> w1 ... wk <end> <pad> ..., T = max_len + 2.

Tokenisation (`tokenize`): the caption lowercased; a word is a run of letters and digits
(any script) with inner apostrophes kept (don't, man's); everything else separates words
and is dropped, so "A man, riding." is [a, man, riding].

Vocabulary (`vocabulary`, on the Dataset as `vocab`, a list of words in id order, stored
in a run's checkpoint): ids 0 <pad>, 1 <start>, 2 <end>, 3 <unk> (the specs' `pad = 0`
and `start = 1`), then the words of the training captions seen at least `min_count`
times, most frequent first, ties alphabetically. A word the vocabulary lacks (a
validation word never seen in training, or a rare one) reads as <unk>.

caption_scores(hypotheses, references): corpus BLEU-4 by sacrebleu and exact match.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import NetdslError
from ..runtime.data import Dataset
from . import cocofile

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(len(SPECIALS))
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(caption: str) -> list[str]:
    """The caption's words: lowercased runs of letters and digits, inner apostrophes kept."""
    return _WORD.findall(caption.lower())


def vocabulary(token_lists, min_count: int = 1) -> list[str]:
    """SPECIALS, then every word seen at least min_count times, most frequent first."""
    counts = Counter(w for words in token_lists for w in words)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [*SPECIALS, *(w for w in words if w not in SPECIALS)]


def encode(words: list[str], index: dict[str, int], length: int) -> np.ndarray:
    """int64[length]: <start>, the words' ids (<unk> for unknown ones; cut to
    length - 2 words), <end>, then <pad>."""
    out = np.full(length, PAD, np.int64)
    ids = [START, *(index.get(w, UNK) for w in words[:length - 2]), END]
    out[:len(ids)] = ids
    return out


def decode(ids, vocab: list[str]) -> str:
    """The words of an id sequence: a leading <start> skipped, up to the first <end>,
    <pad> dropped. An id outside the vocabulary is an error."""
    words = []
    for k, i in enumerate(np.asarray(ids).reshape(-1).tolist()):
        if not isinstance(i, int) or not 0 <= i < len(vocab):
            raise NetdslError(f"id {i!r} is outside the vocabulary of {len(vocab)} words",
                              hint="the spec's vocab is larger than the data's; its extra ids name no word")
        if i == END:
            break
        if i == PAD or (i == START and k == 0):
            continue
        words.append(vocab[i])
    return " ".join(words)


# ---------------------------------------------------------------- the files

def check_captions(d, path: str) -> dict:
    """image id -> (height, width), after checking the fields a captions reader needs."""
    def bad(msg, hint=None):
        raise NetdslError(f"{path} is not a COCO captions file: {msg}", hint=hint)
    shape = "a COCO captions file is an object with 'images' and 'annotations' lists"
    if not isinstance(d, dict):
        bad(f"the top level is {type(d).__name__ if d is not None else 'null'}, expected an object", hint=shape)
    for key in ("images", "annotations"):
        if not isinstance(d.get(key), list):
            bad(f"it has no '{key}' list" if key not in d else f"'{key}' is {type(d[key]).__name__}, expected a list",
                hint=shape)
    images = cocofile.check_images(d["images"], bad)
    seen = set()
    for i, a in enumerate(d["annotations"]):
        if not isinstance(a, dict) or not cocofile._int(a.get("id")):
            bad(f"annotations[{i}] needs an integer 'id', got {cocofile._show(a)}")
        where = f"annotations[{i}] (id {a['id']})"
        if a["id"] in seen:
            bad(f"{where}: annotation id {a['id']} appears twice")
        seen.add(a["id"])
        if not cocofile._int(a.get("image_id")) or a["image_id"] not in images:
            bad(f"{where}: image_id {cocofile._show(a.get('image_id'))} is not an image of the file")
        if not isinstance(a.get("caption"), str):
            bad(f"{where}: 'caption' must be a string, got {cocofile._show(a.get('caption'))}",
                hint="this reads captions files (captions_*.json); instances files are read by coco()")
        if not tokenize(a["caption"]):
            bad(f"{where}: the caption {cocofile._show(a['caption'])} has no words")
    return images


def load_captions_file(path: str):
    """pycocotools' COCO index of a checked captions file."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    d = cocofile.read_json(path, "COCO captions file")
    check_captions(d, path)
    c = COCO()
    c.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):     # createIndex prints progress
        c.createIndex()
    return c


# ---------------------------------------------------------------- the data source

@dataclass
class CaptionsDataset(Dataset):
    """A Dataset of (image, caption) pairs with its vocabulary and where each came from.
    meta[split]: "file", "image_dir", "image_ids" (int64, per example), "references"
    (image id -> its captions as written, every image with a caption, in file order)."""
    max_len: int = 0
    meta: dict = field(default_factory=dict)

    def per_image(self, split: str) -> tuple[np.ndarray, list[list[str]]]:
        """(the index of each image's first example, that image's reference captions):
        what an evaluation runs once per image and scores with caption_scores."""
        m = self.meta[split]
        first = {}
        for k, i in enumerate(m["image_ids"].tolist()):
            first.setdefault(i, k)
        return np.array(list(first.values()), np.int64), [m["references"][i] for i in first]


def coco_captions(path: str, size=0, max_len: int = 0, min_count: int = 1, ann: str = "captions",
                  train: str = "train", test: str = "val") -> CaptionsDataset:
    """Read PATH/annotations/{ann}_{train}.json and _{test}.json with their images
    (module docstring). size: an int, a [height, width] pair, or 0 for the images'
    own size when they all share one. max_len: words per caption (longer ones are
    cut), 0 for the longest caption of either split."""
    from .coco import _common_size, _image_dir, _size
    path = os.path.expanduser(os.fspath(path))
    hw = _size(size, "coco_captions") if size != 0 else None
    for name, v, lo in (("max_len", max_len, 0), ("min_count", min_count, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise NetdslError(f"coco_captions: {name} must be an integer of at least {lo}, got {v!r}")
    if not os.path.isdir(path):
        raise NetdslError(f"coco_captions: directory {path} not found" if not os.path.exists(path)
                          else f"coco_captions: {path} is not a directory",
                          hint="give the directory holding annotations/ (e.g. netdsl data shapes-captions DIR)")
    splits = (("train", train), ("test", test))
    files = {s: os.path.join(path, "annotations", f"{ann}_{name}.json") for s, name in splits}
    cocos = {s: load_captions_file(f) for s, f in files.items()}
    words = {s: {a["id"]: tokenize(a["caption"]) for a in c.dataset["annotations"]} for s, c in cocos.items()}
    for s, c in cocos.items():
        if not c.dataset["annotations"]:
            raise NetdslError(f"{files[s]} holds no captions")
    vocab = vocabulary(words["train"].values(), min_count)
    longest = max(len(w) for ws in words.values() for w in ws.values())
    length = (max_len or longest) + 2
    hw = hw or _common_size(cocos, files, "coco_captions")
    ds = CaptionsDataset("coco_captions", path, {}, {}, vocab=vocab, max_len=length - 2)
    index = {w: i for i, w in enumerate(vocab)}
    for s, name in splits:
        image_dir = _image_dir(path, name, files[s])
        arrays, ds.meta[s] = _read_split(cocos[s], words[s], files[s], image_dir, hw, index, length)
        setattr(ds, s, arrays)
    return ds


def _read_split(c, words, ann_file, image_dir, hw, index, length):
    from .coco import _read_image
    images = [im for im in c.dataset["images"] if c.imgToAnns[im["id"]]]
    anns = [a for im in images for a in c.imgToAnns[im["id"]]]
    _check_memory(len(anns), len(images), hw, length, ann_file)
    pixels = np.empty((len(images), 3, *hw), np.float32)
    row = {}
    for k, info in enumerate(images):
        pixels[k] = _read_image(os.path.join(image_dir, info["file_name"]), info, ann_file, hw)
        row[info["id"]] = k
    image_ids = np.array([a["image_id"] for a in anns], np.int64)
    arrays = {"image": pixels[[row[i] for i in image_ids.tolist()]],
              "captions": np.stack([encode(words[a["id"]], index, length) for a in anns])}
    refs = {im["id"]: [a["caption"] for a in c.imgToAnns[im["id"]]] for im in images}
    return arrays, {"file": ann_file, "image_dir": image_dir, "image_ids": image_ids, "references": refs}


def _check_memory(examples, images, hw, length, ann_file):
    from ..runtime.train import machine_memory
    pixels = 12 * hw[0] * hw[1]
    need = examples * (pixels + 8 * length) + images * pixels
    if need > machine_memory() // 2:
        raise NetdslError(f"{ann_file}: {examples} captions of {images} images at {hw[1]}x{hw[0]} would take "
                          f"{need / 2**30:.1f} GiB, more than half of this machine's memory",
                          hint="read them at a smaller size, or fewer of them")


def fit_to_spec(g, kwargs: dict) -> dict:
    """coco_captions' arguments with `size` and `max_len` taken from a spec that fixes
    them (image f32[N, 3, 224, 224]: size [224, 224]; captions i64[N, 18]: max_len 16),
    unless given."""
    out = dict(kwargs)
    image = _input(g, "image", "f", 4)
    if not out.get("size") and image is not None and fixed(image.shape[2:]):
        out["size"] = list(image.shape[2:])
    caps = _input(g, "captions", "i", 2)
    if not out.get("max_len") and caps is not None and fixed(caps.shape[1:]) and caps.shape[1] > 2:
        out["max_len"] = caps.shape[1] - 2
    return out


def fixed(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _input(g, name, kind, rank):
    """The input feeds.bind gives the field `name`: the input of that name, else the only one of its kind."""
    if name in g.inputs:
        return g.inputs[name]
    fits = [v for v in g.inputs.values() if v.dtype[0] == kind and v.rank == rank]
    return fits[0] if len(fits) == 1 else None


# ---------------------------------------------------------------- scores

def caption_scores(hypotheses, references) -> dict[str, float]:
    """{"bleu4": corpus BLEU-4, "exact_match": share of hypotheses equal to one of
    their references}, both in [0, 1]. hypotheses: one string per image; references:
    a list of strings per image (any number). Both are tokenised as the captions are
    (tokenize), so case and punctuation do not count; BLEU is sacrebleu's corpus BLEU
    (4-gram, brevity penalty against the closest reference length, its default 'exp'
    smoothing of zero counts) on those words, divided by 100."""
    import sacrebleu
    hypotheses, references = list(hypotheses), list(references)
    if not hypotheses:
        raise NetdslError("caption_scores: no hypotheses to score")
    if len(references) != len(hypotheses):
        raise NetdslError(f"caption_scores: {len(hypotheses)} hypotheses but {len(references)} reference lists",
                          hint="give one list of reference captions per hypothesis")
    for i, (h, rs) in enumerate(zip(hypotheses, references)):
        if not isinstance(h, str):
            raise NetdslError(f"caption_scores: hypothesis {i} is {type(h).__name__}, expected a string")
        if isinstance(rs, str) or not rs or not all(isinstance(r, str) for r in rs):
            raise NetdslError(f"caption_scores: the references of hypothesis {i} must be a non-empty list of "
                              f"strings, got {rs!r}")
    hyp = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    exact = sum(any(h == r for r in rs) for h, rs in zip(hyp, refs)) / len(hyp)
    streams = [[" ".join(rs[j]) if j < len(rs) else None for rs in refs] for j in range(max(map(len, refs)))]
    bleu = sacrebleu.corpus_bleu([" ".join(h) for h in hyp], streams, tokenize="none")
    return {"bleu4": bleu.score / 100, "exact_match": exact}
