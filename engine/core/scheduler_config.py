"""The scheduler's limits and the statistics it reports (no JAX)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import is_int


@dataclass(slots=True)
class SchedulerConfig:
    """Limits of one engine.

    Attributes:
      max_num_seqs: most sequences in one step (and running at once).
      max_num_batched_tokens: token budget of one step.
      max_model_len: most tokens (prompt + output) of one sequence.
      page_size: token slots per KV page.
      num_pages: KV pages, page 0 included (it is reserved for padding).
      enable_prefix_caching: reuse computed full pages across requests.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    page_size: int = 16
    num_pages: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if not is_int(self.num_pages) or self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages!r}: expected an integer >= 2 "
                             "(page 0 is reserved for padding)")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r}: "
                             "expected a bool")

    def resolve_max_tokens(self, num_prompt: int, max_tokens: int | None) -> int:
        """The most output tokens a request may have; None means up to max_model_len.

        Raises:
          ValueError when the request could never run: an empty prompt, or one that with
          max_tokens goes beyond max_model_len or needs more pages than the cache has.
        """
        max_len = self.max_model_len
        if num_prompt < 1:
            raise ValueError("prompt has 0 tokens: expected at least 1")
        if num_prompt > max_len:
            raise ValueError(f"prompt has {num_prompt} tokens, beyond max_model_len={max_len}")
        if max_tokens is None:
            max_tokens = max_len - num_prompt
        if num_prompt + max_tokens > max_len:
            raise ValueError(f"prompt has {num_prompt} tokens and max_tokens={max_tokens}, "
                             f"beyond max_model_len={max_len}")
        # The last sampled token is never fed, so its KV needs no slot.
        num_pages = -(-(num_prompt + max(max_tokens - 1, 0)) // self.page_size)
        if num_pages > self.num_pages - 1:   # page 0 is reserved
            raise ValueError(
                f"prompt has {num_prompt} tokens and max_tokens={max_tokens}: needs "
                f"{num_pages} KV pages of {self.page_size} tokens, beyond the "
                f"{self.num_pages - 1} usable pages of the cache (num_pages)")
        return max_tokens


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_free_pages: int
    page_usage: float                # fraction of usable pages held by requests
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_rate: float
    num_preemptions: int             # since start
