"""A scanned layer's parameters, sliced out of their stacks only where read.

Under `jax.lax.scan` over stacked weights ([num_layers, ...]), taking layer i of a stack is a
dynamic-slice, and XLA's CPU backend copies a slice that feeds an unfused operand (a dot, a
custom call) into a buffer of its own: every layer's weights written once more and read
twice per step, which for a decode bound by reading its weights costs up to three times the
bytes. So the scanned stack (models/transformer.py) gives each layer's module LayerSlice
values: reading one (`param[...]`) takes the slice as before, while the CPU kernels' callers
(Linear, QuantizedLinear) take the stack and the layer's index (`stack_and_layer`) and the
kernel reads the layer in place (pallas_kernels/cpu/layer_stack.h). On a GPU, Linear hands
products of few rows to the Pallas layer matmul (pallas_kernels/gpu/layer_matmul.py), which
reads the layer in place too, while a step is traced inside `gpu_layer_matmul(True)`: the
paged engine's single-device steps on the GPU kernels (models/paged.py). A step on a mesh
keeps XLA's dot, which GSPMD partitions (a Pallas call it cannot).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import jax

_GPU_LAYER_MATMUL = contextvars.ContextVar("ember_gpu_layer_matmul", default=False)


@contextlib.contextmanager
def gpu_layer_matmul(allowed: bool):
    """While a step is traced: whether a scanned layer's products may take the GPU layer
    matmul (pallas_kernels/gpu/kernel_choice.py then decides which do)."""
    token = _GPU_LAYER_MATMUL.set(allowed)
    try:
        yield
    finally:
        _GPU_LAYER_MATMUL.reset(token)


def gpu_layer_matmul_allowed() -> bool:
    return _GPU_LAYER_MATMUL.get()


@dataclass(slots=True, frozen=True)
class LayerSlice:
    """Layer `index` (i32[]) of `stack` ([num_layers, ...]), not yet taken."""

    stack: jax.Array
    index: jax.Array

    def __getitem__(self, key):
        return jax.lax.dynamic_index_in_dim(self.stack, self.index, keepdims=False)[key]


def stack_and_layer(value) -> tuple[jax.Array, jax.Array | None]:
    """(stack, layer index) of a LayerSlice; (value, None) of a parameter not stacked."""
    if isinstance(value, LayerSlice):
        return value.stack, value.index
    return value, None
