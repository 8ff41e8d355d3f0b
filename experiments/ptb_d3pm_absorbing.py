"""D3PM absorbing [MASK] (Austin et al. 2021), T=1000, hybrid loss lambda=0.01 on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_d3pm_absorbing --workdir runs/ptb_d3pm_absorbing
  diffusion-text eval --workdir runs/ptb_d3pm_absorbing
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("d3pm_absorbing")
