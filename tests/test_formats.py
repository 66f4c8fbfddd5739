from rebase_ray.formats import (
    checked_rationale,
    extract_code,
    final_answer,
    split_answer,
    strict_answer,
    student_target,
)


def test_round_trip_with_rationale():
    t = student_target("sport", "The article is about a football match.")
    assert t == "The article is about a football match.\nAnswer: sport"
    assert split_answer(t) == ("The article is about a football match.", "sport")


def test_markers():
    assert split_answer("Both say the man sleeps, so the answer is entailment.") == (
        "Both say the man sleeps,", "entailment")
    assert split_answer("x\nFinal answer: \"B\"") == ("x", "B")
    assert split_answer("Answer: first\nmore thought\nAnswer: second") == (
        "Answer: first\nmore thought", "second")
    assert split_answer("just a span of text") == ("", "just a span of text")
    assert split_answer("") == ("", "")


def test_strict_answer_is_the_trained_format_only():
    reply = "Because.\nAnswer: \"B\""
    assert strict_answer(reply) == '"B"' and final_answer(reply) == "B"
    assert strict_answer(student_target("sport", "It is a match.")) == "sport"
    assert strict_answer("so the answer is sport") == "so the answer is sport"
    assert strict_answer("  sport\n") == "sport"


def test_code():
    text = "Here:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(text) == "def f(x):\n    return x"
    assert split_answer("Reasoning\nAnswer:\n```python\nprint(1)\n```") == ("Reasoning", "print(1)")


LETTERS = ["A", "B", "C", "D"]


def test_checked_rationale_on_real_teacher_replies():
    """Replies SmolLM2 gave when asked for a rationale of a multiple-choice answer."""
    reply = "C\n\nExplanation: Murder is a serious crime, as it involves the use of force."
    assert checked_rationale(reply, "C", LETTERS) == (
        "Explanation: Murder is a serious crime, as it involves the use of force.", "C")
    # the last "answer is" wins: this one contradicts itself and ends on the wrong letter
    reply = "The correct answer is A.\n\nStep-by-step explanation:\n\n1. The correct answer is D."
    assert checked_rationale(reply, "A", LETTERS)[0] == ""
    assert checked_rationale("A is the correct answer", "A", LETTERS) == (
        "", "A is the correct answer")  # no reasoning at all
    reply = "Cats are mammals and mammals breathe air.\nAnswer: B. they breathe air"
    assert checked_rationale(reply, "B", LETTERS)[0] == "Cats are mammals and mammals breathe air."
    assert checked_rationale(reply, "C", LETTERS)[0] == ""
    # labels are matched as the evaluation matches them; free answers after normalisation
    reply = "Both sentences say the man sleeps.\nAnswer: it is an entailment"
    assert checked_rationale(reply, "entailment", ["entailment", "neutral"])[0]
    assert checked_rationale("Paris is the capital.\nAnswer: paris.", "Paris", None)[0]
    assert not checked_rationale("Paris is the capital.\nAnswer: Lyon", "Paris", None)[0]
