"""The graph's weights, written to its one external-data file as they are made.

The graph keeps only where each tensor lies (offset and length), so a conversion holds one
tensor at a time, or one slice of one (a large tensor may come as chunks of rows), never the
whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

INLINE_BYTES = 1024  # tensors smaller than this stay inside the graph
# Large tensors start on a 64 KiB boundary (the coarsest mmap granularity, Windows'), so
# ONNX Runtime can map them from the file rather than copy them.
ALIGNMENT = 1 << 16


class WeightFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")

    def tensor(self, name: str, data: np.ndarray | Iterable[np.ndarray]) -> TensorProto:
        """A tensor of the graph; `data` is an array, or chunks whose concatenation along
        the first axis is the tensor (written as they come)."""
        if isinstance(data, np.ndarray):
            if data.nbytes < INLINE_BYTES:
                return numpy_helper.from_array(data, name)
            return self._write(name, [data], data.shape)
        return self._write(name, data, None)

    def _write(self, name: str, chunks: Iterable[np.ndarray],
               shape: tuple[int, ...] | None) -> TensorProto:
        self._file.write(b"\0" * (-self._file.tell() % ALIGNMENT))
        offset = self._file.tell()
        rows, tail, dtype = 0, None, None
        for chunk in _ahead(chunks):
            if dtype is not None and (chunk.dtype, chunk.shape[1:]) != (dtype, tail):
                raise ValueError(f"{name}: chunk of {chunk.dtype} {chunk.shape} after "
                                 f"{dtype} {tail}")
            dtype, tail = chunk.dtype, chunk.shape[1:]
            self._file.write(np.ascontiguousarray(chunk, chunk.dtype.newbyteorder("<")).data)
            rows += chunk.shape[0]
        if dtype is None:
            raise ValueError(f"{name}: no data")
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype),
                             dims=shape if shape is not None else (rows, *tail),
                             data_location=TensorProto.EXTERNAL)
        where = {"location": self.path.name, "offset": offset,
                 "length": self._file.tell() - offset}
        for key, value in where.items():
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def close(self) -> None:
        self._file.close()


def _ahead(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The chunks, each next one made (read, quantized) on a thread while this one is written:
    the write's copy into the page cache no longer waits for the quantizer, nor it for the
    write."""
    it = iter(chunks)
    with ThreadPoolExecutor(1, thread_name_prefix="chunk") as pool:
        upcoming = pool.submit(next, it, None)
        while (chunk := upcoming.result()) is not None:
            upcoming = pool.submit(next, it, None)
            yield chunk
