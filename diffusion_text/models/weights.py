"""Torch-free readers of published PyTorch weight files into numpy arrays.

* `read_safetensors`: the safetensors format is an 8-byte little-endian
  header length, a JSON header {name: {dtype, shape, data_offsets}} and one
  raw little-endian byte buffer; a few lines of numpy read it, so no package
  is needed.
* `read_torch_bin`: `torch.save`'s zip format (`<stem>/data.pkl` plus one
  raw buffer per storage under `<stem>/data/<key>`). The pickle is read by a
  RESTRICTED unpickler that resolves only the handful of globals a state
  dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter` and the typed `torch.*Storage` names, all mapped to
  numpy stand-ins) and refuses every other global with `UnsafePickleError`,
  so loading a file never runs code it names.
* `read_state_dict` picks the reader by file name; `read_checkpoint_dir`
  reads a published folder (config.json plus weights).
"""

from __future__ import annotations

import collections
import json
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# torch's typed storages as pickled by `torch.save` (the `torch` module).
_TORCH_STORAGES = {
    "DoubleStorage": _ST_DTYPES["F64"], "FloatStorage": _ST_DTYPES["F32"],
    "HalfStorage": _ST_DTYPES["F16"], "BFloat16Storage": _ST_DTYPES["BF16"],
    "LongStorage": _ST_DTYPES["I64"], "IntStorage": _ST_DTYPES["I32"],
    "ShortStorage": _ST_DTYPES["I16"], "CharStorage": _ST_DTYPES["I8"],
    "ByteStorage": _ST_DTYPES["U8"], "BoolStorage": _ST_DTYPES["BOOL"],
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class UnsafePickleError(pickle.UnpicklingError):
  """A weights pickle names a global outside the state-dict allow-list."""


# ------------------------------------------------------------- safetensors
def read_safetensors(path: str | Path) -> StateDict:
  """{name: array} of a .safetensors file (metadata entry dropped)."""
  raw = Path(path).read_bytes()
  if len(raw) < 8:
    raise ValueError(f"{path}: too short to be a safetensors file")
  (header_len,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + header_len])
  body = memoryview(raw)[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype "
                       f"{info['dtype']}")
    start, end = info["data_offsets"]
    flat = np.frombuffer(body[start:end], dtype=_ST_DTYPES[info["dtype"]])
    out[name] = flat.reshape(info["shape"]).copy()
  return out


# ------------------------------------------------------- torch zip pickles
class _Storage:
  """Stand-in for a `torch.<X>Storage` class: only carries the dtype."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied."""
  del requires_grad, backward_hooks, metadata
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=tuple(size),
      strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(dtype)
       for name, dtype in _TORCH_STORAGES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals; storages come from the zip archive."""

  def __init__(self, file, archive: zipfile.ZipFile, stem: str):
    super().__init__(file)
    self._archive, self._stem = archive, stem

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"refusing to unpickle {module}.{name}: a weights file may only "
          "hold tensors in an OrderedDict; convert it to .safetensors or "
          "check where it came from") from None

  def persistent_load(self, pid):
    kind, storage, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage, _Storage):
      raise UnsafePickleError(f"unexpected persistent id {pid!r}")
    data = self._archive.read(f"{self._stem}/data/{key}")
    return np.frombuffer(data, dtype=storage.dtype, count=numel)


def read_torch_bin(path: str | Path) -> StateDict:
  """{name: array} of a `torch.save` zip file, through the restricted
  unpickler (never executes a global outside the allow-list)."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a zip-format torch file (legacy "
                     "pre-1.6 pickles are not supported); re-save it with "
                     "a recent torch or as .safetensors")
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{path}: expected one */data.pkl, found {pkl}")
    stem = pkl[0][:-len("/data.pkl")]
    byteorder = f"{stem}/byteorder"
    if (byteorder in archive.namelist()
        and archive.read(byteorder).strip() != b"little"):
      raise ValueError(f"{path}: big-endian torch files are not supported")
    with archive.open(pkl[0]) as f:
      state = _StateDictUnpickler(f, archive, stem).load()
  if not isinstance(state, dict):
    raise ValueError(f"{path}: holds a {type(state).__name__}, not a "
                     "state dict")
  return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


# ------------------------------------------------------------ dispatching
def read_state_dict(path: str | Path) -> StateDict:
  """Read .safetensors or a torch .bin/.pt/.pth zip, by file suffix."""
  path = Path(path)
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  if path.suffix in (".bin", ".pt", ".pth"):
    return read_torch_bin(path)
  raise ValueError(f"{path}: unknown weights format; expected .safetensors "
                   "or a torch .bin")


def read_checkpoint_dir(folder: str | Path) -> tuple[dict, StateDict]:
  """(config.json as a dict, state dict) of a published checkpoint folder;
  model.safetensors is preferred over pytorch_model.bin."""
  folder = Path(folder)
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder}: no config.json; point at a folder "
                            "holding config.json and model weights")
  for name in WEIGHT_FILES:
    if (folder / name).is_file():
      return json.loads(config_path.read_text()), read_state_dict(
          folder / name)
  raise FileNotFoundError(f"{folder}: no weights file; expected one of "
                          f"{', '.join(WEIGHT_FILES)}")
