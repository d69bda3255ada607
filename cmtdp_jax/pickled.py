"""Reads the pickled files the field publishes without running anything in them.

A pickle is a program: `pickle.load`, `torch.load(weights_only=False)` and
`np.load(allow_pickle=True)` call whatever the file names. The split files of
MTPSL, JTR and DiffusionMTL hold only dicts, lists, strings, numbers, numpy
strings and tensors, so `load` lets a pickle name exactly the globals that
build those (`_GLOBALS`), each mapped to a function of ours that makes plain
data: a tensor becomes a numpy array, an OrderedDict a dict, a numpy scalar a
Python one. Any other global stops the read with `RefusedPickle` before it is
called. Needs no PyTorch.

Formats (torch/serialization.py):
  torch.save, zip ('PK' magic): `<prefix>/data.pkl` with tensor storages as
    persistent ids ('storage', <Type>Storage, key, location, numel), their bytes
    in `<prefix>/data/<key>` (byte order in `<prefix>/byteorder`, little by default).
  torch.save, legacy (before torch 1.6): pickles in a row: the magic number,
    the protocol version, a dict of system info, the object, the list of
    storage keys; then each storage: its element count (int64) and its bytes.
  .npy: the header, then the array; an object array is a pickle of the array.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class RefusedPickle(ValueError):
  """The file asks for something a data file never holds; nothing of it ran."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: type


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: type
  numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """A tensor whose storage bytes may come later in the file (legacy format)."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2's arguments (the later ones say nothing about values)."""
  del unused
  if not isinstance(storage, _Storage):
    raise RefusedPickle(f'a tensor built on {type(storage).__name__}, not a storage')
  return _Tensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _ordered_dict(*args):
  return dict(*args)


def _latin1(text, encoding):
  """`_codecs.encode`: how pickle protocol 2 writes bytes."""
  if encoding != 'latin1' or not isinstance(text, str):
    raise RefusedPickle(f'_codecs.encode with {encoding!r}')
  return text.encode('latin-1')


_reconstruct_array = np.zeros(1).__reduce__()[0]  # numpy.core.multiarray._reconstruct
_numpy_scalar = np.float32(0).__reduce__()[0]  # numpy.core.multiarray.scalar


def _new_array(subtype, shape, typecode):
  if subtype is not np.ndarray:
    raise RefusedPickle(f'an array of type {subtype!r}')
  return _reconstruct_array(np.ndarray, shape, typecode)


