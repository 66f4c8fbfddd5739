"""rebase_ray.generation on the tiny random model: one batched generate call mixing a JSON
schema, a choice, a JSON object and a free row, each with its own limit; cancellation; the
schema check; the grammar cache. (Log-likelihood is checked against a forward pass by hand in
test_evaluate.py, through the evaluation that uses it.)"""

import json

import jsonschema
import pytest

from rebase_ray.generation import (
    LM,
    Constraint,
    UnsupportedSchema,
    choice_loglikelihood,
    generate,
    loglikelihood,
)
from rebase_ray.models import TINY

SCHEMA = {"type": "object", "properties": {
    "input": {"type": "string", "minLength": 1, "maxLength": 40},
    "output": {"type": "string", "enum": ["sport", "tech"]}},
    "required": ["input", "output"], "additionalProperties": False}


@pytest.fixture(scope="module")
def lm():
    # float32: these tests compare batched results with unbatched ones; in bfloat16 (what
    # "auto" picks on a CPU with native bf16) padding alone moves log-likelihoods by 1e-3
    return LM.load(TINY, dtype="float32")


def test_mixed_batch_each_row_its_own_constraint_and_limit(lm):
    prompts = [lm.render([{"role": "user", "content": f"Write something {i}."}])
               for i in range(4)]
    constraints = [Constraint.json_schema(SCHEMA), Constraint.choice(["yes", "no"]),
                   Constraint.json_object(), None]
    for seed in range(3):
        out = generate(lm, prompts, max_new_tokens=[120, 8, 120, 5], temperature=1.0, n=2,
                       seeds=[seed] * 4, constraints=constraints)
        for choice in out[0]:
            assert choice.finish_reason == "stop"
            obj = json.loads(choice.text)  # strict JSON: no raw control characters
            jsonschema.validate(obj, SCHEMA)
            assert list(obj) == ["input", "output"]  # the schema's order
        assert {c.text for c in out[1]} <= {"yes", "no"}
        assert all(c.finish_reason == "stop" for c in out[1])
        for choice in out[2]:
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.text), dict)
        assert all(c.completion_tokens == 5 and c.finish_reason == "length" for c in out[3])


def test_a_seeded_row_samples_the_same_in_any_batch(lm):
    """The row's sample depends on its prompt and seed only: alone, or between other rows
    with other seeds, lengths and a grammar, it is the same text."""
    def prompt(text):
        return lm.render([{"role": "user", "content": text}])

    mine = prompt("Name a colour.")
    alone = generate(lm, [mine], max_new_tokens=12, temperature=1.0, n=2, seeds=[7])[0]
    batched = generate(lm, [prompt("Write a long story about a castle."), mine, prompt("Hi")],
                       max_new_tokens=[20, 12, 3], temperature=1.0, n=2, seeds=[1, 7, None],
                       constraints=[Constraint.choice(["yes", "no"]), None, None])[1]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert alone[0].text != alone[1].text  # the second choice samples with seed + 1
    other = generate(lm, [mine], max_new_tokens=12, temperature=1.0, seeds=[8])[0][0]
    assert other.text != alone[0].text


def test_seeded_sampler_draws_from_the_warped_softmax():
    """Gumbel-max over many seeds gives softmax(logits / T) frequencies, and top_p drops the
    tail: the sampler is a sampler, not a perturbed argmax."""
    import torch

    from rebase_ray.generation.decode import _seeded_sampler_class

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 4000
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        sampler = _seeded_sampler_class()(temperature, top_p, list(range(draws)))
        picks = sampler(list(range(draws)), logits.repeat(draws, 1)).argmax(dim=1)
        freq = torch.bincount(picks, minlength=4).float() / draws
        want = torch.softmax(logits[0] / temperature, dim=0)
        if top_p < 1:  # the smallest set of tokens with mass >= 0.8: the first two
            want = torch.tensor([want[0], want[1], 0, 0]) / (want[0] + want[1])
        assert torch.allclose(freq, want, atol=0.03), (temperature, top_p, freq, want)


def test_cancelled_row_stops_and_says_abort(lm):
    prompts = [lm.render([{"role": "user", "content": "Count."}])] * 2
    out = generate(lm, prompts, max_new_tokens=40, cancelled=[lambda: True, None])
    assert (out[0][0].finish_reason, out[0][0].completion_tokens) == ("abort", 1)
    assert (out[1][0].finish_reason, out[1][0].completion_tokens) == ("length", 40)


def test_unsupported_schema_names_the_feature_and_schemas_compile_once(lm):
    with pytest.raises(UnsupportedSchema, match="'uniqueItems'"):
        Constraint.json_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(UnsupportedSchema, match="'not'.*properties.a"):
        Constraint.json_schema({"type": "object", "properties": {"a": {"not": {}}}})
    with pytest.raises(UnsupportedSchema, match="lookaround"):
        Constraint.json_schema({"type": "string", "pattern": "(?=a)b"})
    before = lm.grammars.cached
    first = lm.grammars.compile(Constraint.json_schema(SCHEMA))
    again = lm.grammars.compile(Constraint.json_schema(json.loads(json.dumps(SCHEMA))))
    assert first is again and lm.grammars.cached <= before + 1


