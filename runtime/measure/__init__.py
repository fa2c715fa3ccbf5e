"""Measurements against the cost model: the links (links.py), ``launch.py bench`` and its report (bench.py),
``launch.py probe`` (probe.py)."""
