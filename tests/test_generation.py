"""The one generate path on tiny random models (float32): each response is what `generate` draws for its prompt
alone after seeding the global RNG with that response's seed, so a response depends neither on the batch size nor
on the other prompts; `logp` is the likelihood under the warped sampler; `wspo sample` and `wspo generate` draw the
same; the shared sampling arguments check their values and old option names still read."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.decoding import SamplingArgs, chunk_beam_search, generate_responses, row_seed
from wspo_lightning.decoding.generation import finish
from wspo_lightning.decoding.sampling import row_generators
from wspo_lightning.errors import InputError
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tiny_model, build_tokenizer

# prompts of unequal lengths, so a batch pads some of them
PROMPTS = [
    "Hi",
    "Write one line about the film.",
    "Tell me about the plot of this movie, please, in detail and with care.",
    "Ok",
    "What is the best scene of the film and why?",
    "Go on.",
]
STOP = list(range(5, 25))  # random tiny models seldom pick the end-of-turn: 20 ids end a response

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return {arch: build_tiny_model(arch, tok, seed=0).eval() for arch in ("llama", "gpt2")}


def draw(model, tok, prompts=PROMPTS, **kwargs):
    """`generate_responses` with 24 new tokens and seed 4; keyword arguments of `SamplingArgs` go there."""
    names = {f.name for f in fields(SamplingArgs)}
    args = SamplingArgs(**{"max_new_tokens": 24, "seed": 4} | {k: kwargs.pop(k) for k in names & set(kwargs)})
    return generate_responses(model, Renderer(tok), prompts, args, stop_ids=STOP, **kwargs)


def prompt_ids(tok, prompt):
    """The chat-templated prompt, encoded without the package's helpers."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("warping", [{}, {"temperature": 0.7, "top_k": 40, "top_p": 0.9}])
def test_each_response_is_what_generate_draws_for_its_prompt_alone_after_seeding_with_its_row_seed(
    models, tok, arch, warping
):
    """The independent check of the sampler: `generate` on one unpadded prompt, global RNG seeded with
    row_seed(seed, the prompt's index, the sample's index), draws the same tokens and stops at the same place."""
    indices = [4, 7, 9]  # positions in a larger input: they, not the batch rows, seed the draws
    got = draw(models[arch], tok, PROMPTS[:3], indices=indices, num_samples=2, batch_size=4, **warping)
    assert len(got) == 6
    for j, (index, prompt) in enumerate(zip(indices, PROMPTS[:3])):
        ids = torch.tensor([prompt_ids(tok, prompt)])
        for k in range(2):
            torch.manual_seed(row_seed(4, index, k))
            expected = (
                models[arch]
                .generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    max_new_tokens=24,
                    eos_token_id=STOP,
                    **({"top_k": 0} | warping),
                )[0, ids.shape[1] :]
                .tolist()
            )
            response = got[j * 2 + k]
            assert response.token_ids == expected
            assert response.finished == (expected[-1] in STOP)
            assert response.text == tok.decode(expected, skip_special_tokens=True).strip()
    assert len({tuple(r.token_ids) for r in got}) == 6, "every response draws from its own stream"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_responses_do_not_depend_on_the_batch_size_or_on_the_other_prompts(models, tok, arch, temperature):
    """batch_size 1 (no padding), 3 and 6 (padded, rows ending at different steps), and prompts 2..5 run alone
    with their positions in the whole list, give the same tokens, text and ends. `logp` is equal up to float
    rounding: a batch's shape changes the float32 logits in their last bits (~1e-7 on these models, measured with
    and without padding), which moves a sum of log-probs by ~1e-6 but flips no draw here."""
    runs = [draw(models[arch], tok, temperature=temperature, batch_size=size) for size in (1, 3, 6)]
    runs.append(draw(models[arch], tok, PROMPTS[2:], temperature=temperature, batch_size=3, indices=range(2, 6)))
    alone = runs[0]
    if temperature:  # greedy tiny models may never stop; sampled rows should end at different steps
        assert len({len(r.token_ids) for r in alone}) > 2
    for run in runs[1:]:
        part = alone[-len(run) :]
        assert [(r.token_ids, r.text, r.finished) for r in run] == [(r.token_ids, r.text, r.finished) for r in part]
        assert [r.logp for r in run] == pytest.approx([r.logp for r in part], abs=1e-5)


