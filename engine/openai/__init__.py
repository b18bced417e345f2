"""The OpenAI protocol without a web framework: request parsing and validation (api), prompts
and sampling parameters (prompts), response and stream-chunk shapes (responses, formatting).
Shared by `ember serve` (server.py) and `ember batch` (engine/batch). No JAX, no Flask."""
