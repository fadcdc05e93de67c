"""Benchmarks: each prints its figures next to a baseline measured in the same run."""


def noop(*args):
    """The job the baseline enqueues (nothing runs it during a submit benchmark)."""
