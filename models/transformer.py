"""The one decoder-only transformer (Flax NNX) behind every supported architecture.

Parameter names follow Hugging Face's, so a checkpoint maps onto the module tree by name:
unrolled (`config.scan_layers=False`), `Transformer.model.layers[i].self_attn.q_proj.weight`
is `model.layers.i.self_attn.q_proj.weight`; scanned (ModelConfig's default), `model.layers`
is one DecoderLayer whose parameters are stacked on a leading [num_layers] axis, so that
tensor is `model.layers.self_attn.q_proj.weight[i]` (models/assembly.py maps one onto the
other).
Linear weights are stored [in, out] (HF stores [out, in]; the loader transposes).

Attention is not built in: each call takes an `attend(cache, q, k, v) -> (cache, out)` function
and the KV cache, so the same layers serve the paged engine (each layer gets a LayerCache,
its handle on the cache of every layer, writes its K/V and attends over its pages, and hands
the updated cache on: `hidden_states` returns it) and the dense causal path used for
training and tests (no cache: None in, None out).

`hints` (models.layer_slice.ProductHints, down to every Linear): how the step's products may
run. Its `num_rows` (i32[1]) is the step's real rows, the rest of the token rung padding: the
paged engine passes it on the CPU backend, where every f32 product then goes to the C++
kernel, which skips the padding (pallas_kernels/cpu/dense_matmul.cc); on one GPU it allows
the layer matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from models.config import ModelConfig
from models.layer_slice import NO_HINTS, LayerSlice, ProductHints, stack_and_layer
from models.quantization import QuantizedLinear, quantize_table, table_matmul
from pallas_kernels.cpu import dense_matmul_cpu
from pallas_kernels.gpu.kernel_choice import uses_layer_matmul


@dataclass(slots=True, frozen=True)
class LayerCache:
    """One layer's handle on the KV cache: the cache of every layer and which layer runs.

    The cache is one array for all layers (models/paged.py), carried through the layers;
    layer `layer` reads and writes only its own part, in place, so no layer's pages are
    ever copied out of it.
    """

    kv: object                 # the whole cache, e.g. [L, num_pages, page_size, 2 * Hkv, D]
                               # (an 8-bit cache: (pages, scales); models/paged.py)
    layer: jax.Array | int     # i32[] under scan; a Python int when unrolled


# attend(cache, q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D]) -> (cache, out [..., Hq, D]);
# cache is a LayerCache on the paged path (models/paged.py), None on the dense path.
AttendFn = Callable[[LayerCache | None, jax.Array, jax.Array, jax.Array],
                    tuple[LayerCache | None, jax.Array]]


FEW_HEAD_ROWS = 8   # LM-head rows up to which XLA's dot computes the logits on the CPU too


def _init(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, std: float = 0.02
          ) -> nnx.Param:
    """Random normal weights; without rngs only their shape (a module built for its
    structure before a checkpoint fills it: no memory, and no tracing, which cost more
    than reading the weights)."""
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * std)


def _constant(shape: tuple[int, ...], value: float, dtype) -> jax.Array:
    # Built in numpy and copied over: jnp.full would compile a tiny program per shape.
    return jnp.asarray(np.full(shape, value, np.float32)).astype(dtype)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype,
                 rngs: nnx.Rngs | None):
        self.weight = _init(rngs, (in_features, out_features), dtype)
        self.bias = nnx.Param(_constant((out_features,), 0.0, dtype)) if bias else None

    def __call__(self, x: jax.Array, hints: ProductHints = NO_HINTS) -> jax.Array:
        weight, layer = stack_and_layer(self.weight.get_value())   # the stack, under scan
        tokens = x.reshape(-1, x.shape[-1])
        # On the CPU every f32 product goes to the C++ kernel: it skips the padding rows,
        # reads a scanned layer's weight in place (XLA's dot would copy it out of the stack
        # first) and reads a decode's few rows' weights faster than XLA's dot.
        if hints.num_rows is not None and x.dtype == weight.dtype == jnp.float32:
            y = dense_matmul_cpu(tokens, weight, hints.num_rows, layer)
            y = y.reshape(*x.shape[:-1], weight.shape[-1])
        elif (layer is not None and hints.gpu_layer_matmul
              and uses_layer_matmul(tokens.shape[0], weight.shape)):
            from pallas_kernels.gpu.layer_matmul import layer_matmul_gpu
            y = layer_matmul_gpu(tokens, weight, layer).reshape(*x.shape[:-1], weight.shape[-1])
        else:
            y = x @ self.weight[...]
        return y if self.bias is None else y + self.bias[...]


def grouped_products(linears: tuple[Linear | QuantizedLinear, ...], x: jax.Array,
                     hints: ProductHints) -> tuple[jax.Array, ...]:
    """x through each of a scanned layer's Linears that read the same input (q, k and v;
    gate and up): on one GPU one layer-matmul call for all, so that a narrow product (k, v)
    shares the programs of a wide one (pallas_kernels/gpu/layer_matmul.py); else each on
    its own."""
    pairs = [stack_and_layer(linear.weight.get_value()) if isinstance(linear, Linear)
             else (None, None) for linear in linears]
    rows = x.size // x.shape[-1]
    if not (hints.gpu_layer_matmul and all(layer is not None for _, layer in pairs)
            and len({stack.dtype for stack, _ in pairs}) == 1
            and all(uses_layer_matmul(rows, stack.shape) for stack, _ in pairs)):
        return tuple(linear(x, hints) for linear in linears)
    from pallas_kernels.gpu.layer_matmul import grouped_layer_matmul_gpu
    products = grouped_layer_matmul_gpu(x.reshape(rows, x.shape[-1]),
                                        tuple(stack for stack, _ in pairs), pairs[0][1])
    return tuple((y if linear.bias is None else y + linear.bias[...]).reshape(
        *x.shape[:-1], y.shape[-1]) for y, linear in zip(products, linears))


def linear(config: ModelConfig, projection: str, in_features: int, out_features: int, *,
           bias: bool, rngs: nnx.Rngs | None) -> Linear | QuantizedLinear:
    """The `projection` layer (e.g. "q_proj"): quantized when config.quantization lists it."""
    fmt = config.linear_format(projection)
    if fmt is None:
        return Linear(in_features, out_features, bias=bias, dtype=config.dtype, rngs=rngs)
    return QuantizedLinear.create(in_features, out_features, bias=bias, dtype=config.dtype,
                                  quantization=fmt, rngs=rngs)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype, rngs: nnx.Rngs | None):
        self.weight = _init(rngs, (vocab_size, hidden_size), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class HeadBlocks(nnx.Module):
    """The LM head's weight, [vocab, hidden], also held as a GGUF file's Q8_0 blocks in the
    file's own order, one token's row each (q i8[vocab, hidden], scale f16[vocab, hidden /
    32]; ModelConfig.head_blocks): a decode's few rows read them (models/quantization.
    table_matmul), a quarter of the float head's bytes. `table` (f32 [vocab, hidden]) fills
    them from its values; None: shapes only, for the loader."""

    def __init__(self, vocab_size: int, hidden_size: int, table: np.ndarray | None = None):
        if table is None:
            self.q = nnx.Param(jax.ShapeDtypeStruct((vocab_size, hidden_size), jnp.int8))
            self.scale = nnx.Param(jax.ShapeDtypeStruct((vocab_size, hidden_size // 32),
                                                        jnp.float16))
        else:
            q, scale = quantize_table(table)
            self.q, self.scale = nnx.Param(jnp.asarray(q)), nnx.Param(
                jnp.asarray(scale.astype(np.float16)))

    def values(self) -> np.ndarray:
        """f32 [vocab, hidden]: the blocks' values."""
        q, scale = np.asarray(self.q[...]), np.asarray(self.scale[...], np.float32)
        return (q.reshape(q.shape[0], -1, 32) * scale[..., None]).reshape(q.shape)


