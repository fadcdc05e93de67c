"""Figures the security tests report at the end of a run: requests fuzzed, payloads tried, routes x roles checked."""

from collections import Counter

counts: Counter[str] = Counter()
