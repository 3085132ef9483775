"""Huge pages for malloc: when the glibc tunable is added, and that the re-exec really happens."""
import os
import subprocess
import sys

import pytest

from mean_nav import huge_pages
from mean_nav.huge_pages import TUNABLE, environment_with_huge_pages

GLIBC = ("glibc", "2.36")


def test_tunable_is_added_where_the_kernel_gives_huge_pages_on_request():
    env = environment_with_huge_pages({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}


def test_other_tunables_are_kept():
    env = environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize("environ, libc, mode", [
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, GLIBC, "madvise"),   # the user chose: never re-exec (no loop either)
    ({"MEAN_NAV_HUGE_PAGES": "0"}, GLIBC, "madvise"),          # opted out
    ({}, GLIBC, "always"),                                     # on already
    ({}, GLIBC, "never"),                                      # none to be had
    ({}, GLIBC, None),                                         # no THP in this kernel
    ({}, ("glibc", "2.31"), "madvise"),                        # tunable unknown before 2.35
    ({}, ("", ""), "madvise"),                                 # musl and others
])
def test_no_reexec_where_it_would_change_nothing(environ, libc, mode):
    assert environment_with_huge_pages(environ, libc, mode) is None


def _applies_here() -> bool:
    import platform

    return environment_with_huge_pages({}, platform.libc_ver(), huge_pages.thp_mode()) is not None


@pytest.mark.skipif(sys.platform != "linux" or not _applies_here(),
                    reason="needs Linux, glibc >= 2.35 and THP mode madvise")
def test_process_starts_over_once_with_its_memory_on_huge_pages():
    # plain malloc, as onnxruntime's arena does (numpy asks for huge pages on its own)
    probe = ("import ctypes, os\n"
             "from mean_nav.huge_pages import reexec_with_huge_pages\n"
             "reexec_with_huge_pages()\n"
             "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
             "ctypes.memset(libc.malloc(64 << 20), 1, 64 << 20)\n"
             "kb = [l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')][0]\n"
             "print(os.environ.get('GLIBC_TUNABLES'), int(kb) > 0)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MEAN_NAV_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{TUNABLE}=1 True"]       # one line: the first process was replaced
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "MEAN_NAV_HUGE_PAGES": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["None False"]
