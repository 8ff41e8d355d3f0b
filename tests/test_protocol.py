"""SEDD zero-shot protocol: detokenizer rules (data.detokenizers) on hand-worked strings, constants."""

import pytest

from diffusion_text.data import detokenizers, sources
from diffusion_text.eval import protocol


@pytest.mark.parametrize("raw, expected", [
    # number separators, spaced full stop, clitic 's
    ("The game 's release @-@ date was 1 @,@ 000 @.@ 5 km . Next",
     "The game's release-date was 1,000.5 km. Next"),
    # heading markers collapse; the space before the newline goes
    (" = = Reception = = \n", " == Reception ==\n"),
    (" = = = Sales = = = \n", " === Sales ===\n"),
    # brackets and quotes hug their contents; plural possessive
    ('the ( first ) players \' club said " yes " , then',
     'the (first) players\' club said "yes", then'),
    # degree sign, " N " placeholder
    ("at 20 ° C with N units", "at 20°C with 1 units"),
])
def test_wikitext(raw, expected):
  assert detokenizers.wt_detokenizer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("it does n't have N N shares at $ N each",
     "it doesn't have 1 1 shares at $1 each"),
    ("the company 's investors ' <unk> rose N % in the u.s. \\/ japan",
     "the company's investors' ? rose 1 % in the u.s. / japan"),
    ("N bonds , # N notes", "N bonds , #1 notes"),  # ' N ' needs both spaces
    ("pay # N N later", "pay #1 1 later"),
])
def test_ptb(raw, expected):
  assert detokenizers.ptb_detokenizer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("I do n't know , he said .", "I do n't know, he said."),
    ("It 's at http : / / www.example.com now !", "It's at http://www.example.com now!"),
    ("The price is $ 5 ( about £ 3 ) .", "The price is $5 (about £3) ."),
    ('He said " go away " ; she left ?', 'He said "go away"; she left?'),
    ("Mr. Smith arrived . Then he left", "Mr. Smith arrived. Then he left"),
])
def test_lm1b(raw, expected):
  assert detokenizers.lm1b_detokenizer(raw) == expected


def test_lambada():
  raw = "“Hi,” she said.  He smiled, “Bye.” "
  assert detokenizers.lambada_detokenizer(raw) == '\n"Hi," she said.  He smiled, "Bye."'


def test_protocol_selection():
  assert protocol.PROTOCOL["tokenizer"] == "gpt2"
  assert protocol.PROTOCOL["block_length"] == 1024
  assert protocol.PROTOCOL["eos_per_row"] is True
  assert set(detokenizers.DETOKENIZERS) <= set(sources.names())
  assert detokenizers.detokenizer_for("ptb", "gpt2") is detokenizers.ptb_detokenizer
  assert detokenizers.detokenizer_for("wikitext103", "gpt2") is detokenizers.wt_detokenizer
  assert detokenizers.detokenizer_for("ptb", "word") is None
  assert detokenizers.detokenizer_for("tinyshakespeare", "gpt2") is None
  assert protocol.PROTOCOL["detokenizers"]["ptb"] == "ptb_detokenizer"


def test_data_never_imports_eval():
  import pathlib
  import diffusion_text.data as data
  for f in pathlib.Path(data.__file__).parent.rglob("*.py"):
    text = f.read_text()
    assert "diffusion_text.eval" not in text and "from diffusion_text import eval" not in text, f
