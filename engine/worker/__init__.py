"""The device side of the engine: the runner (ragged batch in, sampled tokens out), the jitted
step functions and the compilation counter. The only package in engine/ that imports JAX."""
