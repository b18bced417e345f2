"""A step's inputs in one buffer (engine/worker/packing.py): what a jitted step reads of each
field is, bit for bit, what the host wrote into its view, for every field of the forward's
and the sampler's layouts, on fresh random values (floats of any bits, u32 past 2**31)."""

import jax
import numpy as np
import pytest

from engine.worker.packing import ForwardInputs, Layout, SamplingInputs


def random_fill(inputs, rng):
    """Writes random values into every field's host view; returns {name: a copy}."""
    written = {}
    for field in inputs.layout.fields:
        view = inputs.fields[field.name]
        assert view.dtype == np.dtype(field.dtype) and view.shape == field.shape
        assert np.shares_memory(view, inputs.buffer), field.name
        bits = rng.integers(0, 2 ** 32, size=field.shape, dtype=np.uint32)
        view[...] = bits.view(field.dtype)   # any bits: NaNs, infinities, -0.0, denormals
        written[field.name] = view.copy()
    return written


@jax.jit
def read_on_device(inputs):
    return inputs.fields


@pytest.mark.parametrize("inputs", [
    ForwardInputs.empty(ForwardInputs.layout_for(16, 8, 5)),
    ForwardInputs.empty(ForwardInputs.layout_for(1, 3, 2)),
    SamplingInputs.empty(SamplingInputs.layout_for(4, with_penalties=False)),
    SamplingInputs.empty(SamplingInputs.layout_for(8, with_penalties=True)),
], ids=["forward-16", "forward-1", "sampling", "sampling-penalties"])
def test_the_device_reads_every_field_as_the_host_wrote_it(inputs):
    seed = np.random.SeedSequence().entropy
    written = random_fill(inputs, np.random.default_rng(seed))
    read = read_on_device(inputs)
    assert read.keys() == written.keys()
    for name, expected in written.items():
        got = np.asarray(read[name])
        assert got.dtype == expected.dtype and got.shape == expected.shape, (name, seed)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32),
                                      err_msg=f"{name}, seed {seed}")


def test_the_named_views_cover_the_buffer_once():
    inputs = SamplingInputs.empty(SamplingInputs.layout_for(4, with_penalties=True))
    for index, array in enumerate([*inputs.sampling, *inputs.penalties]):
        array[...] = np.full(4, index + 1).astype(array.dtype)
    owners = inputs.buffer.view(np.uint32)
    # Every word belongs to exactly one field: ten fields of four words, none left at 0.
    assert inputs.buffer.size == 40 and np.all(owners != 0)
    assert SamplingInputs.empty(SamplingInputs.layout_for(4, False)).penalties is None
    forward = ForwardInputs.empty(ForwardInputs.layout_for(16, 8, 5))
    assert forward.num_tokens == 16 and forward.batch.page_indices.shape == (8, 5)


def test_a_field_wider_than_a_word_is_refused():
    with pytest.raises(ValueError, match="field 'x' dtype='float64': expected a 4-byte"):
        Layout.of(("x", (3,), "float64"))
