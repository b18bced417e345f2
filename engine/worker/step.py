"""The device side of one engine step: pure functions the runner jits once per ladder rung.

forward_step   (per token rung T)   embeds, attends over the paged cache, writes K/V
sample_step    (per sequence rung S) LM head on each sequence's last row, penalties, the
                                     structured-output token bitmask, sampling,
                                     chosen-token logprob, rank and optional top logprobs,
                                     all packed in one f32 array for a single host transfer
prompt_logprobs_step (per T)         logprobs of each prompt token, for evaluations
init_penalty_slot (once)             fills a penalised request's slot of the PenaltyState
                                     (token counts kept on the device across steps)

Splitting the LM head from the body keeps compilations at |T| + |S| instead of |T| x |S|.
`jit_steps` jits them as the runner runs them.

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
from models.layer_slice import NO_HINTS, ProductHints
from models.paged import forward_paged, kv_cache_spec
from models.sharding import ShardingPlan
from models.transformer import Rotation
from pallas_kernels.token_bitmask import apply_token_bitmask

TOP_LOGPROBS = 20  # the one top-logprobs width compiled; requests slice what they asked for
HISTORY_PENDING = -2   # a penalty history entry drawn by the previous step (-1 is padding)


class SamplingArrays(NamedTuple):
    """Per-sequence sampling parameters, padded to a sequence rung S."""

    temperature: jax.Array  # f32[S]  0 = greedy
    top_k: jax.Array        # i32[S]  <= 0 disables
    top_p: jax.Array        # f32[S]
    min_p: jax.Array        # f32[S]
    seeds: jax.Array        # u32[S, 2]  the seed mod 2**64 as (high, low) words: its key
    positions: jax.Array    # i32[S]  output position of the token being drawn
    num_rows: jax.Array     # i32[1]  rows that are real, the rest padding (their logits: zeros on
                            #         the CPU kernels)


class PenaltyArrays(NamedTuple):
    """Per-row repetition / presence / frequency penalties; the tokens they count are the
    runner's PenaltyState, read at each row's slot."""

    slots: jax.Array        # i32[S]  the row's PenaltyState slot; -1: no penalty, nothing counted
    repetition: jax.Array   # f32[S]  1 disables
    presence: jax.Array     # f32[S]
    frequency: jax.Array    # f32[S]


class PenaltyState(NamedTuple):
    """Token counts of the penalised requests, kept on the device from step to step: one
    slot (row) per request, filled once by init_penalty_slot, then counted on by every
    sampler call that draws for it. R = max_num_seqs slots."""

    counts: jax.Array        # i32[R, V]   output tokens drawn so far
    prompt_seen: jax.Array   # bool[R, V]  tokens of the prompt


class TokenBitmask(NamedTuple):
    """Structured output's allowed tokens (engine/structured), filled on the host per step."""

    bitmask: jax.Array   # u32[S, ceil(V/32)]  token t allowed: bit t % 32 of word t // 32
    enabled: jax.Array   # bool[S]             False rows are left free


def forward_step(graphdef, params, kv_cache, batch: Batch, logits_indices, previous_rows,
                 previous_tokens, rotary_table: Rotation, *, backend, interpret,
                 plan: ShardingPlan | None = None):
    """kv_cache [L, num_pages, page_size, 2 * Hkv, D] (donated); logits_indices i32[S_max];
    rotary_table: models.transformer.rotary_table over the page table's positions, made once.

    Async scheduling: input row t whose previous_rows[t] (i32[T]) is a row r >= 0 feeds
    previous_tokens[r] (i32[S_max], the previous step's draws, still on the device).

    Returns (kv_cache, hidden [T, H], last_hidden [S_max, H] at logits_indices)."""
    input_ids = jnp.where(previous_rows >= 0,
                          previous_tokens[jnp.maximum(previous_rows, 0)], batch.input_ids)
    batch = dataclasses.replace(batch, input_ids=input_ids)
    model = nnx.merge(graphdef, params)
    kv_cache, hidden = forward_paged(model, kv_cache, batch, rotary_table, backend=backend,
                                     interpret=interpret,
                                     mesh=None if plan is None else plan.mesh)
    return kv_cache, hidden, hidden[logits_indices]


