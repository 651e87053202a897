"""The Select step's rules side by side (pal_jax/inference/selection.py): selection accuracy, the share of "none" picks,
accuracy on persona-labelled and on "none"-labelled turns, for each checkpoint of a pipeline workdir.

One scoring pass per checkpoint and split gives every rule (they differ only in how the token log-probs are
combined). The "calibrated" bias is always fitted on the dev split, then applied to the split measured. Tune on
dev; read `--split test` only for final figures.

    python benchmarks/select_rules.py runs/pal                                   # tiny pipeline, dev split
    python benchmarks/select_rules.py runs/pal --split test
    python benchmarks/select_rules.py runs/pal_convai2 --preset tiny --data ../shared/data/convai2/valid_self_original.txt
    python benchmarks/select_rules.py runs/smollm2 --preset smollm2_convai2 --max 200 --names base,stage1,stage2
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: pal_jax, configs
from configs import pipeline as pcfg  # noqa: E402

from pal_jax.inference import predictor as predict
from pal_jax.inference import selection  # noqa: E402
from pal_jax.data import convai2, corpus  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("workdir", help="a pipeline workdir (stage1/, stage2/ inside)")
ap.add_argument("--preset", default="tiny", help="configs/pipeline.py preset")
ap.add_argument("--data", default="", help="a ConvAI2 text file (data.source=convai2); default: the preset's")
ap.add_argument("--split", default="dev", choices=("dev", "test"))
ap.add_argument("--max", type=int, default=0, help="turns per split (0 = all)")
ap.add_argument("--names", default="stage1,stage2", help="checkpoints: stage1, stage2, base (the preset's init_from)")
args = ap.parse_args()

c = pcfg.get_config(args.preset)
if args.data:
    c.data.source, c.data.path = "convai2", args.data
parts = corpus.load_corpus(c.data)


def recs(split):
    r = convai2.records_from_dialogues(parts[split])
    return r[:args.max] if args.max else r


dev = recs("dev")
meas = dev if args.split == "dev" else recs("test")
print(f"{args.workdir} ({c.data.source}): calibration on {len(dev)} dev turns; measured on {len(meas)} "
      f"{args.split} turns, {sum(r.persona_label == -1 for r in meas)} labelled 'none'")
print("| checkpoint | rule | accuracy | picks 'none' | acc. on persona turns | acc. on 'none' turns |")
print("| --- | --- | --- | --- | --- | --- |")
for name in args.names.split(","):
    path = c.init_from if name == "base" else os.path.join(args.workdir, name)
    cfg = c.copy_and_resolve_references()
    if name != "base":
        cfg.tokenizer.path = cfg.tokenizer.path or os.path.join(args.workdir, "stage1", "tokenizer")
    p = predict.load_predictor(cfg, path)
    t0 = time.time()
    f_dev = p.select_features(dev)
    f_meas = f_dev if meas is dev else p.select_features(meas)
    bias, dev_acc, _ = selection.calibrate_none_bias([f["sum"] for f in f_dev], [r.persona_label for r in dev])
    labels = np.array([r.persona_label for r in meas])
    for rule in selection.RULES:
        pick = np.array([selection.pick(selection.rule_scores(f, rule, bias)) for f in f_meas])
        note = f" (bias {bias:+.2f})" if rule == "calibrated" else ""
        print(f"| {name} | {rule}{note} | {np.mean(pick == labels):.3f} | {np.mean(pick == -1):.3f} | "
              f"{np.mean(pick[labels >= 0] == labels[labels >= 0]):.3f} | {np.mean(pick[labels == -1] == -1):.3f} |")
    persona = [(f, y) for f, y in zip(f_meas, labels) if y >= 0]
    top = np.mean([int(np.argmax(f["sum"][:-1])) == y for f, y in persona]) if persona else float("nan")
    print(f"| {name} | (labelled sentence first among the sentences, by sum) | {top:.3f} | | | |"
          f"  <!-- {time.time() - t0:.0f}s -->")
