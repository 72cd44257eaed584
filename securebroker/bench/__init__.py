"""The benchmark tool: drives securebroker and peer brokers with the same workloads.

``securebroker bench`` (see ``runner.py`` and docs/benchmarks.md).
"""
