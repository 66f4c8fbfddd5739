"""BalDistill's budget plan: K stages share the teacher budget B (B/K each, the remainder going
to the first stages); each stage's budget is split over the l domains by the mode:

- `random`: proportional to the domain's share of the pool, n_d/N (what a random sample of the
  pool gets in expectation);
- `balanced`: the same for every domain, B/(K·l);
- `adaptive`: quota_d(i) = (i/K)·avg + ((K−i)/K)·prop_d for stage i = 1..K, with avg the
  balanced and prop_d the proportional quota: it starts near proportional and ends balanced.

Fractional quotas become integers by the largest-remainder method, so a stage's quotas always
sum exactly to its budget (ties go to the smaller domain, then by name).
"""

from __future__ import annotations

import math
from typing import Literal

Mode = Literal["random", "balanced", "adaptive"]


def largest_remainder(shares: dict[str, float], total: int, sizes: dict[str, int]
                      ) -> dict[str, int]:
    """Integers summing to `total`, each the floor of its share plus at most one; the units
    left over go to the largest fractional parts (ties: smaller domain first, then name)."""
    scale = sum(shares.values())
    exact = {d: total * s / scale for d, s in shares.items()} if scale > 0 else {
        d: total / len(shares) for d in shares}
    quotas = {d: math.floor(x + 1e-9) for d, x in exact.items()}
    left = total - sum(quotas.values())
    order = sorted(exact, key=lambda d: (-(exact[d] - quotas[d]), sizes.get(d, 0), d))
    for d in order[:left]:
        quotas[d] += 1
    return quotas


def stage_budgets(budget: int, stages: int) -> list[int]:
    """B split over K stages: B//K each, the remainder one each to the first stages."""
    base, extra = divmod(budget, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def stage_quotas(mode: Mode, stage: int, stages: int, stage_budget: int,
                 sizes: dict[str, int]) -> dict[str, int]:
    """Per-domain quotas for stage `stage` (1-based) of `stages`; they sum to `stage_budget`.
    `sizes`: the number of pool examples per domain (the long-tailed distribution)."""
    if not 1 <= stage <= stages:
        raise ValueError(f"stage must be in 1..{stages}, got {stage}")
    if not sizes:
        raise ValueError("no domains to plan for")
    total = sum(sizes.values())
    l = len(sizes)
    proportional = {d: stage_budget * n / total for d, n in sizes.items()}
    avg = stage_budget / l
    if mode == "random":
        shares = proportional
    elif mode == "balanced":
        shares = {d: avg for d in sizes}
    elif mode == "adaptive":
        shares = {d: (stage / stages) * avg + ((stages - stage) / stages) * proportional[d]
                  for d in sizes}
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return largest_remainder(shares, stage_budget, sizes)

