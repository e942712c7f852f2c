"""One module per CLI command family; each exposes ``register(app)`` so that ``muonprof.cli`` stays a table
of contents and the library modules (models, data, capture, bench, ...) never import Typer."""
