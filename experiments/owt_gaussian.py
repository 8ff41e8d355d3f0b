"""Gaussian diffusion on token embeddings (Li et al. 2022 Diffusion-LM) on OpenWebText (GPT-2 tokens, EOS between documents, 1,024-token blocks, last 100k documents held out).

Command:
  diffusion-text train --config owt_gaussian --workdir runs/owt_gaussian \
    --set data.path=/path/to/openwebtext
  diffusion-text eval --workdir runs/owt_gaussian
Expected: perplexity bound on the held-out documents; published: AR 17.5, MDLM <= 23.2, SEDD <= 24.1 (see docs/benchmarks.md).
"""

from experiments._base import paper_scale


def config():
  return paper_scale("owt", "gaussian")
