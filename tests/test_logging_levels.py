"""The command line's loudness: mean-nav's own progress at INFO, libraries at WARNING, -v/-q."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import mean_nav
from mean_nav.cli import THIRD_PARTY_LOGGERS, configure_logging


@pytest.fixture(autouse=True)
def restore_levels():
    names = ["mean_nav", *THIRD_PARTY_LOGGERS]
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("verbose, quiet, ours", [(False, False, logging.INFO), (True, False, logging.DEBUG),
                                                  (False, True, logging.WARNING)])
def test_our_progress_shows_and_library_chatter_does_not(verbose, quiet, ours):
    configure_logging(verbose, quiet)
    assert logging.getLogger("mean_nav.geo.cache").getEffectiveLevel() == ours
    for name in ("matplotlib.font_manager", "PIL.PngImagePlugin", "rasterio._env"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name


def test_every_module_logger_is_named_by_its_module():
    """One logger per module, named by __name__, so the levels above reach all of them."""
    module_logger = re.compile(r"^(\w+)\s*=\s*logging\.getLogger\((.*)\)", re.M)
    offenders = []
    for path in sorted(Path(mean_nav.__file__).parent.rglob("*.py")):
        offenders += [f"{path.name}: {m.group(0)}" for m in module_logger.finditer(path.read_text(encoding="utf-8"))
                      if m.group(2) != "__name__"]
    assert not offenders, offenders
