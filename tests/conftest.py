"""Suite-wide pytest settings. The project keeps no top-level pytest.ini/pyproject, so the
warning policy lives here, next to the tests it governs."""
from __future__ import annotations

import pytest

# Modules whose warnings are ours to fix: the package and the test files themselves (tests/
# has no __init__.py, so its modules import under their bare names).
OWN_MODULES = r"(mean_nav|test_|nav_testing|deploy_testing|conftest)"

# Third-party warnings we cannot fix at the source, each matched by its exact message.
THIRD_PARTY_FILTERS = [
    # rasterio.warp.calculate_default_transform (mean_nav/geo/raster.py) builds its result with
    # rasterio.transform.from_bounds, which still composes Affines with `*` (rasterio 1.4);
    # our own code uses `@`, and this filter is limited to rasterio's module.
    r"ignore:Use `@` matmul instead of `\*` mul operator for matrix multiplication"
    r":PendingDeprecationWarning:rasterio\.transform",
    # test_cache writes a GeoTIFF without georeferencing on purpose, to check that the cache
    # refuses it; rasterio warns when writing and reading such a file.
    r"ignore:Dataset has no geotransform, gcps, or rpcs. The identity matrix will be returned."
    r":rasterio.errors.NotGeoreferencedWarning",
]


def pytest_configure(config):
    # Later lines take precedence: ours become errors, then the known third-party ones are muted.
    config.addinivalue_line("filterwarnings", f"error::Warning:{OWN_MODULES}")
    for line in THIRD_PARTY_FILTERS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def nav_map(tmp_path_factory):
    """Map of the core navigation tests: ../shared's orthophoto, or a generated world."""
    from nav_testing import navigation_map

    return navigation_map(tmp_path_factory.mktemp("nav_map"))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_terminal_summary(terminalreporter):
    """Say once, at the end, how much of the real-data layer did not run."""
    skipped = terminalreporter.stats.get("skipped", [])
    without_shared = sum("shared" in _skip_reason(r) for r in skipped)
    if without_shared:
        terminalreporter.write_line(
            f"{without_shared} test(s) skipped because ../shared/data (real orthophotos and logs) is "
            "absent; the procedural-world tests ran in their place. Put the data beside the clone "
            "to run the real-data layer too.", yellow=True)
