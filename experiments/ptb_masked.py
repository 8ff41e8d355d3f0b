"""Masked diffusion, continuous time (Sahoo et al. 2024 MDLM; Shi et al. 2024 MD4) on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_masked --workdir runs/ptb_masked
  diffusion-text eval --workdir runs/ptb_masked
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("masked")
