"""Issue 13's "each other sequence task reaches a stated figure": every recurrent spec
whose train section reads a generated task (runtime/tasks.py) trained from the command
line exactly as written (its data, optimiser, epochs and seed), then its last epoch's
test figures read from metrics.jsonl against the figure stated here.

    python benchmarks/bench_sequence_tasks.py [--only many_to_one,...] [--runs DIR] [--out FILE]

Wall-clock and CPU seconds of each training are printed beside it (other work sharing
the machine stretches the first, not the second). The captioning and char-LM specs have
their own benchmarks (netdsl eval on a captioning run; bench_charlm.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dense_tasks import ROOT, netdsl  # noqa: E402

# spec -> [(metric in metrics.jsonl, the figure it must reach)]
TASKS = {
    "many_to_one": [("test_acc", 0.95)],                                     # polarity
    "seq2seq": [("test_acc", 0.95), ("test_seq_acc", 0.90)],                # copy(task = "reverse")
    "many_to_many": [("test_acc", 0.95)],                                    # echo(delay = 2)
    "one_to_many": [("test_acc", 0.95)],                                     # count_up
    "glimpses": [("test_acc", 0.95)],                                        # translated_digits
    "vanilla_rnn": [("test_acc", 0.95)],                                    # recall(delay = 1)
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(TASKS))
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "sequence"))
    ap.add_argument("--out")
    a = ap.parse_args()
    lines = [f"# bench_sequence_tasks.py, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"]
    print(lines[0], flush=True)
    failed = 0
    for name in a.only.split(","):
        out = os.path.join(a.runs, name)
        spec = os.path.join("specs", "rnn", f"{name}.net")
        wall, cpu, _ = netdsl("run", spec, "--out", out, "--no-progress")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            last = [json.loads(l) for l in f if l.strip()][-1]
        figs = []
        for metric, want in TASKS[name]:
            got = last.get(metric)
            ok = got is not None and got >= want
            failed += not ok
            figs.append(f"{metric} {got:.4f} (>= {want})" + ("" if ok else "  MISSED") if got is not None
                        else f"{metric} missing  MISSED")
        line = (f"{name:13s} {'  '.join(figs)}   epoch {last.get('epoch', '?')}, "
                f"{wall / 60:.1f} min wall, {cpu:.0f} s CPU")
        lines.append(line)
        print(line, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
