"""The typed config of every stage, and `pipeline.yaml` that holds them (pure pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rebase_ray.config.resources import Resources, renamed
from rebase_ray.config.schema import (
    AUTO_DTYPE,
    ConfigError,
    Dtype,
    S3Config,
    SourceConfig,
    Strict,
    TaskConfig,
    config_hash,
    how,
)

# ----------------------------------------------------------------------------- stages


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None: start or join a local Ray")
    num_cpus: int | None = None
    num_gpus: int | None = None


class IndexConfig(Strict):
    embedder: str = "bundled:minilm"
    backend: Literal["auto", "torch", "onnx"] = Field(
        default="auto", description="how the embedder runs: onnx (ONNX Runtime), torch "
        "(sentence-transformers); auto: torch on GPU actors and, on CPU ones, the faster of the "
        "two on this CPU, timed once per machine and cached (README, Datastore)")
    batch_size: int = how(2048, gt=0, description="cells per embedding call: the actor sorts "
                          "them by length, so larger batches pad less (2048 vs 256: 1.16x "
                          "the cells/s, benchmarks/many_sources.py)")
    resources: Resources = how(Resources(), description="the embedding actors (gpus > 0: "
                               "they encode on CUDA); one CPU is left to the reading tasks")
    encode_batch_size: int | None = how(
        None, gt=0, description="texts per forward pass inside an embedding call; unset: 16 on "
        "CPU actors (a call's texts are sorted by length, so small batches pad less: 2048-cell "
        "calls at 222.7 cells/s against 195.0 at 64 on 2 cores), 64 on GPU ones")
    piece_cells: int = how(
        1024, gt=0, description="cells per staged piece of embeddings: pieces are "
        "written as they finish and a rerun of a killed build embeds only the missing ones "
        "(~15 s of a CPU actor's work; each piece writes one file per shard it touches)")
    build: Resources = how(Resources(cpus=1), description="the shard-index build tasks: "
                           "actors is how many run at once, threads FAISS's")
    max_value_chars: int = Field(default=2000, gt=0, description="values are cut to this length")
    reject_value_chars: int = Field(
        default=100_000, gt=0, description="values longer than this are rejected, not cut")
    shards: int | None = Field(default=None, gt=0, description="fixed shard count")
    target_shard_cells: int = Field(default=200_000, gt=0)
    index: Literal["auto", "flat", "hnsw", "ivfpq"] = "auto"
    factory: str | None = Field(default=None, description="a FAISS factory string; overrides index")
    flat_max_cells: int = Field(default=100_000, gt=0)
    hnsw_max_cells: int = Field(default=1_000_000, gt=0)
    train_sample: int = Field(default=100_000, gt=0)
    dataset_dims: int = Field(
        default=32, ge=0, le=256, description="index dimensions that carry the dataset score "
        "(exact for shards with at most this many sources); 0: cell similarity alone")

    def build_hash(self) -> str:
        """Hash of the fields that change what is built (not how many resources build it)."""
        return config_hash(self.what())

    def embed_hash(self) -> str:
        """Hash of the fields that change which cells are embedded and their vectors: those of
        `build_hash` less the index's own and the shard layout (a build's staging key holds
        its shard count). A field not excluded here counts, so staged embeddings are never
        reused across a change that could alter them."""
        return config_hash(self.what({
            "shards", "target_shard_cells", "index", "factory", "flat_max_cells",
            "hnsw_max_cells", "train_sample", "dataset_dims"}))

    _old_keys = renamed("index", {"num_actors": "actors", "num_cpus_per_actor": "cpus",
                                  "num_gpus_per_actor": "gpus", "torch_threads": "threads"})
    _old_build = renamed("index", {"build_cpus": "cpus"}, into="build", defaults={"cpus": 1})


class ServeConfig(Strict):
    """How an endpoint is served (shared by the teacher and the retriever)."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=8000, ge=0, lt=65536, description="0 or None: a free port")
    route_prefix: str = Field(default="/", pattern=r"^/", description="the app's URL prefix")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, gt=0)
    target_ongoing_requests: float = Field(default=8, gt=0)
    cpus: float = Field(default=1, ge=0, description="CPUs per replica (held while it runs)")
    gpus: float = Field(default=0, ge=0, description="GPUs per replica")
    threads: int | None = Field(
        default=None, gt=0, description="torch threads per teacher replica; None: its share "
        "of the CPUs free when it is deployed, as `Resources.threads`")
    api_key: str | None = Field(default=None, description="or REBASE_RAY_API_KEY")
    max_request_bytes: int = Field(default=1_000_000, gt=0)
    request_timeout_s: float = Field(default=300, gt=0)

    _old_keys = renamed("serve", {"num_cpus": "cpus", "num_gpus": "gpus"}, into=None)


