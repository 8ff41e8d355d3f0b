"""Continuous-time Gaussian VLB on embeddings (Kingma et al. 2021 VDM; Gulrajani & Hashimoto 2023 PLAID) on PTB (word level, 10k vocabulary).

Command:
  diffusion-text train --config ptb_gaussian_vlb --workdir runs/ptb_gaussian_vlb
  diffusion-text eval --workdir runs/ptb_gaussian_vlb
Expected: see docs/results.md (the demo's table) for the bound this preset
reaches with the demo's budget.
"""

import dataclasses

from experiments._base import ptb_word


def config():
  cfg = ptb_word("gaussian_vlb", latent_dim=32)
  # One continuous time per block gives a noisy (if unbiased) bound: average 4.
  return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, mc_samples=4))