def logits_of(model, hidden, plan: ShardingPlan | None, hints: ProductHints = NO_HINTS):
    """f32[rows, V]: the LM head (hints as Transformer.logits takes them); under a plan
    gathered onto every device, padding cut off."""
    logits = model.logits(hidden, hints)
    return logits if plan is None else plan.gather_logits(logits)


def apply_penalties(logits, penalties: PenaltyArrays, state: PenaltyState):
    """vLLM/OpenAI semantics: repetition over prompt and output tokens (divide positive
    logits, multiply negative ones); presence and frequency over output tokens only. Row s
    reads slot penalties.slots[s] of `state`; a row without one (-1) is left as it is."""
    has_slot = (penalties.slots >= 0)[:, None]
    slots = jnp.maximum(penalties.slots, 0)
    counts = jnp.where(has_slot, state.counts[slots], 0)                 # i32[S, V]
    seen = (counts > 0) | (has_slot & state.prompt_seen[slots])          # bool[S, V]
    rep = penalties.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - penalties.frequency[:, None] * counts.astype(jnp.float32)
    return logits - penalties.presence[:, None] * (counts > 0)


def count_draws(state: PenaltyState, slots, token_ids) -> PenaltyState:
    """Adds row s's drawn token_ids[s] (i32[S]) to slot slots[s] (i32[S]; -1 adds nothing)."""
    rows = jnp.where(slots >= 0, slots, state.counts.shape[0])   # out of range: dropped
    return state._replace(counts=state.counts.at[rows, token_ids].add(1, mode="drop"))


def init_penalty_slot(state: PenaltyState, slot, tokens, num_prompt, pending_row,
                      previous_tokens) -> PenaltyState:
    """Resets slot `slot` (i32[]) to one request's history: tokens i32[L] (L = max_model_len),
    the prompt (tokens[:num_prompt], num_prompt i32[]) then the output ids, -1 padded. An
    entry HISTORY_PENDING is the token the previous step drew at row pending_row (i32[]),
    read from previous_tokens (i32[S_max]) without a trip through the host."""
    vocab = state.counts.shape[1]
    pending = previous_tokens[jnp.maximum(pending_row, 0)]
    tokens = jnp.where(tokens == HISTORY_PENDING, pending, tokens)
    is_output = jnp.arange(tokens.shape[0]) >= num_prompt
    outputs = jnp.where((tokens >= 0) & is_output, tokens, vocab)   # padding: a dropped column
    prompt = jnp.where((tokens >= 0) & ~is_output, tokens, vocab)
    counts = jnp.zeros(vocab + 1, jnp.int32).at[outputs].add(1)[:vocab]
    prompt_seen = jnp.zeros(vocab + 1, jnp.bool_).at[prompt].set(True)[:vocab]
    return PenaltyState(state.counts.at[slot].set(counts),
                        state.prompt_seen.at[slot].set(prompt_seen))


def request_keys(seeds, positions):
    """Raw key data u32[S, 2] of fold_in(PRNGKey(seed), output_position), per sequence:
    seeds u32[S, 2] hold each seed mod 2**64 as (high, low) words, the raw key PRNGKey makes
    of a 64-bit seed ([0, seed] for one below 2**32, as with a 32-bit seed)."""
    def one(key, position):
        return jax.random.key_data(jax.random.fold_in(key, position))
    return jax.vmap(one)(seeds, positions)