class RetrieveConfig(Strict):
    top_n: int = Field(default=3000, gt=0, description="rows kept (ReBase: 3,000)")
    candidates_per_query: int = Field(
        default=2000, gt=0, description="ANN cells per query vector per shard (at least top_n)")
    exact: bool = Field(
        default=False, description="search again with more candidates until no row left "
        "unfound can beat the last row kept (exact with Flat indexes, else up to the index's "
        "recall); off: one pass")
    per_dataset_cap: int | None = Field(default=None, gt=0, description="off: the paper")
    diversity: bool = Field(default=False, description="MMR re-rank; off: the paper")
    diversity_weight: float = Field(default=0.7, gt=0, le=1, description="MMR score weight")
    ngram: int = Field(default=13, gt=0, description="n of the eval-set n-gram overlap check")
    resources: Resources = how(Resources(cpus=0.25), description="the shard actors (one per "
                               "shard, one FAISS thread each): only `cpus` applies")
    search_params: str | None = Field(
        default=None, description='FAISS search params for every shard, e.g. "nprobe=8" or '
        '"efSearch=64"; None: those the datastore was built with')
    embed_cache: int = Field(
        default=10_000, ge=0, description="query texts whose vectors are remembered (least "
        "recently used first out); 0: off")
    max_batch_size: int = how(16, gt=0, description="endpoint requests per batch")
    batch_wait_timeout_s: float = how(0.002, ge=0)
    load: Literal["mmap", "memory"] = Field(
        default="mmap", description="mmap: shard indexes and vectors memory-mapped (pages "
        "read on first touch); memory: read into each shard actor's memory at start (no "
        "page faults on a query, needs the shards' size in RAM)")
    verify: Literal["cached", "full"] = how(
        "cached", description="cached: re-hash a shard file only when its stat changed")
    serve: ServeConfig = how(ServeConfig(route_prefix="/retriever"))  # beside the teacher at /

    _old_keys = renamed("retrieve", {"shard_cpus": "cpus"}, defaults={"cpus": 0.25})

    @field_validator("resources")
    @classmethod
    def _cpus_only(cls, v: Resources) -> Resources:
        if v.actors is not None or v.threads is not None or v.gpus:
            raise ValueError("retrieve.resources: only `cpus` applies (one actor per shard, "
                             "one FAISS thread each, on the CPU)")
        return v


class TeacherConfig(Strict):
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = "bundled:smollm2-135m-instruct"
    url: str | None = Field(default=None, description="an OpenAI-compatible base URL to use")
    api_key: str | None = None
    dtype: Dtype = Field(default="auto", description=AUTO_DTYPE)
    adapter: str | None = Field(
        default=None, description="a peft LoRA adapter (local path or s3:// URI) on top of model")
    served_model_name: str | None = Field(default=None, description="default: the model ref")
    max_batch_size: int = Field(default=8, gt=0)
    batch_wait_timeout_s: float = Field(default=0.1, ge=0)
    max_tokens_limit: int = Field(
        default=2048, gt=0, description="the most max_tokens / max_completion_tokens a request "
        "to our Serve teacher may ask for (400 above)")
    max_model_len: int | None = Field(default=None, gt=0, description="vLLM's max_model_len")
    serve: ServeConfig = ServeConfig()

    _old_keys = renamed("teacher", {"torch_threads": "threads"}, into="serve")


class ReplyFormat(Strict):
    """The shape teacher replies are constrained to (OpenAI `response_format` json_schema,
    built from the task: labels → enum, strings with these maxLengths)."""

    structured: bool = Field(
        default=True, description="request a JSON schema; off: free text, parsed leniently "
        "(for endpoints that refuse response_format)")
    min_input_chars: int = Field(default=1, gt=0, description="minLength of `input`; a "
                                 "shorter input (free-text replies) is rejected `too_short`")
    max_input_chars: int = Field(default=600, gt=0, description="maxLength of `input`")
    max_answer_chars: int = Field(default=200, gt=0, description="maxLength of a non-label "
                                  "`output`")
    max_rationale_chars: int = Field(default=600, gt=0, description="maxLength of `rationale`")

    @model_validator(mode="after")
    def _input_range(self) -> ReplyFormat:
        if self.min_input_chars > self.max_input_chars:
            raise ValueError(f"reply.min_input_chars ({self.min_input_chars}) is above "
                             f"reply.max_input_chars ({self.max_input_chars})")
        return self