def test_choice_loglikelihood_equals_pairwise_loglikelihood(lm):
    """The shared-prefix scoring gives lm-evaluation-harness's values (`loglikelihood`, one
    sequence per pair), labels of different token lengths and contexts of different lengths
    (left-padded in one batch) included."""
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    contexts = [lm.render([{"role": "system", "content": "Classify the topic."},
                           {"role": "user", "content": "Shares fell. " * (i + 1)}])
                for i in range(3)] + ["A context ending in spaces  "]
    pairwise = loglikelihood(lm, [c for c in contexts for _ in labels], labels * len(contexts),
                             batch_size=7, max_seq_len=64)
    for batch_size in (1, 3, 16):  # alone, a left-padded batch and its remainder, all at once
        shared = choice_loglikelihood(lm, contexts, labels, max_seq_len=64,
                                      batch_size=batch_size)
        assert len(shared) == len(contexts)
        for got, want in zip([x for row in shared for x in row], pairwise):
            assert got[1] == want[1]
            assert got[0] == pytest.approx(want[0], abs=1e-4)


def test_shared_prefix_and_early_finish_decode_as_each_prompt_alone(lm):
    """Prompts sharing a long system prompt (its KV cache computed once and repeated) with
    suffixes of different lengths, rows ending at different steps (leaving the batch): each
    row's greedy tokens are those of transformers' own `generate` on that prompt alone."""
    import torch

    from rebase_ray.generation.decode import MIN_SHARED_PREFIX, common_prefix_len

    system = "You turn rows into task examples. Answer with one JSON object. " * 4
    prompts = [lm.render([{"role": "system", "content": system},
                          {"role": "user", "content": text}])
               for text in ("Hi", "Classify: the match ended two all after extra time.",
                            "Write a long story about a castle by the sea.")]
    ids = lm.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert common_prefix_len(ids) >= MIN_SHARED_PREFIX
    limits = [3, 17, 30]
    batched = generate(lm, prompts, max_new_tokens=limits)
    for prompt, limit, got in zip(ids, limits, batched):
        with torch.inference_mode():
            ref = lm.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
                1, len(prompt), dtype=torch.long), max_new_tokens=limit, do_sample=False,
                pad_token_id=lm.pad_id)[0, len(prompt):].tolist()
        assert got[0].completion_tokens == len(ref) == limit
        assert got[0].text == lm.tokenizer.decode(ref, skip_special_tokens=True)
        assert got[0].prompt_tokens == len(prompt)


def test_stop_string_ends_its_row_only(lm):
    prompts = [lm.render([{"role": "user", "content": f"Tell me about {t}."}])
               for t in ("rivers", "mountains")]
    # sampled: greedy decoding of the random model repeats one token
    kw = {"max_new_tokens": 24, "temperature": 1.0, "seeds": [3, 4]}
    free = generate(lm, prompts, **kw)
    text = free[0][0].text
    # a stop string first seen past the first third of row 0's text, absent from row 1's
    at = next(j for j in range(len(text) // 3, len(text) - 2)
              if text[j:j + 2].strip() and text.index(text[j:j + 2]) == j
              and text[j:j + 2] not in free[1][0].text)
    stop = text[at:at + 2]
    cut = generate(lm, prompts, stop=[stop], **kw)
    assert cut[0][0].finish_reason == "stop"
    assert cut[0][0].text == text[:at]
    assert cut[0][0].completion_tokens < free[0][0].completion_tokens
    assert cut[1][0].text == free[1][0].text  # the other row runs on to its limit


def _random_adapter(folder, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import resolve

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve(TINY)), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM"))
    model.save_pretrained(str(folder))


def test_the_resident_model_is_kept_and_a_rewritten_adapter_reloaded(tmp_path):
    """`resident_lm` (the student kept in a Ray worker between evaluations): the base model
    loads once; an adapter is named by the fingerprint of its files, so the same path
    rewritten with other weights gets a new name, is loaded again and scores as a fresh load;
    adapters not asked for go."""
    from peft import PeftModel

    from rebase_ray.generation import resident
    from rebase_ray.generation.resident import fingerprint, resident_lm, using

    resident._resident = None  # this process may hold another test's model
    prompt, label = "Is a cat an animal?", ["yes"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def score(lm, name):
        with using(lm, name):
            return loglikelihood(lm, [prompt], label)[0][0]

    _random_adapter(a, seed=0)
    _random_adapter(b, seed=1)
    lm, loaded = resident_lm(TINY, "float32")
    base = score(lm, None)
    assert loaded
    first_name = fingerprint(a)
    assert fingerprint(a) == first_name  # the same files, the same name
    lm, loaded = resident_lm(TINY, "float32", {first_name: a})
    assert not loaded
    first = score(lm, first_name)
    assert first != pytest.approx(base, abs=1e-6)
    assert score(lm, None) == pytest.approx(base, abs=1e-5)  # adapters off: the base model

    _random_adapter(a, seed=2)  # the same path, new weights
    names = {fingerprint(a): a, fingerprint(b): b}
    assert first_name not in names
    lm, loaded = resident_lm(TINY, "float32", names)
    assert not loaded
    assert set(lm.model.peft_config) == set(names)  # the stale one was deleted
    rewritten = score(lm, fingerprint(a))
    assert rewritten != pytest.approx(first, abs=1e-6)
    fresh = LM.load(TINY, adapter=a, dtype="float32")
    assert rewritten == pytest.approx(loglikelihood(fresh, [prompt], label)[0][0], abs=1e-5)

    lm, loaded = resident_lm(TINY, "bfloat16")  # another dtype: another model
    assert loaded and not isinstance(lm.model, PeftModel)
    resident._resident = None
