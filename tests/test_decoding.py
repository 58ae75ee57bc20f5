"""Test-time weak-to-strong decoding on tiny random models: plain and proxy sampling against
`generate`, the weak-pair scorer against per-model log-prob sums, and CBS against brute force.
(The seeding rule, one generator per response, is pinned in test_generation.py.)"""

import math

import pytest
import torch

from wspo_lightning.decoding import (
    WeakPairScorer,
    chunk_beam_search,
    proxy_logits,
    proxy_sample,
    row_seed,
    sample,
)
from wspo_lightning.logprobs import left_pad
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tiny_model, build_tokenizer

PROMPTS = ["Write one line about the film.", "Hi", "Tell me about the plot of this movie, please."]
# Random tiny models almost never pick the real EOS: let 20 ids end a response, so rows do end.
EOS = list(range(5, 25))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok2():
    """A second tokenizer (different merges and vocabulary) for a weak pair of another family."""
    return build_tokenizer(vocab_size=400)


@pytest.fixture(scope="module")
def models(tok, tok2):
    build = lambda arch, t, seed: build_tiny_model(arch, t, seed=seed).eval()  # noqa: E731
    return {
        "strong": build("llama", tok, 0),
        "weak_aligned": build("llama", tok, 1),
        "weak_base": build("llama", tok, 2),
        "gpt2_strong": build("gpt2", tok, 3),
        "other_aligned": build("gpt2", tok2, 1),
        "other_base": build("gpt2", tok2, 2),
    }


@pytest.fixture(scope="module")
def batch(tok):
    return left_pad(Renderer(tok).prompt_ids(PROMPTS), tok.pad_token_id, "cpu")


def generate_new_tokens(model, input_ids, attention_mask, seed, **kwargs):
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, top_k=0, eos_token_id=EOS, **kwargs
    )
    return out[:, input_ids.shape[1] :]


def shared(seed):
    """One generator for every row: what `generate` draws from after `torch.manual_seed(seed)`."""
    return torch.Generator().manual_seed(seed)


def generate_each_row(model, prompts, seed, **kwargs):
    """`generate` on each prompt alone (no padding) after seeding the global RNG with that row's seed."""
    rows = []
    for j, ids in enumerate(prompts):
        ids = torch.tensor([ids])
        rows.append(generate_new_tokens(model, ids, torch.ones_like(ids), row_seed(seed, j), **kwargs)[0].tolist())
    return rows


