"""The device side of one engine step: pure functions the runner jits once per ladder rung.

forward_step   (per token rung T)   embeds, attends over the paged cache, writes K/V
sample_step    (per sequence rung S) LM head on each sequence's last row, penalties, the
                                     structured-output token bitmask, sampling,
                                     chosen-token logprob, rank and optional top logprobs,
                                     all packed in one f32 array for a single host transfer
prompt_logprobs_step (per T)         logprobs of each prompt token, for evaluations

Splitting the LM head from the body keeps compilations at |T| + |S| instead of |T| x |S|.
`jit_steps` jits the three as the runner runs them.

With tensor parallelism (a ShardingPlan), forward_step runs attention per device under
shard_map, and the vocab-sharded logits are gathered onto every device (padding cut off)
before anything reads them, so sampling and logprobs are the single-device code, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from engine.config import EngineConfig
from models.batch import Batch
from models.paged import forward_paged, kv_cache_spec
from models.sharding import ShardingPlan
from pallas_kernels.token_bitmask import apply_token_bitmask

TOP_LOGPROBS = 20  # the one top-logprobs width compiled; requests slice what they asked for
HISTORY_PENDING = -2   # a penalty history entry drawn by the previous step (-1 is padding)


class SamplingArrays(NamedTuple):
    """Per-sequence sampling parameters, padded to a sequence rung S."""

    temperature: jax.Array  # f32[S]  0 = greedy
    top_k: jax.Array        # i32[S]  <= 0 disables
    top_p: jax.Array        # f32[S]
    min_p: jax.Array        # f32[S]
    seeds: jax.Array        # u32[S]
    positions: jax.Array    # i32[S]  output position of the token being drawn


class PenaltyArrays(NamedTuple):
    """Token history for repetition / presence / frequency penalties."""

    history: jax.Array             # i32[S, L]  prompt then output ids, -1 padded; a token
                                   #            still being drawn is PENDING_TOKEN (-2 here)
    pending_rows: jax.Array        # i32[S]     its row in the previous step's draws, or -1
    num_prompt: jax.Array          # i32[S]     history[:num_prompt] is the prompt
    repetition: jax.Array          # f32[S]     1 disables
    presence: jax.Array            # f32[S]
    frequency: jax.Array           # f32[S]


class TokenBitmask(NamedTuple):
    """Structured output's allowed tokens (engine/structured), filled on the host per step."""

    bitmask: jax.Array   # u32[S, ceil(V/32)]  token t allowed: bit t % 32 of word t // 32
    enabled: jax.Array   # bool[S]             False rows are left free


def forward_step(graphdef, params, kv_cache, batch: Batch, logits_indices, previous_rows,
                 previous_tokens, *, backend, interpret, plan: ShardingPlan | None = None):
    """kv_cache [L, num_pages, page_size, 2 * Hkv, D] (donated); logits_indices i32[S_max].

    Async scheduling: input row t whose previous_rows[t] (i32[T]) is a row r >= 0 feeds
    previous_tokens[r] (i32[S_max], the previous step's draws, still on the device).

    Returns (kv_cache, hidden [T, H], last_hidden [S_max, H] at logits_indices)."""
    input_ids = jnp.where(previous_rows >= 0,
                          previous_tokens[jnp.maximum(previous_rows, 0)], batch.input_ids)
    batch = dataclasses.replace(batch, input_ids=input_ids)
    model = nnx.merge(graphdef, params)
    kv_cache, hidden = forward_paged(model, kv_cache, batch, backend=backend,
                                     interpret=interpret,
                                     mesh=None if plan is None else plan.mesh)
    return kv_cache, hidden, hidden[logits_indices]


def logits_of(model, hidden, plan: ShardingPlan | None):
    """f32[rows, V]: the LM head; under a plan gathered onto every device, padding cut off."""
    logits = model.logits(hidden)
    return logits if plan is None else plan.gather_logits(logits)


def apply_penalties(logits, penalties: PenaltyArrays, previous_tokens):
    """vLLM/OpenAI semantics: repetition over prompt and output tokens (divide positive
    logits, multiply negative ones); presence and frequency over output tokens only.
    A history entry HISTORY_PENDING takes the row's token from previous_tokens."""
    num_seqs, vocab = logits.shape
    pending = previous_tokens[jnp.maximum(penalties.pending_rows, 0)]
    history = jnp.where(penalties.history == HISTORY_PENDING, pending[:, None],
                        penalties.history)
    valid = history >= 0
    is_output = jnp.arange(history.shape[1])[None, :] >= penalties.num_prompt[:, None]
    ids = jnp.where(valid, history, vocab)  # padding lands in a dropped extra column
    rows = jnp.arange(num_seqs)[:, None]
    seen = jnp.zeros((num_seqs, vocab + 1), jnp.bool_).at[rows, ids].set(True)[:, :vocab]
    counts = jnp.zeros((num_seqs, vocab + 1), jnp.float32).at[rows, ids].add(
        (valid & is_output).astype(jnp.float32))[:, :vocab]
    rep = penalties.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - penalties.frequency[:, None] * counts
    return logits - penalties.presence[:, None] * (counts > 0)


