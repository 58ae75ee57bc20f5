"""The sampling arguments every generate path shares (`wspo sample`, `wspo generate` and its methods, `SampleTable`,
the demo), their checks, and the rule that keeps a renamed option working under its old name."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from wspo_lightning.errors import InputError

log = logging.getLogger(__name__)


def check_sampling(temperature: float, top_p: float, max_new_tokens: int, top_k: int = 0) -> None:
    """Raise ValueError naming the first bad sampling setting."""
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


@dataclass
class SamplingArgs:
    """How responses are drawn: the sampler, when a response ends, the seed and the batch size.

    Every command that generates builds on it (`GenerateConfig` and `SampleConfig` extend it, so its fields are
    their flags and YAML keys; `SampleTable` and the demo hold instances), and
    `wspo_lightning.decoding.generation.generate_responses` reads it.
    """

    where: ClassVar[str] = "sampling"
    """How errors name the command (subclasses set their own)."""

    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off); applied after temperature, before top_p."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    max_new_tokens: int = 128
    """Length limit of a response, in tokens of the model that writes it."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a response also ends at the first one, which is cut from its text (its token ids keep the
    tokens as drawn). Leave empty for samples meant for training."""
    seed: int | None = 0
    """Seed of the draws. Sample k of the prompt at position i of the input is drawn from its own random generator,
    seeded from (seed, i, k): a response does not depend on batch_size, on which prompts share its batch, or on
    how the prompts are split over processes. Null: a fresh seed each run (`wspo generate` records it)."""
    batch_size: int = 32
    """Sequences decoded together (a prompt's samples, best-of-N's N draws and CBS's W*K beams stay in one batch).
    Speed and memory only: the responses do not depend on it."""

    def __post_init__(self) -> None:
        try:
            check_sampling(self.temperature, self.top_p, self.max_new_tokens, self.top_k)
        except ValueError as err:
            raise InputError(f"{self.where}: {err}") from None
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"{self.where}: batch_size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"{self.where}: stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)

    def sampling(self, **changes: Any) -> SamplingArgs:
        """These arguments alone, as a plain `SamplingArgs` (with `changes`): what a subclass passes on."""
        values = {f.name: getattr(self, f.name) for f in fields(SamplingArgs)}
        return SamplingArgs(**(values | changes))


def renamed(config: Any, old: str, new: str, default: Any) -> None:
    """Map the deprecated option `old` of `config` onto `new`, with one warning line; `old` becomes None.

    Giving both (`new` away from its `default`) is an InputError, since one of them would be ignored."""
    value = getattr(config, old)
    if value is None:
        return
    where = getattr(config, "where", type(config).__name__)
    if getattr(config, new) != default:
        raise InputError(f"{where}: {old} is the old name of {new}: give only {new}")
    log.warning("%s: %s is deprecated, use %s (same meaning)", where, old, new)
    setattr(config, new, value)
    setattr(config, old, None)
