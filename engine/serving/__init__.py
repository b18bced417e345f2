"""Serving one engine to many HTTP clients, without a web framework: the engine thread, the
life of one generation (ledger row, streaming, client gone), the service the routes share,
Prometheus metrics and the gunicorn process. server.py puts Flask routes around it."""
