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
reads the layer in place too, where the step's ProductHints allow it: the paged engine's
single-device steps on the GPU kernels (models/paged.py). A step on a mesh keeps XLA's dot,
which GSPMD partitions (a Pallas call it cannot).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax


@dataclass(slots=True, frozen=True)
class ProductHints:
    """How a step's linear products may run, handed down to every Linear by the caller that
    knows the step (models/paged.py); the dense path passes none (NO_HINTS).

    num_rows: i32[1], the step's real rows (the rest token-rung padding), for the CPU dense
      kernel, which then skips the padding; None: every row is computed.
    gpu_layer_matmul: whether a scanned layer's products of few rows may read its weights in
      place on the GPU (pallas_kernels/gpu/kernel_choice.py decides which do).
    """

    num_rows: jax.Array | None = None
    gpu_layer_matmul: bool = False


NO_HINTS = ProductHints()


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
