"""The teacher replica's figures, recorded once into two places:

- Ray Serve's metrics (`ray.serve.metrics` counters and histograms, tagged with the
  deployment, replica and application): Ray exports them to Prometheus from every node, where
  they add up across replicas (`sum(rate(ray_rebase_teacher_requests_total[1m]))`);
- this replica's running totals, served as JSON by the app's GET /metrics: what
  `rebase-ray serve teacher` prints when it stops, the throughput benchmark and the tests
  read, with no Prometheus needed.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray.serve import metrics

from rebase_ray.teacher.types import Completion

COUNTS = {
    "requests": "chat requests accepted",
    "structured": "requests with a structured output (a grammar)",
    "errors": "requests whose generation failed",
    "timeouts": "requests unanswered within serve.request_timeout_s (504)",
    "disconnects": "requests whose client went away",
    "aborted": "choices stopped by a timeout or disconnect",
    "truncated": "choices cut by max_tokens",
    "prompt_tokens": "prompt tokens read",
    "completion_tokens": "completion tokens written",
}
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
SECONDS = [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


class TeacherStats:
    def __init__(self, replica: str):
        self.replica = replica
        self.started = time.time()
        self.counts = dict.fromkeys(COUNTS, 0)
        self.batch_sizes: Counter[int] = Counter()  # rows per generate call → count
        self.generate_s = 0.0
        self.queued = 0
        self.queue_s_sum = self.queue_s_max = 0.0
        self._counters = {name: metrics.Counter(f"rebase_teacher_{name}", description=text)
                          for name, text in COUNTS.items()}
        self._batch_size = metrics.Histogram(
            "rebase_teacher_batch_size", description="rows per generate call",
            boundaries=BATCH_SIZES)
        self._generate_s = metrics.Histogram(
            "rebase_teacher_generate_seconds", description="seconds per generate call",
            boundaries=SECONDS)
        self._queue_s = metrics.Histogram(
            "rebase_teacher_queue_seconds",
            description="seconds a request waited for its batch to start", boundaries=SECONDS)

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += n
            self._counters[name].inc(n)

    def record_batch(self, rows: int, seconds: float, comps: list[list[Completion]]) -> None:
        self.batch_sizes[rows] += 1
        self.generate_s += seconds
        self._batch_size.observe(rows)
        self._generate_s.observe(seconds)
        for choices in comps:
            self.count("prompt_tokens", choices[0].prompt_tokens if choices else 0)
            self.count("completion_tokens", sum(c.completion_tokens for c in choices))
            self.count("aborted", sum(c.finish_reason == "abort" for c in choices))
            self.count("truncated", sum(c.finish_reason == "length" for c in choices))

    def record_queue(self, seconds: float) -> None:
        self.queued += 1
        self.queue_s_sum += seconds
        self.queue_s_max = max(self.queue_s_max, seconds)
        self._queue_s.observe(seconds)

    def to_dict(self) -> dict[str, Any]:
        """This replica's totals (GET /metrics)."""
        batches = sum(self.batch_sizes.values())
        rows = sum(size * count for size, count in self.batch_sizes.items())
        return {
            "replica": self.replica, "uptime_s": round(time.time() - self.started, 3),
            **self.counts, "batches": batches,
            "batch_size_mean": rows / batches if batches else 0.0,
            "batch_size_max": max(self.batch_sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "generate_s": round(self.generate_s, 4),
            "tokens_per_s": (self.counts["completion_tokens"] / self.generate_s
                             if self.generate_s else 0.0),
            "queue_s_mean": self.queue_s_sum / self.queued if self.queued else 0.0,
            "queue_s_max": self.queue_s_max,
        }
