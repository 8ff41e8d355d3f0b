"""Typed config: presets, dotted overrides and the errors users see."""

import dataclasses

import pytest

from diffusion_text import config as config_lib
from diffusion_text import processes


def test_every_preset_loads_and_validates():
  names = config_lib.preset_names()
  assert "ptb_ar" in names and "synthetic_masked" in names
  for name in names:
    cfg = config_lib.load_preset(name)
    config_lib.validate(cfg)
    assert cfg.process.name in processes.names()


def test_overrides_are_typed():
  cfg = config_lib.apply_overrides(
      config_lib.load_preset("synthetic_masked"),
      ["train.steps=7", "train.lr=0.5", "model.remat=true",
       "data.path=none", "process.schedule=cosine"])
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.train.lr == 0.5
  assert cfg.model.remat is True
  assert cfg.data.path is None
  assert cfg.process.options["schedule"] == "cosine"


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["unknown config key 'train.stepz'", "steps"]),
    ("trian.steps=3", ["unknown config key 'trian.steps'", "train"]),
    ("train.steps=many", ["bad value 'many'", "int"]),
    ("steps", ["key=value"]),
    ("process.name=nope", ["unknown process 'nope'", "masked"]),
    ("process.colour=red", ["unknown option", "colour"]),
    ("model.num_heads=3", ["not divisible"]),
])
def test_bad_overrides_name_the_fix(override, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.apply_overrides(config_lib.load_preset("synthetic_ar"), [override])
  for w in words:
    assert w in str(e.value)


def test_dict_round_trip_and_unknown_keys():
  cfg = config_lib.load_preset("ptb_gaussian")
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
  d = config_lib.to_dict(cfg)
  d["train"]["bogus"] = 1
  with pytest.raises(config_lib.ConfigError, match="bogus"):
    config_lib.from_dict(d)


def test_unknown_preset():
  with pytest.raises(config_lib.ConfigError, match="presets"):
    config_lib.load_preset("no_such_preset")


def test_every_field_is_documented():
  # Each field in config.py carries a trailing comment (house rule).
  src = open(config_lib.__file__).read()
  for section in (config_lib.ModelConfig, config_lib.DataConfig,
                  config_lib.TrainConfig, config_lib.EvalConfig,
                  config_lib.SampleConfig):
    for f in dataclasses.fields(section):
      line = next(l for l in src.splitlines()
                  if l.strip().startswith(f"{f.name}:"))
      assert "#" in line, f"{section.__name__}.{f.name} has no comment"
