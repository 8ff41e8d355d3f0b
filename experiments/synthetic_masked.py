"""Masked diffusion, continuous time (Sahoo et al. 2024 MDLM; Shi et al. 2024 MD4) on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_masked shows it).
Command:
  diffusion-text train --config synthetic_masked --workdir runs/synthetic_masked
"""

from experiments._base import synthetic


def config():
  return synthetic("masked")