def test_cbs_results_do_not_depend_on_the_other_prompts_of_the_batch(models, tok):
    """CBS draws all of a prompt's beams from that prompt's generator: a prompt searched alone gets the same."""
    weak = (build_tiny_model("llama", tok, seed=1).eval(), build_tiny_model("llama", tok, seed=2).eval())
    settings = dict(beam_width=2, num_continuations=2, chunk_length=3, max_new_tokens=12, eos_token_id=STOP)

    def search(prompts, indices):
        generators = row_generators(4, indices, 1, "cpu")
        return chunk_beam_search(models["llama"], tok, *weak, None, prompts, generator=generators, **settings)

    together = search(PROMPTS, range(6))
    apart = [search([p], [i])[0] for i, p in enumerate(PROMPTS)]
    assert [(r.token_ids, r.response, r.finished) for r in together] == [
        (r.token_ids, r.response, r.finished) for r in apart
    ]
    assert [r.score for r in together] == pytest.approx([r.score for r in apart], abs=1e-5)


@torch.no_grad()
def test_logp_is_the_log_likelihood_under_the_warped_sampler(models, tok):
    """Recomputed from one unpadded forward, with temperature, top-k and nucleus filtering written out here."""
    temperature, top_k, top_p = 0.7, 40, 0.9
    got = draw(models["llama"], tok, PROMPTS[:3], temperature=temperature, top_k=top_k, top_p=top_p)
    for prompt, response in zip(PROMPTS[:3], got):
        ids = prompt_ids(tok, prompt)
        seq = torch.tensor([ids + response.token_ids])
        raw = models["llama"](seq).logits[0, len(ids) - 1 : -1].float()  # [tokens, vocab]
        logits = raw / temperature
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        logits = logits.scatter(1, order, logits.gather(1, order).masked_fill(drop, float("-inf")))
        drawn = torch.tensor(response.token_ids)[:, None]
        expected = float(logits.log_softmax(-1).gather(1, drawn).sum())
        assert response.logp == pytest.approx(expected, abs=1e-4)
        untempered = float(raw.log_softmax(-1).gather(1, drawn).sum())
        assert abs(expected - untempered) > 0.1, "the warping must matter for this check to mean anything"


def test_finish_cuts_at_the_first_stop_id_or_where_a_stop_string_ended(tok):
    renderer = Renderer(tok)
    hello, there = (
        tok("Hello", add_special_tokens=False)["input_ids"],
        tok(" there", add_special_tokens=False)["input_ids"],
    )
    end, pad = renderer.end_of_turn, renderer.pad_id
    width = len(hello + there) + 2
    rows = [
        hello + [end] + [pad] * (width - len(hello) - 1),  # a stop id: kept, padding dropped
        (hello * width)[:width],  # no stop: cut by the length limit
        hello + there + [pad] * 2,  # the sampler saw the stop string " there" end at its last token
    ]
    tokens = torch.tensor(rows)
    ended_at = torch.tensor([-1, -1, len(hello + there) - 1])
    logps = torch.full(tokens.shape, -0.5)
    got = finish(renderer, tokens, [end], [" there"], ended_at, logps)
    assert [r.token_ids for r in got] == [hello + [end], rows[1], hello + there]
    assert [r.finished for r in got] == [True, False, True]
    assert [r.text for r in got] == ["Hello", tok.decode(rows[1], skip_special_tokens=True).strip(), "Hello"]
    assert [r.logp for r in got] == [-0.5 * (len(hello) + 1), -0.5 * width, -0.5 * len(hello + there)]


def test_wspo_sample_and_wspo_generate_draw_the_same_responses(tiny_world, tmp_path):
    """One path, one seeding rule: `wspo sample` and `wspo generate --method sample` (each with its own batch
    size) write the same responses for the same seed."""
    common = ["--prompts", str(tiny_world / "val.jsonl"), "--max_new_tokens", "6", "--seed", "3", "--limit", "5"]
    sample_args = ["sample", "--model.path", str(tiny_world / "policy"), "--batch_size", "2"]
    assert wspo_main([*sample_args, *common, "--out", str(tmp_path / "s.jsonl")]) == 0
    generate_args = ["generate", "--strong.path", str(tiny_world / "policy"), "--method", "sample", "--batch_size", "5"]
    assert wspo_main([*generate_args, *common, "--out", str(tmp_path / "g.jsonl")]) == 0
    sampled, generated = ([json.loads(line) for line in open(tmp_path / f"{n}.jsonl")] for n in "sg")
    assert len(sampled) == len(generated) == 5
    for s, g in zip(sampled, generated):
        assert (s["prompt"], s["response"], s["response_ids"], s["finished"]) == (
            g["prompt"],
            g["response"],
            g["response_ids"],
            g["finished"],
        )
        assert s["logp"] == pytest.approx(g["logp"], abs=1e-5)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
    ],
)
def test_bad_sampling_arguments_are_an_input_error_naming_the_field(values, message):
    with pytest.raises(InputError, match=f"^sampling: {message}"):
        SamplingArgs(**values)


