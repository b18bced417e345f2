"""Multi-host serving on jax's own distributed runtime (`jax.distributed`).

One model spans the devices of several processes. Process 0 (the leader) owns the scheduler,
HTTP, the ledger and the tokenizer; every other process (a follower) only runs the step. Each
call the leader's Runner makes to one of its jitted functions first reaches every process:

    leader                                      follower (Follower.run)
    header i32[4] = (kind, a, b, c)  --bcast-->  which function, the rung sizes, flags
    the call's numpy arrays          --bcast-->  zeros of the same shapes, filled by the bcast
    jitted fn(global arrays)         <=SPMD=>    the same jitted fn(global arrays)

The broadcasts are `multihost_utils.broadcast_one_to_all` (a psum over every device), so the
exchange runs on jax's own collectives (gloo on CPU). The step inputs become global,
replicated arrays on the mesh, so every process runs the same program on its own devices.
The penalty token counts (step.py: PenaltyState) live on every process and change only
through these calls; a slot is always filled (INIT_PENALTY_SLOT) before a sampler reads it,
so the leader re-creating its own after a failure (DevicePenalties.reset) needs no
broadcast.

A "stop" header ends the followers when the leader's process exits. When a process dies,
the collective it was part of raises on the others (gloo: "Connection reset by peer"); the
leader's broadcaster then refuses every further step and every cache rebuild (`MeshLost`),
so the engine thread fails every live request with that error and stays "failed" (/health
answers 503). Tasks are recoverable (`jax_enable_recoverability`): without it the
coordination service terminates every process once one stops sending heartbeats.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from engine.worker.host_arrays import empty_slot_history

logger = logging.getLogger(__name__)

STOP, FORWARD, SAMPLE, PROMPT_LOGPROBS, INIT_PENALTY_SLOT = range(5)
STOP_GRACE_S = 0.5


class MeshLost(RuntimeError):
    """A process of the multi-host mesh is gone; this engine cannot run a step again."""


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`, before anything touches a device."""
    if num_processes < 2 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id}, num_processes={num_processes}: expected "
                         "num_processes >= 2 and 0 <= process_id < num_processes")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    # jax's preemption notifier takes SIGTERM from the process's own handler (gunicorn's
    # graceful shutdown on the leader); Ember stops on SIGTERM itself.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logger.info("process %d of %d: %d local devices of %d", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def _header(kind: int, a: int = 0, b: int = 0, c: int = 0) -> np.ndarray:
    return np.asarray([kind, a, b, c], np.int32)   # i32[4]


