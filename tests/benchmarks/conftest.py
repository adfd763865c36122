"""The benchmark scripts' smoke runs (small inputs, every code path of the scripts) form their own tier,
``-m bench_smoke``: they spawn a Python process per part and take about a minute and a half together."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/benchmarks/" in item.nodeid.replace("\\", "/") or item.nodeid.startswith("benchmarks/"):
            item.add_marker(pytest.mark.bench_smoke)
