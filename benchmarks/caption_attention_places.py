"""Where a captioning run's attention misses: `python benchmarks/caption_attention_places.py RUN_DIR`.

The check of `netdsl eval` (runtime/caption.py: greedy captions of the held-out images, the
reference sharing most words with each, a grounded word counted where it is said right at its
place, hit when the centre of its map's most weighted cell lies in the object's box), its totals
the same, broken down by the word's place in the caption, with the misses' distance and offset
from the box. Two other readings of "the peak falls inside the box", for comparison only
(benchmarks/results/2026-12-06-captioning-cpu.txt, canonical naming order): the peak cell's own
footprint overlaps the box, and the peak of the map smoothed as Xu et al. draw it.
"""
import math
import sys
from collections import defaultdict

import numpy as np
from skimage.transform import pyramid_expand

from netdsl.cli import data_flag, load_run_weights
from netdsl.lang.elaborate import elaborate
from netdsl.runtime import caption as C
from netdsl.runtime.sample import read_run_file
from netdsl.runtime.train import Trainer


def load(run: str):
    info = read_run_file(run)
    g, loader = elaborate(info["spec"], info["network"], info["set"])
    cfg = dict(g.train)
    if info.get("data"):        # (a run without --data read its train section's own)
        cfg["data"] = data_flag(info["data"], cfg["data"])
    t = Trainer(g, cfg, run, "".join(loader.sources.values()), training=False)
    load_run_weights(t, None, resume=False, fresh=False)
    return t


def captions(t):
    """(greedy [(words, maps)], references, grounding, image H and W) of the test images, as evaluate_captions."""
    got, refs, first, images = C.test_decodes(t)
    return got, refs, C._grounding(t.data, first), images.shape[2:]


def main(run: str) -> None:
    got, refs, grounded, (H, W) = captions(load(run))
    if grounded is None:
        sys.exit(f"{run}: the data has no grounding (instances and `grounding` of netdsl data shapes-captions)")
    rows = defaultdict(lambda: {"n": 0, "hit": 0, "over": 0, "smooth": 0, "far": []})
    offs, outside, peaks = [], [], []
    for _, i, m, box in C.grounded_words(got, grounded):
        bx, by, bw, bh = box
        side = math.isqrt(m.size)
        ch, cw = H / side, W / side
        x, y = C.attention_peak(m, (H, W))
        r, c = int(y // ch), int(x // cw)
        row = rows[i]
        row["n"] += 1
        hit = C.attention_peak_in_box(m, (H, W), box)
        row["hit"] += hit
        row["over"] += c * cw < bx + bw and (c + 1) * cw > bx and r * ch < by + bh and (r + 1) * ch > by
        # Xu et al.'s drawing: skimage pyramid_expand, sigma 20 px for 16-px cells (1.25 cells)
        up = pyramid_expand(m.reshape(side, side).astype(np.float64), upscale=round(cw), sigma=1.25 * cw)
        yy, xx = divmod(int(np.argmax(up)), up.shape[1])
        row["smooth"] += bx <= xx + 0.5 <= bx + bw and by <= yy + 0.5 <= by + bh
        peaks.append(float(m.max()))
        if not hit:
            dx, dy = x - (bx + bw / 2), y - (by + bh / 2)
            row["far"].append(math.hypot(dx, dy))
            offs.append((dx, dy, bw, bh))
            outside.append(max(bx - x, x - bx - bw, by - y, y - by - bh))
    n = sum(r["n"] for r in rows.values())
    if not n:
        sys.exit(f"{run}: no grounded word was said right")
    share = lambda k: sum(r[k] for r in rows.values()) / n     # noqa: E731
    exact = sum(" ".join(w) in r for (w, _), r in zip(got, refs)) / len(got)
    print(f"{run}: exact {exact:.4f}  peak in box {sum(r['hit'] for r in rows.values())}/{n} ({share('hit'):.4f})  "
          f"peak cell overlaps box {share('over'):.4f}  smoothed peak in box {share('smooth'):.4f}  "
          f"mean peak weight {np.mean(peaks):.3f}")
    if offs:
        o, out = np.array(offs), np.array(outside)
        print(f"  misses: mean offset from the box centre dx {o[:, 0].mean():+.1f} dy {o[:, 1].mean():+.1f} px "
              f"(|dx| {np.abs(o[:, 0]).mean():.1f}, |dy| {np.abs(o[:, 1]).mean():.1f}); the peak's point lies "
              f"outside the box by a median {np.median(out):.1f} px, within half a cell in "
              f"{np.mean(out <= W / side / 2):.2f}; boxes' median side {np.median(o[:, 2:]):.0f} px")
    for i in sorted(rows):
        r = rows[i]
        far = f"{np.median(r['far']):.0f}" if r["far"] else "-"
        print(f"  place {i}: {r['hit']}/{r['n']} ({r['hit'] / r['n']:.3f}); misses a median {far} px from the centre; "
              f"cell overlaps {r['over'] / r['n']:.3f}; smoothed {r['smooth'] / r['n']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/caption_attention_places.py RUN_DIR")
    main(sys.argv[1])
