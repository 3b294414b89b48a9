"""Fixtures for tests, the demo and the benchmarks: tiny random releases and tokenizers in the official layouts.

Never imported by the nodes or the core at run time.
"""
