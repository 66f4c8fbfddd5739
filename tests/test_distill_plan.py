"""BalDistill planning without Ray: quotas per mode (hand-computed), budgets, domains and
long-tail statistics."""

import json
import random

import pandas as pd
import pytest

from rebase_ray.config import ConfigError, DistillConfig
from rebase_ray.distill.domains import assign_domains, gini, long_tail_stats
from rebase_ray.distill.planner import largest_remainder, stage_budgets, stage_quotas

SIZES = {"a": 60, "b": 30, "c": 10}  # a long tail: 60 / 30 / 10


def all_quotas(mode, budget, stages, sizes):
    """Every stage's quotas, as the distill stage writes them to plan.json."""
    return [stage_quotas(mode, i + 1, stages, b, sizes)
            for i, b in enumerate(stage_budgets(budget, stages))]


def test_stage_budgets_split_the_total():
    assert stage_budgets(30, 3) == [10, 10, 10]
    assert stage_budgets(10, 3) == [4, 3, 3]
    assert stage_budgets(2, 3) == [1, 1, 0]


def test_random_mode_is_proportional():
    # 10 per stage, shares 0.6 / 0.3 / 0.1
    assert all_quotas("random", 30, 3, SIZES) == [{"a": 6, "b": 3, "c": 1}] * 3
    # 7 per stage: 4.2 / 2.1 / 0.7 → floors 4, 2, 0; the one left goes to c (largest .7)
    assert stage_quotas("random", 1, 1, 7, SIZES) == {"a": 4, "b": 2, "c": 1}


def test_balanced_mode_is_even():
    # 10 / 3 = 3.33 each: one unit left, tie on the remainder → the smallest domain
    assert all_quotas("balanced", 30, 3, SIZES) == [{"a": 3, "b": 3, "c": 4}] * 3
    assert stage_quotas("balanced", 2, 2, 12, SIZES) == {"a": 4, "b": 4, "c": 4}


def test_adaptive_mode_moves_from_proportional_to_balanced():
    # quota_d(i) = (i/K)·avg + ((K−i)/K)·prop_d with avg = 10/3, prop = 6, 3, 1
    # i=1: 1.111 + (4, 2, 0.667) = 5.111, 3.111, 1.778 → 5, 3, 1 + 1 to c
    # i=2: 2.222 + (2, 1, 0.333) = 4.222, 3.222, 2.556 → 4, 3, 2 + 1 to c
    # i=3: 3.333 each → 3, 3, 3 + 1 to c (tie → smallest)
    assert all_quotas("adaptive", 30, 3, SIZES) == [{"a": 5, "b": 3, "c": 2},
                                              {"a": 4, "b": 3, "c": 3},
                                              {"a": 3, "b": 3, "c": 4}]


@pytest.mark.parametrize("mode", ["random", "balanced", "adaptive"])
def test_quotas_are_integers_that_sum_to_the_stage_budget(mode):
    rng = random.Random(0)
    for _ in range(200):
        sizes = {f"d{i}": rng.randint(1, 2000) for i in range(rng.randint(1, 12))}
        budget, stages = rng.randint(1, 500), rng.randint(1, 5)
        quotas = all_quotas(mode, budget, stages, sizes)
        assert [sum(q.values()) for q in quotas] == stage_budgets(budget, stages)
        assert sum(sum(q.values()) for q in quotas) == budget
        assert all(isinstance(v, int) and v >= 0 for q in quotas for v in q.values())


def test_largest_remainder_never_moves_more_than_one_unit():
    shares = {"x": 0.5, "y": 0.3, "z": 0.2}
    quotas = largest_remainder(shares, 9, {})
    assert quotas == {"x": 4, "y": 3, "z": 2}  # 4.5, 2.7, 1.8 → 4, 2, 1; + z (.8), y (.7)
    with pytest.raises(ValueError):
        stage_quotas("adaptive", 4, 3, 10, SIZES)


def test_domains_from_each_source_and_rejects():
    pool = pd.DataFrame({
        "example_id": ["1", "2", "3", "4"],
        "dataset": ["ds1", "ds1", "ds2", ""],
        "domain": ["news", "news", None, "sport"],
        "input": ["i1", "i2", "i3", "i4"], "output": ["pos", "neg", "pos", "pos"],
        "row": [json.dumps({"topic": "t1"}), json.dumps({"topic": "t2"}), "{}",
                json.dumps({"topic": "t1"})]})
    by_dataset, rejects = assign_domains(pool, DistillConfig(domain_from="dataset"))
    assert list(by_dataset["domain"]) == ["ds1", "ds1", "ds2"]
    assert rejects.to_dict(orient="records") == [{"example_id": "4", "reason": "no_domain"}]
    by_label, _ = assign_domains(pool, DistillConfig(domain_from="label"))
    assert list(by_label["domain"]) == ["pos", "neg", "pos", "pos"]
    by_eval, rejects = assign_domains(pool, DistillConfig(domain_from="eval_domain"))
    assert list(by_eval["domain"]) == ["news", "news", "sport"]
    assert list(rejects["example_id"]) == ["3"]
    by_row, rejects = assign_domains(pool, DistillConfig(domain_from="column",
                                                         domain_column="topic"))
    assert list(by_row["domain"]) == ["t1", "t2", "t1"] and list(rejects["example_id"]) == ["3"]
    with pytest.raises(ConfigError, match="domain_column"):
        assign_domains(pool, DistillConfig(domain_from="column"))


def test_long_tail_statistics():
    stats = long_tail_stats(pd.Series(["a"] * 6 + ["b"] * 3 + ["c"]))
    assert stats["counts"] == {"a": 6, "b": 3, "c": 1}
    assert list(stats["counts"]) == ["a", "b", "c"]  # largest first
    assert stats["imbalance_ratio"] == 6.0
    # Gini of (1, 3, 6): 2·(1·1 + 2·3 + 3·6)/(3·10) − 4/3 = 1/3
    assert stats["gini"] == pytest.approx(1 / 3, abs=1e-4)
    assert gini([5, 5, 5]) == 0.0
    assert gini([0, 0, 9]) == pytest.approx(2 / 3)
