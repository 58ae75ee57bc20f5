"""The registry of decoding methods behind `wspo generate --method`: one object per method, saying what it needs
(the weak pair, one vocabulary), which `GenerateConfig` options it reads, and how it decodes a batch of prompts.
A method from elsewhere is named by its import path, as a reward is; nothing outside this file compares names."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

from wspo_lightning.decoding.cbs import chunk_beam_search
from wspo_lightning.decoding.runner import Decoder, Generation
from wspo_lightning.errors import InputError
from wspo_lightning.io import import_object
from wspo_lightning.render import Prompt


class DecodingMethod:
    """A way to answer prompts with the strong model, alone or steered by the weak pair.

    A new method subclasses this, sets the attributes that differ from the defaults, and writes `decode`;
    `wspo generate --method my_pkg.decoding.MyMethod` (a subclass, built with no arguments) or
    `--method my_pkg.decoding:instance` then runs it. The first line of its docstring is its help.
    """

    name: str = ""
    """The short name `--method` takes (the registered methods; any other is named by its import path)."""
    needs_weak_pair: bool = False
    """Reads the weak pair (`decoder.scorer`): `generate` refuses to run it without weak_base and weak_aligned."""
    needs_shared_vocabulary: bool = False
    """Mixes strong and weak logits token by token, so the strong and weak tokenizers must share one vocabulary."""
    options: tuple[str, ...] = ()
    """The `GenerateConfig` fields it reads beyond those every method shares; written to each output line's
    settings, in this order."""
    search: bool = False
    """Keeps the best of many draws from the strong model's own sampler (so no likelihood); the demo gives it
    the search budget (W * K draws per response, as CBS)."""
    steers_sampler: bool = False
    """The weak pair changes the distribution each token is drawn from; the demo samples it untempered, as the
    design's formula reads, while the other methods draw with the search's sampler."""

    def rows_per_prompt(self, config) -> int:
        """Sequences it decodes together per prompt (`generate` fits batch_size // this prompts in a batch)."""
        return 1

    def kl_bound(self, budget: int) -> float | None:
        """An upper bound on the KL (nats per response) of its responses to the strong model's sampler at `budget`
        draws per response, where the method has no likelihood to estimate it with; None where it has none."""
        return None

    def decode(self, decoder: Decoder, prompts: Sequence[Prompt]) -> list[Generation]:
        """One `Generation` per prompt, in order, with `decoder`'s models, settings (`decoder.config`) and random
        generators (`decoder.draw` and `decoder.generators` seed each prompt's by its position in the input)."""
        raise NotImplementedError(f"{type(self).__name__} must define decode(decoder, prompts)")


class Sample(DecodingMethod):
    """The strong model alone, each response scored by the weak pair when there is one."""

    name = "sample"

    def decode(self, decoder: Decoder, prompts: Sequence[Prompt]) -> list[Generation]:
        return decoder.draw(prompts, 1)


class Proxy(DecodingMethod):
    """Proxy / EFT sampling, strong logits + alpha * (log pi_weak_aligned - log pi_weak_base) before each draw."""

    name = "proxy"
    needs_weak_pair = True
    needs_shared_vocabulary = True
    options = ("alpha",)
    steers_sampler = True

    def decode(self, decoder: Decoder, prompts: Sequence[Prompt]) -> list[Generation]:
        return decoder.draw(prompts, 1, alpha=decoder.config.alpha)


class ChunkBeamSearch(DecodingMethod):
    """Chunk-level beam search, W beams and K continuations of L strong tokens each, ranked by the weak log-ratio."""

    name = "cbs"
    needs_weak_pair = True
    options = ("beam_width", "num_continuations", "chunk_length")
    search = True

    def rows_per_prompt(self, config) -> int:
        return config.beam_width * config.num_continuations

    def decode(self, decoder: Decoder, prompts: Sequence[Prompt]) -> list[Generation]:
        c, scorer = decoder.config, decoder.scorer
        results = chunk_beam_search(
            decoder.strong,
            decoder.renderer,
            scorer.weak_aligned,
            scorer.weak_base,
            scorer.renderer,
            prompts,
            beam_width=c.beam_width,
            num_continuations=c.num_continuations,
            chunk_length=c.chunk_length,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            eos_token_id=decoder.stop_ids,
            stop_strings=c.stop,
            generator=decoder.generators(prompts),  # one per prompt: its W * K rows draw from it in turn
            score_batch_size=c.batch_size,
        )
        return [Generation(r.response, r.token_ids, r.score, r.finished, None) for r in results]


class BestOfN(DecodingMethod):
    """Best-of-N, N plain samples per prompt, the one with the highest weak log-ratio kept."""

    name = "bon"
    needs_weak_pair = True
    options = ("best_of",)
    search = True

    def rows_per_prompt(self, config) -> int:
        return config.best_of

    def kl_bound(self, budget: int) -> float:
        """KL(best-of-n || sampler) <= log n - (n - 1) / n."""
        return math.log(budget) - (budget - 1) / budget

    def decode(self, decoder: Decoder, prompts: Sequence[Prompt]) -> list[Generation]:
        n = decoder.config.best_of
        drawn = decoder.draw(prompts, n)  # rows prompt * n + i
        best = [max(drawn[i * n : (i + 1) * n], key=lambda g: g.score) for i in range(len(prompts))]
        return [Generation(g.response, g.token_ids, g.score, g.finished, None) for g in best]


METHODS: dict[str, DecodingMethod] = {m.name: m for m in (Sample(), Proxy(), ChunkBeamSearch(), BestOfN())}
"""The methods `--method` knows by name."""


def resolve_method(method: str) -> DecodingMethod:
    """The method `method` names: a key of `METHODS`, or the import path (`pkg.module.Name` or
    `pkg.module:name`) of a `DecodingMethod` subclass (built with no arguments) or instance."""
    if method in METHODS:
        return METHODS[method]
    if "." not in method and ":" not in method:  # not a path: a mistyped name
        raise InputError(
            f"generate: unknown method {method!r}: expected one of {', '.join(METHODS)}, or the import path of a "
            "DecodingMethod such as my_pkg.decoding.MyMethod"
        )
    found = import_object(method)
    if inspect.isclass(found) and issubclass(found, DecodingMethod):
        found = found()
    if not isinstance(found, DecodingMethod):
        raise InputError(
            f"generate: method {method!r} is {found!r}, not a decoding method: subclass "
            "wspo_lightning.decoding.methods.DecodingMethod and name the class or an instance"
        )
    if type(found).decode is DecodingMethod.decode:  # found now, not after the models load
        raise InputError(f"generate: method {method!r} has no decode(decoder, prompts): define it")
    return found


def methods_help() -> str:
    """The registered names with their one-line help, for `wspo generate --help`."""
    lines = {name: inspect.getdoc(m).splitlines()[0].rstrip(".") for name, m in METHODS.items()}
    return "Registered: " + "; ".join(f"{name}: {line[0].lower()}{line[1:]}" for name, line in lines.items()) + "."