def _to_global(tree: Any, sharding) -> Any:
    """Host numpy arrays (the same on every process) -> replicated global arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)


def _lost(error: Exception | None) -> MeshLost:
    return MeshLost(f"a process of the {jax.process_count()}-process mesh is gone ({error}); "
                    "restart every process of the server")


class StepBroadcaster:
    """Leader side: wraps the runner's jitted functions so that each call first broadcasts
    its header and arrays to the followers. Outputs the runner reads on the host come back
    as the leader's own (fully addressable) copy."""

    def __init__(self, runner):
        self._replicated = runner.plan.sharding()
        self._forward, self._sample = runner._forward, runner._sample
        self._prompt_logprobs = runner._prompt_logprobs
        self._init_penalty_slot = runner.penalties.init_slot
        self._restore_kv_cache = runner.restore_kv_cache
        self._lock = threading.Lock()
        self.lost: Exception | None = None
        self.stopped = False
        runner._forward, runner._sample = self.forward, self.sample
        runner._prompt_logprobs = self.prompt_logprobs
        runner.penalties.init_slot = self.init_penalty_slot
        runner.restore_kv_cache = self.restore_kv_cache
        atexit.register(self.stop)

    def forward(self, params, kv_cache, batch, logits_indices, previous_rows, previous_draws,
                rotary_table):
        # previous_draws: the last sampler's draws, which every process holds as its own;
        # rotary_table: made by every process's Runner alike.
        with self._lock:
            header = _header(FORWARD, batch.input_ids.shape[0])
            batch, logits_indices, previous_rows = self._send(
                header, (batch, logits_indices, previous_rows))
            return self._run(self._forward, params, kv_cache, batch, logits_indices,
                             previous_rows, previous_draws, rotary_table)

    def sample(self, params, last_hidden, sampling, penalties, penalty_state, bitmask, *,
               num_seqs, num_top):
        # penalty_state: every process holds its own, changed by the same calls.
        with self._lock:
            flags = int(penalties is not None) | int(bitmask is not None) << 1
            sampling, penalties, bitmask = self._send(
                _header(SAMPLE, num_seqs, flags, num_top), (sampling, penalties, bitmask))
            packed, drawn, penalty_state = self._run(
                self._sample, params, last_hidden, sampling, penalties, penalty_state, bitmask,
                num_seqs=num_seqs, num_top=num_top)
            return packed.addressable_data(0), drawn, penalty_state

    def init_penalty_slot(self, penalty_state, slot, tokens, num_prompt, pending_row,
                          previous_draws):
        with self._lock:
            arrays = self._send(_header(INIT_PENALTY_SLOT, tokens.shape[0]),
                                (slot, tokens, num_prompt, pending_row))
            return self._run(self._init_penalty_slot, penalty_state, *arrays, previous_draws)

    def prompt_logprobs(self, params, hidden, targets, *, num_top):
        with self._lock:
            targets = self._send(_header(PROMPT_LOGPROBS, targets.shape[0], num_top), targets)
            return self._run(self._prompt_logprobs, params, hidden, targets,
                             num_top=num_top).addressable_data(0)

    def restore_kv_cache(self) -> bool:
        if self.lost is not None:
            raise _lost(self.lost)
        return self._restore_kv_cache()

    def stop(self, timeout: float = 5.0) -> None:
        """Tells the followers to exit (once; registered to run at the leader's exit)."""
        if self.stopped or self.lost is not None or not self._lock.acquire(timeout=timeout):
            return
        try:
            multihost_utils.broadcast_one_to_all(_header(STOP))
            # The coordination service lives in this process: give the followers a moment
            # to exit before it goes, or their error poll sees it gone and aborts them.
            time.sleep(STOP_GRACE_S)
        except Exception:  # noqa: BLE001 - the followers are gone already
            pass
        finally:
            self.stopped = True
            self._lock.release()

    def _send(self, header: np.ndarray, arrays: Any) -> Any:
        if self.lost is not None or self.stopped:
            raise _lost(self.lost or "the leader is stopping")

        def exchange():
            multihost_utils.broadcast_one_to_all(header)
            return _to_global(multihost_utils.broadcast_one_to_all(arrays), self._replicated)

        return self._run(exchange)

    def _run(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a peer died mid-collective
            self.lost = error
            logger.error("a multi-host collective failed; the engine stops serving: %s", error)
            raise _lost(error) from error


class Follower:
    """Follower side: receives each call's header and arrays from the leader and runs the
    same jitted function (the runner's own) on the same global shapes."""

    def __init__(self, runner):
        self.runner = runner
        self._replicated = runner.plan.sharding()

    def run(self) -> None:
        """Mirrors the leader's calls (its warm-up included) until it sends STOP, then ends
        the process at once, before the leader's coordination service goes (see
        StepBroadcaster.stop); a failed collective (the leader is gone) raises."""
        r = self.runner
        hidden = last_hidden = None
        drawn = r._no_draws   # the leader's last sampler's draws, mirrored
        while True:
            kind, a, b, c = (int(v) for v in multihost_utils.broadcast_one_to_all(_header(-1)))
            if kind == STOP:
                logger.info("the leader stopped; the follower exits")
                logging.shutdown()   # a follower holds nothing else that needs flushing
                os._exit(0)
            if kind == FORWARD:
                batch, indices = r._empty_batch(a)
                batch, indices, previous_rows = self._receive(
                    (batch, indices, np.full(a, -1, np.int32)))
                r.kv_cache, hidden, last_hidden = r._forward(r.param_leaves, r.kv_cache, batch,
                                                             indices, previous_rows, drawn,
                                                             r.rotary_table)
            elif kind == SAMPLE:
                # b: bit 0 penalties, bit 1 a token bitmask (StepBroadcaster.sample)
                sampling, penalties = r._sampling_arrays([], a, bool(b & 1))
                bitmask = r._open_bitmask(a) if b & 2 else None
                sampling, penalties, bitmask = self._receive((sampling, penalties, bitmask))
                _, drawn, penalty_state = r._sample(
                    r.param_leaves, last_hidden, sampling, penalties,
                    r.penalties.state if b & 1 else None, bitmask, num_seqs=a, num_top=c)
                if b & 1:
                    r.penalties.state = penalty_state
                drawn.block_until_ready()
            elif kind == INIT_PENALTY_SLOT:
                arrays = self._receive(empty_slot_history(a))
                r.penalties.state = r.penalties.init_slot(r.penalties.state, *arrays, drawn)
            elif kind == PROMPT_LOGPROBS:
                targets = self._receive(np.zeros(a, np.int32))
                r._prompt_logprobs(r.param_leaves, hidden, targets,
                                   num_top=b).block_until_ready()
            else:
                raise ValueError(f"header kind={kind}: expected one of 0..4")

    def _receive(self, template: Any) -> Any:
        return _to_global(multihost_utils.broadcast_one_to_all(template), self._replicated)


def attach(runner) -> None:
    """Called by a Runner built while jax runs several processes: on the leader, every step
    is broadcast; a follower's runner is driven by Follower."""
    if runner.plan is None or runner.plan.mesh.devices.size != jax.device_count():
        raise ValueError(f"jax.process_count()={jax.process_count()}: multi-process serving "
                         "needs a mesh over every process's devices (tensor_parallel_size="
                         f"{jax.device_count()})")
    if jax.process_index() == 0:
        StepBroadcaster(runner)