def prompt_ids(tokenizer, prompt):
    """The chat-templated prompt, encoded independently of the package's helpers."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def brute_force_reward(aligned, base, prompt, response):
    """sum over response tokens of log pi_aligned - log pi_base: one unpadded sequence, full forwards."""
    ids = torch.tensor([list(prompt) + list(response)])
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    total = 0.0
    for model, sign in ((aligned, 1.0), (base, -1.0)):
        logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        total += sign * logps[positions, torch.tensor(response, dtype=torch.long)].sum().item()
    return total


# --- plain and proxy sampling -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["strong", "gpt2_strong"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sample_equals_generate_with_the_same_seed(models, batch, arch, temperature, top_p):
    ids, mask = batch
    expected = generate_new_tokens(
        models[arch], ids, mask, seed=3, temperature=temperature, top_p=top_p, max_new_tokens=25
    )
    got = sample(
        models[arch],
        ids,
        mask,
        generator=shared(3),
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=25,
        eos_token_id=EOS,
    )
    assert torch.equal(got, expected)
    assert (got == models[arch].generation_config.pad_token_id).any(), "some rows should end early"


def test_proxy_with_alpha_zero_equals_generate_with_the_same_seed(models, batch):
    ids, mask = batch
    expected = generate_new_tokens(models["strong"], ids, mask, seed=7, max_new_tokens=25)
    got = proxy_sample(
        models["strong"],
        ids,
        mask,
        models["weak_aligned"],
        models["weak_base"],
        alpha=0.0,
        generator=shared(7),
        max_new_tokens=25,
        eos_token_id=EOS,
    )
    assert torch.equal(got, expected)


def test_proxy_with_an_identical_weak_pair_equals_plain_sampling(models, batch):
    """weak_aligned == weak_base makes the log-ratio exactly 0, whatever alpha."""
    ids, mask = batch
    expected = generate_new_tokens(models["strong"], ids, mask, seed=1, max_new_tokens=20)
    got = proxy_sample(
        models["strong"],
        ids,
        mask,
        models["weak_base"],
        models["weak_base"],
        alpha=3.0,
        generator=shared(1),
        max_new_tokens=20,
        eos_token_id=EOS,
    )
    assert torch.equal(got, expected)


def test_proxy_logits_add_alpha_times_the_weak_log_ratio():
    """strong [0, 1, 2]; aligned and base differ by +ln2 on token 0 and -ln2 on token 2, so
    log pi_aligned - log pi_base = [ln2, 0, -ln2] (the normalisers cancel: both sum to the same mass),
    and with alpha = 2: [0 + 2 ln2, 1, 2 - 2 ln2]."""
    strong = torch.tensor([[0.0, 1.0, 2.0]])
    base = torch.tensor([[1.0, 1.0, 1.0]]).log()
    aligned = torch.tensor([[2.0, 1.0, 0.5]]).log()  # mass 3.5 vs 3: normaliser shifts both by ln(3.5/3)
    shift = math.log(3.5 / 3)
    ln2 = math.log(2.0)
    expected = torch.tensor([[2 * (ln2 - shift), 1 - 2 * shift, 2 + 2 * (-ln2 - shift)]])
    torch.testing.assert_close(proxy_logits(strong, aligned, base, alpha=2.0), expected)
    assert torch.equal(proxy_logits(strong, aligned, base, alpha=0.0), strong)


@torch.no_grad()
def test_proxy_sampling_with_caches_equals_recomputing_every_prefix(models, tok):
    """A naive loop that re-encodes the whole sequence with all three models at every step."""
    ids = torch.tensor([prompt_ids(tok, PROMPTS[0])])
    got = proxy_sample(
        models["strong"],
        ids,
        None,
        models["weak_aligned"],
        models["weak_base"],
        alpha=1.5,
        temperature=0.8,
        seed=11,
        max_new_tokens=15,
        eos_token_id=EOS,
    )
    generator = torch.Generator().manual_seed(row_seed(11, 0))  # the one row's own seed
    seq = ids
    for _ in range(got.shape[1]):
        s, a, b = (models[k](seq).logits[:, -1].float() for k in ("strong", "weak_aligned", "weak_base"))
        scores = (s + 1.5 * (a.log_softmax(-1) - b.log_softmax(-1))) / 0.8
        token = torch.multinomial(scores.softmax(-1), 1, generator=generator)
        seq = torch.cat([seq, token], dim=1)
    assert seq[0, ids.shape[1] :].tolist() == got[0].tolist()


@torch.no_grad()
@pytest.mark.parametrize("alpha, temperature, top_p", [(0.0, 1.0, 1.0), (1.5, 0.7, 0.9)])
def test_sampled_logps_are_the_log_likelihood_under_the_sampler(models, tok, alpha, temperature, top_p):
    """Each drawn token's returned log-prob equals log_softmax of the scores it was drawn from, rebuilt
    here by full forwards of one unpadded sequence; at alpha 0 and temperature 1 that is the strong
    model's own log-likelihood (what `evaluate` needs for its KL estimate)."""
    ids = torch.tensor([prompt_ids(tok, PROMPTS[2])])
    tokens, ended_at, logps = proxy_sample(
        models["strong"],
        ids,
        None,
        models["weak_aligned"],
        models["weak_base"],
        alpha=alpha,
        temperature=temperature,
        top_p=top_p,
        seed=5,
        max_new_tokens=12,
        eos_token_id=EOS,
        return_ended_at=True,
        return_logps=True,
    )
    n = int(ended_at[0]) + 1 if ended_at[0] >= 0 else tokens.shape[1]
    seq = torch.cat([ids, tokens[:, :n]], dim=1)
    steps = torch.arange(ids.shape[1] - 1, seq.shape[1] - 1)
    s, a, b = (models[k](seq).logits[0, steps].float() for k in ("strong", "weak_aligned", "weak_base"))
    scores = (s + alpha * (a.log_softmax(-1) - b.log_softmax(-1))) / temperature
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    outside = sorted_scores.softmax(-1).cumsum(-1) > top_p  # nucleus: keep tokens until mass top_p
    outside[:, 1:] = outside[:, :-1].clone()
    outside[:, 0] = False
    scores = scores.scatter(1, order, sorted_scores.masked_fill(outside, float("-inf")))
    expected = scores.log_softmax(-1).gather(1, tokens[0, :n, None]).squeeze(1)
    torch.testing.assert_close(logps[0, :n], expected, rtol=1e-4, atol=1e-4)
    assert torch.all(logps[0, n:] == 0)
    if alpha == 0 and temperature == 1:
        assert torch.allclose(logps[0, :n], s.log_softmax(-1).gather(1, tokens[0, :n, None]).squeeze(1), atol=1e-4)


