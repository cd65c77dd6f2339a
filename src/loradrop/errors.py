"""The exception types of loradrop's user-facing errors.

Every error here means "the input was wrong or unavailable, and the message says what to do": the command line
prints it as one line and exits with status 2. Anything else is a bug or an environment failure and keeps its
traceback. The classes also derive from the built-in type a Python caller would expect (`ValueError` for bad values,
`RuntimeError` for things that cannot be loaded), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LoradropError(Exception):
    """Base class: bad or unavailable input, reported to a command-line user as one line."""


class UsageError(LoradropError, ValueError):
    """Bad settings or flags (a value out of range, options that exclude each other, a busy output folder)."""


class SettingsError(UsageError):
    """Settings that fail validation; `problems` lists every problem found, the message joins them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(LoradropError, ValueError):
    """A data file or folder that is missing, malformed or empty; the message names the file."""


class DataUnavailableError(LoradropError, RuntimeError):
    """Data must come from the Hugging Face hub but the hub cannot be reached (offline)."""


class ModelLoadError(LoradropError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


class OutputError(LoradropError, OSError):
    """The run's output could not be written (read-only or full file system, a file where a folder should be)."""


class TrainingDivergedError(LoradropError, RuntimeError):
    """Training produced a non-finite loss or gradient norm; the message names the step, the value and the likely
    cause (a learning rate too high). See ``LoraDropoutTrainer.skip_nonfinite_steps`` to skip such steps instead."""
