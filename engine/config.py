"""EngineConfig: sizes, ladders and options of one engine (no JAX)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.sampling_params import is_int


def default_cache_dir() -> Path:
    """$EMBER_HOME (default ~/.cache/ember), read on each call: models, XLA cache, ledger."""
    return Path(os.environ.get("EMBER_HOME") or "~/.cache/ember").expanduser()


# Auto scan_layers: models this deep run their layers under jax.lax.scan (EngineConfig.scans).
SCAN_FROM_LAYERS = 9
# EngineConfig.quantization: None keeps the checkpoint's own (see the class docstring).
QUANTIZATIONS = (None, "none", "int8", "int4")
# EngineConfig.load_format: read the checkpoint, or random weights from config.json alone.
LOAD_FORMATS = ("auto", "dummy")


def ladder(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `largest`, which is always the last rung."""
    rungs, rung = [], smallest
    while rung < largest:
        rungs.append(rung)
        rung *= 2
    rungs.append(largest)
    return tuple(rungs)


@dataclass(slots=True)
class EngineConfig:
    """How one engine is sized and compiled.

    Attributes:
      max_model_len: longest sequence (prompt + output); None takes the model's limit,
        clamped to what the KV cache holds for one sequence ((num_pages - 1) * page_size
        tokens); an explicit value beyond the cache is an error at start-up.
      max_num_seqs: most sequences in one step.
      max_num_batched_tokens: the token budget of one step (decodes first, then prefill).
      page_size: tokens per KV page.
      num_pages: KV pages in the pool; None sizes it from device memory on accelerators
        (memory_fraction of what is free after the weights) and uses cpu_num_pages on CPU.
      backend: kernels to use, one of pallas_kernels.BACKENDS (checked by LLMEngine, which
        imports the kernels; this module stays free of JAX).
      interpret: run Pallas kernels in interpret mode (for tests on CPU).
      compilation_cache_dir: persistent XLA cache; "" disables it.
      warmup: compile every ladder rung before serving.
      tensor_parallel_size: devices one model is split over (tensor parallelism on a
        ("data", "model") mesh of the first N devices; models/sharding.py). 1 runs on one
        device, without a mesh.
      scan_layers: run the layers under jax.lax.scan over stacked weights (compile time
        flat in depth) or unrolled (compile time growing with depth); None (auto) scans
        models of more than 8 layers (see `scans`).
      quantization: how linear weights are held in memory: None (the checkpoint's own: a
        GGUF file's Q8_0/Q4_0/Q4_1 blocks stay quantized, other tensors and float
        checkpoints are float), "none" (everything dequantized to dtype), "int8" (symmetric
        per output channel) or "int4" (groups of 32 with a scale and a minimum, as Q4_1),
        quantized at load (models/quantization.py).
      load_format: "auto" reads the checkpoint's weights; "dummy" (vLLM's) reads only
        config.json and draws every weight at random on the device(s) (models/dummy.py),
        in dtype, quantized and sharded as asked: benchmarks of a shape with no weight file.
      kv_cache_dtype: the KV pages' dtype: "auto" (the model dtype), "bfloat16",
        "float8_e4m3fn" or "int8" (both 8-bit ones with a scale per token and head); one of
        pallas_kernels.KV_CACHE_DTYPES, checked by LLMEngine.
      async_scheduling: plan and launch step N+1 before step N's results come back, so
        the host's scheduling and output processing overlap the device (engine/
        llm_engine.py); the outputs are the same either way. Off on several hosts.
      seed: None (the default) draws each unseeded request's seed from OS entropy, so
        restarts and replicas never repeat a sequence; an int makes unseeded requests
        repeat from run to run (tests, benchmarks).
    """

    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    page_size: int = 16
    num_pages: int | None = None
    cpu_num_pages: int = 2048
    memory_fraction: float = 0.8
    enable_prefix_caching: bool = True
    dtype: str | None = None
    backend: str = "auto"
    interpret: bool = False
    compilation_cache_dir: str = field(default_factory=lambda: str(default_cache_dir() / "xla"))
    warmup: bool = True
    seed: int | None = None
    tensor_parallel_size: int = 1
    scan_layers: bool | None = None
    quantization: str | None = None
    load_format: str = "auto"
    kv_cache_dtype: str = "auto"
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "cpu_num_pages",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not (self.scan_layers is None or isinstance(self.scan_layers, bool)):
            raise ValueError(f"scan_layers={self.scan_layers!r}: expected None (auto), True "
                             "or False")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r}: expected one of "
                             f"{QUANTIZATIONS}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r}: expected one of "
                             f"{LOAD_FORMATS}")
        if self.seed is not None and not (is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed={self.seed!r}: expected None or an integer >= 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len!r}: expected a positive integer")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages!r}: expected at least 2 (page 0 is "
                             "reserved for padding)")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction={self.memory_fraction!r}: expected (0, 1]")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below "
                             f"max_num_seqs={self.max_num_seqs}: every sequence needs a token")

    def scans(self, num_layers: int) -> bool:
        """Whether the layers run under jax.lax.scan: scan_layers, or when None (auto) for
        models of SCAN_FROM_LAYERS layers or more.

        A scanned step compiles one layer whatever the depth; an unrolled one compiles
        every layer (about 0.3 s per layer and token rung on a CPU), but decodes faster: a
        scanned layer's weights are sliced out of the stacked arrays, which XLA's CPU
        backend copies every step. Up to 8 layers the compile costs seconds and batch-1
        decode runs 20-30% faster unrolled; deeper, compile time wins (docs/perf.md,
        "Scanned layers").
        """
        if self.scan_layers is not None:
            return self.scan_layers
        return num_layers >= SCAN_FROM_LAYERS

    @property
    def token_ladder(self) -> tuple[int, ...]:
        # From 1: a decode of a few sequences pads to 1, 2, 4 or 8 rows, not to 16.
        return ladder(1, self.max_num_batched_tokens)

    @property
    def seq_ladder(self) -> tuple[int, ...]:
        return ladder(1, self.max_num_seqs)
