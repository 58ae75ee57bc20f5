"""`wspo evaluate` scores a sample under the reference on the ids the sampler drew only where they are the
reference's ids of the response text (another tokenizer's ids, or a response edited after sampling, are scored
on the reference's own rendering of the text), and reuses a kept reference log-probability only for the same ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.models import ModelSpec, load_tokenizer
from wspo_lightning.pipeline import evaluate as evaluate_module
from wspo_lightning.pipeline.evaluate import EvalRow, evaluate
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "Write one line about the film."


@pytest.fixture(scope="module")
def reference(tiny_world):
    """The tiny policy as the reference: its tokenizer (ChatML) and its model."""
    path = str(tiny_world / "policy")
    return path, load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path).eval()


def chatml_ids(tokenizer, text: str) -> list[int]:
    """The reference's ids of a finished response, worked out by hand for ChatML: the content's tokens (the
    template writes `<|im_start|>assistant\\n` + content + `<|im_end|>`; the byte-level pre-tokenizer splits the
    newline from the text after it), then the end-of-turn <|im_end|>."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def logp(model, tokenizer, response_ids: list[int]) -> float:
    """sum_t log p(y_t | x, y_<t) of `response_ids` after the ChatML prompt, one unpadded sequence."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # [L - 1, vocab]
    targets = ids[0, 1:]
    token = logps.gather(1, targets[:, None])[:, 0]
    return float(token[len(prompt) - 1 :].sum())


def record(i: int, response: str, response_ids: list[int], fingerprint: str | None, logp: float) -> dict:
    return {
        "id": f"p{i}",
        "prompt": PROMPT,
        "response": response,
        "response_ids": response_ids,
        "finished": True,
        "logp": logp,
        "num_tokens": len(response_ids),
        "reward": 0.1 * i,
        "tokenizer_fingerprint": fingerprint,
    }


def results(path) -> dict:
    return json.loads(path.read_text())[0]


def test_stored_ids_are_scored_only_when_they_are_the_references_ids_of_the_response(reference, tmp_path):
    path, tokenizer, model = reference
    fingerprint = Renderer(tokenizer).fingerprint
    other = build_tokenizer(vocab_size=400)  # another vocabulary and merges
    text = "The film was wonderful from start to finish."
    canonical = chatml_ids(tokenizer, text)
    split = tokenizer.convert_tokens_to_ids(["T", "h", "e"]) + canonical[1:]  # "The" drawn as three tokens
    assert tokenizer.convert_ids_to_tokens(canonical[0]) == "The" and split != canonical
    edited = "The plot was a delight."  # the response after sampling said "The plot was dull."
    records = [
        record(0, text, canonical, fingerprint, -20.0),  # the reference's rendering of the text
        record(1, text, split, fingerprint, -21.0),  # drawn by the reference's tokenizer, decodes to the text
        record(2, edited, chatml_ids(tokenizer, "The plot was dull."), fingerprint, -22.0),  # edited after sampling
        record(3, text, Renderer(other).response_ids([PROMPT], [text])[0], Renderer(other).fingerprint, -23.0),
    ]
    samples = write_jsonl(tmp_path / "samples.jsonl", records)
    # what the reference must score: the drawn ids for 0 and 1, its own ids of the text for 2 and 3
    scored = [canonical, split, chatml_ids(tokenizer, edited), canonical]
    expected = [logp(model, tokenizer, ids) for ids in scored]
    assert abs(expected[1] - expected[0]) > 1e-3  # the split is another token sequence, with its own value

    out = evaluate([EvalRow("strong", str(samples))], ModelSpec(path), str(tmp_path / "results.json"), n_boot=20)
    kept = read_jsonl(tmp_path / "results_logps" / "00.jsonl")
    assert [k["ref_logp"] for k in kept] == pytest.approx(expected, abs=1e-4)
    kl = sum(r["logp"] - e for r, e in zip(records, expected)) / len(records)
    assert results(out)["kl"] == pytest.approx(kl, abs=1e-4)


def test_kept_reference_values_are_reused_only_for_the_same_ids(reference, tmp_path, monkeypatch):
    path, tokenizer, model = reference
    fingerprint = Renderer(tokenizer).fingerprint
    texts = ["The film was wonderful.", "The plot was dull.", "The ending left me smiling."]
    records = [record(i, t, chatml_ids(tokenizer, t), fingerprint, -15.0 - i) for i, t in enumerate(texts)]
    samples = tmp_path / "samples.jsonl"
    row, out = [EvalRow("strong", str(samples))], tmp_path / "results.json"
    scored: list[int] = []
    summed = evaluate_module.summed_logps

    def counting(model, prompts, responses, *args):
        scored.append(len(responses))
        return summed(model, prompts, responses, *args)

    monkeypatch.setattr(evaluate_module, "summed_logps", counting)

    write_jsonl(samples, records)
    evaluate(row, ModelSpec(path), str(out), n_boot=20)
    assert sum(scored) == 3
    # the same row sampled again: one response is new, same count, same row name
    records[1].update(
        response="The acting was brilliant.", response_ids=chatml_ids(tokenizer, "The acting was brilliant.")
    )
    write_jsonl(samples, records)
    out.unlink()  # not `force`, which would drop the kept values too
    scored.clear()
    evaluate(row, ModelSpec(path), str(out), n_boot=20)
    assert sum(scored) == 1  # the new response alone
    expected = [logp(model, tokenizer, r["response_ids"]) for r in records]
    kept = read_jsonl(tmp_path / "results_logps" / "00.jsonl")
    assert [k["ref_logp"] for k in kept] == pytest.approx(expected, abs=1e-4)
    kl = sum(r["logp"] - e for r, e in zip(records, expected)) / len(records)
    assert results(out)["kl"] == pytest.approx(kl, abs=1e-4)

    out.unlink()  # nothing changed: nothing scored again
    scored.clear()
    evaluate(row, ModelSpec(path), str(out), n_boot=20)
    assert scored == []
    assert results(out)["kl"] == pytest.approx(kl, abs=1e-4)