def test_num_samples_repeats_each_prompt_like_num_return_sequences(models, batch):
    """Encoding each prompt once and repeating its cache draws what generate() draws for n copies."""
    ids, mask = batch
    expected = generate_new_tokens(models["strong"], ids, mask, seed=2, max_new_tokens=12, num_return_sequences=3)
    got = sample(models["strong"], ids, mask, num_samples=3, generator=shared(2), max_new_tokens=12, eos_token_id=EOS)
    assert torch.equal(got, expected)


def test_greedy_sampling_at_temperature_zero_equals_generate_greedy(models, batch):
    ids, mask = batch
    expected = models["strong"].generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=EOS
    )[:, ids.shape[1] :]
    assert torch.equal(
        sample(models["strong"], ids, mask, temperature=0.0, max_new_tokens=12, eos_token_id=EOS), expected
    )


def test_sampling_ends_rows_at_a_stop_string_and_pads_after_it(models, batch, tok):
    ids, mask = batch
    stop = ["e", "a"]
    tokens, ended_at = proxy_sample(
        models["strong"],
        ids,
        mask,
        alpha=0.0,
        seed=0,
        max_new_tokens=40,
        stop_strings=stop,
        tokenizer=tok,
        return_ended_at=True,
    )
    for row, end in zip(tokens.tolist(), ended_at.tolist()):
        assert end >= 0, "a random model writes an 'e' or an 'a' within 40 tokens"
        assert any(s in tok.decode(row[: end + 1]) for s in stop)
        assert not any(s in tok.decode(row[:end]) for s in stop)
        assert all(t == tok.pad_token_id for t in row[end + 1 :])


