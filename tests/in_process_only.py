"""A pytest plugin for scripts/mutate: leave out the tests that drive a real nginx or OpenSSH,
or run drainbus in a process of its own.

Those tests (the ``nginx_env`` fixture; ``add_user``, whose key the test hands the OpenSSH
client) take a second or more each and reach code that the in-process tests beside them
already cover, so running them for every mutant would turn minutes into hours. Tests marked
``own_process`` test the installed package, which no mutant changes. Loaded only by
scripts/_mutate.py (``-p tests.in_process_only``); the suite itself always runs them.
"""

from __future__ import annotations

import pytest

_SLOW_FIXTURES = frozenset({"nginx_env", "add_user"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = [
        item
        for item in items
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        or item.get_closest_marker("own_process")
    ]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]
