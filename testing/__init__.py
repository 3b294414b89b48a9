"""Fixtures for tests, the demo and the benchmarks: tiny random releases and tokenizers in the official layouts;
the locale tooling (``locales``, used by ``locales/sync.py`` and the locale tests).

Never imported by the nodes or the core at run time.
"""
