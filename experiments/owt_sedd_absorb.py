"""SEDD absorbing, score entropy (Lou et al. 2024) on OpenWebText (GPT-2 tokens, EOS between documents, 1,024-token blocks, last 100k documents held out).

Command:
  diffusion-text train --config owt_sedd_absorb --workdir runs/owt_sedd_absorb \
    --set data.path=/path/to/openwebtext
  diffusion-text eval --workdir runs/owt_sedd_absorb
Expected: perplexity bound on the held-out documents; published: AR 17.5, MDLM <= 23.2, SEDD <= 24.1 (see docs/benchmarks.md).
"""

from experiments._base import paper_scale


def config():
  return paper_scale("owt", "sedd_absorb")
