"""The main job and the benchmarks (``./atlas run``, ``python -m bench``)."""
