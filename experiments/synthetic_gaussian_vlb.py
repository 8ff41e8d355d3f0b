"""Continuous-time Gaussian VLB on embeddings (Kingma et al. 2021 VDM; Gulrajani & Hashimoto 2023 PLAID) on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_gaussian_vlb shows it).
Command:
  diffusion-text train --config synthetic_gaussian_vlb --workdir runs/synthetic_gaussian_vlb
"""

from experiments._base import synthetic


def config():
  return synthetic("gaussian_vlb", latent_dim=8)