def test_sample_table_reads_its_old_arguments_and_yaml_keeps_the_greedy_default(caplog):
    """`max_new_tokens` / `do_sample` map onto `sampling` with a warning; a YAML `sampling` block that sets only
    some keys keeps SampleTable's other defaults (greedy), as jsonargparse fills them from the default."""
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser

    from wspo_lightning.callbacks import SampleTable

    assert SampleTable(max_new_tokens=8).sampling == SamplingArgs(temperature=0.0, max_new_tokens=8)
    assert SampleTable(do_sample=True).sampling == SamplingArgs(temperature=1.0, max_new_tokens=32)
    assert (
        sum("SampleTable: max_new_tokens and do_sample are deprecated" in r.getMessage() for r in caplog.records) == 2
    )
    with pytest.raises(InputError, match="give only sampling"):
        SampleTable(sampling=SamplingArgs(max_new_tokens=4), max_new_tokens=8)
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    table = {"class_path": "wspo_lightning.callbacks.SampleTable", "init_args": {"sampling": {"max_new_tokens": 8}}}
    (callback,) = parser.instantiate(parser.parse_object({"callbacks": [table]})).callbacks
    assert callback.sampling == SamplingArgs(temperature=0.0, max_new_tokens=8)


def test_demo_settings_check_their_samplers():
    from wspo_lightning.demo.settings import DemoSettings

    s = DemoSettings(max_new_tokens=7, sample_batch_size=5, train_top_k=9, search_temperature=0.5, seed=3)
    assert s.train_sampling(1) == SamplingArgs(max_new_tokens=7, batch_size=5, top_k=9, seed=4)
    assert s.eval_sampling() == SamplingArgs(max_new_tokens=7, batch_size=5, seed=5)
    assert s.search_sampling() == SamplingArgs(max_new_tokens=7, batch_size=5, temperature=0.5, top_k=50, seed=5)
    with pytest.raises(InputError, match="temperature must be >= 0"):
        DemoSettings(search_temperature=-1.0)


def test_an_unseeded_generate_records_the_seed_it_drew_and_that_seed_repeats_the_run(tiny_world, tmp_path):
    common = ["generate", "--strong.path", str(tiny_world / "policy"), "--method", "sample", "--limit", "3"]
    common += ["--prompts", str(tiny_world / "val.jsonl"), "--max_new_tokens", "6"]
    assert wspo_main([*common, "--seed", "null", "--out", str(tmp_path / "a.jsonl")]) == 0
    first = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    seed = first[0]["settings"]["seed"]
    assert isinstance(seed, int)
    assert wspo_main([*common, "--seed", str(seed), "--out", str(tmp_path / "b.jsonl")]) == 0
    again = [json.loads(line) for line in open(tmp_path / "b.jsonl")]
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in first]


def test_files_of_older_versions_with_completion_still_score_and_evaluate(tmp_path):
    """`wspo generate` wrote `completion` before it wrote `response`: `wspo score` and `wspo evaluate` read both."""
    from helpers import LetterReward

    from wspo_lightning.io import read_jsonl, write_jsonl
    from wspo_lightning.models import ModelSpec
    from wspo_lightning.pipeline.evaluate import EvalRow, evaluate
    from wspo_lightning.pipeline.score import score

    texts = ["a fine film", "never seen better", "eh"]
    old = [
        {"id": f"p{i}", "prompt": "Review it.", "completion": t, "response_ids": [5] * (i + 1), "logp": None}
        | {"num_tokens": i + 1}
        for i, t in enumerate(texts)
    ]
    scored = read_jsonl(score(str(write_jsonl(tmp_path / "old.jsonl", old)), str(tmp_path / "s.jsonl"), LetterReward()))
    assert [r["response"] for r in scored] == texts
    assert [r["reward"] for r in scored] == LetterReward()(["Review it."] * 3, texts)
    for record in scored:  # a file scored by an older version may also lack `response`
        del record["response"]
    rows = [EvalRow("old", str(write_jsonl(tmp_path / "scored_old.jsonl", scored)))]
    out = evaluate(rows, ModelSpec("never/loaded"), str(tmp_path / "results.json"), n_boot=20)
    (result,) = json.loads(out.read_text())
    assert [e["response"] for e in result["examples"]] == texts and result["kl"] is None
