from __future__ import annotations

from hypothesis import settings

# CPU-only CI on 2 cores: no per-example deadline, a fixed example budget.
settings.register_profile("default", deadline=None, max_examples=60)
settings.load_profile("default")
