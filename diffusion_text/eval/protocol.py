"""The SEDD zero-shot evaluation protocol: constants and detokenizers.

Lou, Meng & Ermon 2024, "Discrete Diffusion Modeling by Estimating the Ratios
of the Data Distribution" (SEDD), Table 1 / Appendix: every evaluation set is
detokenized row by row with a dataset-specific function, tokenized with GPT-2
BPE, an EOS is appended to every row (empty rows included), the rows are
concatenated and cut into non-overlapping 1024-token blocks. The detokenizers
below reproduce the rules of SEDD's `data.py` exactly (including its quirks,
e.g. the WikiText contraction regex that only ever matches literal slashes),
so numbers are comparable with the published table.

One documented difference: SEDD drops the final partial block; our pipeline
keeps it, padded and masked, so every token of the set is scored.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

# Pinned into every zero-shot result (see diffusion_text.data.pipeline).
PROTOCOL = {
    "name": "sedd_zero_shot",
    "tokenizer": "gpt2",
    "eos_per_row": True,
    "block_length": 1024,        # configurable via data.seq_len
    "concatenate_rows": True,
    "final_partial_block": "kept, padded, masked",
    "reference": "Lou et al. 2024 (SEDD), data.py",
}


def wt_detokenizer(string: str) -> str:
  """WikiText: undo the ' @-@ ' separators and spaced punctuation."""
  # contractions
  string = string.replace("s '", "s'")
  string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
  # number separators
  string = string.replace(" @-@ ", "-")
  string = string.replace(" @,@ ", ",")
  string = string.replace(" @.@ ", ".")
  # punctuation
  string = string.replace(" : ", ": ")
  string = string.replace(" ; ", "; ")
  string = string.replace(" . ", ". ")
  string = string.replace(" ! ", "! ")
  string = string.replace(" ? ", "? ")
  string = string.replace(" , ", ", ")
  # double brackets
  string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
  string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
  string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
  string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
  string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
  # miscellaneous
  string = string.replace("= = = =", "====")
  string = string.replace("= = =", "===")
  string = string.replace("= =", "==")
  string = string.replace(" " + chr(176) + " ", chr(176))
  string = string.replace(" \n", "\n")
  string = string.replace("\n ", "\n")
  string = string.replace(" N ", " 1 ")
  string = string.replace(" 's", "'s")
  return string


def ptb_detokenizer(x: str) -> str:
  """Penn Treebank (Mikolov): contractions, '\\/', N -> 1, <unk> -> '?'."""
  x = x.replace(" 's", "'s")
  x = x.replace("s ' ", "s' ")
  x = x.replace(" n't", "n't")
  x = x.replace(" \n ", "\n")
  x = x.replace("\\/", "/")
  for _ in range(10):  # overlapping ' N N ' needs repeated passes
    x = x.replace(" N ", " 1 ")
  x = x.replace("$ 1", "$1")
  x = x.replace("# 1", "#1")
  x = x.replace("<unk>", "?")
  return x


def lm1b_detokenizer(x: str) -> str:
  """One Billion Word: URLs, clitics, spaced punctuation and brackets."""
  x = x.replace("http : / / ", "http://")
  x = x.replace("https : / / ", "https://")
  x = re.sub(r" \'(\w+)", r"'\1", x)
  x = re.sub(r" (\w+) \. ", r" \1. ", x)
  x = re.sub(r" (\w+) \.$", r" \1.", x)
  x = x.replace(" ? ", "? ")
  x = re.sub(r" \?$", "?", x)
  x = x.replace(" ! ", "! ")
  x = re.sub(r" \!$", "!", x)
  x = x.replace(" , ", ", ")
  x = x.replace(" : ", ": ")
  x = x.replace(" ; ", "; ")
  x = x.replace(" / ", "/")
  x = re.sub(r"\" ([^\"]+) \"", r'"\1"', x)
  x = re.sub(r"\' ([^\']+) \'", r"'\1'", x)
  x = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", x)
  x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
  x = x.replace("$ ", "$")
  x = x.replace("£ ", "£")
  return x


def lambada_detokenizer(text: str) -> str:
  """LAMBADA (OpenAI's version): straight quotes, one leading newline."""
  text = text.replace("“", '"')
  text = text.replace("”", '"')
  return "\n" + text.strip()


# Source name (diffusion_text.data.sources) -> detokenizer.
DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext2": wt_detokenizer,
    "wikitext103": wt_detokenizer,
    "ptb": ptb_detokenizer,
    "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer,
}


def detokenizer_for(source: str, tokenizer: str) -> Optional[Callable[[str], str]]:
  """The detokenizer the protocol applies, or None (only with GPT-2 BPE)."""
  if tokenizer != PROTOCOL["tokenizer"]:
    return None
  return DETOKENIZERS.get(source)
