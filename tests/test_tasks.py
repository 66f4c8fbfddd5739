import pytest

from rebase_ray.config import EvalSetConfig, FewShot, TaskConfig
from rebase_ray.tasks import load_eval_set


def make_task(path, **eval_kw):
    return TaskConfig(name="t", instruction="i", examples=[FewShot(input="a", output="b")],
                      eval=EvalSetConfig(path=str(path), **eval_kw))


def test_csv_with_templates_and_rejects(tmp_path):
    p = tmp_path / "eval.csv"
    p.write_text("question,choice0,choice1,answer,subject\nWhat?,x,y,0,math\n"
                 "Why?,u,v,,bio\n")
    es = load_eval_set(make_task(p, input="{question}\nA. {choice0}\nB. {choice1}",
                                 output="answer", domain="subject"))
    assert es.records == [{"input": "What?\nA. x\nB. y", "output": "0", "domain": "math"}]
    assert es.rejects == [{"row": 1, "reason": "empty input or output"}]


def test_jsonl_missing_field_and_stride(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text("\n".join(f'{{"q": "q{i}", "a": "a{i}"}}' for i in range(10))
                 + '\n{"q": "no answer"}\n')
    es = load_eval_set(make_task(p, input="q", output="{a}"))
    assert len(es.records) == 10 and es.records[0]["domain"] == "t"
    assert es.rejects == [{"row": 10, "reason": "empty input or output"}]
    es = load_eval_set(make_task(p, input="q", output="a", max_rows=5))
    assert [r["input"] for r in es.records] == ["q0", "q2", "q4", "q6", "q8"]


def test_unknown_format(tmp_path):
    p = tmp_path / "eval.txt"
    p.write_text("x")
    with pytest.raises(Exception, match="unknown eval file format"):
        load_eval_set(make_task(p, input="q", output="a"))
