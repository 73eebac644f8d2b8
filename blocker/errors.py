"""The error types every part of blocker raises: configuration problems carry FILE:LINE."""

from __future__ import annotations

from dataclasses import dataclass


class BlockerError(Exception):
    """Base of every error blocker raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a file, printed as `FILE:LINE: message`."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(BlockerError):
    """A config or list file is broken; holds every problem found, each with file and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ExemptionEditError(BlockerError):
    """An exemption command was refused (unknown device, duplicate reference, past expiry...).

    The message is one line a person can act on; nothing was written.
    """
