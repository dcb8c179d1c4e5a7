"""Shared pytest configuration.

Hypothesis profiles for tests/test_properties.py:

* ``default`` (loaded here): a bounded, derandomized run, the same examples on
  every run and machine, so CI is fast and reproducible.
* ``long``: ``python -m pytest tests/test_properties.py --hypothesis-profile=long``
  for a deep search (random examples; failures are kept in the example database
  and replayed first on the next run).

Hypothesis' pytest plugin loads the profile named by ``--hypothesis-profile``
after this file is imported, so the option overrides the default loaded here.

This directory has no ``__init__.py``: pytest puts ``tests/`` on ``sys.path``
(rootdir-relative ``prepend`` import mode), which is what lets the test modules
``from builders import ...``.
"""
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")
