"""The modes of scripts/benchmark.py, one module each: `add_args(parser)` and `run(args) -> dict`."""
