"""The project's exception hierarchy. Every error a user can cause is one of these, and launch.py turns
them into a one-line message on stderr and a non-zero exit code (no traceback).

Messages name the file (or device), the offset or key where it applies, and the values expected and found.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment the user can fix. Printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """Model arguments or command-line configuration that are unknown, missing or contradictory."""


class CheckpointError(UserError):
    """A checkpoint (Meta .pth, HF safetensors, GGUF) that is missing, truncated or of an unsupported kind."""


class ImageFormatError(UserError):
    """A packed image or manifest whose header, size, layout or checksum does not match."""


class ReadError(UserError, OSError):
    """A read that failed or came back short. Carries path, offset and byte counts."""

    def __init__(self, path: str, offset: int, expected: int, got: int, detail: str = "") -> None:
        self.path, self.offset, self.expected, self.got = path, offset, expected, got
        msg = f"{path}: read at offset {offset} returned {got} of {expected} bytes"
        super().__init__(msg + (f" ({detail})" if detail else ""))

    def __str__(self) -> str:  # OSError's __str__ would show errno formatting
        return self.args[0]
