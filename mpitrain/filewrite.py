"""Writing files that are either whole or absent: checksummed HDF5 datasets, atomic renames, and
one background writer fed from reused host buffers. What a checkpoint holds is `checkpoint`'s."""
from __future__ import annotations

import errno
import io
import math
import os
import threading
from pathlib import Path

import h5py
import numpy as np
import torch

from .config import CannotWrite
from .schema import SCALAR, why


def as_array(value) -> tuple[np.ndarray, str]:
    """A tensor or array as numpy (bf16 as its uint16 bits) and the dtype name to declare."""
    arr = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    dtype_name = str(arr.dtype).replace("torch.", "")
    if isinstance(arr, torch.Tensor):
        arr = arr.view(torch.int16).numpy().view(np.uint16) if arr.dtype == torch.bfloat16 else arr.numpy()
    return np.asarray(arr), dtype_name


def chunks_of(shape: tuple, itemsize: int, target: int = 2**20) -> tuple:
    """Chunks of about `target` bytes that split the leading axis evenly (h5py's own choice for a
    100 MB array was 48 kB: 8192 chunks, each a write through `Sink` and a checksum)."""
    inner = math.prod(shape[1:]) * itemsize
    if inner > target:
        return (1, *chunks_of(shape[1:], itemsize, target))
    pieces = -(-shape[0] * inner // target)
    return (-(-shape[0] // pieces), *shape[1:])


def write_dataset(group: h5py.Group, name: str, value):
    """One array (a tensor, an array, or an (array, dtype name) snapshot) or JSON text as a chunked,
    checksummed dataset."""
    if isinstance(value, str):
        data = np.array([value.encode("utf-8")])
        return group.create_dataset(name, data=data, chunks=True, fletcher32=True)
    arr, dtype_name = value if isinstance(value, tuple) else as_array(value)
    shape, scalar = arr.shape, arr.ndim == 0
    if scalar:
        arr = arr.reshape(1)
    if arr.size == 0:
        ds = group.create_dataset(name, data=arr)
    else:
        ds = group.create_dataset(name, data=arr, chunks=chunks_of(arr.shape, arr.itemsize), fletcher32=True)
    ds.attrs["dtype"] = dtype_name
    ds.attrs["shape"] = np.array(shape, dtype=np.int64)
    if scalar:
        ds.attrs[SCALAR] = True
    return ds


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write):
    """write(tmp_path), then fsync, rename into place, fsync the folder."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def on_disk_bytes(*values) -> int:
    """About what arrays and texts (nested in dicts) take in a checkpoint: their bytes, plus HDF5's
    headers and chunk index and the checksums, generously."""
    total, datasets, todo = 0, 0, list(values)
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.values())
        elif value is not None:
            arr = value[0] if isinstance(value, tuple) else value
            total += len(arr.encode()) if isinstance(arr, str) else np.asarray(arr).nbytes
            datasets += 1
    return int(total * 1.01) + 8192 * datasets + 2**16  # measured: ~4 kB a dataset


class Sink(io.RawIOBase):
    """The file HDF5 writes a checkpoint through. The first failed write (a full disk, a quota, a
    file size limit) is kept and what follows is dropped, so HDF5 itself never sees a failure: on
    one it could crash while closing the file (a segfault, seen with h5py 3.16), and its error
    surfaced in the training thread's next HDF5 call (a data read) as a multi-line OSError.
    `failure` is the kept error; the file is worthless once there is one."""

    def __init__(self, path: Path):
        super().__init__()
        self.fd, self.at, self.failure = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), 0, None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.at = offset + (self.at if whence == io.SEEK_CUR else os.fstat(self.fd).st_size if whence == io.SEEK_END else 0)
        return self.at

    def tell(self) -> int:
        return self.at

    def readinto(self, buffer) -> int:
        data = os.pread(self.fd, len(buffer), self.at)
        buffer[:len(data)] = data
        self.at += len(data)
        return len(data)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.failure is None and done < len(view):
            try:
                wrote = os.pwrite(self.fd, view[done:], self.at + done)
            except OSError as e:
                self.failure = e
                break
            if not wrote:
                self.failure = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += wrote
        self.at += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.at if size is None else size
        if self.failure is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self.failure = e
        return size

    def flush(self) -> None:
        pass  # `atomic_write` fsyncs the finished file

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def host_array(shape: tuple, dtype) -> np.ndarray:
    """np.empty, from torch's allocator where torch has the dtype: it asks for huge pages, which
    large copies into it fill faster (`bench checkpoint` measures the snapshot)."""
    try:
        as_torch = torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        return np.empty(shape, dtype)
    return torch.empty(shape, dtype=as_torch).numpy()


def copy_into(buf: np.ndarray, arr: np.ndarray, piece_bytes: int = 2**24):
    """buf[...] = arr, a large contiguous one on torch's threads (numpy copies on one) in 16 MB
    pieces (one call per large array was slower: `bench checkpoint` measures the snapshot)."""
    if arr.nbytes < 2**20 or not (arr.flags.c_contiguous and arr.flags.writeable):
        np.copyto(buf, arr)
        return
    n = max(1, piece_bytes // arr.itemsize)
    for to, of in zip(torch.from_numpy(buf).view(-1).split(n), torch.from_numpy(arr).view(-1).split(n)):
        to.copy_(of)


class Writer:
    """Rank 0's checkpoint writer: one write at a time, in a background thread, from a snapshot held
    in host buffers that are reused from one checkpoint to the next."""

    def __init__(self):
        self._thread, self._error, self._buffers = None, None, {}

    def buffer(self, key: str, shape: tuple, dtype) -> np.ndarray:
        """The host buffer for `key`, kept from one checkpoint to the next: a fresh one's pages
        cost a large snapshot as much time again as the copy."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self._buffers[key] = host_array(shape, dtype)
        return buf

    def snapshot(self, key: str, value) -> tuple[np.ndarray, str]:
        arr, dtype_name = as_array(value)
        buf = self.buffer(key, arr.shape, arr.dtype)
        copy_into(buf, arr)
        return buf, dtype_name

    def submit(self, write):
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="mpitrain-checkpoint")
        self._thread.start()

    def _run(self, write):
        try:
            write()
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def raise_failure(self):
        """If the last write has ended in a failure, raise it now (without waiting for a write in
        flight): a job whose checkpoints cannot be written should not train on until the next one."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self):
        """Until the write in flight (if any) is on disk and `latest` names it; re-raises its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CannotWrite):
                raise error
            if isinstance(error, OSError):  # the file system's answer, not a bug: one line
                raise CannotWrite(f"writing a checkpoint failed: {why(error)}") from None
            raise RuntimeError(f"writing a checkpoint failed: {type(error).__name__}: {error}") from error


WRITER = Writer()
