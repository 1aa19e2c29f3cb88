"""The command line's re-run under a faster malloc: when it happens, what it preloads, and that the re-run has it."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from lightning_vlm import allocator


@pytest.fixture
def jemalloc_installed(monkeypatch):
    """find_library finds jemalloc only, wherever the suite runs."""
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes.util, "find_library",
                        lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)


def test_preloads_the_found_library_before_any_other(jemalloc_installed):
    assert allocator.preload_environment({"PATH": "/bin"}) == {"PATH": "/bin", "LD_PRELOAD": "libjemalloc.so.2"}
    preloaded = allocator.preload_environment({"LD_PRELOAD": "/opt/libx.so"})["LD_PRELOAD"]
    assert preloaded == "libjemalloc.so.2:/opt/libx.so"


@pytest.mark.parametrize("environ", [{"LIGHTNING_VLM_ALLOCATOR": "system"},  # switched off
                                     {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}])  # one already there
def test_nothing_to_do_when_switched_off_or_preloaded(jemalloc_installed, environ):
    assert allocator.preload_environment(environ) is None


def test_nothing_to_do_without_a_library(monkeypatch):
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator.preload_environment({}) is None


@pytest.mark.skipif(not any(map(ctypes.util.find_library, allocator.LIBRARIES)), reason="no jemalloc/tcmalloc here")
def test_the_rerun_process_has_the_library_mapped():
    code = ("from lightning_vlm.allocator import reexec_with_fast_malloc; reexec_with_fast_malloc(); "
            f"maps = open('/proc/self/maps').read(); print(any(name in maps for name in {allocator.LIBRARIES!r}))")
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", allocator.SWITCH)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
