"""The documented settings are the shipped ones: nav.example.yaml, which users copy and read,
states every default it lists; a default changed in the code (or a typo in the file) fails here."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mean_nav.config import load_config
from mean_nav.nav.daemon import NavConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "mean_nav" / "nav" / "nav.example.yaml"
# where the example shows a site's own values rather than the defaults
SITE_SPECIFIC = {"model.path", "model.threads", "cache.path", "mavlink.connection", "frame_log"}


def _differences(a, b, prefix=""):
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            yield from _differences(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.")
    elif a != b:
        yield prefix[:-1], a, b


def test_every_setting_the_example_lists_is_the_default():
    example, shipped = load_config(EXAMPLE, NavConfig), NavConfig()
    wrong = [(name, doc, code) for name, doc, code in _differences(example, shipped) if name not in SITE_SPECIFIC]
    assert not wrong, "nav.example.yaml says (name, documented, shipped): " + repr(wrong)


def test_the_site_specific_settings_are_still_in_the_example():
    example, shipped = load_config(EXAMPLE, NavConfig), NavConfig()
    assert {name for name, _, _ in _differences(example, shipped)} == SITE_SPECIFIC
