"""Maps the weights of an `ember convert` orbax checkpoint straight from their files.

`ember convert` writes every weight as its own zarr v3 array (orbax without OCDBT and without
compression), already in the engine's layout and dtype. Such an array is one file holding a
single chunk of raw little-endian bytes plus the shard index of zarr's sharding codec. Loading
maps those bytes copy-on-write instead of reading them: on the CPU, jax adopts a 64-byte
aligned host buffer without copying, so the weights are device arrays backed by the page
cache; on an accelerator the host-to-device transfer reads the mapping directly. A layout this
module does not recognise (OCDBT, compression, several chunks) gives None, and the caller
restores through orbax instead.

A mapped file must not be rewritten in place while its model is loaded (a truncated file
faults on the next read). `ember convert` never does: it deletes the old checkpoint and writes
new files, and a deleted file stays readable for as long as it is mapped.

Zarr v3 and its sharding codec: https://zarr-specs.readthedocs.io/en/latest/v3/core/index.html
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

_NO_CHUNK = 2**64 - 1  # a shard index entry of all ones: the chunk was never written
_INDEX_ENTRY_BYTES = 16  # u64 offset + u64 length per inner chunk
_CRC32C_BYTES = 4
_SPARE_FILE_DESCRIPTORS = 256


class MappedArrayError(ValueError):
    """A recognised array whose files are damaged; the message names the file."""


def map_array(array_dir: Path) -> np.ndarray | None:
    """The array stored in `array_dir` as a copy-on-write memory map, or None when its
    layout is not one uncompressed chunk. Raises MappedArrayError for a damaged file."""
    metadata = _read_metadata(array_dir / "zarr.json")
    if metadata is None or sys.byteorder != "little":
        return None
    try:
        dtype = jnp.dtype(metadata["data_type"])
    except TypeError:
        return None
    shape = tuple(metadata["shape"])
    codecs = metadata["codecs"]
    chunk_file = array_dir / _chunk_key(metadata, len(shape))
    if not chunk_file.is_file():
        raise MappedArrayError(f"{chunk_file}: array data file missing")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if _is_raw_bytes(codecs):
        offset = 0
        if chunk_file.stat().st_size != nbytes:
            raise MappedArrayError(f"{chunk_file}: {chunk_file.stat().st_size} bytes, "
                                   f"expected {nbytes}")
    elif _is_single_raw_shard(codecs, shape):
        offset = _shard_data_offset(chunk_file, codecs[0]["configuration"], nbytes)
    else:
        return None
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(chunk_file, dtype=dtype, mode="c", offset=offset, shape=shape)


def reserve_file_descriptors(count: int) -> int:
    """How many of `count` maps may stay open: each map keeps a descriptor while the weight
    lives, so the soft limit is raised towards the hard one when a model has many tensors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + _SPARE_FILE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return count
    return max(0, min(count, soft - _SPARE_FILE_DESCRIPTORS))


def _read_metadata(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # orbax's own restore reports the damage with its context
    required = ("shape", "data_type", "codecs", "chunk_grid", "chunk_key_encoding")
    if metadata.get("zarr_format") != 3 or any(key not in metadata for key in required):
        return None
    grid = metadata["chunk_grid"]
    if (grid.get("name") != "regular"
            or grid.get("configuration", {}).get("chunk_shape") != metadata["shape"]
            or metadata["chunk_key_encoding"].get("name") != "default"):
        return None  # orbax writes the "default" chunk keys; others restore through orbax
    return metadata


def _chunk_key(metadata: dict, rank: int) -> str:
    separator = metadata["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    return separator.join(["c"] + ["0"] * rank)


def _is_raw_bytes(codecs: list) -> bool:
    return (len(codecs) == 1 and codecs[0].get("name") == "bytes"
            and codecs[0].get("configuration", {}).get("endian", "little") == "little")


def _is_single_raw_shard(codecs: list, shape: tuple) -> bool:
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    config = codecs[0].get("configuration", {})
    index_codecs = [codec.get("name") for codec in config.get("index_codecs", [])]
    return (tuple(config.get("chunk_shape", ())) == shape
            and _is_raw_bytes(config.get("codecs", []))
            and index_codecs in (["bytes"], ["bytes", "crc32c"])
            and _is_raw_bytes(config["index_codecs"][:1]))


def _shard_data_offset(shard_file: Path, config: dict, nbytes: int) -> int:
    """Where the one inner chunk's bytes start, read from the shard index."""
    has_crc = len(config["index_codecs"]) == 2
    index_bytes = _INDEX_ENTRY_BYTES + (_CRC32C_BYTES if has_crc else 0)
    file_bytes = shard_file.stat().st_size
    if file_bytes < index_bytes:
        raise MappedArrayError(f"{shard_file}: {file_bytes} bytes, too short for a shard index")
    at_start = config.get("index_location", "end") == "start"
    with open(shard_file, "rb") as handle:
        handle.seek(0 if at_start else file_bytes - index_bytes)
        offset, length = np.frombuffer(handle.read(_INDEX_ENTRY_BYTES), "<u8").tolist()
    if offset == _NO_CHUNK and length == _NO_CHUNK:
        raise MappedArrayError(f"{shard_file}: the shard holds no chunk")
    if length != nbytes or offset + length > file_bytes:
        raise MappedArrayError(f"{shard_file}: shard index gives {length} bytes at offset "
                               f"{offset} in a {file_bytes}-byte file, expected {nbytes} bytes")
    return offset
