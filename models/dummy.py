"""Random weights without a weight file (vLLM's `load_format="dummy"`): for benchmarks of a
model's shape when its checkpoint is not at hand (a GPU machine with no network).

Only config.json is read. Every parameter is drawn on the device(s) where it lives, by one
jitted program per tensor (a scanned model's stacked layer weights are one tensor each), so
an 8B model never passes through host memory; under a ShardingPlan each program writes each
device's block in place (out_shardings). Values keep bf16 activations finite:

  float weights (linear, embedding)  normal * 0.02, in the module's dtype
  norms                              1 (Gemma's (1 + w) form: 0), as a fresh model has them
  biases                             0
  int8 q                             uniform in -127..127, scale 0.02 / 73 (std of q: 73.3)
  int4 packed                        uniform bytes (two uniform nibbles 0..15), scale
                                     0.02 / 4.6 (std of a nibble: 4.61), minimum -7.5 scale

so a quantized weight dequantizes to zero mean and std ~0.02 like a float one. Drawing the
integers directly (not quantizing float draws) keeps an int8/int4 load as fast as a float one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from models.assembly import abstract_model
from models.config import ModelConfig
from models.sharding import ShardingPlan
from models.transformer import Transformer

STD = 0.02
_INT8_STD = 73.3      # std of a uniform integer in -127..127
_NIBBLE_STD = 4.61    # std of a uniform integer in 0..15


def dummy_model(config: ModelConfig, plan: ShardingPlan | None = None, *, seed: int = 0
                ) -> Transformer:
    """A model of `config` (its dtype, scan_layers and quantization) with random weights.

    Args:
      config: the model's config; config.quantization picks the projections' formats.
      plan: tensor parallelism, made from the unquantized config (as the engine makes it):
        the model is built with its layout and each weight drawn sharded on its mesh.
      seed: the draws' seed (each tensor folds in its own index).
    """
    if plan is not None and config.quantization:
        plan = plan.with_quantization(config.quantization)
    layout = config if plan is None else plan.layout
    graphdef, state = abstract_model(layout)
    flat = nnx.to_flat_state(state)
    key = jax.random.key(seed)
    filled = []
    for index, (path, variable) in enumerate(flat):
        value = variable.get_value()
        shape = tuple(value.shape)
        sharding = None if plan is None else plan.sharding(plan.spec(path, len(shape)))
        rule = _rule(path, layout)
        array = _program(rule, shape, jnp.dtype(value.dtype), sharding)(
            jax.random.fold_in(key, index))
        filled.append((path, variable.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _rule(path: tuple, config: ModelConfig) -> tuple[str, float]:
    """(how to draw, its constant) for the parameter at `path`."""
    module, name = str(path[-2]), str(path[-1])
    if "norm" in module:
        return "constant", 1.0 - config.norm_offset
    if name == "bias":
        return "constant", 0.0
    if name == "q":
        return "integers", 0.0
    if name == "packed":
        return "bytes", 0.0
    if name == "scale":
        per_step = _NIBBLE_STD if config.linear_format(module).kind == "int4" else _INT8_STD
        return "constant", STD / per_step
    if name == "minimum":
        return "constant", -7.5 * STD / _NIBBLE_STD
    return "normal", STD


@functools.cache
def _program(rule: tuple[str, float], shape: tuple[int, ...], dtype: jnp.dtype,
             sharding: NamedSharding | None):
    """key -> one parameter, jitted (cached: a scanned model's layers share one program per
    shape, and an unrolled one's layers all reuse theirs)."""
    kind, value = rule

    def draw(key: jax.Array) -> jax.Array:
        if kind == "normal":
            return (jax.random.normal(key, shape, dtype) * jnp.asarray(value, dtype))
        if kind == "integers":   # int8 q in -127..127
            return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)
        if kind == "bytes":      # int4 packed: two nibbles per byte
            return jax.random.bits(key, shape, jnp.uint8).astype(dtype)
        return jnp.full(shape, value, dtype)

    placement = {} if sharding is None else dict(out_shardings=sharding)
    return jax.jit(draw, **placement)
