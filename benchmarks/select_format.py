"""Persona selection accuracy of the base SmolLM2-135M-Instruct (no fine-tuning) on the first N ConvAI2 dev-part
turns of configs/pipeline.py:smollm2_convai2: the plain vs the chat select prompt, candidates ranked by summed and
by mean token log-prob. The numbers behind predict.SELECT_AUTO (docs/real_run.md, "Prompt formats").

    python benchmarks/select_format.py [N=100]      # from the repository root
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: pal_jax, configs
from configs import pipeline as pcfg  # noqa: E402

from pal_jax.inference import predictor as predict  # noqa: E402
from pal_jax.data import convai2, corpus  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
c = pcfg.get_config("smollm2_convai2")
recs = convai2.records_from_dialogues(corpus.load_corpus(c.data)["dev"])[:n]
labels = np.array([r.persona_label for r in recs])
print(f"{len(recs)} dev turns; label 'none' share {np.mean(labels == -1):.3f}")
base = predict.load_predictor(c, "smollm2_gguf")
for fmt in ("plain", "chat"):  # the generate format does not matter here: only Select runs
    p = predict.Predictor(base.ms, base.params, base.tok, max_len=c.data.max_len, buckets=tuple(c.data.buckets),
                          batch_size=base.batch_size, sampling_cfg=base.sampling_cfg, prompt_format="chat",
                          select_format=fmt)
    t0 = time.time()
    end = [p.select_end_id]
    cands = [[p.tok.encode(t) + end for t in p.candidate_texts(r.persona)] for r in recs]
    longest = max(len(x) for cc in cands for x in cc)
    # what Predictor.select scores, both rankings from one pass
    prompts = [p._prompt_ids(p.select_prompt(r.persona, r.history), c.data.max_len - longest) for r in recs]
    sums, means = p.score(prompts, cands)
    for name, sc in (("sum", sums), ("mean", means)):
        pick = []
        for i, r in enumerate(recs):
            k = len(r.persona) + 1
            b = int(np.argmax(sc[i, :k]))
            pick.append(-1 if b == len(r.persona) else b)
        pick = np.array(pick)
        print(f"select_format={fmt} select_by={name}: accuracy {np.mean(pick == labels):.3f}, "
              f"none picked {np.mean(pick == -1):.3f}, acc on persona-labelled turns "
              f"{np.mean(pick[labels >= 0] == labels[labels >= 0]):.3f}, on none-labelled "
              f"{np.mean(pick[labels == -1] == -1):.3f}  ({time.time() - t0:.0f}s)")
