"""Helpers every layer may use: config dataclass machinery, atomic files, lazy imports, progress.

The bottom layer with :mod:`fastgen.errors` and :mod:`fastgen.version`: it imports nothing else of
fastgen (the layering test, ``tests/test_layers.py``, checks it).
"""
