"""SEDD absorbing, score entropy (Lou et al. 2024) at GPT-2-small size (bf16) on OpenWebText (GPT-2 tokens, EOS between documents, 1,024-token blocks, last 100k documents held out).

Command:
  diffusion-text train --config owt_sedd_absorb_small --workdir runs/owt_sedd_absorb_small \
    --set data.path=/path/to/openwebtext
  diffusion-text eval --workdir runs/owt_sedd_absorb_small
  diffusion-text eval --suite zero-shot --workdir runs/owt_sedd_absorb_small
Expected: perplexity bound on the held-out documents; published: AR 17.5, MDLM <= 23.2, SEDD <= 24.1 (see docs/benchmarks.md).
"""

from experiments._base import owt_small


def config():
  return owt_small("sedd_absorb")
