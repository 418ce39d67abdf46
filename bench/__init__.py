"""The benchmark of trio-wsgate against the libraries a user would otherwise pick.

Run it with ``scripts/bench`` (``--quick`` for a smoke run); see docs/benchmarks.md.
"""