@pytest.mark.parametrize(
    "setting, value, name",
    [
        ("num_continuations", 0, "num_continuations (K)"),
        ("beam_width", 0, "beam_width (W)"),
        ("chunk_length", 0, "chunk_length (L)"),
        ("temperature", -1.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("max_new_tokens", 0, "max_new_tokens"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(models, tok, setting, value, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)")):
        chunk_beam_search(
            models["strong"], tok, models["weak_aligned"], models["weak_base"], None, PROMPTS[:1], **{setting: value}
        )


def test_proxy_with_nonzero_alpha_needs_the_weak_pair(models, batch):
    with pytest.raises(ValueError, match="weak_aligned and weak_base"):
        proxy_sample(models["strong"], *batch, alpha=1.0)


# --- the weak-pair scorer -----------------------------------------------------------------------


def test_weak_pair_scorer_equals_per_model_log_prob_sums(models, tok2):
    """Batched (padded) scoring of text equals each weak model's own log-probs, one sequence at a time."""
    scorer = WeakPairScorer(models["other_aligned"], models["other_base"], tok2, batch_size=2)
    responses = ["The film was wonderful.", "", "a mess from start to finish, and I would say so again."]
    ended = [True, False, False]
    got = scorer.score(PROMPTS, responses, ended)
    for prompt, response, end, value in zip(PROMPTS, responses, ended, got):
        ids = tok2(response, add_special_tokens=False)["input_ids"] + ([tok2.eos_token_id] if end else [])
        expected = brute_force_reward(models["other_aligned"], models["other_base"], prompt_ids(tok2, prompt), ids)
        assert value == pytest.approx(expected, abs=1e-4)
    assert got[1] == 0.0


# --- chunk-level beam search --------------------------------------------------------------------


def cbs(models, tok, weak_tok=None, weak=("weak_aligned", "weak_base"), **kwargs):
    settings = dict(beam_width=3, num_continuations=2, chunk_length=4, max_new_tokens=18, seed=5, eos_token_id=EOS)
    settings.update(kwargs)
    return chunk_beam_search(models["strong"], tok, models[weak[0]], models[weak[1]], weak_tok, PROMPTS, **settings)


def test_cbs_with_one_beam_and_one_continuation_equals_plain_sampling(models, tok, batch):
    """W = K = 1 keeps the single candidate: the same draws as `sample` with the same seed, and as `generate` on
    each prompt alone after seeding the global RNG with that prompt's seed."""
    ids, mask = batch
    results = cbs(models, tok, beam_width=1, num_continuations=1, chunk_length=4, max_new_tokens=23, seed=8)
    expected = generate_each_row(models["strong"], [prompt_ids(tok, p) for p in PROMPTS], 8, max_new_tokens=23)
    sampled = sample(models["strong"], ids, mask, seed=8, max_new_tokens=23, eos_token_id=EOS)
    for result, row, drawn in zip(results, expected, sampled.tolist()):
        n = len(result.token_ids)
        assert result.token_ids == row[:n] == drawn[:n]
        assert result.finished == (row[n - 1] in EOS) and len(row) == n  # generate stops the row there too
        assert all(t == tok.pad_token_id for t in drawn[n:])
    assert any(r.finished for r in results) and not all(r.finished for r in results)


def check_trace_against_brute_force(trace, models, prompt_rows, response_ids, W):
    """Every candidate's score equals brute force, and the kept ones are the top W of those scores."""
    for record in trace:
        for b, (responses, scores, kept) in enumerate(zip(record.responses, record.scores, record.kept)):
            brute = []
            for response, score in zip(responses, scores):
                if score == -math.inf:  # a copy of a beam that had already ended
                    brute.append(-math.inf)
                    continue
                brute.append(brute_force_reward(*models, prompt_rows[b], response_ids(response)))
                assert score == pytest.approx(brute[-1], abs=1e-4)
            top = sorted(range(len(brute)), key=lambda c: -brute[c])[:W]
            assert sorted(brute[c] for c in kept) == pytest.approx(sorted(brute[c] for c in top), abs=1e-4)
            assert kept == sorted(kept, key=lambda c: -scores[c]), "beams are kept best first"


def test_cbs_keeps_the_top_w_candidates_by_brute_force_score(models, tok):
    trace = []
    results = cbs(models, tok, trace=trace)
    assert len(trace) == math.ceil(18 / 4)
    assert all(len(r) == 3 * 2 for record in trace for r in record.responses)
    weak = (models["weak_aligned"], models["weak_base"])
    check_trace_against_brute_force(trace, weak, [prompt_ids(tok, p) for p in PROMPTS], list, W=3)
    for b, result in enumerate(results):
        assert result.score == pytest.approx(
            brute_force_reward(*weak, prompt_ids(tok, PROMPTS[b]), result.token_ids), abs=1e-4
        )
        assert result.score == pytest.approx(max(trace[-1].scores[b]), abs=1e-6)
    ended_copies = sum(s == -math.inf for record in trace for row in record.scores for s in row)
    assert ended_copies > 0, "some beam should end early and then be carried once, not K times"


def test_cbs_with_chunk_length_one_is_token_level_search(models, tok):
    trace = []
    cbs(models, tok, chunk_length=1, max_new_tokens=6, trace=trace)
    assert len(trace) == 6
    for step, record in enumerate(trace, start=1):
        assert all(len(r) <= step for rows in record.responses for r in rows)
    weak = (models["weak_aligned"], models["weak_base"])
    check_trace_against_brute_force(trace, weak, [prompt_ids(tok, p) for p in PROMPTS], list, W=3)


def test_cbs_cache_reuse_gives_the_same_tokens_and_scores_as_recomputation(models, tok, tok2):
    for weak_tok, weak in ((None, ("weak_aligned", "weak_base")), (tok2, ("other_aligned", "other_base"))):
        trace_cached, trace_recomputed = [], []
        cached = cbs(models, tok, weak_tok, weak, trace=trace_cached)
        recomputed = cbs(models, tok, weak_tok, weak, reuse_cache=False, trace=trace_recomputed)
        assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
        assert [r.score for r in cached] == pytest.approx([r.score for r in recomputed], abs=1e-4)
        for a, b in zip(trace_cached, trace_recomputed):
            assert a.responses == b.responses and a.kept == b.kept
            for row_a, row_b in zip(a.scores, b.scores):
                assert row_a == pytest.approx(row_b, abs=1e-4)


def test_cbs_cross_tokenizer_scores_equal_scoring_the_decoded_text_with_each_weak_model(models, tok, tok2):
    """The weak pair has its own tokenizer: the response text is decoded, stripped of surrounding whitespace (as
    training's weak side reads a sampled response's text) and re-tokenised for it."""
    trace = []
    results = cbs(models, tok, tok2, ("other_aligned", "other_base"), max_new_tokens=20, trace=trace)
    weak = (models["other_aligned"], models["other_base"])

    def weak_ids(strong_response):
        ended = bool(strong_response) and strong_response[-1] in EOS
        text = tok.decode(strong_response, skip_special_tokens=True).strip()
        return tok2(text, add_special_tokens=False)["input_ids"] + ([tok2.eos_token_id] if ended else [])

    check_trace_against_brute_force(trace, weak, [prompt_ids(tok2, p) for p in PROMPTS], weak_ids, W=3)
    for b, result in enumerate(results):
        expected = brute_force_reward(*weak, prompt_ids(tok2, PROMPTS[b]), weak_ids(result.token_ids))
        assert result.score == pytest.approx(expected, abs=1e-4)
    # the case that needs care: re-tokenising a longer text changed tokens of the shorter one
    changed = 0
    for before, after in zip(trace, trace[1:]):
        for b in range(len(PROMPTS)):
            for c, response in enumerate(after.responses[b]):
                parent = before.responses[b][before.kept[b][c // 2]]
                old, new = weak_ids(parent), weak_ids(response)
                changed += new[: len(old)] != old
    assert changed > 0


def test_cbs_is_reproducible_and_respects_max_new_tokens_and_stop_strings(models, tok):
    first = cbs(models, tok, max_new_tokens=9, stop_strings=["e"])
    second = cbs(models, tok, max_new_tokens=9, stop_strings=["e"])
    assert [(r.token_ids, r.score) for r in first] == [(r.token_ids, r.score) for r in second]
    for result in first:
        assert len(result.token_ids) <= 9
        assert "e" not in result.response
        if not result.finished:
            assert len(result.token_ids) == 9
