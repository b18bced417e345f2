"""Runner: turns a SchedulerOutput into one flattened ragged batch and runs the jitted step.

Host side only builds numpy arrays (engine/worker/host_arrays.py); the device side lives in
engine/worker/step.py; KV cache sizing is engine/worker/sizing.py. Every array is
padded to a ladder rung, so after warm-up no step compiles. Results come back in one packed
transfer per step (two when prompt logprobs were asked for).

A step is launched, then collected (`launch`, `dispatch_sample`, `collect`; `execute` does all
three): with async scheduling the engine launches step N+1 before it collects step N. A token
step N draws reaches step N+1's input on the device (PENDING_TOKEN rows, `previous_rows`),
and a grammar's token bitmask, which needs that token on the host, is filled once step N is
collected, while step N+1's forward runs; its sampler is dispatched then. Penalised requests'
token counts stay on the device from step to step (engine/worker/penalties.py: a slot per
request), so a step ships no history.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from tqdm import tqdm

import pallas_kernels
from engine.config import EngineConfig
from engine.core.request import ModelOutput, Request, SchedulerOutput
from engine.structured import fill_bitmasks
from engine.worker.host_arrays import (empty_batch, forbid_tokens, open_bitmask, output_position,
                                      rung, sampling_arrays, step_batch)
from engine.worker.penalties import DevicePenalties, is_lost
from engine.worker.prompt_logprobs import prompt_targets, unpack_prompt_logprobs
from engine.worker.step import TOP_LOGPROBS, PenaltyArrays, SamplingArrays, TokenBitmask, jit_steps
from models.batch import Batch
from models.huge_pages import collapse_into_huge_pages
from models.paged import init_kv_cache
from models.sharding import KV_PAGES, ShardingPlan
from models.transformer import Transformer, rotary_table

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInFlight:
    """A launched step: what its sampler and its collection need."""

    scheduler_output: SchedulerOutput
    chosen: list[Request]           # the request of each scheduled row
    num_seqs: int                   # sequence rung
    num_top: int                    # top logprobs compiled for
    last_hidden: jax.Array          # [S_max, H]
    rows: dict[str, int]            # request id -> its row (its draw in `drawn`)
    packed: jax.Array | None = None   # the sampler's packed f32 output, once dispatched
    drawn: jax.Array | None = None    # i32[S_max]: the draws, for the next step's inputs
    prompt_logprobs: tuple | None = None   # (packed f32 on the device, rows wanted, spans)

    @property
    def is_sampled(self) -> bool:
        return self.packed is not None


class Runner:
    """Owns the weights, the KV cache and the compiled step functions."""

    def __init__(self, model: Transformer, config: EngineConfig, max_model_len: int,
                 num_pages: int, plan: ShardingPlan | None = None):
        """`plan`: tensor parallelism; `model` is then loaded on plan.mesh (load_model)."""
        if model.config.vocab_size >= 2 ** 24:
            raise ValueError("vocab_size >= 2**24 cannot travel exactly in the packed f32 output")
        self.config = config
        self.max_model_len = max_model_len
        self.num_pages = num_pages
        self.max_pages_per_seq = math.ceil(max_model_len / config.page_size)
        # The rungs, read every step (the config's properties build them on each read).
        self._token_ladder, self._seq_ladder = config.token_ladder, config.seq_ladder
        self.graphdef, self.params = nnx.split(model)
        # The jitted steps are given the params as the State's leaves (step.py:
        # _taking_leaves): a tuple costs jit's dispatch far less than the State.
        leaves, params_treedef = jax.tree.flatten(self.params)
        self.param_leaves = tuple(leaves)
        self.plan = plan
        # The logits' width, which bitmask rows cover (under a plan the padding is cut off).
        self.vocab_size = (model if plan is None else plan).config.vocab_size
        # Committed to its device(s) from the start: a jitted step's outputs are committed
        # when any input is, so a first cache that was not would compile a rung twice.
        self._new_kv_cache = functools.partial(
            init_kv_cache, model, num_pages, config.page_size,
            pallas_kernels.resolve_kv_cache_dtype(config.kv_cache_dtype, model.config.dtype),
            sharding=(SingleDeviceSharding(jax.devices()[0]) if plan is None
                      else plan.sharding(KV_PAGES)))
        # [L, num_pages, page_size, 2 * Hkv, D], or (that, scales) for int8/fp8 (models/paged.py)
        self.kv_cache = self._fresh_kv_cache()
        self.num_kv_rebuilds = 0   # times a failed step lost the cache and it was re-created
        self.timeline = None   # a DeviceTimeline a benchmark attaches (engine/worker/timeline.py)
        self._replicated = (SingleDeviceSharding(jax.devices()[0]) if plan is None
                            else plan.sharding())
        # An accelerator's results start their one trip to the host as soon as they are
        # drawn (as JetStream's do), so collect() finds them there; a CPU's are host memory
        # already, and the call costs it tens of microseconds a step.
        self._copy_results_early = jax.devices()[0].platform != "cpu"
        # The "previous draws" of a step that follows none: placed as the sampler's own
        # output is, so both compile alike.
        self._no_draws = jax.device_put(np.zeros(config.max_num_seqs, np.int32),
                                        self._replicated)
        # The rotary angles of every position a page table can reach, which each step reads
        # (models/transformer.py: Rotation), placed as _no_draws is.
        self.rotary_table = jax.device_put(
            rotary_table(model.config, self.max_pages_per_seq * config.page_size),
            self._replicated)
        (self._forward, self._sample, self._prompt_logprobs,
         init_penalty_slot) = jit_steps(self.graphdef, config, plan, params_treedef)
        # Penalised requests' token counts, kept on the device from step to step (a slot
        # per request), committed as _no_draws is.
        self.penalties = DevicePenalties(config.max_num_seqs, self.vocab_size, max_model_len,
                                         self._replicated, init_penalty_slot)
        if jax.process_count() > 1:   # several hosts: engine/worker/multihost.py
            from engine.worker import multihost
            multihost.attach(self)

    # ------------------------------------------------------------------ warm-up
    def warmup(self, progress: bool = True) -> None:
        """Compiles every rung: forward and prompt logprobs per token rung, sampling per
        sequence rung with and without penalties, top logprobs and a token bitmask, and
        the penalty slots' fill (once)."""
        c = self.config
        jobs = [("init_penalty_slot", None)]
        jobs += [("forward", t) for t in c.token_ladder]
        jobs += [("prompt_logprobs", t) for t in c.token_ladder]
        jobs += [("sample", (s, pen, top, mask)) for s in c.seq_ladder for pen in (False, True)
                 for top in (0, TOP_LOGPROBS) for mask in (False, True)]
        last_hidden = None
        for kind, shape in tqdm(jobs, desc="warm-up (compile)", unit="bucket",
                                disable=not progress):
            if kind == "init_penalty_slot":
                self.penalties.warm_up(self._no_draws)
            elif kind == "forward":
                batch, indices = self._empty_batch(shape)
                self.kv_cache, hidden, last_hidden = self._forward(
                    self.param_leaves, self.kv_cache, batch, indices,
                    np.full(shape, -1, np.int32), self._no_draws, self.rotary_table)
                self._prompt_logprobs(self.param_leaves, hidden, np.zeros(shape, np.int32),
                                      num_top=TOP_LOGPROBS).block_until_ready()
            elif kind == "sample":
                num_seqs, with_penalties, num_top, with_bitmask = shape
                sampling, penalties = self._sampling_arrays([], num_seqs, with_penalties)
                bitmask = self._open_bitmask(num_seqs) if with_bitmask else None
                packed, _, penalty_state = self._sample(
                    self.param_leaves, last_hidden, sampling, penalties,
                    self.penalties.state if with_penalties else None, bitmask,
                    num_seqs=num_seqs, num_top=num_top)
                if with_penalties:
                    self.penalties.state = penalty_state
                packed.block_until_ready()

    def _empty_batch(self, num_tokens: int) -> tuple[Batch, np.ndarray]:
        return empty_batch(num_tokens, self.config.max_num_seqs, self.max_pages_per_seq)

    # ------------------------------------------------------------------ one step
    def execute(self, scheduler_output: SchedulerOutput, requests: Mapping[str, Request]
                ) -> ModelOutput:
        """Runs one step to the end; returns sampled tokens and logprobs as numpy, row s for
        scheduled[s]. Every PENDING_TOKEN must be known to its request by now."""
        step = self.launch(scheduler_output, requests)
        self.dispatch_sample(step)
        return self.collect(step)

    def launch(self, scheduler_output: SchedulerOutput, requests: Mapping[str, Request],
               previous: StepInFlight | None = None) -> StepInFlight:
        """Dispatches the step's forward (and its sampler, unless a row's grammar waits for
        `previous`' tokens; then call dispatch_sample once they are applied). A
        PENDING_TOKEN its request knows by now is fed from the host, any other from
        `previous`' draws on the device."""
        scheduled = scheduler_output.scheduled
        chosen = [requests[item.request_id] for item in scheduled]
        # Every host array is packed before the forward runs, so a value that does not fit
        # its dtype fails the step before the (donated) KV cache is touched.
        batch, logits_indices, previous_rows = self._build_batch(scheduler_output, chosen,
                                                                 previous)
        self.kv_cache, hidden, last_hidden = self._dispatch(
            self._forward, self.param_leaves, self.kv_cache, batch, logits_indices,
            previous_rows, self._no_draws if previous is None else previous.drawn,
            self.rotary_table)
        self._record(last_hidden, scheduler_output)
        step = StepInFlight(
            scheduler_output, chosen, rung(self._seq_ladder, len(scheduled)),
            TOP_LOGPROBS if any(r.sampling_params.logprobs for r in chosen) else 0,
            last_hidden, {item.request_id: s for s, item in enumerate(scheduled)})
        step.prompt_logprobs = self._launch_prompt_logprobs(scheduler_output, chosen, batch,
                                                            hidden)
        grammar_waits = previous is not None and any(
            request.matcher is not None and request.num_pending > 1 for request in chosen)
        if not grammar_waits:
            self.dispatch_sample(step, previous)
        return step

    def dispatch_sample(self, step: StepInFlight, previous: StepInFlight | None = None
                        ) -> None:
        """Dispatches the step's sampler (once): penalties, the grammar rows' token
        bitmasks, filled from their matchers now, and the draw. `previous`: the step whose
        draws are still pending (None once they are applied)."""
        if step.is_sampled:
            return
        scheduled, chosen = step.scheduler_output.scheduled, step.chosen
        with_penalties = any(r.sampling_params.has_penalties for r in chosen)
        slots = () if not with_penalties else self.penalties.slots_for(
            scheduled, chosen, {} if previous is None else previous.rows,
            self._no_draws if previous is None else previous.drawn)
        sampling, penalties = sampling_arrays(chosen, step.num_seqs, with_penalties, slots)
        # Rows that draw a token this step (a prefill chunk draws none; a request finished
        # since it was scheduled is left free: its row is discarded) under a grammar, and
        # those short of min_tokens, which may not draw EOS or a stop token yet (as vLLM and
        # transformers forbid them).
        drawing = [(s, request) for s, (item, request) in enumerate(zip(scheduled, chosen))
                   if item.sample and not request.is_finished]
        constrained = [(request.matcher, s) for s, request in drawing
                       if request.matcher is not None]
        short = [(s, request) for s, request in drawing
                 if output_position(request) < request.sampling_params.min_tokens]
        bitmask = self._open_bitmask(step.num_seqs) if constrained or short else None
        if bitmask is not None:
            # Filled while the forward runs (dispatch is asynchronous): the host's grammar
            # work overlaps the device's, and the masks reach the device with the sampler.
            fill_bitmasks(constrained, bitmask.bitmask)
            for s, request in short:
                forbid_tokens(bitmask.bitmask[s], request.eos_token_ids
                              | set(request.sampling_params.stop_token_ids))
            bitmask.enabled[[s for _, s in constrained] + [s for s, _ in short]] = True
        step.packed, step.drawn, penalty_state = self._dispatch(
            self._sample, self.param_leaves, step.last_hidden, sampling, penalties,
            self.penalties.state if with_penalties else None, bitmask,
            num_seqs=step.num_seqs, num_top=step.num_top)
        if with_penalties:
            self.penalties.state = penalty_state
        if self._copy_results_early:
            step.packed.copy_to_host_async()
        self._record(step.packed, step.scheduler_output)

    def collect(self, step: StepInFlight) -> ModelOutput:
        """Waits for the step's results: sampled tokens and logprobs as numpy, row s for
        scheduled[s]."""
        num_top = step.num_top
        start = time.perf_counter()
        packed = np.asarray(step.packed)[:len(step.chosen)]
        if self.timeline is not None:
            self.timeline.add_wait(time.perf_counter() - start)
        output = ModelOutput(sampled_token_ids=packed[:, 0].astype(np.int32),
                             logprobs=packed[:, 1], ranks=packed[:, 2].astype(np.int32),
                             prompt_logprobs=self._collect_prompt_logprobs(step))
        output.top_logprob_ids = packed[:, 3:3 + num_top].astype(np.int32)
        output.top_logprobs = packed[:, 3 + num_top:]
        return output

    def _dispatch(self, jitted, *args, **kwargs):
        """jitted(*args, **kwargs), the host's time inside the call added to the timeline's
        dispatch time when one is attached: a call that returns only once the device has
        caught up shows there."""
        if self.timeline is None:
            return jitted(*args, **kwargs)
        start = time.perf_counter()
        try:
            return jitted(*args, **kwargs)
        finally:
            self.timeline.add_dispatch(time.perf_counter() - start)

    def _record(self, output: jax.Array, scheduler_output: SchedulerOutput) -> None:
        """The computation behind `output`, to the timeline if one is attached, labelled by
        its step's kind: "prefill" (prompt tokens fed) or "decode" (one token a sequence)."""
        if self.timeline is not None:
            self.timeline.record(output,
                                 "prefill" if scheduler_output.feeds_prompts else "decode")

    def restore_kv_cache(self) -> bool:
        """Re-creates the KV cache if a failed step lost it: the forward donates the cache, so
        after an error raised while it ran the old buffers may be deleted, or (the error
        surfacing later, dispatch being asynchronous) the new ones may hold that error.

        Every penalty slot is forgotten too (DevicePenalties.reset): whoever restores after
        a failure has a step to roll back, whose draws the slots may count.

        Returns:
          True when the cache was re-created: every page's contents are gone, so whatever
          the scheduler believes computed must be computed again.
        """
        self.penalties.reset()
        if not is_lost(self.kv_cache):
            return False
        self.kv_cache = self._fresh_kv_cache()
        self.num_kv_rebuilds += 1
        return True

    def _fresh_kv_cache(self):
        """A zeroed KV cache; on one CPU device in huge pages (models/huge_pages.py: a decode
        step of many sequences streams its pages as a small model's weights are streamed, and
        over 4 KiB pages it misses the TLB every 4 KiB), which the donating steps keep."""
        kv_cache = self._new_kv_cache()
        if self.plan is None:
            collapse_into_huge_pages(kv_cache)
        return kv_cache

    def _build_batch(self, scheduler_output: SchedulerOutput, chosen: list[Request],
                     previous: StepInFlight | None = None
                     ) -> tuple[Batch, np.ndarray, np.ndarray]:
        """The flattened batch, logits_indices and previous_rows i32[T] (host_arrays.py)."""
        num_tokens = rung(self._token_ladder, scheduler_output.num_batched_tokens)
        return step_batch(scheduler_output, chosen, self._empty_batch(num_tokens),
                          self.config.page_size, None if previous is None else previous.rows)

    def _sampling_arrays(self, chosen: list[Request], num_seqs: int, with_penalties: bool
                         ) -> tuple[SamplingArrays, PenaltyArrays | None]:
        return sampling_arrays(chosen, num_seqs, with_penalties)

    def _open_bitmask(self, num_seqs: int) -> TokenBitmask:
        return open_bitmask(num_seqs, self.vocab_size)

    def _launch_prompt_logprobs(self, scheduler_output, chosen, batch, hidden):
        """Dispatches the scoring of prompt tokens fed this step for requests that asked
        for prompt_logprobs: (packed on the device, rows wanted, spans), or None."""
        targets = prompt_targets(scheduler_output, chosen, batch.input_ids.shape[0])
        if targets is None:
            return None
        targets, wanted, spans = targets
        packed = self._dispatch(self._prompt_logprobs, self.param_leaves, hidden, targets,
                                num_top=TOP_LOGPROBS)
        self._record(packed, scheduler_output)
        return packed, wanted, spans

    def _collect_prompt_logprobs(self, step: StepInFlight) -> dict | None:
        if step.prompt_logprobs is None:
            return None
        packed, wanted, spans = step.prompt_logprobs
        return unpack_prompt_logprobs(np.asarray(jax.device_get(packed)), wanted, spans,
                                      step.chosen)