class RMSNorm(nnx.Module):
    """RMSNorm in float32; Gemma scales by (1 + w) before the cast, Llama by w after it."""

    def __init__(self, dim: int, *, eps: float, offset: float, dtype):
        self.weight = nnx.Param(_constant((dim,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class Rotation(NamedTuple):
    """The rotary angles' cos and sin, f32[..., 1, D/2]: of each token of a step, or of
    every position of the context (rotary_table), whose rows a step reads."""

    cos: jax.Array
    sin: jax.Array

    @classmethod
    def of(cls, positions: jax.Array, inv_freq: jax.Array) -> Rotation:
        """positions: i32[...]; inv_freq: f32[D/2]."""
        freqs = positions.astype(jnp.float32)[..., None, None] * inv_freq  # f32[..., 1, D/2]
        return cls(jnp.cos(freqs), jnp.sin(freqs))

    def at(self, positions: jax.Array) -> Rotation:
        """A table's rows at positions (i32[...], clipped into the table)."""
        rows = jnp.clip(positions, 0, self.cos.shape[0] - 1)
        return Rotation(self.cos[rows], self.sin[rows])


def inverse_frequencies(config: ModelConfig) -> Float[Array, "half_head_dim"]:
    return jnp.asarray(config.rope.inverse_frequencies(config.head_dim), jnp.float32)


def rotary_table(config: ModelConfig, num_positions: int) -> Rotation:
    """The rotary angles of positions 0 .. num_positions - 1, f32[num_positions, 1, D/2]
    (Transformer.hidden_states' `rotary_table`; jax.eval_shape gives its abstract form)."""
    return Rotation.of(jnp.arange(num_positions, dtype=jnp.int32), inverse_frequencies(config))


def rotary(x: jax.Array, rotation: Rotation) -> jax.Array:
    """Rotates halves (HF's rotate_half layout). x: [..., heads, D]."""
    cos, sin = rotation.cos.astype(x.dtype), rotation.sin.astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        c, dtype = config, config.dtype
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = linear(c, "q_proj", c.hidden_size, q_size, bias=c.qkv_bias, rngs=rngs)
        self.k_proj = linear(c, "k_proj", c.hidden_size, kv_size, bias=c.qkv_bias, rngs=rngs)
        self.v_proj = linear(c, "v_proj", c.hidden_size, kv_size, bias=c.qkv_bias, rngs=rngs)
        self.o_proj = linear(c, "o_proj", q_size, c.hidden_size, bias=c.o_bias, rngs=rngs)
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype)
        self.q_norm = RMSNorm(c.head_dim, **norm) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, **norm) if c.qk_norm else None

    def __call__(self, x, rotation: Rotation, attend: AttendFn, cache: LayerCache | None,
                 hints: ProductHints = NO_HINTS) -> tuple[LayerCache | None, jax.Array]:
        lead = x.shape[:-1]
        q, k, v = grouped_products((self.q_proj, self.k_proj, self.v_proj), x, hints)
        q = q.reshape(*lead, self.num_heads, self.head_dim)
        k = k.reshape(*lead, self.num_kv_heads, self.head_dim)
        v = v.reshape(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, rotation), rotary(k, rotation)
        cache, out = attend(cache, q, k, v)  # out: [..., Hq, D]
        return cache, self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim), hints)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        c = config
        self.gate_proj = linear(c, "gate_proj", c.hidden_size, c.intermediate_size,
                                bias=c.mlp_bias, rngs=rngs)
        self.up_proj = linear(c, "up_proj", c.hidden_size, c.intermediate_size, bias=c.mlp_bias,
                              rngs=rngs)
        self.down_proj = linear(c, "down_proj", c.intermediate_size, c.hidden_size,
                                bias=c.mlp_bias, rngs=rngs)
        self.activation = c.activation

    def __call__(self, x: jax.Array, hints: ProductHints = NO_HINTS) -> jax.Array:
        gate, up = grouped_products((self.gate_proj, self.up_proj), x, hints)
        if self.activation == "silu":
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=self.activation != "gelu")
        return self.down_proj(gate * up, hints)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        norm = dict(eps=config.rms_norm_eps, offset=config.norm_offset, dtype=config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, rotation: Rotation, attend: AttendFn, cache: LayerCache | None,
                 hints: ProductHints = NO_HINTS) -> tuple[LayerCache | None, jax.Array]:
        cache, attended = self.self_attn(self.input_layernorm(x), rotation, attend, cache,
                                         hints)
        x = x + attended
        return cache, x + self.mlp(self.post_attention_layernorm(x), hints)


