"""A step's small host arrays travel to the device as one buffer.

The forward's inputs (the flattened batch, logits_indices, previous_rows: nine arrays) and
the sampler's (six sampling arrays, four more with penalties) are each laid out in one i32
buffer: every field is a run of 4-byte words (i32, u32 or f32, the floats' bits as they
are). The host fills numpy views of the buffer; inside the jitted step the same fields are
static slices of it, bit-cast back. A jitted call then converts one host array instead of
one per field (1.5-2.5 us each on the development CPU: docs/perf.md), and on an accelerator
the step's inputs cross to the device in two copies instead of one per field.

`ForwardInputs` and `SamplingInputs` are pytrees whose one leaf is the buffer; the layout
is static (their treedef), so each shape of layout compiles once, as before.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import numpy as np

from engine.worker.step import PenaltyArrays, SamplingArrays
from models.batch import Batch

WORD = np.dtype(np.int32)   # the buffer's dtype; every field's itemsize is 4
_BATCH_FIELDS = tuple(Batch.__dataclass_fields__)


class Field(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype   # int32, uint32 or float32
    start: int        # words [start, stop) of the buffer
    stop: int


class Layout(NamedTuple):
    """Named fields one after another in a buffer of `size` words (hashable: a static
    part of a jitted call's signature)."""

    fields: tuple[Field, ...]
    size: int

    @classmethod
    def of(cls, *specs: tuple[str, tuple[int, ...], str]) -> Layout:
        fields, offset = [], 0
        for name, shape, dtype in specs:
            if np.dtype(dtype).itemsize != WORD.itemsize:
                raise ValueError(f"field {name!r} dtype={dtype!r}: expected a 4-byte dtype")
            size = math.prod(shape)
            fields.append(Field(name, tuple(shape), np.dtype(dtype), offset, offset + size))
            offset += size
        return cls(tuple(fields), offset)

    def split(self, buffer) -> dict:
        """Every field of `buffer`: numpy views of a host buffer, slices of a jax one."""
        if isinstance(buffer, np.ndarray):
            return {f.name: buffer[f.start:f.stop].view(f.dtype).reshape(f.shape)
                    for f in self.fields}
        return {f.name: (buffer[f.start:f.stop] if f.dtype == WORD else
                         jax.lax.bitcast_convert_type(buffer[f.start:f.stop], f.dtype)
                         ).reshape(f.shape) for f in self.fields}


class _Packed:
    """One buffer (i32[layout.size]: numpy on the host, a jax array or tracer in a step),
    its layout, and its fields once split."""

    __slots__ = ("buffer", "layout", "_fields")

    def __init__(self, buffer, layout: Layout):
        self.buffer, self.layout, self._fields = buffer, layout, None

    @classmethod
    def empty(cls, layout: Layout):
        return cls(np.zeros(layout.size, WORD), layout)

    @property
    def fields(self) -> dict:
        """name -> the field's array (host: views of the buffer, which fill it)."""
        if self._fields is None:
            self._fields = self.layout.split(self.buffer)
        return self._fields

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(
            cls, lambda packed: ((packed.buffer,), packed.layout),
            lambda layout, children: cls(children[0], layout))


class ForwardInputs(_Packed):
    """The forward's inputs: the Batch, logits_indices i32[S], previous_rows i32[T]."""

    __slots__ = ()

    @staticmethod
    @functools.cache
    def layout_for(num_tokens: int, max_num_seqs: int, max_pages_per_seq: int) -> Layout:
        t, s = num_tokens, max_num_seqs
        return Layout.of(("input_ids", (t,), "int32"), ("positions", (t,), "int32"),
                         ("slot_mapping", (t,), "int32"), ("cu_q_lens", (s + 1,), "int32"),
                         ("kv_lens", (s,), "int32"),
                         ("page_indices", (s, max_pages_per_seq), "int32"),
                         ("num_seqs", (1,), "int32"), ("logits_indices", (s,), "int32"),
                         ("previous_rows", (t,), "int32"))

    @property
    def batch(self) -> Batch:
        return Batch(**{name: self.fields[name] for name in _BATCH_FIELDS})

    @property
    def logits_indices(self):
        return self.fields["logits_indices"]

    @property
    def previous_rows(self):
        return self.fields["previous_rows"]

    @property
    def num_tokens(self) -> int:
        return self.layout.fields[0].shape[0]


# The dtype of each SamplingArrays and PenaltyArrays field (step.py's shape comments).
_DTYPES = dict(temperature="float32", top_k="int32", top_p="float32", min_p="float32",
               seeds="uint32", positions="int32", slots="int32", repetition="float32",
               presence="float32", frequency="float32")


class SamplingInputs(_Packed):
    """The sampler's inputs: SamplingArrays and, with penalties, PenaltyArrays ([S] each)."""

    __slots__ = ()

    @staticmethod
    @functools.cache
    def layout_for(num_seqs: int, with_penalties: bool) -> Layout:
        names = SamplingArrays._fields + (PenaltyArrays._fields if with_penalties else ())
        return Layout.of(*((name, (num_seqs,), _DTYPES[name]) for name in names))

    @property
    def sampling(self) -> SamplingArrays:
        return SamplingArrays(*(self.fields[name] for name in SamplingArrays._fields))

    @property
    def penalties(self) -> PenaltyArrays | None:
        if len(self.layout.fields) == len(SamplingArrays._fields):
            return None
        return PenaltyArrays(*(self.fields[name] for name in PenaltyArrays._fields))
