"""Tokenizers: characters, words, GPT-2 BPE, BERT WordPiece, identity.

All of them load offline. 'char' and 'word' learn their vocabulary from the
training split (PTB's word vocabulary is Mikolov's 10k, `<unk>` included);
'gpt2' is OpenAI's byte-level BPE read from `encoder.json`/`vocab.bpe` (as in
SEDD, Lou et al. 2024, and GPT-2, Radford et al. 2019); 'bert' is the
bert-base-uncased WordPiece vocabulary (used by MDLM for LM1B); 'text8' is
text8's fixed 27 characters; 'identity' is for token-level sources (the
synthetic Markov chain). Tokenizers are built by name from a registry.

A tokenizer round-trips through `to_json()` / `tokenizer_from_json()` so a
workdir can restore exactly the vocabulary it was trained with;
`fingerprint()` is a hash of the vocabulary used to detect mismatches.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, Optional, Sequence, Union

from diffusion_text import config as config_lib
from diffusion_text.config import ConfigError

TrainText = Union[str, Sequence[str], None]

EOS_WORD = "<eos>"
UNK_WORD = "<unk>"


def _hash_vocab(tokens_by_id: Sequence[str]) -> str:
  blob = json.dumps(list(tokens_by_id), ensure_ascii=False).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()


class Tokenizer:
  """Base class: text <-> int ids. Subclasses set name/vocab_size/eos_id."""

  name: str = ""
  vocab_size: int = 0
  eos_id: Optional[int] = None

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def unknown(self, text: str) -> list[str]:
    """The pieces of `text` that encode to an unknown-token id (none for
    byte-level and fixed-alphabet tokenizers)."""
    return []

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def fingerprint(self) -> str:
    raise NotImplementedError

  def to_json(self) -> dict:
    return {"name": self.name, "fingerprint": self.fingerprint()}

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, "
            f"vocab_size={self.vocab_size}, eos_id={self.eos_id})")


class _VocabTokenizer(Tokenizer):
  """A fixed list of string types; id = position in the list."""

  def __init__(self, vocab: Sequence[str], unk: str, eos: str):
    self.vocab = list(vocab)
    self.index = {tok: i for i, tok in enumerate(self.vocab)}
    if len(self.index) != len(self.vocab):
      raise ValueError("vocabulary has duplicate entries")
    self.unk_id = self.index[unk]
    self.eos_id = self.index[eos]
    self.vocab_size = len(self.vocab)

  def units(self, text: str) -> list[str]:
    """`text` cut into the units the vocabulary lists."""
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    get, unk = self.index.get, self.unk_id
    return [get(u, unk) for u in self.units(text)]

  def unknown(self, text: str) -> list[str]:
    return [u for u in self.units(text) if u not in self.index]

  def fingerprint(self) -> str:
    return _hash_vocab(self.vocab)

  def to_json(self) -> dict:
    return {**super().to_json(), "vocab": self.vocab}


class CharTokenizer(_VocabTokenizer):
  """Sorted characters of the training text, then <unk>, then EOS."""

  name = "char"
  UNK = "\x00<unk>"   # multi-character names can never collide with a char
  EOS = "\x00<eos>"

  @classmethod
  def from_text(cls, train_text: TrainText) -> "CharTokenizer":
    return cls(sorted(_types(train_text, list)) + [cls.UNK, cls.EOS])

  def __init__(self, vocab: Sequence[str]):
    super().__init__(vocab, self.UNK, self.EOS)

  def units(self, text: str) -> list[str]:
    return list(text)

  def decode(self, ids: Iterable[int]) -> str:
    # EOS ends a unit (a line), so it reads as a newline.
    out = {self.eos_id: "\n", self.unk_id: "\ufffd"}
    return "".join(out.get(i, self.vocab[i]) if 0 <= i < self.vocab_size
                   else "\ufffd" for i in map(int, ids))


def _types(train_text: TrainText, split) -> set[str]:
  """The set of units (`split(text)`) of one text or a sequence of texts."""
  texts = [train_text] if isinstance(train_text, str) else train_text
  out = set()
  for t in texts:
    out.update(split(t))
  return out


class WordTokenizer(_VocabTokenizer):
  """Whitespace types of the training text (sorted), <unk> and <eos>."""

  name = "word"

  @classmethod
  def from_text(cls, train_text: TrainText) -> "WordTokenizer":
    types = _types(train_text, str.split)
    types.discard(EOS_WORD)
    types.add(UNK_WORD)
    return cls(sorted(types) + [EOS_WORD])

  def __init__(self, vocab: Sequence[str]):
    super().__init__(vocab, UNK_WORD, EOS_WORD)

  def units(self, text: str) -> list[str]:
    return text.split()

  def decode(self, ids: Iterable[int]) -> str:
    pieces = []
    for i in map(int, ids):
      if i == self.eos_id:
        pieces.append("\n")   # EOS ends a unit (a line)
        continue
      word = self.vocab[i] if 0 <= i < self.vocab_size else UNK_WORD
      pieces.append(word if not pieces or pieces[-1] == "\n" else " " + word)
    return "".join(pieces)


class _HFTokenizer(Tokenizer):
  """Wraps a `tokenizers.Tokenizer` (Rust; encode_batch is parallel)."""

  def __init__(self, tok, eos_id: int, data_dir: pathlib.Path):
    self._tok = tok
    self.eos_id = eos_id
    self.vocab_size = tok.get_vocab_size()
    self.data_dir = data_dir
    self._fingerprint = None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # encode_batch_fast: the same ids without offsets (not on every wrapper).
    encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
    encs = encode(list(texts), add_special_tokens=False)
    return [e.ids for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def fingerprint(self) -> str:
    if self._fingerprint is None:
      vocab = self._tok.get_vocab()
      self._fingerprint = _hash_vocab(sorted(vocab, key=vocab.__getitem__))
    return self._fingerprint

  def to_json(self) -> dict:
    return {**super().to_json(), "data_dir": str(self.data_dir)}


class GPT2Tokenizer(_HFTokenizer):
  """OpenAI GPT-2 byte-level BPE, 50,257 ids, EOS = <|endoftext|> = 50256."""

  name = "gpt2"

  def __init__(self, data_dir: pathlib.Path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    d = pathlib.Path(data_dir) / "gpt2_tokenizer"
    if (d / "encoder.json").exists() and (d / "vocab.bpe").exists():
      tok = HFTokenizer(models.BPE.from_file(str(d / "encoder.json"),
                                             str(d / "vocab.bpe")))
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
    elif (d / "tokenizer.json").exists():
      tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    else:
      raise _missing(d / "encoder.json", "the GPT-2 BPE files "
                     "(encoder.json and vocab.bpe, or tokenizer.json)")
    super().__init__(tok, tok.token_to_id("<|endoftext|>"), data_dir)


class BertTokenizer(_HFTokenizer):
  """bert-base-uncased WordPiece (lowercased); EOS is [SEP] as in MDLM."""

  name = "bert"

  def __init__(self, data_dir: pathlib.Path):
    from tokenizers.implementations import BertWordPieceTokenizer
    path = pathlib.Path(data_dir) / "bert-base-uncased" / "bert-base-uncased-vocab.txt"
    if not path.exists():
      raise _missing(path, "the BERT WordPiece vocabulary")
    tok = BertWordPieceTokenizer(str(path), lowercase=True)
    super().__init__(tok, tok.token_to_id("[SEP]"), data_dir)


class IdentityTokenizer(Tokenizer):
  """Ids are already tokens (token-level sources); text is space-separated ids."""

  name = "identity"

  def __init__(self, vocab_size: int):
    self.vocab_size = int(vocab_size)
    self.eos_id = None

  def encode(self, text: str) -> list[int]:
    ids = [int(w) for w in text.split()]
    if any(not 0 <= i < self.vocab_size for i in ids):
      raise ValueError(f"identity tokenizer: ids must lie in [0, {self.vocab_size})")
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    return " ".join(str(int(i)) for i in ids)

  def fingerprint(self) -> str:
    return _hash_vocab([str(i) for i in range(self.vocab_size)])

  def to_json(self) -> dict:
    return {**super().to_json(), "vocab_size": self.vocab_size}


class Text8Tokenizer(Tokenizer):
  """text8's 27 characters (a-z and space), no EOS: the corpus is one stream.

  D3PM (Austin et al. 2021) and MD4 (Shi et al. 2024) model text8 as
  256-character chunks of one continuous stream; bits per character are the
  nats per token of this tokenizer divided by ln 2.
  """

  name = "text8"
  CHARS = "abcdefghijklmnopqrstuvwxyz "

  def __init__(self):
    self.vocab_size = len(self.CHARS)
    self.eos_id = None
    self._index = {c: i for i, c in enumerate(self.CHARS)}

  def encode(self, text: str) -> list[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      raise ConfigError(f"text8 holds only a-z and space, found {e.args[0]!r}; "
                        "use the text8 file (or data.tokenizer=char)") from None

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(self.CHARS[i] if 0 <= i < self.vocab_size else "\ufffd"
                   for i in map(int, ids))

  def fingerprint(self) -> str:
    return _hash_vocab(list(self.CHARS))


# ------------------------------------------------------------------ registry
def _missing(path: pathlib.Path, what: str) -> ConfigError:
  return ConfigError(
      f"missing {what}: {path} does not exist. Point the data directory at "
      "the project's data (set DIFFUSION_TEXT_DATA or data.data_dir=PATH, "
      "e.g. ../shared/data)")


def resolve_data_dir(data_dir) -> pathlib.Path:
  d = data_dir or config_lib.default_data_dir()
  if not d:
    raise ConfigError("no data directory: set DIFFUSION_TEXT_DATA or "
                      "data.data_dir=PATH (e.g. ../shared/data)")
  d = pathlib.Path(d).expanduser()
  if not d.is_dir():
    raise ConfigError(f"data directory {d} does not exist: set "
                      "DIFFUSION_TEXT_DATA or data.data_dir=PATH "
                      "(e.g. ../shared/data)")
  return d


def _learned(cls):
  def make(data_dir, train_text, vocab_size):
    if train_text is None:
      raise ConfigError(f"tokenizer {cls.name!r} learns its vocabulary from a "
                        "training split; this source has none (use "
                        "data.tokenizer=gpt2 or bert)")
    return cls.from_text(train_text)
  return make


def _from_files(cls):
  return lambda data_dir, train_text, vocab_size: cls(resolve_data_dir(data_dir))


def _identity(data_dir, train_text, vocab_size):
  if vocab_size is None:
    raise ConfigError("the identity tokenizer needs vocab_size")
  return IdentityTokenizer(vocab_size)


# name -> make(data_dir, train_text, vocab_size)
_MAKERS = {
    "char": _learned(CharTokenizer),
    "word": _learned(WordTokenizer),
    "gpt2": _from_files(GPT2Tokenizer),
    "bert": _from_files(BertTokenizer),
    "text8": lambda data_dir, train_text, vocab_size: Text8Tokenizer(),
    "identity": _identity,
}


def names() -> list[str]:
  return list(_MAKERS)


def _unknown(name, where: str) -> ConfigError:
  return ConfigError(f"unknown tokenizer {name!r} ({where}); choose one of: "
                     f"{', '.join(names())}")


def make_tokenizer(name: str, data_dir=None, train_text: TrainText = None,
                   vocab_size: Optional[int] = None) -> Tokenizer:
  """Build tokenizer `name`; 'char'/'word' need `train_text` (str or units)."""
  if name not in _MAKERS:
    raise _unknown(name, "data.tokenizer")
  return _MAKERS[name](data_dir, train_text, vocab_size)


def _reload_from_files(d: dict, data_dir) -> Tokenizer:
  try:
    root = resolve_data_dir(data_dir)
  except ConfigError:
    if not d.get("data_dir"):
      raise
    root = resolve_data_dir(d["data_dir"])
  return make_tokenizer(d["name"], root)


# name -> load(saved dict, data_dir); inverse of each tokenizer's to_json
_LOADERS = {
    "char": lambda d, data_dir: CharTokenizer(d["vocab"]),
    "word": lambda d, data_dir: WordTokenizer(d["vocab"]),
    "identity": lambda d, data_dir: IdentityTokenizer(d["vocab_size"]),
    "text8": lambda d, data_dir: Text8Tokenizer(),
    "gpt2": _reload_from_files,
    "bert": _reload_from_files,
}


def tokenizer_from_json(d: dict, data_dir=None) -> Tokenizer:
  """Inverse of `to_json`; GPT-2/BERT reload from the data dir and are checked."""
  name = d.get("name")
  if name not in _LOADERS:
    raise _unknown(name, "saved tokenizer")
  tok = _LOADERS[name](d, data_dir)
  if d.get("fingerprint") and d["fingerprint"] != tok.fingerprint():
    raise ConfigError(
        f"vocabulary mismatch: the saved {name!r} tokenizer has fingerprint "
        f"{d['fingerprint'][:12]}, the files found give "
        f"{tok.fingerprint()[:12]}; point the data directory at the files "
        "the run was trained with")
  return tok