def sample_step(graphdef, params, last_hidden, sampling: SamplingArrays,
                penalties: PenaltyArrays | None, penalty_state: PenaltyState | None,
                bitmask: TokenBitmask | None, *, num_seqs, num_top, backend, interpret,
                plan: ShardingPlan | None = None):
    """Samples one token per sequence; returns (f32[S, 3 + 2 * num_top]: token id, its
    logprob, its rank, then num_top (id, logprob) pairs; the token ids as i32[S_max], for
    the next step's forward to feed without a trip through the host; the penalty state,
    each penalised row's draw counted in its slot, or None without penalties).

    Logprobs are the model's own distribution (log_softmax of the raw logits), as OpenAI
    and vLLM report them; penalties, the structured-output mask and temperature shape only
    the draw. The mask sets forbidden logits to -inf before the draw, so a greedy row's
    argmax obeys it too. `penalties` None (no penalised row) compiles without them and
    leaves the state alone; `bitmask` None (no constrained row) compiles without it.
    """
    model = nnx.merge(graphdef, params)
    # On the CPU kernels, one device: the real rows, so that the LM head skips the padding.
    on_cpu_kernels = plan is None and pallas_kernels.resolve_backend(backend) == "cpu"
    hints = ProductHints(num_rows=sampling.num_rows) if on_cpu_kernels else NO_HINTS
    logits = logits_of(model, last_hidden[:num_seqs], plan, hints)  # f32[S, V]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if penalties is not None:
        logits = apply_penalties(logits, penalties, penalty_state)
    if bitmask is not None:
        logits = apply_token_bitmask(logits, bitmask.bitmask, bitmask.enabled)
    keys = request_keys(sampling.seeds, sampling.positions)
    token_ids, _ = pallas_kernels.sample(logits, sampling.temperature, sampling.top_k,
                                         sampling.top_p, sampling.min_p, keys, backend=backend,
                                         interpret=interpret)
    if penalties is not None:
        penalty_state = count_draws(penalty_state, penalties.slots, token_ids)
    drawn = jnp.zeros(last_hidden.shape[0], jnp.int32).at[:num_seqs].set(token_ids)
    return _pack(logprobs, token_ids, num_top), drawn, penalty_state


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
    """The jitted functions of a step, the graphdef bound."""

    forward: Callable           # (params, kv_cache, batch, logits_indices, previous_rows,
                                #  previous_tokens, rotary_table), cache donated
    sample: Callable            # (params, last_hidden, sampling, penalties, penalty_state,
                                #  bitmask, *, num_seqs, num_top), penalty_state donated
    prompt_logprobs: Callable   # (params, hidden, target_ids, *, num_top)
    init_penalty_slot: Callable   # (penalty_state, slot, tokens, num_prompt, pending_row,
                                  #  previous_tokens), penalty_state donated


def jit_steps(graphdef: nnx.GraphDef, config: EngineConfig, plan: ShardingPlan | None = None,
              params_treedef: jax.tree_util.PyTreeDef | None = None) -> StepFunctions:
    """The step functions jitted as the runner runs them (scripts/bench_compile.py lowers
    them on abstract arrays). With `params_treedef` (the params State's structure) they
    also take the params as that State's leaves, a tuple, as the runner passes them."""
    kernel = dict(backend=config.backend, interpret=config.interpret)
    flat = functools.partial(_taking_leaves, treedef=params_treedef)
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
        forward=jax.jit(flat(functools.partial(forward_step, graphdef, plan=plan, **kernel)),
                        donate_argnums=(1,), **forward_out),
        sample=jax.jit(flat(functools.partial(sample_step, graphdef, plan=plan, **kernel)),
                       static_argnames=("num_seqs", "num_top"),
                       donate_argnames=("penalty_state",), **replicated),
        prompt_logprobs=jax.jit(
            flat(functools.partial(prompt_logprobs_step, graphdef, plan=plan)),
            static_argnames=("num_top",), **replicated),
        init_penalty_slot=jax.jit(init_penalty_slot, donate_argnums=(0,), **replicated))


def _taking_leaves(step: Callable, treedef: jax.tree_util.PyTreeDef | None) -> Callable:
    """`step`, whose first argument is the params State, taking that State's leaves (a
    tuple) too. Dispatch cost is why: jit flattens a tuple of arrays in C++, while a
    State's nodes are flattened and compared in Python, ~0.1 ms a call."""
    if treedef is None:
        return step

    @functools.wraps(step)   # jit reads the signature (argument names) through it
    def run(params, *args, **kwargs):
        if isinstance(params, tuple):
            params = jax.tree.unflatten(treedef, params)
        return step(params, *args, **kwargs)

    return run