class LabelCheck(Strict):
    """Label quality from a weak teacher (label tasks only), after an example is generated:
    roundtrip: the teacher labels its own generated input (greedy, constrained to the label
    set) and the example is kept only when that agrees with its label; vote: `votes` sampled
    labels, and the majority label is kept when its share is at least `min_agreement`
    (Prompt2Model's multi-vote); none: off. Every label request counts against the budget."""

    mode: Literal["none", "roundtrip", "vote"] = "roundtrip"
    votes: int = Field(default=5, gt=1, description="sampled labels per example (vote)")
    min_agreement: float = Field(default=0.6, gt=0, le=1, description="majority share (vote)")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature (vote)")


class TransformConfig(Strict):
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    seed: int = 0
    max_tokens: int = Field(default=384, gt=0, description="room for a reply of the "
                            "default schema (reply.max_*_chars)")
    concurrency: int = Field(default=8, gt=0)
    max_requests: int | None = Field(default=None, gt=0, description="hard budget on calls")
    max_value_chars: int = Field(default=250, gt=0)
    max_row_chars: int = Field(default=2000, gt=0)
    max_output_chars: int = Field(default=2000, gt=0)
    near_duplicate_threshold: float = Field(default=0.7, gt=0, le=1)
    min_examples: int = Field(default=1, gt=0, description="the run stops after transform "
                              "when it keeps fewer examples, with the reasons")
    annotate: bool = Field(
        default=True, description="with cot: annotate, the teacher writes each kept example's "
        "rationale here (one more request per example); off: the examples go on without one, "
        "and distill annotates only those it selects (BalDistill's budget)")
    input: Literal["teacher", "row"] = Field(
        default="teacher", description="teacher: the teacher writes each example's input from "
        "the retrieved row (ReBase's transformation); row: the row's own text (its values, cut "
        "to reply.max_input_chars) is the input and the teacher only answers it, greedy, with "
        "the label check's classification prompt (for a teacher too weak to write inputs; "
        "label_check roundtrip would repeat that question and is skipped)")
    reply: ReplyFormat = ReplyFormat()
    label_check: LabelCheck = LabelCheck()


class DistillConfig(Strict):
    stages: int = Field(default=3, gt=0)
    budget: int = Field(default=300, gt=0, description="total teacher budget B: the examples "
                        "the stages add (annotated, synthesized or selected), B/K a stage")
    rounds: int = Field(default=3, gt=0, description="teacher rounds per stage: each asks again "
                        "for what the last left missing (the next IFD candidates of a head "
                        "domain, new syntheses for a tail domain)")
    max_calls_per_example: float = Field(
        default=3.0, ge=1, description="teacher calls a stage may make per example of its "
        "budget (rejected ones and label checks included); spent, the stage stops short")
    mode: Literal["random", "balanced", "adaptive"] = "adaptive"
    domain_from: Literal["eval_domain", "column", "dataset", "label"] = "dataset"
    domain_column: str | None = None
    synth_shots: int = Field(default=3, gt=0, description="domain examples shown per synthesis")
    ifd_candidates: int = Field(
        default=4, gt=0, description="head candidates scored per unit of quota (IFD cost cap)")
    ifd_batch_size: int = how(8, gt=0)
    ifd_max_new_tokens: int = Field(default=64, gt=0, description="length of the student's ŷ")
    ifd_resources: Resources = how(Resources(), description="the IFD scoring workers (Ray "
                                   "Data tasks; `actors`: how many run at once)")
    ifd_dtype: Dtype = Field(default="auto", description=AUTO_DTYPE)
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=384, gt=0, description="teacher reply length")
    concurrency: int = how(8, gt=0, description="teacher requests in flight")
    max_output_chars: int = Field(default=2000, gt=0)
    near_duplicate_threshold: float = Field(default=0.7, gt=0, le=1)
    reply: ReplyFormat = ReplyFormat()
    label_check: LabelCheck = Field(
        default=LabelCheck(mode="none"), description="checks the labels of synthesized "
        "examples; a synthesis then takes 1 + its label requests of the stage's calls")
    task_examples: bool = Field(
        default=True, description="the task's few-shot examples join the student's training "
        "set from stage 1, at no teacher cost, as they make the fewshot baseline's: the "
        "comparison then measures what retrieval and distillation add to them")
    evaluate_stages: bool = Field(
        default=True, description="evaluate the student on the eval set after every stage (the "
        "per-stage curves); off: only the pipeline's evaluate stage scores the final student")
    seed: int = 0

    def plan_hash(self) -> str:
        """Hash of the fields that change what a run selects (not its resources)."""
        return config_hash(self.what())

    _old_keys = renamed("distill", {"ifd_actors": "actors", "ifd_num_cpus": "cpus",
                                    "ifd_num_gpus": "gpus", "ifd_torch_threads": "threads"},
                        into="ifd_resources")


