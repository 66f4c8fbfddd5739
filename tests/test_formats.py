from rebase_ray.formats import extract_code, split_answer, student_target


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


def test_code():
    text = "Here:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(text) == "def f(x):\n    return x"
    assert split_answer("Reasoning\nAnswer:\n```python\nprint(1)\n```") == ("Reasoning", "print(1)")
