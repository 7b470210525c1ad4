"""Streaming safetensors: write a file tensor by tensor, read one tensor at a time with plain reads.

A safetensors file is an 8-byte little-endian header length, a JSON header giving every tensor's dtype,
shape and byte range, then the raw bytes. The header must come first, so `StreamingWriter` takes the
full plan (names, dtypes, shapes) up front, writes the header, then appends each tensor's bytes in plan
order as soon as the caller has formed it, hashing as it goes (`io.OUTPUT_HASH`). Nothing but the
current tensor is ever held. The result loads with the official `safetensors` library.

A file loaded whole into a dict is read with the official library (`load_safetensors`): as fast, and its
tensors are all held anyway. Streaming a checkpoint is not (`bench/libraries.py`): `SafetensorsReader`
reads tensors with `os.preadv` into fresh buffers instead of memory-mapping the file, as `safe_open`
does: touched pages of a mapping stay in the process's RSS for as long as the file is mapped, so a
mapped 13 GB checkpoint would grow RSS to 13 GB. It can also hash the bytes it reads in file order, so a caller
that reads every tensor in order gets the file's digest for free (`digest()` reads any remainder).

Both hash (and the writer writes) on a helper thread (`OneBehind`), and the stages run their tensor
producer one tensor ahead on another (`prefetched`), so reading, copying, hashing and writing overlap.
`configure_allocator_for_streaming` keeps RSS at the tensors in flight and page faults cheap.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from neva_core.errors import NevaError
from neva_core.io import OUTPUT_HASH, new_hasher

T = TypeVar("T")

_DTYPE_CODES: Mapping[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_CODE_DTYPES: Mapping[str, torch.dtype] = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_MAX_HEADER_BYTES = 100 << 20  # the official library's own limit
_HEADER_ALIGN = 8  # pad the header so tensor data starts 8-byte aligned, as the official writer does
_READ_CHUNK = 1 << 30  # one preadv call moves at most ~2 GiB on Linux; stay well below


class OneBehind:
    """Run jobs on a helper thread, in order, at most one job behind the caller.

    Writing and hashing release the GIL, so handing them to a helper lets them overlap with the
    caller's next read or copy instead of adding to it. Waiting for the previous job before queueing
    the next bounds memory: only one buffer is ever pending (each stays referenced until its job ran).
    A job's exception is raised by the next submit() or wait().
    """

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[Any] | None = None

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._executor.submit(job, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Stop the helper (after its current job); pending errors are dropped: the caller is failing."""
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file plan."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def dtype_code(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_CODES:
        raise NevaError(f"tensor dtype {dtype} cannot be stored in safetensors by neva")
    return _DTYPE_CODES[dtype]


def encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for `specs`, data laid out in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise NevaError(f"tensor {spec.name!r} appears twice in a safetensors file plan")
        header[spec.name] = {
            "dtype": dtype_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % _HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of `tensor` without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class StreamingWriter:
    """Write one safetensors file whose header is fixed up front; tensors are appended in plan order."""

    def __init__(self, path: Path, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None,
                 hash_name: str = OUTPUT_HASH):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._hash_name = hash_name
        self._digest = new_hasher(hash_name)
        self._size = 0
        self._file = open(self.path, "xb")  # noqa: SIM115 - closed by close()/abort()
        self._io = OneBehind("neva-write")
        self._append(encode_header(self._specs, metadata))

    def _append(self, data: bytes | memoryview) -> None:
        try:
            self._io.submit(self._write_and_hash, data)
        except OSError as exc:  # raised by the previous write, e.g. a full disk
            raise self._write_failed(exc) from exc
        self._size += len(data)

    def _write_failed(self, exc: OSError) -> NevaError:
        self.abort()
        return NevaError(f"cannot write {self.path}: {exc.strerror or exc}; check the free disk space and run again")

    def _write_and_hash(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor`; it must be the next tensor of the plan, with the planned dtype and shape."""
        if self._next >= len(self._specs):
            raise NevaError(f"{self.path}: tensor {name!r} is not in the file plan (all tensors already written)")
        spec = self._specs[self._next]
        if name != spec.name:
            raise NevaError(f"{self.path}: tensor {name!r} written out of order; expected {spec.name!r} next")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise NevaError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the plan says {spec.dtype} {spec.shape}"
            )
        self._append(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> dict[str, Any]:
        """Finish the file (every planned tensor written), fsync it; return its manifest entry."""
        if self._next != len(self._specs):
            missing = [spec.name for spec in self._specs[self._next:]]
            self.abort()
            raise NevaError(f"{self.path}: {len(missing)} planned tensors were never written, first {missing[0]!r}")
        try:
            self._io.wait()
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise self._write_failed(exc) from exc
        # The data is on disk now; dropping it from the page cache keeps a multi-GB conversion from
        # evicting everybody else's cache.
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._file.close()
        self._io.close()
        return {"bytes": self._size, self._hash_name: self._digest.hexdigest()}

    def abort(self) -> None:
        self._io.close()
        self._file.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_safetensors(path: Path) -> Any:
    """The official library's lazy handle on a safetensors file (`keys`, `get_slice`, `get_tensor`); a damaged
    file is a NevaError naming it."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise NevaError(f"{path} is not a valid safetensors file ({exc}); the file is damaged or truncated") from exc
    except OSError as exc:
        raise NevaError(f"cannot open {path}: {exc.strerror or exc}") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read with the official library."""
    opened = open_safetensors(path)
    return {name: opened.get_tensor(name) for name in opened.keys()}


@dataclass(frozen=True)
class StoredTensor:
    spec: TensorSpec
    start: int  # absolute file offset of the first byte
    end: int


class SafetensorsReader:
    """Read tensors of one safetensors file by plain reads.

    With `hash_name` ("sha256", "blake3"), the bytes read in file order are hashed on the way, so that
    `digest()` after reading every tensor in order costs nothing extra; reads out of order make it read the
    skipped bytes.
    """

    def __init__(self, path: Path | str, *, hash_name: str | None = None):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise NevaError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.metadata, self.tensors = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise
        self._digest = new_hasher(hash_name) if hash_name else None
        self._hasher = OneBehind("neva-hash")
        self._hashed_upto = 0

    def _invalid(self, why: str) -> NevaError:
        return NevaError(f"{self.path} is not a valid safetensors file ({why}); the file is damaged or truncated")

    def _pread_exact(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise self._invalid(f"expected {size} bytes at offset {offset}, the file ends first")
        return data

    def _parse_header(self) -> tuple[dict[str, str], dict[str, StoredTensor]]:
        if self.file_size < 8:
            raise self._invalid(f"only {self.file_size} bytes")
        (header_len,) = struct.unpack("<Q", self._pread_exact(8, 0))
        if header_len > min(_MAX_HEADER_BYTES, self.file_size - 8):
            raise self._invalid(f"header length {header_len} does not fit in the file")
        try:
            header = json.loads(self._pread_exact(header_len, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._invalid(f"header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise self._invalid("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        tensors = {name: self._parse_entry(name, entry, data_start) for name, entry in header.items()}
        return metadata, dict(sorted(tensors.items(), key=lambda item: item[1].start))

    def _parse_entry(self, name: str, entry: Any, data_start: int) -> StoredTensor:
        try:
            dtype = _CODE_DTYPES[entry["dtype"]]
            shape = tuple(int(size) for size in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._invalid(f"bad header entry for tensor {name!r}: {entry!r}") from exc
        spec = TensorSpec(name, dtype, shape)
        if end - begin != spec.nbytes or begin < 0 or data_start + end > self.file_size:
            raise self._invalid(f"tensor {name!r} byte range [{begin}, {end}) does not match its shape or the file")
        return StoredTensor(spec, data_start + begin, data_start + end)

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        return self._stored(name).spec

    def _stored(self, name: str) -> StoredTensor:
        if name not in self.tensors:
            raise NevaError(f"{self.path} has no tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor (owning its memory) holding `name`."""
        stored = self._stored(name)
        buffer = torch.empty(stored.end - stored.start, dtype=torch.uint8)
        self._read_into(memoryview(buffer.numpy()), stored.start)
        return buffer.view(stored.spec.dtype).reshape(stored.spec.shape)

    def _read_into(self, view: memoryview, offset: int) -> None:
        if self._digest is not None:
            self._hash_gap(offset)
        done = 0
        while done < len(view):
            count = os.preadv(self._fd, [view[done : done + _READ_CHUNK]], offset + done)
            if count == 0:
                raise self._invalid(f"file ends at offset {offset + done}")
            done += count
        if self._digest is not None and offset == self._hashed_upto:
            self._hasher.submit(self._digest.update, view)
            self._hashed_upto = offset + len(view)
        # Read once, never again in this run: let the kernel drop these pages from its cache.
        os.posix_fadvise(self._fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def _hash_gap(self, upto: int) -> None:
        """Hash the bytes between the hashed prefix and `upto` (headers, tensors skipped by the caller)."""
        while self._hashed_upto < upto:
            chunk = os.pread(self._fd, min(_READ_CHUNK, upto - self._hashed_upto), self._hashed_upto)
            if not chunk:
                raise self._invalid(f"file ends at offset {self._hashed_upto}")
            self._hasher.submit(self._digest.update, chunk)
            self._hashed_upto += len(chunk)

    def digest(self) -> str:
        """The hex digest of the whole file; cheap when every tensor was read in file order."""
        if self._digest is None:
            raise NevaError(f"{self.path} was opened without a hash_name; use neva_core.io.hash_file")
        self._hash_gap(self.file_size)
        self._hasher.wait()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._hasher.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def configure_allocator_for_streaming() -> None:
    """Allocator settings for a process that streams a multi-GB checkpoint tensor by tensor.

    * glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB); tensors below
      it then come from the heap, which fragments, and over a 7B conversion RSS creeps up by hundreds
      of MB of freed tensors. A fixed 1 MiB threshold keeps RSS at the tensors actually in flight.
    * Every tensor formed is fresh memory, so the kernel takes one page fault per 4 KiB touched: at 7B
      scale that is a third of the run. Transparent huge pages for torch's large CPU buffers cut the
      faults 512-fold. torch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation, so this helps in
      a fresh stage process and is harmless elsewhere; a value set by the user wins.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:  # glibc only
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `items` in a background thread that runs up to `depth` items ahead.

    Forming the next tensor (file reads and torch copies, both of which release the GIL) then overlaps
    with splitting, writing and hashing the current one: on two cores the stages run at close to the
    disk's speed instead of the sum of the I/O and the CPU work. An exception in `items` is re-raised
    here, in order; abandoning the iteration stops the thread.
    """
    slots: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
                del item  # do not keep the item alive while waiting for the next one
            offer((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which re-raises it
            offer((None, exc))

    worker = threading.Thread(target=produce, name="neva-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
            del item
    finally:
        stop.set()
        worker.join()


_END = object()
