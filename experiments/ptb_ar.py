"""Autoregressive baseline (causal backbone, exact NLL) on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_ar --workdir runs/ptb_ar
  diffusion-text eval --workdir runs/ptb_ar
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("ar")
