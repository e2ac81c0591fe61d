"""Captions for an image from a trained captioning spec, and where it looked.

The training spec is enough: its decoder is a scan over the caption's words (teacher
forcing), so decoding runs it one word at a time: `<start>` first, then each chosen
word fed back, the scan's state (its carries) handed from one call to the next, until
`<end>` or the caption length the data allowed. Greedy decoding takes the most likely
word; sampling draws from the softmax (seeded). A spec that also outputs attention
weights over L locations (`alphas: [N, T, L]`) gives, for each word, the weights of the
step that chose it: an attention map over the sqrt(L) x sqrt(L) grid of the image.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import NetdslError
from .model import Model

START, END, PAD = "<start>", "<end>", "<pad>"


def _io(g):
    """(image input, captions input, logits output, alphas output or None)."""
    ids = [n for n, v in g.inputs.items() if v.dtype in ("i64", "i32") and v.rank == 2]
    imgs = [n for n, v in g.inputs.items() if v.dtype.startswith("f")]
    logits = [n for n, v in g.outputs.items() if v.dtype.startswith("f") and v.rank == 3
              and "alpha" not in n]
    if len(ids) != 1 or len(imgs) != 1 or len(logits) != 1:
        raise NetdslError(f"network '{g.name}' is not a captioning network: it needs one image input, one "
                          "[N, T] input of word ids and one [N, T, vocab] output of word scores", g.pos)
    alphas = next((n for n, v in g.outputs.items() if n != logits[0] and v.rank == 3), None)
    return imgs[0], ids[0], logits[0], alphas


def decode(model: Model, vocab: list[str], image: np.ndarray, max_len: int, sample: bool = False,
           temperature: float = 1.0, seed: int = 0):
    """(words, attention weights per word [len, L] or None) for one image [C, H, W]."""
    return decode_batch(model, vocab, image[None], max_len, sample, temperature, seed)[0]


def decode_batch(model: Model, vocab: list[str], images: np.ndarray, max_len: int, sample: bool = False,
                 temperature: float = 1.0, seed: int = 0) -> list:
    """decode for a batch of images [B, C, H, W], all decoded side by side (one inference
    per word for the whole batch): [(words, maps or None)] per image."""
    img_in, ids_in, logits_out, alphas_out = _io(model.g)
    index = {w: i for i, w in enumerate(vocab)}
    if START not in index or END not in index:
        raise NetdslError(f"the vocabulary has no {START} or {END}: it is not a captioning vocabulary")
    want = [logits_out] + ([alphas_out] if alphas_out else [])
    rng = np.random.default_rng(seed)
    B = len(images)
    pad = index.get(PAD, 0)
    word = np.full(B, index[START], np.int64)
    carry, done = None, np.zeros(B, bool)
    words, maps = [[] for _ in range(B)], [[] for _ in range(B)]
    for _ in range(max_len + 1):
        out = model.infer({img_in: images, ids_in: np.stack([word, np.full(B, pad)], 1)}, want=want, carry=carry)
        carry = model.carries
        scores = out[logits_out][:, 0].astype(np.float64)
        if sample:
            p = np.exp((scores - scores.max(1, keepdims=True)) / temperature)
            word = np.array([rng.choice(p.shape[1], p=q / q.sum()) for q in p], np.int64)
        else:
            word = scores.argmax(1)
        if (word[~done] >= len(vocab)).any():
            w = int(word[~done][word[~done] >= len(vocab)][0])
            raise NetdslError(f"the model chose word id {w}, outside the run's vocabulary of {len(vocab)} words",
                              hint="the spec's vocab is larger than the data's: train with --set vocab=...")
        for b in np.flatnonzero(~done):
            if vocab[word[b]] == END:
                done[b] = True
                continue
            words[b].append(vocab[word[b]])
            if alphas_out:
                maps[b].append(out[alphas_out][b, 0])
        if done.all():
            break
        word = np.where(done, pad, word)
    # (an empty caption, <end> first, has no maps: [0, L], not a reshape of nothing)
    L = int(np.prod(out[alphas_out].shape[2:])) if alphas_out else 0
    return [(w, np.array(m, out[alphas_out].dtype).reshape(len(w), L) if alphas_out else None) for w, m in zip(words, maps)]


def attention_peak(maps: np.ndarray, hw: tuple[int, int]) -> tuple[float, float]:
    """(x, y) in pixels of the centre of the most weighted cell of an attention map over a
    square grid of the image (H, W)."""
    side = math.isqrt(maps.size)
    r, c = divmod(int(np.argmax(maps)), side)
    return (c + 0.5) * hw[1] / side, (r + 0.5) * hw[0] / side


def attention_peak_in_box(maps: np.ndarray, hw: tuple[int, int], box) -> bool:
    """Whether attention_peak lies inside the COCO box [x, y, w, h]."""
    x, y = attention_peak(maps, hw)
    return box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]


def grounded_words(got, grounded):
    """(image index, word index, its map, the named object's box) for each grounded word a
    greedy caption has right: the same word at the same place as in the reference that
    shares most words with the caption. got: [(words, maps)]; grounded: _grounding's."""
    for k, ((words, maps), (cands, boxes)) in enumerate(zip(got, grounded)):
        best = max(cands, key=lambda c: sum(a == b for a, b in zip(words, c[0])))
        for i, ann in best[1]:
            if i < len(words) and words[i] == best[0][i]:
                yield k, i, maps[i], boxes[ann]


def evaluate_captions(t) -> tuple[dict, list[str]]:
    """`netdsl eval` of a captioning run: each held-out image captioned greedily, scored
    against all its references (caption_scores: exact match, BLEU-4 by sacrebleu). Where
    the data grounds its words (`grounding`: [word index, instance id] in each caption,
    as netdsl data shapes-captions writes, with instances_<split>.json beside it), also
    the attention check of Xu et al.: for each grounded word the caption got right (same
    word at the same place as in the reference that shares most words with it), whether
    the peak of its attention map falls inside that object's box."""
    from ..datasets import captions as cap
    ds = t.data
    alphas_out = _io(t.g)[3]
    got, refs, first, images = test_decodes(t)
    hyps = [" ".join(w) for w, _ in got]
    figures = cap.caption_scores(hyps, refs)
    lines = [f"captions of {len(hyps)} held-out images, greedy: exact match {figures['exact_match']:.4f}  "
             f"BLEU-4 {figures['bleu4']:.4f} (sacrebleu)"]
    grounded = _grounding(ds, first) if alphas_out else None
    if grounded is not None:
        hits = total = 0
        for _, _, m, box in grounded_words(got, grounded):
            total += 1
            hits += attention_peak_in_box(m, images.shape[2:], box)
        if total:
            figures["attention_in_box"] = hits / total
            lines.append(f"attention peak inside the named object's box: {hits} of {total} grounded words "
                         f"({hits / total:.4f})")
    for i in range(min(5, len(hyps))):
        lines.append(f"  {hyps[i]!r}   (references: {' | '.join(refs[i])})")
    return figures, lines


def test_decodes(t):
    """(greedy [(words, maps)] of each held-out image, its references, the test rows of the
    images' first captions, the normalised images)."""
    ds = t.data
    img_in = _io(t.g)[0]
    first, refs = ds.per_image("test")
    images = ds.test["image"][first]
    norm = t.norm.get(t.fields.get(img_in))
    if norm is not None:
        images = (images - norm[0].reshape(1, -1, 1, 1)) / norm[1].reshape(1, -1, 1, 1)
    images = images.astype(np.float32)
    got = []
    for k in range(0, len(images), 64):
        got += decode_batch(t.model, ds.vocab, images[k:k + 64], ds.max_len)
    return got, refs, first, images


def _grounding(ds, first):
    """Per evaluated image: ([(reference words, [(word index, instance id)])], {instance id:
    bbox}), or None when the data has no grounding."""
    from ..datasets import captions as cap
    from ..datasets import cocofile
    path = ds.meta["test"]["file"]
    inst = os.path.join(os.path.dirname(path), os.path.basename(path).replace("captions", "instances", 1))
    if inst == path or not os.path.isfile(inst):
        return None
    c = cap.load_captions_file(path)
    if not any("grounding" in a for a in c.dataset["annotations"]):
        return None
    boxes = {a["id"]: a["bbox"] for a in cocofile.read_json(inst, "COCO instances file").get("annotations", [])
             if isinstance(a, dict) and "id" in a and isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4}
    out = []
    for image_id in ds.meta["test"]["image_ids"][first].tolist():
        cands = [(cap.tokenize(a["caption"]), [(int(i), int(j)) for i, j in a.get("grounding", []) if j in boxes])
                 for a in c.imgToAnns[image_id]]
        out.append((cands, boxes))
    return out


def attention_png(path: str, image: np.ndarray, words: list[str], maps: np.ndarray) -> None:
    """The image once per word with that word's attention weights over it (brighter =
    more weight), as Xu et al. show them; written atomically."""
    from PIL import Image, ImageDraw
    from .checkpoint import atomic_write
    L = maps.shape[1]
    side = math.isqrt(L)
    if side * side != L:
        raise NetdslError(f"{L} attention locations are not a square grid; cannot draw them over the image")
    rgb = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    scale = max(1, 128 // max(h, w))
    tiles = []
    for word, a in zip(words, maps):
        m = np.asarray(Image.fromarray((a.reshape(side, side) / max(a.max(), 1e-12) * 255).astype(np.uint8))
                       .resize((w, h), Image.BILINEAR), np.float32)[..., None] / 255
        tile = Image.fromarray((rgb * (0.25 + 0.75 * m)).astype(np.uint8)).resize((w * scale, h * scale))
        canvas = Image.new("RGB", (tile.width, tile.height + 14), "white")
        canvas.paste(tile, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), word, fill="black")
        tiles.append(canvas)
    if not tiles:
        raise NetdslError("the caption is empty: no word to draw attention for")
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 2
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def is_captioner(g) -> bool:
    try:
        _io(g)
        return True
    except NetdslError:
        return False


def predict_captions(t, path: str, out_dir: str, sample: bool = False, seed: int = 0) -> list[dict]:
    """`netdsl run CAPTIONING_SPEC --predict IMAGE|DIR [--sample]`: a caption per image (printed
    and in out_dir/predict/captions.json), and for a spec with attention an attention
    sheet per image (out_dir/predict/NAME_attention.png)."""
    import json
    from .checkpoint import atomic_write
    from .vision import _image_files, _read, _resize
    img_in, ids_in, _, alphas_out = _io(t.g)
    vocab = getattr(t.data, "vocab", None)
    if not isinstance(vocab, list) or START not in vocab:
        raise NetdslError(f"--predict {path}: the data of this run has no caption vocabulary (coco_captions)",
                          hint="captioning runs read their words from --data coco_captions:DIR")
    v = t.g.inputs[img_in]
    if v.rank != 4 or not all(isinstance(d, int) for d in v.shape[1:]):
        raise NetdslError(f"--predict {path}: '{img_in}' is not an image input of a fixed size", v.pos)
    T = t.g.inputs[ids_in].shape[1]
    max_len = T - 2 if isinstance(T, int) else getattr(t.data, "max_len", None) or 16
    out_dir = os.path.join(out_dir, "predict")
    os.makedirs(out_dir, exist_ok=True)
    norm = t.norm.get(t.fields.get(img_in))
    records = []
    for f in _image_files(path):
        raw = _resize(_read(f), v.shape[2], v.shape[3])
        x = raw if norm is None else (raw - norm[0].reshape(-1, 1, 1)) / norm[1].reshape(-1, 1, 1)
        words, maps = decode(t.model, vocab, x.astype(np.float32), max_len, sample=sample, seed=seed)
        rec = {"file": f, "caption": " ".join(words)}
        if maps is not None and words:
            png = os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0] + "_attention.png")
            attention_png(png, raw, words, maps)
            rec["attention"] = png
        records.append(rec)
    atomic_write(os.path.join(out_dir, "captions.json"), lambda fh: fh.write(json.dumps(records, indent=1).encode()))
    return records
