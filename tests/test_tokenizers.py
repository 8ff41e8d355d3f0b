"""Tokenizers: published ids, vocabulary sizes, round trips, saved-state checks."""

import shutil

import pytest

from diffusion_text import config as config_lib
from diffusion_text.config import ConfigError
from diffusion_text.data import tokenizers
from diffusion_text.eval import samples


def test_gpt2_matches_published_ids_and_round_trips(data_dir):
  tok = tokenizers.make_tokenizer("gpt2", data_dir)
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.vocab_size == 50257 and tok.eos_id == 50256
  text = "  Naïve café — 東京 🙂\n\ttabs, 'quotes' and <unk>s!"
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_gpt2_counts_wikitext_test_like_the_reference(data_dir):
  # README: the HF tokenizer gives 286,221 tokens on the raw test file.
  tok = tokenizers.make_tokenizer("gpt2", data_dir)
  text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text("utf-8")
  assert len(tok.encode(text)) == 286_221
  rows = text.splitlines(keepends=True)
  assert tok.encode_batch(rows[:50]) == [tok.encode(r) for r in rows[:50]]


def test_gpt2_from_tokenizer_json_has_the_same_vocabulary(data_dir, tmp_path):
  only_json = tmp_path / "gpt2_tokenizer"
  only_json.mkdir()
  shutil.copy(data_dir / "gpt2_tokenizer" / "tokenizer.json", only_json)
  a = tokenizers.make_tokenizer("gpt2", data_dir)
  b = tokenizers.make_tokenizer("gpt2", tmp_path)
  assert a.fingerprint() == b.fingerprint()
  assert b.encode("Hello world") == [15496, 995]


def test_bert_wordpiece_ids_are_vocab_file_lines(data_dir):
  tok = tokenizers.make_tokenizer("bert", data_dir)
  lines = (data_dir / "bert-base-uncased" /
           "bert-base-uncased-vocab.txt").read_text("utf-8").splitlines()
  assert tok.vocab_size == len(lines) == 30522
  assert tok.eos_id == lines.index("[SEP]")
  ids = tok.encode("Hello, World!")   # lower-cased, no [CLS]/[SEP] added
  assert ids == [lines.index(w) for w in ("hello", ",", "world", "!")]
  assert tok.decode(ids) == "hello, world!"


def test_word_vocabulary_of_ptb(data_dir):
  train = (data_dir / "ptb" / "ptb.train.txt").read_text("utf-8").splitlines()
  tok = tokenizers.make_tokenizer("word", data_dir, train)
  # Mikolov's PTB: 9,999 types (<unk> included) plus <eos>.
  assert tok.vocab_size == 10_000
  assert tok.vocab[tok.eos_id] == "<eos>" and tok.vocab[tok.unk_id] == "<unk>"
  test = (data_dir / "ptb" / "ptb.test.txt").read_text("utf-8").splitlines()
  ids = [i for line in test for i in tok.encode(line)]
  n_words = sum(len(line.split()) for line in test)
  assert len(ids) == n_words
  # Every test word is in the train vocabulary: unknowns are only literal <unk>.
  assert ids.count(tok.unk_id) == sum(line.split().count("<unk>") for line in test)
  line = test[3]
  assert tok.decode(tok.encode(line) + [tok.eos_id]) == " ".join(line.split()) + "\n"
  assert tok.encode("zzyzx-not-a-word") == [tok.unk_id]
  assert tok.unknown("the zzyzx <unk> company qqq") == ["zzyzx", "qqq"]
  # What `diffusion-text sample` prints before sampling (eval/samples.py).
  assert samples.notices(tok, "the zzyzx ___ qqq", 64, 64) == [
      "not in the vocabulary, fixed as the unknown token: 'qqq', 'zzyzx'"]
  assert samples.notices(tok, "the company", 80, 64) == [
      "length 80 is longer than the 64-token blocks the model was trained "
      "on; positions past them were never trained"]
  assert samples.notices(tok, "the company", 64, 64) == []