class DecoderStack(nnx.Module):
    """HF's `model.*`: embeddings, layers and the final norm.

    `layers` is, by config.scan_layers, one DecoderLayer with every parameter stacked on a
    leading [num_layers] axis, run under jax.lax.scan (compile time flat in depth), or an
    nnx.List of num_layers DecoderLayers, unrolled.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                      rngs=rngs)
        self.scan_layers = config.scan_layers
        if config.scan_layers:
            self.layers = stacked_layers(config, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs=rngs)
                                    for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                            offset=config.norm_offset, dtype=config.dtype)

    def layer(self, index: int) -> DecoderLayer:
        """Layer `index`; scanned, a module holding its slices of the stacked parameters."""
        if not self.scan_layers:
            return self.layers[index]
        graphdef, stacked = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[index], stacked))

    def run_layers(self, x: Float[Array, "*tokens hidden"], rotation: Rotation,
                   attend: AttendFn, kv_cache: jax.Array | None, hints: ProductHints = NO_HINTS
                   ) -> tuple[jax.Array | None, Float[Array, "*tokens hidden"]]:
        """Every layer in order: (the cache as the last layer left it, hidden states)."""
        def one(layer, layer_index, x, kv_cache):   # -> (x, kv_cache): the scan's carry
            cache = None if kv_cache is None else LayerCache(kv_cache, layer_index)
            cache, x = layer(x, rotation, attend, cache, hints)
            return x, None if cache is None else cache.kv

        if not self.scan_layers:
            for index, layer in enumerate(self.layers):
                x, kv_cache = one(layer, index, x, kv_cache)
            return kv_cache, x
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, layer_index):
            # Each parameter a LayerSlice of its stack (models/layer_slice.py), not the scan's
            # slice of it: a CPU kernel then reads its layer in place, no copy made.
            params = jax.tree.map(lambda stack: LayerSlice(stack, layer_index), stacked)
            return one(nnx.merge(graphdef, params), layer_index, *carry), None

        num_layers = jax.tree.leaves(stacked)[0].shape[0]
        (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache),
                                        jnp.arange(num_layers, dtype=jnp.int32))
        return kv_cache, x


def stacked_layers(config: ModelConfig, rngs: nnx.Rngs | None) -> DecoderLayer:
    """num_layers DecoderLayers as one module, each parameter stacked on a leading axis.

    With rngs the layers are drawn one after another, as the unrolled model draws them, so
    one seed gives the same weights scanned or not; without, shapes only (no memory).
    """
    if rngs is None:
        graphdef, state = nnx.split(DecoderLayer(config, rngs=None))
        return nnx.merge(graphdef, jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct((config.num_layers, *leaf.shape), leaf.dtype),
            state))
    layers = [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
    graphdef, _ = nnx.split(layers[0])
    return nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                            *(nnx.state(layer) for layer in layers)))


class Transformer(nnx.Module):
    """A decoder-only causal LM; see the module docstring for the attention seam."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None):
        self.config = config
        self.model = DecoderStack(config, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, bias=False,
                               dtype=config.dtype, rngs=rngs))
        head_blocks = None
        if config.head_blocks and rngs is None:
            head_blocks = HeadBlocks(config.vocab_size, config.hidden_size)
        elif config.head_blocks:   # random weights: the float head holds its blocks' values
            tied = self.lm_head is None
            module = self.model.embed_tokens if tied else self.lm_head
            table = np.asarray(module.weight[...], np.float32)       # tied [V, H], else [H, V]
            head_blocks = HeadBlocks(config.vocab_size, config.hidden_size,
                                     table if tied else table.T)
            values = head_blocks.values()
            module.weight = nnx.Param(jnp.asarray(values if tied else values.T, config.dtype))
        self.head_blocks = head_blocks

    def hidden_states(self, input_ids: Int[Array, "*tokens"], positions: Int[Array, "*tokens"],
                      attend: AttendFn, kv_cache: jax.Array | None = None,
                      hints: ProductHints = NO_HINTS, rotary_table: Rotation | None = None
                      ) -> tuple[jax.Array | None, Float[Array, "*tokens hidden"]]:
        """Runs the decoder stack.

        Args:
          input_ids, positions: the tokens and their positions in their sequences.
          attend: the attention seam (see AttendFn).
          kv_cache: the cache of every layer (opaque here: each layer hands `attend` a
            LayerCache of it and takes back the updated one); None on the dense path.
          hints: how the products may run (models.layer_slice.ProductHints): the real
            rows of [T] tokens for kernels that skip the padding, the GPU layer matmul.
          rotary_table: `rotary_table(config, n)` for positions below n, read at
            `positions`; None computes the step's angles here, which XLA fuses into each
            rotation of q and k: cos and sin once per head and layer (docs/perf.md).
        Returns:
          (the cache as the last layer's `attend` returned it, or None; final-norm hidden
          states).
        """
        c = self.config
        x = self.model.embed_tokens(input_ids)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.hidden_size ** 0.5, x.dtype)
        rotation = (Rotation.of(positions, inverse_frequencies(c)) if rotary_table is None
                    else rotary_table.at(positions))
        kv_cache, x = self.model.run_layers(x, rotation, attend, kv_cache, hints)
        return kv_cache, self.model.norm(x)

    def logits(self, hidden: Float[Array, "*rows hidden"], hints: ProductHints = NO_HINTS
               ) -> Float[Array, "*rows vocab"]:
        """The LM head in float32 accumulation: [..., hidden] -> [..., vocab]. With
        hints.num_rows (the sampler on the CPU kernels: its real rows) an untied f32 head of
        more than FEW_HEAD_ROWS rows goes to the dense kernel, which skips the padding rows
        (zeros) and reads a head as wide as a vocabulary faster than XLA's dot (docs/perf.md);
        XLA's dot reads a few rows' head as fast on one thread."""
        if self.head_blocks is not None:   # a decode's few rows on a CPU: from the blocks
            logits = table_matmul(hidden, self.head_blocks.q[...], self.head_blocks.scale[...])
            if logits is not None:
                return logits
        rows = hidden.size // hidden.shape[-1]
        if (hints.num_rows is not None and self.lm_head is not None and rows > FEW_HEAD_ROWS
                and hidden.dtype == self.lm_head.weight.dtype == jnp.float32):
            return self.lm_head(hidden, hints)
        if self.lm_head is None:
            weight = self.model.embed_tokens.weight[...].T
        else:
            weight = self.lm_head.weight[...]
        return jnp.dot(hidden, weight, preferred_element_type=jnp.float32)

    def forward_dense(self, input_ids: Int[Array, "batch length"],
                      hints: ProductHints = NO_HINTS) -> Float[Array, "batch length vocab"]:
        """Full causal forward over [batch, length] (training and scoring; no KV cache);
        hints as hidden_states takes them."""
        length = input_ids.shape[-1]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), input_ids.shape)
        _, hidden = self.hidden_states(input_ids, positions, dense_causal_attend(self.config),
                                       hints=hints)
        return self.logits(hidden)


def dense_causal_attend(config: ModelConfig) -> AttendFn:
    """Plain causal attention over [batch, length, heads, D], with the config's window."""
    scale = config.head_dim ** -0.5
    group = config.num_heads // config.num_kv_heads

    def attend(cache, q, k, v):
        length = q.shape[-3]
        k, v = jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
        query_pos = jnp.arange(length)[:, None]
        key_pos = jnp.arange(length)[None, :]
        visible = key_pos <= query_pos
        if config.sliding_window is not None:
            visible &= query_pos - key_pos < config.sliding_window
        scores = jnp.where(visible, scores * scale, -1e30)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return cache, jnp.einsum("...hqk,...khd->...qhd", weights, v)

    return attend
