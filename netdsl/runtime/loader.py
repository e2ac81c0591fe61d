"""Batches of named arrays, with the image augmentations of torchvision's pipelines.

A loader iterates one epoch of batches per `iter()`: a dict holding, for each field,
the rows of that batch. Per batch: gather, random crop after zero padding, random
scaling and translation (`affine`, runtime/affine.py: it moves boxes, masks and
keypoints too), random horizontal flip, then normalise (x - mean) / std per channel,
the order torchvision pipelines use. The crop and the flip are the same for every spatial field of an
example: images ([C, H, W] floats) and dense label maps ([H, W] integers, padded with
their `fill`, e.g. the loss's ignore index), so a segmentation label stays aligned
with its image. All randomness comes from `rng`, so a run is reproducible from its
seed and the Generator's state, which a checkpoint saves.

A sequence source (text) is read by `StreamLoader` instead: in order, as parallel
streams, so that state carried between batches is meaningful.

Data-parallel training (runtime/distributed.py) sets `shard = (rank, ranks)`: each
batch is then the rank's contiguous slice of the global batch (rows rank*n//ranks to
(rank+1)*n//ranks), and the augmentation draws its random numbers for the whole
global batch, so every rank's generator stays in step and each example is cropped
and flipped as one process reading the global batch would.
"""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of NCHW images (computed in float64 for accuracy)."""
    return (x.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32),
            x.std(axis=(0, 2, 3), dtype=np.float64).astype(np.float32))


class Loader:
    """fields: name -> array (first axis = examples). images: the fields that are
    NCHW images (augmented and normalised; default: every float field of rank 4);
    dense: name -> fill for [N, H, W] label maps cropped and flipped with them;
    mean, std: per image field, or one pair for every image field. mirror: a function
    (batch, which) -> batch that flips the chosen examples of every field (a COCO data
    set's flip, which moves boxes and joints too), used for the flip instead. affine: an
    affine.Affine (random scaling and translation of the images and what lies on them)."""

    def __init__(self, fields: dict[str, np.ndarray], batch_size: int, *, rng: np.random.Generator | None = None,
                 shuffle: bool = False, drop_last: bool = False, mean=None, std=None,
                 crop_padding: int = 0, flip: bool = False, images=None, dense: dict | None = None, mirror=None,
                 affine=None):
        if batch_size < 1:
            raise NetdslError(f"batch size must be at least 1, got {batch_size}")
        if crop_padding < 0:
            raise NetdslError(f"crop padding must not be negative, got {crop_padding}")
        if (shuffle or crop_padding or flip or affine) and rng is None:
            raise ValueError("shuffling and augmentation need an rng")
        self.fields, self.batch_size, self.rng = fields, batch_size, rng
        self.shuffle, self.drop_last, self.pad, self.flip = shuffle, drop_last, crop_padding, flip
        self.images = [k for k, a in fields.items() if a.dtype.kind == "f" and a.ndim == 4] \
            if images is None else list(images)
        self.dense = dict(dense or {})
        self.mirror, self.affine = mirror, affine
        self.mean, self.std = {}, {}
        for name in self.images:
            c = fields[name].shape[1]
            for what, given, into in (("mean", mean, self.mean), ("std", std, self.std)):
                v = given.get(name) if isinstance(given, dict) else given
                if v is not None:
                    into[name] = _per_channel(v, c, what)
            if name in self.std and np.any(self.std[name] <= 0):
                raise NetdslError("normalisation std must be positive")

    shard: tuple[int, int] | None = None    # (rank, ranks): read that rank's slice of each batch

    def __len__(self) -> int:
        n, b = len(next(iter(self.fields.values()))), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n = len(next(iter(self.fields.values())))
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            part = shard_slice(len(idx), self.shard)
            yield self._augment({k: a[idx[part]] for k, a in self.fields.items()}, len(idx), part)

    def _augment(self, b: dict, total: int, part: slice) -> dict:
        """b: rows `part` of a batch of `total` (random numbers are drawn for all `total`)."""
        spatial = {**{k: None for k in self.images}, **self.dense}   # name -> padding value (images: 0)
        for k in self.images:
            b[k] = b[k].astype(np.float32, copy=False)   # a[idx] is already a private copy
        if self.pad and spatial:
            offsets = self.rng.integers(0, 2 * self.pad + 1, size=(total, 2))[part]
            for k, fill in spatial.items():
                b[k] = _crop(b[k], self.pad, offsets, 0 if fill is None else fill)
        if self.affine is not None:
            from .affine import DRAWS
            b = self.affine(b, self.rng.random((total, DRAWS))[part])
        if self.flip and (spatial or self.mirror):
            flip = (self.rng.random(total) < 0.5)[part]
            if self.mirror is not None:
                b.update(self.mirror(b, flip))
            else:
                for k in spatial:
                    b[k][flip] = b[k][flip, ..., ::-1]
        for k in self.images:
            if k in self.mean:
                b[k] -= self.mean[k][:, None, None]
            if k in self.std:
                b[k] /= self.std[k][:, None, None]
        return b


class StreamLoader:
    """One long id sequence read in order as `n_streams` parallel streams, as PyTorch's
    word_language_model example does (main.py, `batchify` and `get_batch`): the
    sequence is cut into n_streams equal streams of L = len // n_streams ids (the
    remainder dropped), and batch i holds, for each field, columns
    [i*seq + shift, (i+1)*seq + shift) of every stream: [n_streams, seq]. Row s of
    batch i + 1 continues row s of batch i, so a recurrent state carried from one
    batch to the next reads on. The last chunk of a stream, shorter than seq (which
    get_batch would return shortened), is dropped, so every batch has the same shape.
    No shuffling, no augmentation, no rng: an epoch is always the same batches.
    With `shard`, a rank reads its slice of the streams."""
    sequential = True
    shard: tuple[int, int] | None = None

    def __init__(self, ids: np.ndarray, n_streams: int, seq: int, shifts: dict[str, int],
                 dtypes: dict | None = None, where: str = "the sequence"):
        if n_streams < 1 or seq < 1:
            raise NetdslError(f"streams and their chunk length must be at least 1, got {n_streams} and {seq}")
        length = len(ids) // n_streams
        extra = max(shifts.values())
        if length < seq + extra:
            raise NetdslError(f"{where} has {len(ids)} ids: {n_streams} streams of {length} are too short for "
                              f"one chunk of {seq} (+{extra} for the shifted targets)",
                              hint="lower the batch (--batch: the number of streams) or the sequence length")
        self.streams = ids[:n_streams * length].reshape(n_streams, length)    # a view
        self.seq, self.shifts = seq, dict(shifts)
        self.dtypes = {f: np.dtype((dtypes or {}).get(f, ids.dtype)) for f in shifts}
        self.batches = (length - extra) // seq

    @classmethod
    def of(cls, ds, split: str, n_streams: int) -> "StreamLoader":
        """The stream loader of a sequence Dataset's split (ds.streams set), yielding
        its fields in the dtypes `feeds.bind` converted them to."""
        if ds.streams is None:
            raise ValueError(f"data set '{ds.name}' is not a sequence source")
        from .text import SPLIT_NAMES
        arrays = ds.split(split)
        return cls(ds.streams[split], n_streams, ds.seq, ds.shifts,
                   {f: arrays[f].dtype for f in ds.shifts if f in arrays}, f"{ds.source}: {SPLIT_NAMES[split]}")

    def __len__(self) -> int:
        return self.batches

    @property
    def batch_size(self) -> int:
        return len(self.streams)

    def __iter__(self):
        rows = shard_slice(len(self.streams), self.shard)
        for i in range(self.batches):
            at = i * self.seq
            yield {f: self.streams[rows, at + s:at + s + self.seq].astype(self.dtypes[f])   # private copies
                   for f, s in self.shifts.items()}


def shard_slice(n: int, shard: tuple[int, int] | None) -> slice:
    """The rows of a batch of n that rank r of k reads: [r*n//k, (r+1)*n//k), so k ranks of
    batch B together read exactly the batch of k*B, in order (a short last batch splits as
    evenly as it can; a rank may get none)."""
    if shard is None:
        return slice(0, n)
    r, k = shard
    return slice(r * n // k, (r + 1) * n // k)


def random_crop(xb: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad each side by `pad`, then cut one random same-size window per image."""
    return _crop(xb, pad, rng.integers(0, 2 * pad + 1, size=(len(xb), 2)), 0)


def _crop(xb: np.ndarray, pad: int, offsets: np.ndarray, fill) -> np.ndarray:
    """Pad the last two axes by `pad` with `fill`, then cut the window at each example's offset."""
    h, w = xb.shape[-2:]
    padded = np.full(xb.shape[:-2] + (h + 2 * pad, w + 2 * pad), fill, xb.dtype)
    padded[..., pad:pad + h, pad:pad + w] = xb
    out = np.empty_like(xb)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, ..., dy:dy + h, dx:dx + w]
    return out


def _per_channel(v, c: int, what: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, c)
    if a.size != c:
        raise NetdslError(f"normalisation {what} has {a.size} values, the images have {c} channels")
    return a
