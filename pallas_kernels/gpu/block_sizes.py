"""Block sizes of the GPU (Triton) attention kernels, and the table they come from.

Keyed by a substring of `jax.devices()[0].device_kind` and the head dim. Entries with
tuned=False are first guesses from the shape of the problem (Hopper: 132 SMs, 228 KiB shared
memory per SM), not yet measured: docs/perf.md records what the device check measured.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.compat import device_kind


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionBlockSizes:
    """How the attention kernels tile their work.

    decode_*: the split-K kernel for sequences with one query row this step.
    prefill_*: the flash kernel for sequences with several rows (prefill chunks).
    block_m counts query rows x query heads of one kv head (the M of the MMA);
    block_kv counts KV tokens per inner-loop step, independent of the page size.
    """
    decode_block_kv: int = 64
    decode_max_splits: int = 16
    decode_target_programs: int = 512   # split until seqs x kv heads x splits reaches this
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    prefill_block_m: int = 64
    prefill_block_kv: int = 64
    prefill_num_warps: int = 4
    prefill_num_stages: int = 2
    tuned: bool = False

    def __post_init__(self):
        for name in ("decode_block_kv", "prefill_block_m", "prefill_block_kv"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value}: expected a power of 2 >= 16 (an MMA side)")


_HOPPER = {
    64: AttentionBlockSizes(decode_block_kv=128, decode_target_programs=528,
                            prefill_block_m=256, prefill_block_kv=64,
                            prefill_num_warps=8, prefill_num_stages=2),
    # Measured on an H200 (docs/perf.md): the best of a small sweep.
    128: AttentionBlockSizes(decode_block_kv=128, decode_num_warps=4, decode_num_stages=2,
                             decode_target_programs=528,
                             prefill_block_m=256, prefill_block_kv=64,
                             prefill_num_warps=8, prefill_num_stages=2, tuned=True),
    256: AttentionBlockSizes(decode_block_kv=32, decode_num_stages=3, decode_target_programs=528,
                             prefill_block_m=64, prefill_block_kv=32,
                             prefill_num_warps=8, prefill_num_stages=2),
}

# device kind substring -> head_dim -> block sizes. First match wins. The H100 shares the
# H200's entries unmeasured.
TUNED_BLOCK_SIZES: dict[str, dict[int, AttentionBlockSizes]] = {
    "H200": _HOPPER,
    "H100": _HOPPER,
}


def attention_block_sizes(head_dim: int, itemsize: int = 2,
                          kind: str | None = None) -> AttentionBlockSizes:
    """The table entry for this device and head dim, or the generic default.

    The table is for 2-byte K/V (bf16); 4-byte K/V gets half-size tiles, to stay inside
    shared memory."""
    kind = device_kind() if kind is None else kind
    sizes = next((by_head_dim[head_dim] for substring, by_head_dim in TUNED_BLOCK_SIZES.items()
                  if substring in kind and head_dim in by_head_dim), None)
    if sizes is None and head_dim > 128:
        sizes = AttentionBlockSizes(decode_block_kv=32, prefill_block_m=32, prefill_block_kv=32)
    sizes = sizes or AttentionBlockSizes()
    if itemsize <= 2:
        return sizes
    return dataclasses.replace(sizes, decode_block_kv=max(16, sizes.decode_block_kv // 2),
                               prefill_block_m=max(16, sizes.prefill_block_m // 2), tuned=False)
