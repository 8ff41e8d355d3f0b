"""SEDD absorbing, score entropy (Lou et al. 2024) on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_sedd_absorb --workdir runs/ptb_sedd_absorb
  diffusion-text eval --workdir runs/ptb_sedd_absorb
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("sedd_absorb")
