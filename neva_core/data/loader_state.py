"""megatron-energon's loader state as JSON, restored only into an allow-list of classes.

`SavableDataLoader.save_state_rank()` returns a dataclass tree (per-worker checkpoints, RNG states
holding a torch tensor and a numpy array, slice positions as bytes and dicts). Pickling it would make
restoring a checkpoint run arbitrary code, so it is written as tagged JSON instead: every dataclass
becomes {"__class__": name, "fields": ...} and is rebuilt only if its name is in `_ALLOWED`; bytes,
arrays and tensors are base64 with their dtype and shape. Anything else is refused on both sides, which
also catches an energon upgrade that changed the state's shape.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np
import torch

from neva_core.errors import NevaError

# Keys of the tagged objects; a plain JSON object in the state never has exactly one of these keys.
_CLASS, _FIELDS = "__class__", "fields"
_TUPLE, _DICT, _FLEX, _BYTES = "__tuple__", "__dict__", "__flex__", "__bytes__"
_NDARRAY, _TENSOR = "__ndarray__", "__tensor__"
_NUMERIC_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "uint32", "uint64", "float32", "float64", "bool"}


def _allowed_classes() -> dict[str, type]:
    from megatron.energon.flavors.webdataset.sample_loader import SliceState
    from megatron.energon.rng import SystemRngState
    from megatron.energon.savable_loader import SavableDataLoaderState, SavableDatasetCheckpoint, SavableDatasetState

    classes = (SavableDataLoaderState, SavableDatasetCheckpoint, SavableDatasetState, SystemRngState, SliceState)
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes}


def state_to_json(state: Any) -> Any:
    """`state` (energon's loader state or any part of it) as JSON-serialisable data."""
    from megatron.energon.state import FlexState

    allowed = _allowed_classes()
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    if isinstance(state, list):
        return [state_to_json(item) for item in state]
    if isinstance(state, tuple):
        return {_TUPLE: [state_to_json(item) for item in state]}
    if isinstance(state, dict):
        pairs = [[state_to_json(key), state_to_json(value)] for key, value in state.items()]
        return {_FLEX if isinstance(state, FlexState) else _DICT: pairs}
    if isinstance(state, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(state).decode("ascii")}
    if isinstance(state, np.ndarray):
        return {_NDARRAY: _array_to_json(state)}
    if isinstance(state, torch.Tensor):
        return {_TENSOR: _array_to_json(state.detach().cpu().numpy())}
    name = f"{type(state).__module__}.{type(state).__qualname__}"
    if dataclasses.is_dataclass(state) and name in allowed:
        fields = {field.name: state_to_json(getattr(state, field.name)) for field in dataclasses.fields(state)}
        return {_CLASS: name, _FIELDS: fields}
    raise NevaError(
        f"the data loader state holds a {name}, which neva does not know how to store; the installed "
        "megatron-energon version is not the one this neva release supports (see pyproject.toml)"
    )


def state_from_json(data: Any) -> Any:
    """The energon state that `state_to_json` turned into `data`; refuses classes outside the allow-list."""
    from megatron.energon.state import FlexState

    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [state_from_json(item) for item in data]
    if not isinstance(data, dict):
        raise _damaged(f"a {type(data).__name__}")
    if _CLASS in data:
        return _dataclass_from_json(data)
    if len(data) != 1:
        raise _damaged(f"an object with keys {sorted(data)}")
    (tag, value), = data.items()
    if tag == _TUPLE:
        return tuple(state_from_json(item) for item in value)
    if tag in (_DICT, _FLEX):
        pairs = {_hashable(state_from_json(key)): state_from_json(item) for key, item in value}
        return FlexState(pairs) if tag == _FLEX else pairs
    if tag == _BYTES:
        return base64.b64decode(value)
    if tag == _NDARRAY:
        return _array_from_json(value)
    if tag == _TENSOR:
        return torch.from_numpy(_array_from_json(value))
    raise _damaged(f"the tag {tag!r}")


def _dataclass_from_json(data: dict[str, Any]) -> Any:
    cls = _allowed_classes().get(data[_CLASS])
    if cls is None:
        raise NevaError(
            f"the data loader state names the class {data[_CLASS]!r}, which is not on neva's allow-list; "
            "the state was not written by this neva release, so it is not loaded"
        )
    expected = {field.name for field in dataclasses.fields(cls)}
    fields = data.get(_FIELDS)
    if not isinstance(fields, dict) or set(fields) != expected:
        raise _damaged(f"{data[_CLASS]} with fields {sorted(fields) if isinstance(fields, dict) else fields!r}")
    return cls(**{name: state_from_json(value) for name, value in fields.items()})


def _array_to_json(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")}


def _array_from_json(data: dict[str, Any]) -> np.ndarray:
    if data.get("dtype") not in _NUMERIC_DTYPES:
        raise _damaged(f"an array of dtype {data.get('dtype')!r}")
    flat = np.frombuffer(base64.b64decode(data["data"]), dtype=data["dtype"])
    return flat.reshape(data["shape"]).copy()


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise _damaged(f"a {type(key).__name__} used as a mapping key")
    return key


def _damaged(what: str) -> NevaError:
    return NevaError(f"the data loader state is damaged: it holds {what} where neva never writes one")
