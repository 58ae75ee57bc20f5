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


TITLE_SHARES = {"test": 0.2, "tuning": 0.2, "train": 0.6}
"""How the movie titles and premises are dealt to the prompt sets of `split_by_title`, whatever the sets' sizes."""


def title(prompt: str) -> str:
    """The movie title a prompt of this module names (the text between its first pair of double quotes)."""
    return prompt.split('"')[1]


def split_by_title(
    n_train: int, n_tuning: int, n_test: int, seed: int = 0
) -> tuple[list[dict], list[dict], list[dict]]:
    """Training, tuning and test prompts in which no movie title and no premise appears in two sets.

    The titles ("The {adjective} {noun}") and the premises are dealt to the sets first, in the fixed shares
    `TITLE_SHARES`; then each set's prompts are built from its own titles and premises only, by its own random
    stream. So a set depends on `seed` and its own size alone: another number of training prompts changes
    neither the tuning nor the test prompts. Ids name the set: train-0000, tuning-0000, test-0000, ...
    """
    rng = random.Random(seed)
    titles = [f"The {a} {n}" for a in _ADJECTIVES for n in _NOUNS]
    premises = list(_PREMISES)
    rng.shuffle(titles)
    rng.shuffle(premises)
    sizes = {"test": n_test, "tuning": n_tuning, "train": n_train}
    sets, title_start, premise_start = {}, 0, 0
    for name, share in TITLE_SHARES.items():
        n_titles, n_premises = round(share * len(titles)), round(share * len(premises))
        own_titles = titles[title_start : title_start + n_titles]
        own_premises = premises[premise_start : premise_start + n_premises]
        title_start, premise_start = title_start + n_titles, premise_start + n_premises
        sets[name] = _prompts_from(own_titles, own_premises, sizes[name], random.Random(f"{seed}-{name}"), name)
    return sets["train"], sets["tuning"], sets["test"]


def _prompts_from(titles: list[str], premises: list[str], n: int, rng: random.Random, name: str) -> list[dict]:
    """`n` distinct prompts `{id, prompt}` naming only `titles` and `premises`."""
    most = len(titles) * len(_GENRES) * sum(len(premises) if "{premise}" in t else 1 for t in _TEMPLATES)
    if n > most:
        raise ValueError(f"at most {most} distinct {name} prompts")
    seen: set[str] = set()
    records = []
    while len(records) < n:
        template = rng.choice(_TEMPLATES)
        prompt = template.format(title=rng.choice(titles), genre=rng.choice(_GENRES), premise=rng.choice(premises))
        if prompt not in seen:
            seen.add(prompt)
            records.append({"id": f"{name}-{len(records):04d}", "prompt": prompt})
    return records
