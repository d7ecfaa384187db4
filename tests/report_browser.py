"""Headless Chromium for the report tests: find the browser, screenshot a local HTML file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM_NAMES = ("/usr/bin/chromium", "chromium", "chromium-browser")


def find_chromium() -> str | None:
    """The first Chromium executable found (Debian's `chromium` package installs /usr/bin/chromium)."""
    for name in CHROMIUM_NAMES:
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    chromium: str,
    html: Path,
    png: Path,
    profile: Path,
    size: tuple[int, int] = (1280, 2000),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Render `html` (opened as a file:// URL, no network needed or allowed) into `png`."""
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        f"--window-size={size[0]},{size[1]}",
        html.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
