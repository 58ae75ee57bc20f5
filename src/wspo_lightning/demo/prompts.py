"""Movie-review prompts for the controlled-sentiment demo, generated from word lists (no data download)."""

from __future__ import annotations

import random

_ADJECTIVES = [
    "Silent",
    "Last",
    "Broken",
    "Golden",
    "Hidden",
    "Crimson",
    "Endless",
    "Quiet",
    "Wild",
    "Paper",
    "Glass",
    "Iron",
    "Lonely",
    "Burning",
    "Frozen",
    "Distant",
    "Secret",
    "Velvet",
    "Hollow",
    "Midnight",
]
_NOUNS = [
    "Harbor",
    "Circus",
    "Kingdom",
    "Orchard",
    "Letters",
    "River",
    "Garden",
    "Signal",
    "Summer",
    "Mirror",
    "Highway",
    "Island",
    "Crown",
    "Lighthouse",
    "Station",
    "Winter",
    "Machine",
    "Season",
    "Border",
    "Choir",
]
_GENRES = [
    "drama",
    "comedy",
    "thriller",
    "horror film",
    "romance",
    "science-fiction film",
    "documentary",
    "western",
    "musical",
    "war film",
    "animated film",
    "mystery",
]
_PREMISES = [
    "two estranged sisters who inherit a failing bakery",
    "a detective chasing a forger across Europe",
    "a family stranded during a blizzard",
    "a retired boxer coaching his granddaughter",
    "an astronaut who loses contact with Earth",
    "a small town preparing for a flood",
    "a chef who loses her sense of taste",
    "a band on its final tour",
    "a ghost haunting a library",
    "two rivals forced to share an apartment",
    "a village that stops aging",
    "a teacher and a stolen painting",
]
_TEMPLATES = [
    'Write a short review of the movie "{title}", a {genre} about {premise}.',
    'Review the {genre} "{title}" in two sentences.',
    'What did you think of "{title}"? Answer in one or two sentences, like a film critic.',
    'Give your honest opinion of "{title}", the new {genre} about {premise}.',
    'Write a two-sentence audience review of the {genre} "{title}".',
    'Describe your reaction to "{title}", a {genre} about {premise}, in a few sentences.',
]


def movie_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct prompts `{id, prompt}`; ids are p0000, p0001, ... in generation order."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    if n > len(_ADJECTIVES) * len(_NOUNS) * len(_TEMPLATES):
        raise ValueError(f"at most {len(_ADJECTIVES) * len(_NOUNS) * len(_TEMPLATES)} distinct prompts")
    while len(records) < n:
        title = f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        prompt = rng.choice(_TEMPLATES).format(title=title, genre=rng.choice(_GENRES), premise=rng.choice(_PREMISES))
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"id": f"p{len(records):04d}", "prompt": prompt})
    return records


def split_prompts(n_train: int, n_tuning: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint training, tuning and held-out prompts: settings are chosen on the tuning prompts, and the
    held-out ones serve only the results table (neither is ever trained on).

    The held-out prompts come first and the tuning ones next, so neither set depends on how many training
    prompts a run takes: changing `n_train` never moves a tuning prompt into the held-out set.
    """
    records = movie_prompts(n_eval + n_tuning + n_train, seed)
    return records[n_eval + n_tuning :], records[n_eval : n_eval + n_tuning], records[:n_eval]
