"""The `evq` and `gen` command lines: they parse, then call the engine, the consumer, the API
or the workload tools."""

from app.cli.commands import app, gen_main, main

__all__ = ["app", "gen_main", "main"]
