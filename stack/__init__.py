"""The local stack as code: redis-server processes, the local Redis Cluster, the supervised
consumers and API, and the tools that fault them. The Makefile's targets, the tests and the
benchmarks all call this one package (`python -m stack --help` lists its commands)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
