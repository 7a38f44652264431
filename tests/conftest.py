"""Test-wide settings.

Hypothesis runs derandomized by default so CI is reproducible: the same examples every run. Set
HYPOTHESIS_PROFILE=explore to draw fresh examples (and more of them) when hunting bugs.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
