"""Does a checkpoint copy the highlighted persona into its reply? Two probes on the synthetic corpus's dev split
(tune on dev; `--split test` only for final figures), both with the gold persona sentence highlighted, so the
Select step plays no part:

1. oracle persona use: greedy replies on the persona-labelled turns; the share that states the labelled fact
   (all of its keywords, evaluate.synthetic_persona_use);
2. value rank: the gold reply scored against the same reply with the fact's keyword swapped for each other value
   of the same attribute (summed log-prob); top-1 = the model prefers the highlighted value, per attribute. Chance
   is a mean rank of about (values - 1) / 2.

    PYTHONPATH=. python benchmarks/persona_copy.py WORKDIR            # a stage1 / stage2 / pipeline-phase workdir
    PYTHONPATH=. python benchmarks/persona_copy.py WORKDIR --rank 300 # also the value-rank probe on 300 turns
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: pal_jax, configs
from configs import pipeline as pcfg  # noqa: E402

from pal_jax.evaluation import evaluate
from pal_jax.inference import predictor as predict  # noqa: E402
from pal_jax.data import records as records_lib  # noqa: E402
from pal_jax.data import synthetic  # noqa: E402
from pal_jax.inference.predictor import Prediction, Record  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("workdir", help="a workdir holding a checkpoint (tiny preset, synthetic corpus)")
ap.add_argument("--split", default="dev", choices=("dev", "test"))
ap.add_argument("--rank", type=int, default=0, help="persona turns for the value-rank probe; 0 = skip it")
ap.add_argument("--show", type=int, default=4, help="replies printed")
ap.add_argument("--max-new-tokens", type=int, default=0,
                help="decoding budget (the prompt gets data.max_len minus it); 0 = the pipeline preset's")
a = ap.parse_args()

c = pcfg.get_config("tiny")
# the run's own row length and buckets (config.json of the workdir): the prompts are cut as in its training
with open(os.path.join(a.workdir, "config.json")) as f:
    saved = json.load(f)
c.data.max_len, c.data.buckets = saved["data"]["max_len"], tuple(saved["data"]["buckets"])
if a.max_new_tokens:
    c.predict.max_new_tokens = a.max_new_tokens
c.predict.split, c.predict.select_by, c.mesh.cpu_devices, c.predict.batch_size = a.split, "sum", 0, 64
t0 = time.time()
p = predict.load_predictor(c, a.workdir)
records, _ = records_lib.load_records(c)
recs = [r for r in records if r.persona_label is not None and r.persona_label >= 0]
replies = p.generate([Record(tuple(r.persona), tuple(r.history)) for r in recs], [r.persona_label for r in recs])
preds = [Prediction(selected=r.persona_label, selected_text="", select_score=0.0, candidate_scores=[], response=x)
         for r, x in zip(recs, replies)]
use = evaluate.synthetic_persona_use(recs, preds)["persona_use_rate"]
print(f"{a.workdir}: oracle persona use {np.nanmean(use):.4f} on {len(recs)} persona-labelled {a.split} turns "
      f"({time.time() - t0:.0f} s)")
for r, x in list(zip(recs, replies))[:a.show]:
    print(f"  highlighted: {r.persona[r.persona_label]} | user: {r.history[-1]} | reply: {x} | gold: {r.response}")

if a.rank:
    kept, cands, attrs = [], [], []
    for r in recs[:a.rank]:
        fact = synthetic.FACT_BY_SENTENCE[r.persona[r.persona_label]]
        kw = fact.keywords[0]
        if not synthetic.mentions(r.response, kw):
            continue
        others = [f.keywords[0] for f in synthetic.FACTS_BY_ATTRIBUTE[fact.attribute] if f.keywords[0] != kw]
        texts = [r.response] + [r.response.replace(kw, o) for o in others]
        kept.append(r)
        cands.append([p.tok.encode(t) + [p.tok.eos_id] for t in texts])
        attrs.append(fact.attribute)
    budget = p.max_len - max(len(x) for cs in cands for x in cs)  # every candidate fits after its prompt
    prompts = p.generate_prompts([Record(tuple(r.persona), tuple(r.history)) for r in kept],
                                 [r.persona_label for r in kept], budget)
    sums, _ = p.score(prompts, cands)
    ranks = collections.defaultdict(list)
    for row, (attr, cs) in enumerate(zip(attrs, cands)):
        s = sums[row, :len(cs)]
        ranks[attr].append(int((s > s[0]).sum()))
    every = [x for v in ranks.values() for x in v]
    print(f"value rank: top-1 {np.mean([x == 0 for x in every]):.3f}, mean rank {np.mean(every):.2f} "
          f"(chance {np.mean([(len(cs) - 1) / 2 for cs in cands]):.2f}), {len(every)} turns")
    for attr, v in sorted(ranks.items()):
        print(f"  {attr:10s} top-1 {np.mean([x == 0 for x in v]):.2f}  mean rank {np.mean(v):.2f}  n={len(v)}")
