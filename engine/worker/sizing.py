"""How big the KV cache and the longest sequence can be on this device (host arithmetic)."""

from __future__ import annotations

import logging

import jax

import pallas_kernels
from engine.config import EngineConfig
from models.config import ModelConfig

logger = logging.getLogger(__name__)


def pages_that_fit(model_config: ModelConfig, config: EngineConfig) -> int:
    """KV pages for memory_fraction of one device's free memory (cpu_num_pages on a CPU,
    which reports no limit). `model_config` is the model as built (on a mesh: its layout,
    whose kv heads split evenly over tensor_parallel_size devices). A page's bytes are those
    of config.kv_cache_dtype (int8 scales included): a smaller dtype fits more pages. The
    penalty state (replicated on every device) is set aside first."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return config.cpu_num_pages
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            - penalty_state_bytes(model_config, config))
    return max(2, int(free * config.memory_fraction) // page_bytes(model_config, config))


def penalty_state_bytes(model_config: ModelConfig, config: EngineConfig) -> int:
    """The penalty token counts kept on every device (engine/worker/step.py: PenaltyState):
    i32 counts and a bool prompt mask per slot and vocabulary entry."""
    return config.max_num_seqs * model_config.vocab_size * (4 + 1)


def page_bytes(model_config: ModelConfig, config: EngineConfig) -> int:
    """One KV page's bytes on one device, every layer's slice of it."""
    c = model_config
    dtype = pallas_kernels.resolve_kv_cache_dtype(config.kv_cache_dtype, c.dtype)
    per_token = pallas_kernels.kv_cache_bytes_per_token(c.num_kv_heads, c.head_dim, dtype)
    return config.page_size * per_token * c.num_layers // config.tensor_parallel_size


def fit_max_model_len(requested: int | None, model_limit: int, num_pages: int,
                      page_size: int) -> int:
    """The longest sequence served: `requested` (None: the model's limit, cut to what the KV
    cache holds for one sequence).

    Raises:
      ValueError when `requested` is beyond the model's limit (its positions were never
      trained; a clamp would serve less than asked without a word) or beyond the KV cache,
      as vLLM refuses to start for either.
    """
    if requested is not None and requested > model_limit:
        raise ValueError(f"max_model_len={requested} is beyond the model's limit of "
                         f"{model_limit} positions (max_position_embeddings, or the GGUF "
                         "file's context length): lower max_model_len or leave it unset")
    capacity = (num_pages - 1) * page_size   # page 0 is reserved for padding
    if requested is not None and requested > capacity:
        raise ValueError(f"max_model_len={requested} is beyond the {capacity} tokens the KV "
                         f"cache holds for one sequence ({num_pages - 1} usable pages of "
                         f"{page_size} tokens): lower max_model_len or give the cache more "
                         "pages (num_pages, memory_fraction)")
    length = min(requested or model_limit, model_limit)
    if length > capacity:
        logger.warning("max_model_len %d (the model's limit) clamped to %d: the KV cache holds "
                       "%d pages of %d tokens", length, capacity, num_pages - 1, page_size)
        return capacity
    return length
