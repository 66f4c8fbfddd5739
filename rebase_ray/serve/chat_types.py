"""The teacher endpoint's typed bodies: requests (OpenAI's chat API, with vLLM's
`structured_outputs`) are pydantic models that FastAPI validates, each response format turned
into a grammar `Constraint`; responses are the `openai` package's own types."""

# No `from __future__ import annotations`: FastAPI reads these models' annotations.
import time
import uuid
from typing import Annotated, Any, Literal

from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self  # typing.Self is Python 3.11+

from rebase_ray.generation import Constraint
from rebase_ray.teacher.types import Completion, OutputFormat, SamplingParams


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]

    def constraint(self) -> Constraint | None:
        return None


class JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_object"]

    def constraint(self) -> Constraint | None:
        return Constraint.json_object()


class JSONSchema(BaseModel):
    """OpenAI's `response_format.json_schema`. The schema is enforced whatever `strict` says."""

    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_schema"]
    json_schema: JSONSchema

    def constraint(self) -> Constraint | None:
        return Constraint.json_schema(self.json_schema.schema_)


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat,
                           Field(discriminator="type")]
STRUCTURED_OUTPUTS_KEYS = ("choice", "json")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` request field. Of its keys this server supports `choice`
    (one of these strings) and `json` (a JSON schema); any other key set is refused."""

    model_config = ConfigDict(extra="allow")
    choice: list[str] | None = None
    json_: dict[str, Any] | None = Field(default=None, alias="json")

    @model_validator(mode="after")
    def _one_supported_key(self) -> Self:
        unsupported = sorted(k for k, v in (self.model_extra or {}).items() if v is not None)
        if unsupported:
            raise ValueError(f"structured_outputs {', '.join(map(repr, unsupported))} is not "
                             f"supported by this server (it supports "
                             f"{' and '.join(map(repr, STRUCTURED_OUTPUTS_KEYS))})")
        if (self.choice is None) == (self.json_ is None):
            raise ValueError("structured_outputs needs exactly one of 'choice' and 'json'")
        return self

    def constraint(self) -> Constraint:
        if self.choice is not None:
            return Constraint.choice(self.choice)
        return Constraint.json_schema(self.json_)


class ChatRequest(BaseModel):
    """OpenAI's chat request; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_format(self) -> Self:
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("set response_format or structured_outputs, not both")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p,
            max_tokens=self.requested_max_tokens or default_max_tokens,
            n=self.n, seed=self.seed, stop=tuple(s for s in stop if s))

    def output_format(self) -> OutputFormat | None:
        """The structured output asked for (None: none); raises UnsupportedSchema naming a
        schema feature the grammar engine cannot enforce."""
        if self.response_format is not None:
            fields = {"response_format": self.response_format.model_dump(by_alias=True,
                                                                         exclude_unset=True)}
            return OutputFormat(fields, self.response_format.constraint())
        if self.structured_outputs is not None:
            fields = {"structured_outputs": self.structured_outputs.model_dump(
                by_alias=True, exclude_unset=True)}
            return OutputFormat(fields, self.structured_outputs.constraint())
        return None


class ModelList(BaseModel):
    """GET /v1/models (the `openai` package types the page only on the client side)."""

    object: Literal["list"] = "list"
    data: list[Model]


def chat_completion(model: str, choices: list[Completion]) -> ChatCompletion:
    """The response to a chat request answered with `choices` (n of them, one prompt)."""
    completion_tokens = sum(c.completion_tokens for c in choices)
    prompt_tokens = choices[0].prompt_tokens if choices else 0
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()),
        model=model,
        choices=[Choice(index=i, message=ChatCompletionMessage(role="assistant", content=c.text),
                        finish_reason=c.finish_reason, logprobs=None)
                 for i, c in enumerate(choices)],
        usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens))