def request_keys(seeds, positions):
    """Raw key data u32[S, 2] of fold_in(PRNGKey(seed), output_position), per sequence."""
    def one(seed, position):
        return jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(seed), position))
    return jax.vmap(one)(seeds, positions)


def sample_step(graphdef, params, last_hidden, sampling: SamplingArrays,
                penalties: PenaltyArrays | None, bitmask: TokenBitmask | None,
                previous_tokens, *, num_seqs, num_top, backend, interpret,
                plan: ShardingPlan | None = None):
    """Samples one token per sequence; returns (f32[S, 3 + 2 * num_top]: token id, its
    logprob, its rank, then num_top (id, logprob) pairs; the token ids as i32[S_max], for
    the next step's forward to feed without a trip through the host).

    Logprobs are the model's own distribution (log_softmax of the raw logits), as OpenAI
    and vLLM report them; penalties, the structured-output mask and temperature shape only
    the draw. The mask sets forbidden logits to -inf before the draw, so a greedy row's
    argmax obeys it too. `bitmask` None (no constrained row) compiles without it.
    """
    model = nnx.merge(graphdef, params)
    logits = logits_of(model, last_hidden[:num_seqs], plan)  # f32[S, V]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if penalties is not None:
        logits = apply_penalties(logits, penalties, previous_tokens)
    if bitmask is not None:
        logits = apply_token_bitmask(logits, bitmask.bitmask, bitmask.enabled)
    keys = request_keys(sampling.seeds, sampling.positions)
    token_ids, _ = pallas_kernels.sample(logits, sampling.temperature, sampling.top_k,
                                         sampling.top_p, sampling.min_p, keys, backend=backend,
                                         interpret=interpret)
    drawn = jnp.zeros(previous_tokens.shape, jnp.int32).at[:num_seqs].set(token_ids)
    return _pack(logprobs, token_ids, num_top), drawn


def prompt_logprobs_step(graphdef, params, hidden, target_ids, *, num_top,
                         plan: ShardingPlan | None = None):
    """Logprob, rank and top logprobs of target_ids[t] under row t's distribution:
    f32[T, 3 + 2 * num_top]."""
    model = nnx.merge(graphdef, params)
    logprobs = jax.nn.log_softmax(logits_of(model, hidden, plan), axis=-1)
    return _pack(logprobs, target_ids, num_top)


def _pack(logprobs, token_ids, num_top):
    rows = jnp.arange(logprobs.shape[0])
    chosen = logprobs[rows, token_ids]
    rank = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1)
    columns = [token_ids.astype(jnp.float32), chosen, rank.astype(jnp.float32)]
    packed = jnp.stack(columns, axis=-1)
    if num_top:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
        packed = jnp.concatenate([packed, top_ids.astype(jnp.float32), top_logprobs], axis=-1)
    return packed


class StepFunctions(NamedTuple):
    """The three jitted functions of a step, the graphdef bound."""

    forward: Callable           # (params, kv_cache, batch, logits_indices, previous_rows,
                                #  previous_tokens), cache donated
    sample: Callable            # (params, last_hidden, sampling, penalties, bitmask,
                                #  previous_tokens, *, num_seqs, num_top)
    prompt_logprobs: Callable   # (params, hidden, target_ids, *, num_top)


def jit_steps(graphdef: nnx.GraphDef, config: EngineConfig, plan: ShardingPlan | None = None
              ) -> StepFunctions:
    """The step functions jitted as the runner runs them (scripts/bench_compile.py lowers
    them on abstract arrays)."""
    kernel = dict(backend=config.backend, interpret=config.interpret)
    # On a mesh every output's sharding is fixed, so each rung compiles once: the cache
    # stays split by kv head, everything else is replicated.
    forward_out, replicated = {}, {}
    if plan is not None:
        replicated = dict(out_shardings=plan.sharding())
        cache_dtype = pallas_kernels.resolve_kv_cache_dtype(config.kv_cache_dtype,
                                                            plan.layout.dtype)
        spec = kv_cache_spec(cache_dtype)   # a PartitionSpec, or (pages', scales') for 8-bit caches
        cache = (tuple(map(plan.sharding, spec)) if isinstance(spec[0], P)
                 else plan.sharding(spec))
        forward_out = dict(out_shardings=(cache, plan.sharding(), plan.sharding()))
    return StepFunctions(
        forward=jax.jit(functools.partial(forward_step, graphdef, plan=plan, **kernel),
                        donate_argnums=(1,), **forward_out),
        sample=jax.jit(functools.partial(sample_step, graphdef, plan=plan, **kernel),
                       static_argnames=("num_seqs", "num_top"), **replicated),
        prompt_logprobs=jax.jit(functools.partial(prompt_logprobs_step, graphdef, plan=plan),
                                static_argnames=("num_top",), **replicated))
