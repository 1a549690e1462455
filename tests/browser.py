"""Headless Chromium for the "as a person would see it" tests (Debian package `chromium`).

`.ci/run` installs it (`apt-get install -y chromium`) and sets CLIPSQL_REQUIRE_BROWSER=1,
so there a missing browser FAILS the tests; elsewhere (a fresh machine running the README's
test command) they skip, saying how to install it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CLIPSQL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"headless Chromium is required here (CLIPSQL_REQUIRE_BROWSER=1): {INSTALL}")
    pytest.skip(f"no headless Chromium on this machine; to run the browser tests: {INSTALL}")


def _run(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="clipsql-chromium-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def image_check(page: Path) -> dict[str, int]:
    """Load the page, let its inline script count decoded images on window load, read the
    counts back from the dumped DOM: {'decoded', 'total', 'pending'}."""
    res = _run(["--virtual-time-budget=10000", "--dump-dom", Path(page).resolve().as_uri()])
    m = re.search(r'<div id="image-check"([^>]*)>', res.stdout)
    assert m, f"no #image-check in the dumped DOM (rc {res.returncode}): {res.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-(\w+)="(-?\d+)"', m.group(1)))
    return {k: int(v) for k, v in attrs.items()}


def screenshot(page: Path, output: Path, size: str = "1400,1000") -> Path:
    res = _run([f"--screenshot={output}", f"--window-size={size}", "--virtual-time-budget=10000",
                Path(page).resolve().as_uri()])
    assert output.exists() and output.stat().st_size > 0, f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    return output
