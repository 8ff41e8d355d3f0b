"""Declared ranges of config fields and their check (a leaf module).

A field reads `steps: int = spec(1000, lo=1)  # optimizer steps`: its valid
range or choices sit next to its comment, and `first_error` checks a
section's values against their types and these declarations.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional


def spec(default, *, lo=None, hi=None, lo_open=False, hi_open=False,
         choices=None, not_=None):
  """A field's default with its valid range (lo..hi, open or closed ends)
  or choices, which `validate` enforces."""
  return dataclasses.field(default=default, metadata=dict(
      lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices,
      not_=not_))


def _type_error(key: str, value: Any, typ: Any) -> Optional[str]:
  if typing.get_origin(typ) is typing.Union:  # Optional[X]
    if value is None:
      return None
    typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
  ok = {bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(v)),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict)}.get(typ, lambda v: True)
  if not ok(value):
    what = "a finite number" if typ is float else getattr(typ, "__name__", typ)
    return f"{key}={value!r} must be {what}"
  return None


def _range_error(key: str, value: Any, m: dict) -> Optional[str]:
  if m.get("choices") is not None and value not in m["choices"]:
    return f"{key} must be one of {', '.join(map(str, m['choices']))}, not {value!r}"
  lo, hi = m.get("lo"), m.get("hi")
  bad = ((lo is not None and (value <= lo if m["lo_open"] else value < lo))
         or (hi is not None and (value >= hi if m["hi_open"] else value > hi))
         or (m.get("not_") is not None and value == m["not_"]))
  if not bad:
    return None
  if lo is not None and hi is not None:
    want = (f"in {'(' if m['lo_open'] else '['}{lo}, {hi}"
            f"{')' if m['hi_open'] else ']'}")
  elif lo is not None:
    want = f"{'>' if m['lo_open'] else '>='} {lo}"
  else:
    want = f"{'<' if m['hi_open'] else '<='} {hi}"
  if m.get("not_") is not None:
    want += f" and not {m['not_']}"
  return f"{key}={value!r} must be {want}"


def first_error(section: str, sec: Any) -> Optional[str]:
  """The first field of the dataclass `sec` with a wrong type or a value
  out of its declared range, as a message naming `section.field`."""
  hints = typing.get_type_hints(type(sec))
  for f in dataclasses.fields(sec):
    key, value = f"{section}.{f.name}", getattr(sec, f.name)
    err = _type_error(key, value, hints[f.name]) or _range_error(
        key, value, f.metadata)
    if err:
      return err
  return None
