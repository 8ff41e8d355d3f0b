"""Per-dataset detokenizers of the SEDD zero-shot protocol.

Lou, Meng & Ermon 2024 (SEDD), `data.py`: every evaluation set is
detokenized row by row with a dataset-specific function before GPT-2 BPE.
The functions reproduce SEDD's rules exactly (including its quirks, e.g. the
WikiText contraction regex that only ever matches literal slashes), so
numbers are comparable with the published table. They belong to the data
layer: the pipeline applies them while tokenizing; `eval.protocol` only
names the protocol.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

# The detokenizers apply only with the tokenizer SEDD evaluates with.
PROTOCOL_TOKENIZER = "gpt2"
PROTOCOL_NAME = "sedd_zero_shot"


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
  if tokenizer != PROTOCOL_TOKENIZER:
    return None
  return DETOKENIZERS.get(source)
