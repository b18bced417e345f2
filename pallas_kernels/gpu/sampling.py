"""Fused sampling on the GPU (Pallas, Triton lowering): one program per row.

The row is streamed in vocab tiles of `block_v`, several times, never sorted:
  1. stats: max and sum of exp of the tempered logits (the log-normaliser), and the argmax;
  2. top-k threshold: a radix search over the 32-bit ordered key of the tempered logit,
     `radix_bits` bits per pass: each pass counts the tokens at or above 2^radix_bits
     candidate keys at once, so 32 / radix_bits passes find the exact k-th largest value;
  3. top-p threshold: the same search weighing each token above the top-k threshold by its
     probability, against top_p times the top-k mass (one more pass measures that mass),
     over only the tokens that can matter: one pass copies those with p >= (1 - top_p) / 2V
     to a scratch row (the rest together hold under 1 - top_p of the mass);
  4. draw: argmax over the kept tokens of tempered logit + Gumbel noise.
Searches a row does not need (greedy, top-k or top-p off) run zero passes.

The noise comes from `sampling_primitives.sampling_noise_bits`, generated outside the kernel with
jax.random from each row's key and passed in, so this kernel and `sample_reference` draw
the same token for the same key. The thresholds are the reference's exactly (they are values
of the row), up to float rounding in the top-p mass sums.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import gpu_block_barrier, gpu_load, gpu_store, triton_compiler_params
from pallas_kernels.sampling_primitives import gumbel_from_bits, ordered_key, sampling_noise_bits

_KEY_MIN = -(2 ** 31)


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingBlockSizes:
    """block_v: vocab tile of the stats and draw passes; search_block_v: of the threshold
    searches, whose accumulators are 2^radix_bits times wider; radix_bits divides 32.
    The best of a small sweep on an H200 (docs/perf.md)."""
    block_v: int = 2048
    search_block_v: int = 512
    radix_bits: int = 4
    num_warps: int = 8
    num_stages: int = 2


# Every pass keeps per-lane partials (one per tile position) and reduces them once at the
# end, so the loops over tiles do no cross-thread reductions.

def _tempered_tile(logits_ref, row, tile, *, temperature, block_v):
    vocab = logits_ref.shape[1]
    cols = tile * block_v + jnp.arange(block_v, dtype=jnp.int32)           # i32[BV]
    valid = cols < vocab
    logits = gpu_load(logits_ref.at[row, pl.ds(tile * block_v, block_v)], mask=valid, other=0)
    return cols, valid, logits.astype(jnp.float32) / temperature           # same op as reference


def _row_stats(tile_at, num_tiles, block_v):
    """Max, sum of exp(x - max) and first argmax of the tempered row."""
    def body(tile, lanes):
        lane_max, lane_sum, lane_arg = lanes
        cols, valid, x = tile_at(tile)
        x = jnp.where(valid, x, -jnp.inf)
        new_max = jnp.maximum(lane_max, x)
        lane_sum = lane_sum * jnp.exp(lane_max - new_max) + jnp.exp(x - new_max)
        return new_max, lane_sum, jnp.where(x > lane_max, cols, lane_arg)
    init = (jnp.full((block_v,), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((block_v,), jnp.float32), jnp.zeros((block_v,), jnp.int32))
    lane_max, lane_sum, lane_arg = jax.lax.fori_loop(0, num_tiles, body, init)
    row_max = lane_max.max()
    row_sum = (lane_sum * jnp.exp(lane_max - row_max)).sum()
    argmax = jnp.where(lane_max == row_max, lane_arg, jnp.iinfo(jnp.int32).max).min()
    return row_max, row_sum, argmax


def _radix_search(tile_at, num_tiles, num_passes, weight_of, target, *, radix_bits, block_v):
    """Largest key t with sum(weight[key >= t]) >= target, radix_bits bits per pass."""
    digits = jnp.arange(1 << radix_bits, dtype=jnp.int32)

    def one_pass(index, base):
        shift = 32 - radix_bits * (index + 1)
        # base has its low (shift + radix_bits) bits clear relative to -2^31, so every
        # candidate fits in i32; the add may wrap on the way, which lands on the right value.
        candidates = base + (digits << shift)                               # i32[W]

        def body(tile, lanes):                                              # f32[W, BV]
            _, valid, x = tile_at(tile)
            keys = ordered_key(x)
            above = keys[None, :] >= candidates[:, None]
            return lanes + jnp.where(above, weight_of(valid, keys, x)[None, :], 0.0)

        lanes = jnp.zeros((digits.shape[0], block_v), jnp.float32)
        totals = jax.lax.fori_loop(jnp.int32(0), num_tiles, body, lanes).sum(axis=1)  # f32[W]
        digit = jnp.maximum((totals >= target).astype(jnp.int32).sum() - 1, 0)
        return base + (digit << shift)

    return jax.lax.fori_loop(0, num_passes, one_pass, jnp.int32(_KEY_MIN))


def _sample_kernel(logits_ref,       # [S, V]
                   bits_ref,         # i32[S, V]  random bits of the row's draw
                   temperature_ref,  # f32[S]
                   top_k_ref,        # i32[S]
                   top_p_ref,        # f32[S]
                   min_p_ref,        # f32[S]
                   token_ref,        # i32[S]
                   log_norm_ref,     # f32[S]  log-sum-exp of the tempered row
                   candidates_ref,   # f32[S, V]  scratch: the top-p search's candidates
                   *, sizes: SamplingBlockSizes, interpret: bool):
    row = pl.program_id(0)
    vocab = logits_ref.shape[1]
    greedy = temperature_ref[row] <= 0.0
    temperature = jnp.where(greedy, 1.0, temperature_ref[row])
    tiles = functools.partial(_tempered_tile, logits_ref, row, temperature=temperature)
    tile_at = functools.partial(tiles, block_v=sizes.block_v)
    num_tiles = pl.cdiv(vocab, sizes.block_v)
    row_max, row_sum, argmax = _row_stats(tile_at, num_tiles, sizes.block_v)
    max_key = ordered_key(row_max)
    search = functools.partial(_radix_search, radix_bits=sizes.radix_bits,
                               block_v=sizes.search_block_v)
    passes = 32 // sizes.radix_bits

    top_k = top_k_ref[row]
    use_top_k = ~greedy & (top_k > 0) & (top_k < vocab)
    count = lambda valid, keys, x: valid.astype(jnp.float32)
    k_key = search(functools.partial(tiles, block_v=sizes.search_block_v),
                   pl.cdiv(vocab, sizes.search_block_v), _trip_count(use_top_k, passes), count,
                   top_k.astype(jnp.float32))

    top_p = top_p_ref[row]
    use_top_p = ~greedy & (top_p < 1.0)
    p_key = _top_p_key(tile_at, candidates_ref, row, search, sizes, top_p, use_top_p,
                       use_top_k, k_key, row_max, row_sum, interpret=interpret)
    p_key = jnp.where(use_top_p, jnp.minimum(p_key, max_key), k_key)

    min_p_key = ordered_key(row_max + jnp.log(jnp.maximum(min_p_ref[row], 0.0)))
    threshold = jnp.maximum(p_key, jnp.minimum(min_p_key, max_key))
    drawn = _draw(tile_at, bits_ref, row, _trip_count(~greedy, num_tiles), threshold,
                  sizes.block_v)
    token_ref[row] = jnp.where(greedy, argmax, drawn)
    log_norm_ref[row] = row_max + jnp.log(row_sum)


def _top_p_key(tile_at, candidates_ref, row, search, sizes, top_p, use_top_p, use_top_k, k_key,
               row_max, row_sum, *, interpret):
    """The top-p threshold key on the top-k-renormalised distribution."""
    vocab = candidates_ref.shape[1]
    num_tiles = pl.cdiv(vocab, sizes.block_v)
    weight = lambda valid, keys, x: jnp.where(valid & (keys >= k_key), jnp.exp(x - row_max), 0.0)
    kept_mass = jax.lax.fori_loop(
        0, _trip_count(use_top_p & use_top_k, num_tiles),
        lambda tile, lanes: lanes + weight(*_keyed(tile_at(tile))),
        jnp.zeros((sizes.block_v,), jnp.float32)).sum()
    kept_mass = jnp.where(use_top_k, kept_mass, row_sum)
    # Tokens with p < (1 - top_p) / V hold under 1 - top_p of the mass together, so the
    # threshold lies above them: search only the rest (half the bound, for rounding).
    floor = row_max + jnp.log(0.5 * (1.0 - top_p) * kept_mass / vocab)
    num_candidates = _compact(tile_at, candidates_ref, row, _trip_count(use_top_p, num_tiles),
                              jnp.maximum(ordered_key(floor), k_key))
    gpu_block_barrier(interpret=interpret)
    candidate_tile = functools.partial(_candidate_tile, candidates_ref, row, num_candidates,
                                       block_v=sizes.search_block_v)
    passes = 32 // sizes.radix_bits
    return search(candidate_tile, pl.cdiv(num_candidates, sizes.search_block_v),
                  _trip_count(use_top_p, passes), weight, top_p * kept_mass)


def _compact(tile_at, candidates_ref, row, num_tiles, floor_key):
    """Writes the row's tempered logits with key >= floor_key, in order, to
    candidates_ref[row, :n]; returns n."""
    vocab = candidates_ref.shape[1]

    def body(tile, written):
        _, valid, x = tile_at(tile)
        keep = valid & (ordered_key(x) >= floor_key)
        slots = written + jnp.cumsum(keep.astype(jnp.int32)) - 1
        # Lanes not kept get a slot past the end: masked, and distinct from every kept slot.
        gpu_store(candidates_ref.at[row, jnp.where(keep, slots, vocab)], x, mask=keep)
        return written + keep.astype(jnp.int32).sum()

    return jax.lax.fori_loop(jnp.int32(0), num_tiles, body, jnp.int32(0))


def _candidate_tile(candidates_ref, row, num_candidates, tile, *, block_v):
    slots = tile * block_v + jnp.arange(block_v, dtype=jnp.int32)
    valid = slots < num_candidates
    x = gpu_load(candidates_ref.at[row, pl.ds(tile * block_v, block_v)], mask=valid, other=0)
    return slots, valid, x


def _trip_count(run, count):
    # Typed constants: weakly typed ones lower to an scf.for whose bounds differ in type.
    return jnp.where(run, jnp.int32(count), jnp.int32(0))


def _keyed(tile):
    _, valid, x = tile
    return valid, ordered_key(x), x


def _draw(tile_at, bits_ref, row, num_tiles, threshold, block_v):
    """First argmax over kept tokens of tempered logit + Gumbel noise; the noise of tokens
    that are not kept is never loaded."""
    def body(tile, lanes):
        lane_best, lane_arg = lanes
        cols, valid, x = tile_at(tile)
        kept = valid & (ordered_key(x) >= threshold)
        bits = gpu_load(bits_ref.at[row, pl.ds(tile * block_v, block_v)], mask=kept, other=0)
        score = jnp.where(kept, x + gumbel_from_bits(bits), -jnp.inf)
        return jnp.maximum(lane_best, score), jnp.where(score > lane_best, cols, lane_arg)
    init = (jnp.full((block_v,), -jnp.inf, jnp.float32), jnp.zeros((block_v,), jnp.int32))
    lane_best, lane_arg = jax.lax.fori_loop(0, num_tiles, body, init)
    best = lane_best.max()
    return jnp.where(lane_best == best, lane_arg, jnp.iinfo(jnp.int32).max).min()


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sample_gpu(logits, temperature, top_k, top_p, min_p, keys, *,
               block_sizes: SamplingBlockSizes = SamplingBlockSizes(), interpret=False):
    """Same contract as pallas_kernels.sample (arguments checked there).

    logits [S, V]; temperature, top_p, min_p f32[S]; top_k i32[S]; keys u32[S, 2]
    -> token_ids i32[S], logprobs f32[S]. Besides the noise bits (i32[S, V]) the call
    takes an f32[S, V] scratch output for the top-p candidates.
    """
    rows, vocab = logits.shape
    bits = jax.lax.bitcast_convert_type(sampling_noise_bits(keys, vocab), jnp.int32)
    kernel = functools.partial(_sample_kernel, sizes=block_sizes, interpret=interpret)
    token_ids, log_norm, _ = pl.pallas_call(
        kernel,
        grid=(rows,),
        out_shape=(jax.ShapeDtypeStruct((rows,), jnp.int32),
                   jax.ShapeDtypeStruct((rows,), jnp.float32),
                   jax.ShapeDtypeStruct((rows, vocab), jnp.float32)),
        compiler_params=triton_compiler_params(num_warps=block_sizes.num_warps,
                                               num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="ember_sample",
    )(logits, bits, temperature, top_k, top_p, min_p)
    greedy = temperature <= 0.0
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=1)[:, 0].astype(jnp.float32)
    chosen = chosen / jnp.where(greedy, 1.0, temperature)
    return token_ids, chosen - log_norm
