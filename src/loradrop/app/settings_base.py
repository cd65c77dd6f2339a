"""What every settings class shares (`settings`): a collector that reports all problems at once, and the
JSON-record / from-mapping / replace behaviour."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SettingsError


class Checks:
    """Collects problems so that a settings object reports all of them in one error."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def integer(self, name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(f"{name} must be an integer, got {value!r}")
        elif minimum is not None and value < minimum:
            self.add(f"{name} must be >= {minimum}, got {value}")

    def number(self, name: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.add(f"{name} must be a finite number, got {value!r}")
        elif positive and value <= 0:
            self.add(f"{name} must be > 0, got {value}")
        elif non_negative and value < 0:
            self.add(f"{name} must be >= 0, got {value}")

    def choice(self, name: str, value: Any, allowed: Sequence[str]) -> None:
        if value not in allowed:
            self.add(f"{name} must be one of {list(allowed)}, got {value!r}")

    def boolean(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.add(f"{name} must be True or False, got {value!r}")

    def text(self, name: str, value: Any, *, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, (str, Path)) or not str(value).strip():
            self.add(f"{name} must be a non-empty string or path, got {value!r}")

    def raise_if_any(self) -> None:
        if self.problems:
            raise SettingsError(self.problems)


class SettingsBase:
    """Shared behaviour: a JSON-ready record of the settings, and building from a mapping (unknown keys refused)."""

    command = ""

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (recorded in run folders as ``config.args``)."""
        out: dict[str, Any] = {"command": self.command}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Settings from a mapping (a sweep plan, a stored record); ``command`` is ignored, unknown keys refused."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names - {"command"})
        if unknown:
            raise SettingsError([f"unknown {cls.__name__} setting(s) {unknown}; allowed: {sorted(names)}"])
        return cls(**{k: v for k, v in values.items() if k in names})

    def replace(self, **changes: Any):
        """A validated copy with some settings changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
