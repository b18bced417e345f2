"""The OpenAI protocol without a web framework: request parsing and validation (api, with the
shared error and field readers in fields, structured output and tools in constraints),
prompts and sampling parameters (prompts), response and stream-chunk shapes (responses,
formatting), tool calls read out of generated text (tools). Shared by `ember serve`
(server.py) and `ember batch` (engine/batch). No JAX, no Flask."""
