"""Environment variables: the one place the runtime reads the environment (STYLE.md rule 10).

LLMSTREAM_CACHE_DIR   where the embedded default model is packed (default: $XDG_CACHE_HOME/llmstream, or
                      ~/.cache/llmstream).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("LLMSTREAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmstream"