_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('collections', 'OrderedDict'): _ordered_dict,
    ('_codecs', 'encode'): _latin1,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    **{(package, '_reconstruct'): _new_array
       for package in ('numpy.core.multiarray', 'numpy._core.multiarray')},
    **{(package, 'scalar'): _numpy_scalar
       for package in ('numpy.core.multiarray', 'numpy._core.multiarray')},
    **{('torch', name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Resolves globals through `_GLOBALS` only; collects the storages tensors use."""

  def __init__(self, file):
    super().__init__(file)
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise RefusedPickle(f'it asks to call {module}.{name}')
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType)):
      raise RefusedPickle(f'a persistent id {pid!r:.80} that is not a tensor storage')
    storage = _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))
    self.storages[storage.key] = storage
    return storage


def _plain(value, arrays: dict[str, np.ndarray]):
  """`value` with tensors as numpy arrays and numpy scalars as Python ones."""
  if isinstance(value, _Tensor):
    return _tensor_values(value, arrays[value.storage.key])
  if isinstance(value, dict):
    return {_plain(k, arrays): _plain(v, arrays) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v, arrays) for v in value)
  if isinstance(value, np.ndarray) and value.dtype.hasobject:
    return _plain(value.item(), arrays) if value.ndim == 0 else [
        _plain(v, arrays) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _tensor_values(tensor: _Tensor, storage: np.ndarray) -> np.ndarray:
  """The strided view a tensor is, checked to stay inside its storage."""
  if any(n < 0 for n in tensor.size) or any(s < 0 for s in tensor.stride) or (
      len(tensor.size) != len(tensor.stride)) or tensor.offset < 0:
    raise RefusedPickle(f'a tensor with size {tensor.size} and stride {tensor.stride}')
  if 0 in tensor.size:
    return np.zeros(tensor.size, storage.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
  if last >= storage.size:
    raise RefusedPickle(f'a tensor reaching element {last} of a storage of {storage.size}')
  view = np.lib.stride_tricks.as_strided(
      storage[tensor.offset:], tensor.size,
      tuple(s * storage.itemsize for s in tensor.stride), writeable=False)
  return np.array(view)


def _storage_array(data: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
  dtype = np.dtype(storage.dtype).newbyteorder('<' if byteorder == 'little' else '>')
  if len(data) != storage.numel * dtype.itemsize:
    raise ValueError(f'storage {storage.key} holds {len(data)} bytes, not the '
                     f'{storage.numel} elements its tensor says')
  return np.frombuffer(data, dtype).astype(dtype.newbyteorder('='))


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError('a zip file without one data.pkl, so not a torch.save file')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode().strip()
    unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])))
    value = unpickler.load()
    arrays = {}
    for key, storage in unpickler.storages.items():
      member = f'{prefix}data/{key}'
      if member not in names:
        raise ValueError(f'tensor storage {member} is missing')
      arrays[key] = _storage_array(archive.read(member), storage, byteorder)
  return _plain(value, arrays)


def _load_legacy(file):
  if _Unpickler(file).load() != LEGACY_MAGIC:
    raise ValueError('not a torch.save file (no magic number)')
  _Unpickler(file).load()  # protocol version
  system = _Unpickler(file).load()
  byteorder = 'little' if not isinstance(system, dict) or system.get('little_endian', True) \
      else 'big'
  unpickler = _Unpickler(file)
  value = unpickler.load()
  keys = _Unpickler(file).load()
  arrays = {}
  for key in keys:
    storage = unpickler.storages.get(str(key))
    if storage is None:
      raise ValueError(f'storage {key} is listed but no tensor uses it')
    numel = int.from_bytes(file.read(8), byteorder, signed=True)
    if numel != storage.numel:
      raise ValueError(f'storage {key} has {numel} elements, its tensor says {storage.numel}')
    arrays[storage.key] = _storage_array(file.read(numel * np.dtype(storage.dtype).itemsize),
                                         storage, byteorder)
  return _plain(value, arrays)


def _load_npy(file):
  version = np.lib.format.read_magic(file)
  read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                 (2, 0): np.lib.format.read_array_header_2_0}.get(version)
  if read_header is None:
    raise ValueError(f'.npy format version {version} is not known')
  shape, fortran, dtype = read_header(file)
  if not dtype.hasobject:
    file.seek(0)
    return np.load(file, allow_pickle=False)
  array = _Unpickler(file).load()
  if not isinstance(array, np.ndarray) or array.shape != shape:
    raise ValueError(f'the pickled array does not match its header (shape {shape})')
  del fortran
  return _plain(array, {})


def load(path: str):
  """The data in a torch.save or .npy file at `path`, as dicts, lists, Python
  scalars and numpy arrays. Raises `RefusedPickle` or ValueError with one line
  that names the file; OSError as open() raises it."""
  with open(path, 'rb') as file:
    head = file.read(6)
    file.seek(0)
    try:
      if head.startswith(b'PK'):
        return _load_zip(path)
      if head == b'\x93NUMPY':
        return _load_npy(file)
      return _load_legacy(file)
    except RefusedPickle as e:
      raise RefusedPickle(f'{path}: refused, {e}: a data file never does that, and nothing '
                          'of it was run') from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            zipfile.BadZipFile, AttributeError, IndexError) as e:
      raise ValueError(f'{path}: not a readable torch.save or .npy file ({e})') from None
