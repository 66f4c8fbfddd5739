"""The teacher-reply parser and every quality filter on fixed, real-looking strings."""

import pytest

from rebase_ray.config import FewShot, TaskConfig
from rebase_ray.text import NgramIndex
from rebase_ray.transform.filters import Deduplicator, FilterContext, check, split_output
from rebase_ray.transform.parse import ParseError, parse_example

TOPIC = TaskConfig(name="news_topic", instruction="Classify the topic of a BBC news article.",
                   examples=[FewShot(input="Chelsea win the league after a 2-0 victory.",
                                     output="sport")],
                   labels=["business", "entertainment", "politics", "sport", "tech"],
                   answer="label")
SPAN = TaskConfig(name="qa", instruction="Answer with a span of the context.",
                  examples=[FewShot(input="Context: The sky is blue. Question: What colour?",
                                    output="blue")], answer="span")
COT = TaskConfig(name="nli", instruction="Does the premise entail the hypothesis?",
                 examples=[FewShot(input="P: A man sleeps. H: A man rests.",
                                   output="Sleeping is resting, so the answer is entailment.")],
                 labels=["entailment", "neutral", "contradiction"], answer="label", cot="fewshot")


@pytest.mark.parametrize("reply", [
    '{"input": "Stocks fell sharply today.", "output": "business"}',
    '```json\n{"input": "Stocks fell sharply today.", "output": "business"}\n```',
    ('Sure! Here is the example:\n```\n{"input": "Stocks fell sharply today.", '
     '"output": "business"}\n```\nI hope this helps.'),
    '{"input": "Stocks fell sharply today.", "output": "business"} Let me know if you need more.',
    "{'input': 'Stocks fell sharply today.', 'output': 'business'}",
    '{"input": "Stocks fell sharply today.", "output": "business",}',
    '{"Input": "Stocks fell sharply today.", "Output": "business"}',
])
def test_parser_recovers(reply):
    assert parse_example(reply) == {"input": "Stocks fell sharply today.", "output": "business"}


def test_parser_keeps_braces_inside_strings_and_coerces_values():
    assert parse_example('{"input": "f(x) = {x}", "output": 42}') == {"input": "f(x) = {x}",
                                                                       "output": "42"}


@pytest.mark.parametrize("reply,reason", [
    ("", "empty reply"),
    ("Input: Stocks fell.\nOutput: business", "no JSON object in the reply"),
    ('{"question": "Stocks fell.", "answer": "business"}', "without both 'input' and 'output'"),
    ('{"input": "Stocks fell., "output": business', "malformed JSON object"),
])
def test_parser_rejects_with_reason(reply, reason):
    with pytest.raises(ParseError, match=reason):
        parse_example(reply)


def ex(inp, out, task=TOPIC):
    rationale, answer = split_output(out, task)
    return {"input": inp, "output": out, "rationale": rationale, "answer": answer}


def test_label_filter_and_canonical_spelling():
    ctx = FilterContext(TOPIC)
    e = ex("Shares in the bank rose 5%.", "Business.")
    assert check(e, ctx) is None and e["answer"] == "business"
    assert check(ex("Shares rose.", "finance"), ctx) == "label_not_in_set"


def test_empty_overlong_fewshot_copy():
    ctx = FilterContext(TOPIC, max_output_chars=50)
    assert check(ex("  ", "sport"), ctx) == "empty"
    assert check(ex("x" * 60, "sport"), ctx) == "overlong"
    assert check(ex("Chelsea win the league after a 2-0 victory!", "sport"), ctx) == (
        "copy_of_fewshot")


def test_too_short_input():
    ctx = FilterContext(TOPIC, min_input_chars=20)
    assert check(ex("business", "business"), ctx) == "too_short"
    assert check(ex("Shares in the bank rose 5%.", "business"), ctx) is None


def test_span_filter():
    ctx = FilterContext(SPAN)
    ok = ex("Context: Paris is the capital of France. Question: Capital?", "Paris", SPAN)
    assert check(ok, ctx) is None
    bad = ex("Context: Paris is the capital of France. Question: Capital?", "Lyon", SPAN)
    assert check(bad, ctx) == "answer_not_a_span"


def test_contamination_filter():
    eval_text = ("Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn for the "
                 "three months to December")
    ctx = FilterContext(TOPIC, eval_index=NgramIndex([eval_text], n=13))
    assert check(ex("Report: " + eval_text + ".", "business"), ctx) == "contaminated"
    assert check(ex("Profits at a media firm jumped in December.", "business"), ctx) is None


def test_cot_split():
    e = ex("P: A dog runs. H: An animal moves.",
           "A dog is an animal and running is moving, so the answer is entailment.", COT)
    assert e["answer"] == "entailment" and e["rationale"].startswith("A dog is an animal")
    assert check(e, FilterContext(COT)) is None


def test_deduplicator():
    d = Deduplicator(threshold=0.7)
    base = ("The central bank raised interest rates by a quarter point on Thursday, citing "
            "persistent inflation in services and a tight labour market across the country")
    assert d.check("a", base) is None
    assert d.check("b", base.upper() + "!") == "duplicate"
    assert d.check("c", base.replace("Thursday", "Friday")) == "near_duplicate"
    assert d.check("d", "A completely different sentence about football and goals") is None
