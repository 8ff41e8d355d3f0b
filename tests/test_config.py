"""Typed config: presets, dotted overrides and the errors users see."""

import ast
import dataclasses
import pathlib
import typing

import pytest

from diffusion_text import config as config_lib
from diffusion_text import processes, run as run_lib


def test_every_preset_loads_and_validates():
  names = config_lib.preset_names()
  assert "ptb_ar" in names and "synthetic_masked" in names
  for name in names:
    cfg = config_lib.load_preset(name)
    config_lib.validate(cfg)
    run_lib.check_process(cfg)
    assert cfg.process.name in processes.names()


def test_overrides_are_typed():
  cfg = config_lib.apply_overrides(
      config_lib.load_preset("synthetic_masked"),
      ["train.steps=7", "train.lr=0.5", "model.remat=true",
       "data.path=none", "process.schedule=cosine_alpha"])
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.train.lr == 0.5
  assert cfg.model.remat is True
  assert cfg.data.path is None
  assert cfg.process.options["schedule"] == "cosine_alpha"


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["unknown config key 'train.stepz'", "steps"]),
    ("trian.steps=3", ["unknown config key 'trian.steps'", "train"]),
    ("train.steps=many", ["bad value 'many'", "int"]),
    ("steps", ["key=value"]),
    ("model.num_heads=3", ["not divisible"]),
    ("sample.top_p=0", ["sample.top_p"]),
    ("eval.mc_samples=0", ["eval.mc_samples"]),
])
def test_bad_overrides_name_the_fix(override, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.apply_overrides(config_lib.load_preset("synthetic_ar"), [override])
  for w in words:
    assert w in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("process.name=nope", ["unknown process 'nope'", "masked"]),
    ("process.colour=red", ["colour"]),
    ("process.vocab_size=9", ["tokenizer"]),
])
def test_bad_process_options_are_refused_by_run(override, words):
  # Process options are checked in one place, run.check_process, which knows
  # the process registry (config imports nothing from the package).
  cfg = config_lib.apply_overrides(config_lib.load_preset("synthetic_ar"),
                                   [override])
  with pytest.raises(config_lib.ConfigError) as e:
    run_lib.check_process(cfg)
  for w in words:
    assert w in str(e.value)


def test_latent_dim_belongs_to_the_process():
  assert "latent_dim" not in {f.name for f in dataclasses.fields(
      config_lib.ModelConfig)}
  cfg = config_lib.load_preset("synthetic_gaussian")
  process = run_lib.build_process(cfg, vocab_size=8)
  assert process.model_spec.latent_dim == cfg.process.options["latent_dim"] == 8


def _fields_read(tree, section: str, cls_name: str) -> set:
  """Fields read as `<...>.section.field`, or `alias.field` / `self.alias.field`
  where the alias holds `<...>.section` or is annotated with its class."""
  aliases = {section}

  def is_section(v):
    name = v.attr if isinstance(v, ast.Attribute) else getattr(v, "id", None)
    return name in aliases

  for _ in range(2):  # aliases of aliases (self.cfg = cfg)
    for node in ast.walk(tree):
      if isinstance(node, ast.arg) and node.annotation is not None:
        ann = node.annotation
        if getattr(ann, "id", getattr(ann, "value", None)) == cls_name:
          aliases.add(node.arg)
      if isinstance(node, ast.Assign):
        for target in node.targets:
          pairs = ([(target, node.value)] if not isinstance(target, ast.Tuple)
                   else zip(target.elts, getattr(node.value, "elts", [])))
          for t, v in pairs:
            if is_section(v) and isinstance(t, (ast.Name, ast.Attribute)):
              aliases.add(t.id if isinstance(t, ast.Name) else t.attr)
  return {node.attr for node in ast.walk(tree)
          if isinstance(node, ast.Attribute) and is_section(node.value)}


def test_every_config_field_is_read():
  # A field nobody reads is a setting that silently does nothing.
  # (validate() reads every field it checks; checking is not using.)
  pkg = pathlib.Path(config_lib.__file__).parent
  trees = [ast.parse(p.read_text()) for p in pkg.rglob("*.py")]
  for tree in trees:
    tree.body = [n for n in tree.body if getattr(n, "name", "") != "validate"]
  for f in dataclasses.fields(config_lib.Config):
    if f.name == "name":
      continue
    cls = typing.get_type_hints(config_lib.Config)[f.name]
    read = set().union(*(_fields_read(t, f.name, cls.__name__) for t in trees))
    for g in dataclasses.fields(cls):
      assert g.name in read, f"{f.name}.{g.name} is never read"


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
