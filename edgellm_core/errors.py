"""User-facing errors: one paragraph that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """A problem with the user's input (checkpoint, options, export dir).

    The CLI prints it as one paragraph and exits with code 2; nothing else
    should ever reach the user as a traceback for a user mistake.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        text = " ".join(self.message.split())
        if self.path:
            return f"{self.path}: {text}"
        return text


class UnsupportedError(ExportError):
    """The checkpoint is valid but asks for something the runtime cannot do exactly."""


class EnvironmentProblem(ExportError):
    """Not the input's fault: the machine or another process is in the way (exit code 3)."""

    exit_code = 3