class LoraConfig(Strict):
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class TrainConfig(Strict):
    model: str = "bundled:smollm2-135m-instruct"
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=4, gt=0)
    epochs: float = Field(default=1, gt=0)
    max_seq_len: int = Field(default=512, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    max_examples: int | None = Field(default=None, gt=0)
    max_wall_s: float | None = Field(default=None, gt=0)
    resources: Resources = how(Resources(actors=1, cpus=1), description="the Ray Train "
                               "workers (gpus > 0: on CUDA, nccl); the global batch is "
                               "batch_size × actors")
    checkpoint_every: int = how(50, gt=0)
    max_failures: int = how(2, ge=-1)
    merge: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="float32", description="bfloat16: mixed precision (autocast; weights and "
        "optimizer in float32), about 1.5x faster steps on a CPU with AVX512-BF16 or a GPU; "
        + AUTO_DTYPE)
    rationale: Literal["multitask", "inline"] = Field(
        default="multitask", description="how an example's rationale is learned: multitask — "
        "the plain prompt → the answer, plus the prompt asking for an explanation → rationale "
        "and answer (distilling step-by-step; the student answers directly, as the "
        "log-likelihood evaluation asks); inline — one target, the rationale then the answer")
    seed: int = 0

    _old_keys = renamed("train", {"num_workers": "actors", "cpus_per_worker": "cpus",
                                  "use_gpu": ("gpus", lambda on: 1 if on else 0),
                                  "torch_threads": "threads"}, defaults={"actors": 1, "cpus": 1})


class EvaluateConfig(Strict):
    batch_size: int = Field(default=8, gt=0, description="examples per generate call, and "
                            "prompts per log-likelihood forward pass (their labels share it)")
    max_new_tokens: int = Field(default=64, gt=0)
    max_seq_len: int = Field(
        default=1024, gt=1, description="tokens of prompt + label when labels are ranked by "
        "log-likelihood; a longer prompt is cut from the left")
    resources: Resources = how(Resources(), description="the evaluation workers (Ray Data "
                               "tasks; `actors`: how many run at once)")
    dtype: Dtype = Field(default="auto", description=AUTO_DTYPE)
    max_examples: int | None = Field(default=None, gt=0)
    code_timeout_s: float = Field(default=10, gt=0)
    code_memory_mb: int = Field(default=512, gt=0)
    baseline: bool = Field(default=True, description="also answer with the adapter switched off")
    generative: bool = Field(
        default=True, description="label tasks: also generate each answer for the generative "
        "scores (gen_strict, gen_flexible) beside the log-likelihood ones; off: acc and "
        "acc_norm only, about half the time")
    baselines: list[Literal["fewshot", "synthetic"]] = Field(
        default=[], description="students trained like the distilled one, with the same train "
        "config, on other data, and evaluated beside it (the pipeline's baselines stage): "
        "fewshot — the task's few-shot examples alone; synthetic — examples the teacher writes "
        "from the instruction and few-shot examples alone, no retrieval (Prompt2Model-style), "
        "with as many teacher requests as transform and distill spent")

    @field_validator("baselines")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"baselines listed twice: {v}")
        return v

    _old_keys = renamed("evaluate", {"num_actors": "actors", "num_cpus_per_actor": "cpus",
                                     "num_gpus_per_actor": "gpus", "torch_threads": "threads"})


# ----------------------------------------------------------------------------- pipeline.yaml


class PipelineConfig(Strict):
    storage_root: str = "./artifacts"
    s3: S3Config = S3Config()
    sources: str | list[SourceConfig] | None = Field(
        default=None, description="a sources.yaml path or an inline list")
    datastore: str | None = Field(default=None, description="reuse an existing datastore URI")
    task: str | TaskConfig | None = Field(
        default=None, description="a task.yaml path or an inline task: every stage but index "
        "needs it")
    ray: RayConfig = RayConfig()
    index: IndexConfig = IndexConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    teacher: TeacherConfig = TeacherConfig()
    transform: TransformConfig = TransformConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def require_task(self, source: str = "pipeline.yaml") -> TaskConfig:
        """The task, which every stage but index needs (`rebase-ray index --config` reads only
        the `index` section)."""
        if not isinstance(self.task, TaskConfig):
            raise ConfigError(f"{source}: give `task` (a task.yaml path or an inline task)")
        return self.task

    def require_data(self, source: str = "pipeline.yaml") -> None:
        """The index and retrieve stages need `sources` or an existing `datastore`; verbs
        that start from examples (train, distill --examples, eval) do not."""
        if self.sources is None and self.datastore is None:
            raise ConfigError(f"{source}: give `sources` (a file or a list) or an existing "
                              "`datastore` URI")
