"""Gaussian diffusion on learned embeddings (Ho et al. 2020; Li et al. 2022), T=1000, full discrete-time VLB on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_gaussian shows it).
Command:
  diffusion-text train --config synthetic_gaussian --workdir runs/synthetic_gaussian
"""

from experiments._base import synthetic


def config():
  return synthetic("gaussian", latent_dim=8)
