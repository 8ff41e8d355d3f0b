"""D3PM absorbing (Austin et al. 2021) on LM1B (bert-base-uncased, length 128, sentences padded as MDLM's Table 1; --set data.packing=concat packs them as D3PM).

Command:
  diffusion-text train --config lm1b_d3pm_absorbing --workdir runs/lm1b_d3pm_absorbing \
    --set data.path=/path/to/1-billion-word-language-modeling-benchmark-r13output
  diffusion-text eval --workdir runs/lm1b_d3pm_absorbing
Expected: perplexity bound on the test split; published at 33B tokens: AR 22.3, MDLM <= 27.0, SEDD <= 32.8 (see docs/benchmarks.md).
"""

from experiments._base import paper_scale


def config():
  return paper_scale("lm1b", "d3pm_absorbing")
