"""Hypothesis profiles shared by every package's test suite.

``ci`` (selected automatically when the ``CI`` environment variable is set)
extends hypothesis's built-in ``ci`` profile; ``dev`` is quick; ``nightly``
searches harder. Choose one with ``HYPOTHESIS_PROFILE=nightly``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def register_profiles() -> None:
    """Register ``alq-ci``, ``alq-dev`` and ``alq-nightly`` and load the one asked for."""
    base = settings.get_profile("ci")
    settings.register_profile(
        "alq-ci", base, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("alq-dev", max_examples=30, deadline=None)
    settings.register_profile(
        "alq-nightly", base, max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    default = "alq-ci" if os.environ.get("CI") else "alq-dev"
    settings.load_profile("alq-" + os.environ.get("HYPOTHESIS_PROFILE", default).removeprefix("alq-"))
