"""D3PM uniform (Austin et al. 2021), T=1000, cosine schedule, hybrid loss on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_d3pm_uniform --workdir runs/ptb_d3pm_uniform
  diffusion-text eval --workdir runs/ptb_d3pm_uniform
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("d3pm_uniform")
