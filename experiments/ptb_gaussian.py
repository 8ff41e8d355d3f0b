"""Gaussian diffusion on learned embeddings (Ho et al. 2020; Li et al. 2022), T=1000, full discrete-time VLB on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_gaussian --workdir runs/ptb_gaussian
  diffusion-text eval --workdir runs/ptb_gaussian
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("gaussian", latent_dim=32)
