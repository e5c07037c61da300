"""fastft.preload: imports run on a background thread; a failure there is raised where the module is used."""

from __future__ import annotations

import importlib
import sys
import threading

import pytest

from fastft import preload


@pytest.fixture
def modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fastft_preload_ok.py").write_text("import threading\nLOADED_BY = threading.current_thread().name\n")
    (tmp_path / "fastft_preload_bad.py").write_text("raise ValueError('broken on purpose at line 1')\n")
    yield
    for name in ("fastft_preload_ok", "fastft_preload_bad"):
        sys.modules.pop(name, None)


def test_the_import_happens_on_the_background_thread(modules) -> None:
    thread = preload.start(("fastft_preload_ok",))
    assert thread is not None and not thread.daemon  # an interpreter that exits lets the import finish
    thread.join(timeout=60)
    assert sys.modules["fastft_preload_ok"].LOADED_BY == "fastft-preload" != threading.current_thread().name
    assert preload.start(("fastft_preload_ok",)) is None  # nothing left to import


def test_a_failed_import_is_raised_by_the_code_that_uses_the_module(modules) -> None:
    hooked = []
    old_hook, threading.excepthook = threading.excepthook, hooked.append
    try:
        preload.start(("fastft_preload_bad", "fastft_preload_ok")).join(timeout=60)
    finally:
        threading.excepthook = old_hook
    assert hooked == []  # nothing escaped the thread
    assert "fastft_preload_ok" in sys.modules  # the modules after the failed one still imported
    with pytest.raises(ValueError, match="broken on purpose at line 1"):
        importlib.import_module("fastft_preload_bad")
