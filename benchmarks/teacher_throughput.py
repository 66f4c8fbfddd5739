"""Teacher throughput: the batched Serve deployment vs the same model answering one request at a
time, in completion tokens per second (generated tokens / wall time, measured by the client).

Both runs go through the same HTTP path and the same TeacherClient: the batched app
(max_batch_size = --batch, all prompts in flight) and an app with max_batch_size 1 and no
batch wait, sent one request at a time. The one-at-a-time baseline answers only the first
--baseline-prompts prompts (a rate does not need all 64, and at ~14 tokens/s on 2 CPU cores
64 × 64 tokens would take 5 minutes). The batched app then answers the same prompts again
with a JSON schema as `response_format` (grammar-constrained decoding): the ratio of the free
run's tokens/s to the constrained run's is the constrained-decoding overhead. Writes
benchmarks/results/teacher_throughput.json.

    .venv/bin/python benchmarks/teacher_throughput.py            # SmolLM2, 64 prompts × 64 tokens
    .venv/bin/python benchmarks/teacher_throughput.py --quick    # tiny random model, smaller
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import ray

from rebase_ray.config import TeacherConfig
from rebase_ray.models import SMOLLM2, TINY
from rebase_ray.serve.teacher import local_teacher
from rebase_ray.teacher.client import TeacherClient

RESULTS = Path(__file__).parent / "results" / "teacher_throughput.json"
TOPICS = ["the sea", "mountains", "a city at night", "bread", "rain", "trains", "a library",
          "winter", "bees", "the moon", "chess", "a market", "rivers", "clocks", "music", "tea"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}"
                                         f" (number {i})."}] for i in range(n)]


# the paragraph's minLength keeps every constrained row decoding to max_tokens, as the free
# rows do: both runs then decode the same number of tokens in the same batches, and the ratio
# is the cost of the grammar mask alone
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 1, "maxLength": 60},
    "paragraph": {"type": "string", "minLength": 2000}},
    "required": ["title", "paragraph"], "additionalProperties": False}
CONSTRAINED = {"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "paragraph", "schema": SCHEMA}}}


def run(cfg: TeacherConfig, conversations, concurrency: int, max_tokens: int,
        passes: dict[str, dict]) -> dict[str, dict]:
    """One app; each pass sends all `conversations` with its extra request fields."""
    out = {}
    with local_teacher(cfg, name=f"bench-{cfg.max_batch_size}") as url:
        for name, extra in passes.items():
            client = TeacherClient(url, concurrency=concurrency, timeout_s=1800, max_retries=0)
            client.chat_many(conversations[:1], max_tokens=4, temperature=0, **extra)  # warm-up
            warm, cut = client.stats.completion_tokens, client.stats.truncated
            before = client.server_metrics()
            start = time.perf_counter()
            results = client.chat_many(conversations, max_tokens=max_tokens, temperature=0,
                                       **extra)
            wall = time.perf_counter() - start
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]!r}")
            server = client.server_metrics()
            tokens = client.stats.completion_tokens - warm
            batches = server["batches"] - before["batches"]
            out[name] = {"prompts": len(conversations), "completion_tokens": tokens,
                         "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
                         "batches": batches,
                         "batch_size_mean": round(len(conversations) / max(batches, 1), 2),
                         "truncated": client.stats.truncated - cut}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, 16 prompts")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size of the batched app")
    ap.add_argument("--baseline-prompts", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU) | bfloat16 | float32")
    args = ap.parse_args()
    model = TINY if args.quick else SMOLLM2
    n = 16 if args.quick else args.prompts
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, log_to_driver=False, include_dashboard=False)
    serve = {"port": 0, "num_cpus": cpus, "request_timeout_s": 1800}
    conversations = prompts(n)

    batched = run(TeacherConfig(model=model, dtype=args.dtype, max_batch_size=args.batch,
                                batch_wait_timeout_s=0.5, serve=serve),
                  conversations, concurrency=n, max_tokens=args.max_tokens,
                  passes={"free": {}, "constrained": CONSTRAINED})
    single = run(TeacherConfig(model=model, dtype=args.dtype, max_batch_size=1,
                               batch_wait_timeout_s=0, serve=serve),
                 conversations[:args.baseline_prompts], concurrency=1,
                 max_tokens=args.max_tokens, passes={"free": {}})["free"]
    ratio = batched["free"]["tokens_per_s"] / single["tokens_per_s"]
    overhead = batched["free"]["tokens_per_s"] / batched["constrained"]["tokens_per_s"]
    result = {"model": model, "dtype": args.dtype, "cpus": cpus, "max_tokens": args.max_tokens,
              "max_batch_size": args.batch, "batched": batched["free"],
              "batched_constrained": batched["constrained"], "one_at_a_time": single,
              "ratio": round(ratio, 2), "constrained_overhead": round(overhead, 2),
              "load_avg": os.getloadavg()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"batched {batched['free']['tokens_per_s']} tokens/s vs one at a time "
          f"{single['tokens_per_s']} tokens/s: {ratio:.2f}x (goal >= 4x); constrained "
          f"{batched['constrained']['tokens_per_s']} tokens/s: overhead {overhead:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
