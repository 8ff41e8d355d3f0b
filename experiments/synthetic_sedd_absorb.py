"""SEDD absorbing, score entropy (Lou et al. 2024) on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_sedd_absorb shows it).
Command:
  diffusion-text train --config synthetic_sedd_absorb --workdir runs/synthetic_sedd_absorb
"""

from experiments._base import synthetic


def config():
  return synthetic("sedd_absorb")