def test_char_round_trip_and_unknowns():
  tok = tokenizers.make_tokenizer("char", None, ["hello", "world!"])
  assert tok.vocab[:8] == sorted("helowrd!")
  assert tok.vocab_size == 8 + 2   # + <unk> + EOS
  assert tok.decode(tok.encode("hello world!")) == "hello\ufffdworld!"
  assert tok.encode("hold") == [tok.vocab.index(c) for c in "hold"]
  assert tok.encode("Q") == [tok.unk_id]
  assert tok.unknown("hQ oZ") == ["Q", " ", "Z"]  # no space in its text
  assert tok.decode([tok.vocab.index("h"), tok.eos_id]) == "h\n"


def test_identity():
  tok = tokenizers.make_tokenizer("identity", vocab_size=8)
  assert tok.encode("3 1 7") == [3, 1, 7] and tok.decode([0, 5]) == "0 5"
  assert tok.eos_id is None and tok.unknown("3 1") == []
  with pytest.raises(ValueError):
    tok.encode("8")


@pytest.mark.parametrize("name", ["char", "word", "identity", "gpt2"])
def test_json_round_trip(name, data_dir):
  tok = tokenizers.make_tokenizer(name, data_dir, ["a b c", "b c d!"],
                                  vocab_size=5)
  back = tokenizers.tokenizer_from_json(tok.to_json())
  assert type(back) is type(tok)
  assert back.fingerprint() == tok.fingerprint()
  assert back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
  if name != "identity":
    assert back.encode("b c d!") == tok.encode("b c d!")


def test_vocabulary_mismatch_is_reported():
  saved = tokenizers.make_tokenizer("word", None, "a b c").to_json()
  saved["fingerprint"] = "0" * 64
  with pytest.raises(ConfigError, match="vocabulary mismatch"):
    tokenizers.tokenizer_from_json(saved)


def test_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="unknown tokenizer 'bpe'.*gpt2"):
    tokenizers.make_tokenizer("bpe", tmp_path)
  with pytest.raises(ConfigError, match="DIFFUSION_TEXT_DATA"):
    tokenizers.make_tokenizer("gpt2", tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="encoder.json.*DIFFUSION_TEXT_DATA"):
    tokenizers.make_tokenizer("gpt2", tmp_path)   # exists, but no files
  monkeypatch.delenv("DIFFUSION_TEXT_DATA")
  # Outside a source checkout (no ../shared/data default) and no env var.
  monkeypatch.setattr(config_lib, "_source_checkout", lambda: False)
  with pytest.raises(ConfigError, match="data.data_dir=PATH"):
    tokenizers.make_tokenizer("bert")
  with pytest.raises(ConfigError, match="train"):
    tokenizers.make_tokenizer("word", None)


def test_text8_characters_and_registry_round_trip():
  tok = tokenizers.make_tokenizer("text8")
  assert tok.vocab_size == 27 and tok.eos_id is None
  ids = tok.encode("anarchism originated")
  assert ids[:2] == [0, 13] and ids[9] == 26   # a, n, ...; the space is last
  assert tok.decode(ids) == "anarchism originated"
  # Every registered tokenizer that needs no files round-trips through JSON.
  for name, args in {"char": (None, "ab c"), "word": (None, "a b"),
                     "text8": (), "identity": (None, None, 5)}.items():
    made = tokenizers.make_tokenizer(name, *args)
    back = tokenizers.tokenizer_from_json(made.to_json())
    assert type(back) is type(made) and back.fingerprint() == made.fingerprint()
  assert set(tokenizers.names()) == {"char", "word", "gpt2", "bert", "text8", "identity"}
  with pytest.raises(ConfigError, match="unknown tokenizer 'bpe'.*saved"):
    tokenizers.tokenizer_from_json({"name": "bpe"})
