"""`LoraDropoutConfig`: the LoRA Dropout settings and their validation."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES: tuple[str, ...] = ("ab", "a", "b", "rank", "input")
"""Which part of the LoRA update is masked.

- ``"ab"``: whole columns of A (input features) and whole rows of B (output features), independently (the paper).
- ``"a"``: columns of A only.  ``"b"``: rows of B only.
- ``"rank"``: whole rank components (rows of A), DropLoRA-style, for comparison.
- ``"input"``: element-wise inverted dropout on the LoRA input, PEFT's ``lora_dropout``, for comparison.
"""

MASK_SCOPES: tuple[str, ...] = ("batch", "example")
EVAL_MODES: tuple[str, ...] = ("expected", "raw")
CONFIG_FILE_NAME = "loradrop_config.json"


@dataclass(frozen=True)
class LoraDropoutConfig:
    """LoRA Dropout settings (Lin et al., arXiv 2404.09610).

    Immutable once validated (a frozen dataclass): assigning a field raises ``dataclasses.FrozenInstanceError``,
    so a model's settings cannot drift from what was validated and applied. Make changed copies with
    ``dataclasses.replace(config, p=0.3)`` (or `replace`), which validates again.

    Args:
        p: drop probability of one input/output feature, in [0, 1).
        samples: N, the number of independent masks ("members") per training step; the loss is their mean. All N
            run in one batched forward call.
        strategy: what is masked, one of `STRATEGIES`.
        mask_scope: ``"batch"`` (one mask per member, shared by its examples, as in the paper) or ``"example"``
            (every example draws its own mask).
        rescale: scale kept entries by 1/(1-p) on each masked side, so the expected update equals the unmasked
            one. The paper does not rescale.
        seed: seed of the mask stream; ``None`` draws one from torch's global generator at apply time.
        eval_mode: what a plain forward in ``model.eval()`` uses: ``"expected"`` (the expected update) or ``"raw"``
            (the unscaled update, the paper's "dropout only in training" ablation).
        member_chunk: the memory knob of ``samples > 1``: run at most this many members per forward/backward pass
            (the Trainer and `loradrop.chunked_backward` loop over the chunks within one step). The masks, the loss
            and the gradients equal the one-call run; peak activation memory is that of `member_chunk` members.
            ``None``: all N members in one call. A value above `samples` does nothing more than ``samples``: it is
            clamped to `samples` with a warning.
        extra: settings this version does not know, read from a ``loradrop_config.json`` written by a newer
            loradrop (`from_dict` warns, naming them); kept so that saving again does not lose them.
    """

    p: float = 0.5
    samples: int = 1
    strategy: str = "ab"
    mask_scope: str = "batch"
    rescale: bool = False
    seed: int | None = None
    eval_mode: str = "expected"
    member_chunk: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0.0 <= float(self.p) < 1.0:
            raise ValueError(f"p must be a float in [0, 1), got {self.p!r}")
        object.__setattr__(self, "p", float(self.p))  # frozen: __post_init__ normalises through object.__setattr__
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.mask_scope not in MASK_SCOPES:
            raise ValueError(f"mask_scope must be one of {list(MASK_SCOPES)}, got {self.mask_scope!r}")
        if not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be a bool, got {self.rescale!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {self.seed!r}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {list(EVAL_MODES)}, got {self.eval_mode!r}")
        if self.member_chunk is not None and (isinstance(self.member_chunk, bool)
                                              or not isinstance(self.member_chunk, int) or self.member_chunk < 1):
            raise ValueError(f"member_chunk must be None or an integer >= 1, got {self.member_chunk!r}")
        if self.member_chunk is not None and self.mask_scope == "example":
            raise ValueError("member_chunk applies to samples > 1 with mask_scope='batch'; with mask_scope='example' "
                             "every row is its own member and a step is one call")
        if self.member_chunk is not None and self.member_chunk > self.samples:
            warnings.warn(f"loradrop: member_chunk={self.member_chunk} is larger than samples={self.samples}; a step "
                          f"runs all {self.samples} members in one pass, so member_chunk is clamped to "
                          f"{self.samples}", UserWarning, stacklevel=3)
            object.__setattr__(self, "member_chunk", self.samples)
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict of settings unknown to this version, got {self.extra!r}")

    def replace(self, **changes: Any) -> LoraDropoutConfig:
        """A validated copy with some settings changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(member offset, members) of each forward/backward pass of one training step."""
        size = self.member_chunk or self.samples
        return [(start, min(size, self.samples - start)) for start in range(0, self.samples, size)]

    @property
    def keep_scale(self) -> float:
        """Value of a kept mask entry: 1/(1-p) with rescaling (and always for the inverted "input" dropout)."""
        if self.rescale or self.strategy == "input":
            return 1.0 / (1.0 - self.p)
        return 1.0

    @property
    def expected_factor(self) -> float:
        """E[masked update] / unmasked update, for this strategy.

        "ab" masks two independent sides, so an entry survives with probability (1-p)^2; one-sided strategies keep
        (1-p). Rescaling (and the inverted "input" dropout) makes every side unbiased.
        """
        if self.rescale or self.strategy == "input" or self.p == 0.0:
            return 1.0
        sides = 2 if self.strategy == "ab" else 1
        return (1.0 - self.p) ** sides

    @property
    def expected_bias_factor(self) -> float:
        """E[masked bias] / bias for PEFT's ``lora_bias`` (a bias on lora_B, applied with B's output features).

        Dropping a row of B drops its output feature, bias included ("ab", "b"): the bias is kept with probability
        (1-p) (1 with rescaling). Masks on A ("a", "rank") and on the input ("input") never touch it.
        """
        if self.rescale or self.p == 0.0 or self.strategy not in ("ab", "b"):
            return 1.0
        return 1.0 - self.p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraDropoutConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a LoraDropoutConfig dict was expected, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        # Keep unknown keys (written by a newer loradrop) instead of failing or dropping them silently; say so.
        extra = kwargs.pop("extra", None)
        extra = dict(extra) if isinstance(extra, dict) else ({} if extra is None else extra)
        if isinstance(extra, dict):
            extra.update({k: v for k, v in data.items() if k not in known})
            if extra:
                warnings.warn(f"loradrop: LoraDropoutConfig setting(s) {sorted(extra)} are unknown to this loradrop "
                              "version (a loradrop_config.json written by a newer version?); they are ignored and "
                              "kept in config.extra", UserWarning, stacklevel=2)
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | os.PathLike[str], **metadata: Any) -> Path:
        """Write ``loradrop_config.json`` into `directory` atomically (never a half-written file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"loradrop_config": self.to_dict(), **metadata}
        target = directory / CONFIG_FILE_NAME
        write_json_atomic(target, payload)
        return target

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> LoraDropoutConfig:
        """The settings in a payload returned by `read_config_file` (its ``"loradrop_config"`` entry)."""
        return cls.from_dict(payload.get("loradrop_config", payload))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LoraDropoutConfig:
        """The settings stored in `directory`'s ``loradrop_config.json``."""
        return cls.from_payload(read_config_file(directory))


def read_config_file(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole JSON object of `folder`'s ``loradrop_config.json`` (written by `LoraDropoutConfig.save`): the
    settings under ``"loradrop_config"`` plus the metadata saved with them (``"mask_state"``, ``"eval_mode"``,
    ``"adapters"``, versions).

    Raises FileNotFoundError when the file is absent and ValueError, naming the file, when it is not a JSON object.
    """
    path = Path(folder) / CONFIG_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE_NAME} in {str(folder)!r}: was it saved by loradrop?")
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); delete it or save the adapter again") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(payload).__name__}, not the object loradrop writes")
    return payload


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON to a temporary file in the same folder and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should read like any other file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
