"""Continuous-time Gaussian VLB on embeddings (Kingma et al. 2021 VDM; Gulrajani & Hashimoto 2023 PLAID) on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_gaussian_vlb --workdir runs/ptb_gaussian_vlb
  diffusion-text eval --workdir runs/ptb_gaussian_vlb
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

from experiments._base import ptb_word


def config():
  return ptb_word("gaussian_vlb")
