"""Data in the field's standard formats (docs/data.md).

- shapes.py:   `netdsl data shapes`, a synthetic COCO-format data set (draw.py draws it)
- cocofile.py: a COCO annotation file, checked, as pycocotools' COCO index
- coco.py:     any COCO-format data set as arrays (a runtime Dataset); flips that move
               boxes, masks and keypoints with the image
- evaluate.py: mIoU and pixel accuracy, COCOeval's AP tables, PCK
- results.py:  predictions as a COCO results JSON
- preview.py:  annotations drawn over images
- shapes_captions.py: `netdsl data shapes-captions`, synthetic COCO captions (with instances)
- captions.py: any COCO captions set as (image, caption) pairs, its word vocabulary;
               BLEU-4 (sacrebleu) and exact match of generated captions
- shapes_regions.py: `netdsl data shapes-regions`, synthetic region descriptions in
               Visual Genome's format (dense captioning)
- vg.py:       any Visual Genome-format region description set as images, padded
               region boxes and per-region caption tokens

pycocotools and Pillow are imported inside the functions that need them, so importing
this package costs nothing until data is read or written.
"""


def load_coco(path: str, ann: str = "instances", task: str = "", size=0, max_objects: int = 0,
              train: str = "train", test: str = "val", masks: bool = False, keypoints: bool = False):
    """The `coco` data source for runtime/data.py's table: coco.coco (see there),
    imported on first use (coco.py builds on runtime/data.py's Dataset)."""
    from .coco import coco
    return coco(path, ann=ann, task=task, size=size, max_objects=max_objects, train=train, test=test,
                masks=masks, keypoints=keypoints)


def load_coco_captions(path: str, size=0, max_len: int = 0, min_count: int = 1, ann: str = "captions",
                       train: str = "train", test: str = "val"):
    """The `coco_captions` data source: captions.coco_captions (see there), imported on first use."""
    from .captions import coco_captions
    return coco_captions(path, size=size, max_len=max_len, min_count=min_count, ann=ann, train=train, test=test)
