from __future__ import annotations

from hypothesis import settings

# CPU-only CI on 2 cores: no per-example deadline, a fixed example budget, reproducible examples.
settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("default")
# `pytest --hypothesis-profile=explore` searches wider with fresh random examples.
settings.register_profile("explore", deadline=None, max_examples=500)
