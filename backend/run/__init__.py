"""A run directory: its store, file I/O, config, context, schema, queries, prompts and ranks (docs/run-format.md)."""
