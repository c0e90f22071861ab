"""Where the headless Chromium for the report page's browser tests and screenshots is.

Playwright's own download comes from its CDN, which machines that only reach package
registries cannot fetch; Debian's `chromium` package works instead (`make browser` installs
one or the other). Order: $RDV_CHROMIUM, then a Chromium on PATH, then Playwright's own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Set to a Chromium (or Chrome) executable to use that one.
ENV_VAR = "RDV_CHROMIUM"
#: Names a distribution's Chromium or Chrome goes by on PATH.
PATH_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def find_chromium() -> str | None:
    """A Chromium executable to pass to Playwright, or None to use Playwright's own
    download (which may be missing too: launching then fails with Playwright's message)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"${ENV_VAR}={configured} is not an executable file")
        return str(path)
    for name in PATH_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None
