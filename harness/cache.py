"""Where the harness keeps what it builds or learns, outside any checkout or venv.

`KSM_HARNESS_CACHE` when set; otherwise /var/cache/ksm-harness for root and
$XDG_CACHE_HOME/ksm-harness (default ~/.cache/ksm-harness) for everyone else. It holds the
guest images (guest-images/, see harness.guests.image; KSM_HARNESS_IMAGE_DIR moves just
those) and the accelerator probe's verdicts (accel.json). Nothing in it is precious: removing
it costs a rebuild.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache directory (see the module docstring); not created here."""
    explicit = os.environ.get("KSM_HARNESS_CACHE")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/cache/ksm-harness")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ksm-harness"
