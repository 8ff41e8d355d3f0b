"""SEDD uniform, score entropy (Lou et al. 2024) on the synthetic Markov corpus of known entropy.

A seconds-long smoke run: the bound it prints must stay above the corpus
entropy (diffusion-text data --config synthetic_sedd_uniform shows it).
Command:
  diffusion-text train --config synthetic_sedd_uniform --workdir runs/synthetic_sedd_uniform
"""

from experiments._base import synthetic


def config():
  return synthetic("sedd_uniform")
