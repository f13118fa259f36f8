"""OpenAI-compatible request and response schemas: pydantic lives here and nowhere deeper.

Requests fail validation wherever OpenAI would answer 400 (no silent coercion, no silently ignored feature) and convert
once to the engine's SamplingParams with `.to_sampling_params()`. Unknown extra fields are ignored: clients send them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.sampling import MAX_TOP_LOGPROBS, SamplingParams

# Each choice is a full sequence in the running batch: 16 (the default max_num_seqs, below OpenAI's 128) lets one
# request fill the batch but not queue behind itself.
MAX_N = 16
MAX_STOP_SEQUENCES = 4
# The legacy completions API caps its integer `logprobs` at 5.
MAX_COMPLETION_LOGPROBS = 5
# No context is this long; the bound keeps absurd values away from the engine's integer arithmetic.
MAX_TOKENS_LIMIT = 2**31 - 1
# No vocabulary is this large either.
MAX_TOKEN_ID = 2**31 - 1
# The sampler scales float32 logits by 1 / temperature and divides them by the repetition penalty. Below these bounds
# that overflows to inf and the probabilities turn NaN; a temperature this small samples greedily anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 1e-6
# OpenAI's legacy /v1/completions default when max_tokens is absent.
DEFAULT_COMPLETION_MAX_TOKENS = 16

FinishReason = Literal["stop", "length"]


def _error(code: str, message: str, **context: Any) -> PydanticCustomError:
    """A validation error whose type is the OpenAI error code (server.errors passes unknown types through as `code`).

    `{name}` in `message` is filled from `context`; `param=` names the field of a model-wide error.
    """
    return PydanticCustomError(code, message, context or None)


def _str_to_list(value: Any) -> Any:
    # One string or a list of strings; a single list type keeps error locations free of union-branch names.
    return [value] if isinstance(value, str) else value


def _text_to_parts(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise _error("invalid_type", "content must be a string or a list of content parts")
    return value


def _check_role(role: Any) -> Any:
    if role == "developer":  # OpenAI's newer name for the system role
        return "system"
    if role in ("tool", "function"):
        raise _error("unsupported_value", "'{role}' messages are not supported: no tool calling here", role=role)
    if isinstance(role, str) and role not in ("system", "user", "assistant"):
        raise _error("invalid_value", "role must be one of 'system', 'developer', 'user' or 'assistant'")
    return role


def _check_part_type(part_type: Any) -> Any:
    if isinstance(part_type, str) and part_type != "text":
        raise _error("unsupported_value", "content part type '{part_type}' is not supported: this server serves "
                     "text-only models, send 'text' parts", part_type=part_type[:40])
    return part_type


def _check_response_format(kind: Any) -> Any:
    if kind in ("json_object", "json_schema"):
        raise _error("unsupported_response_format", "response_format '{kind}' is not supported: this server has no "
                     "constrained decoding; use 'text'", kind=kind)
    return kind


# JSON Schema of what a field's validators accept where the Python type says less (a string for a list, the
# "developer" role) or more (an empty list): /openapi.json then describes requests the server takes.
_TEXT_PART_SCHEMA = {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_CONTENT_SCHEMA = WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART_SCHEMA}]})
_ROLE_SCHEMA = WithJsonSchema({"enum": ["system", "developer", "user", "assistant"]})
_STOP_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": {"type": "string", "minLength": 1}}]})
_TOKEN_IDS_SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT_SCHEMA = WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1}, _TOKEN_IDS_SCHEMA,
    {"type": "array", "minItems": 1, "maxItems": 1,
     "items": {"anyOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS_SCHEMA]}}]})
_NULL_SCHEMA = WithJsonSchema({"type": "null"})
_TOOL_CHOICE_SCHEMA = WithJsonSchema({"enum": ["none", "auto"]})
_EMPTY_LIST = {"maxItems": 0}  # a feature this server does not have: only an empty list is accepted


class _Request(BaseModel):
    # strict: "1" is not a number and 0 is not a boolean, as in OpenAI's own validation.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextContentPart(_Request):
    type: Annotated[Literal["text"], BeforeValidator(_check_part_type)]
    text: str


class ChatMessage(_Request):
    # "developer" -> "system"
    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(_check_role), _ROLE_SCHEMA]
    content: Annotated[list[TextContentPart], BeforeValidator(_text_to_parts), _CONTENT_SCHEMA]
    name: str | None = None
    tool_calls: list[Any] | None = Field(None, json_schema_extra=_EMPTY_LIST)
    function_call: Annotated[Any, _NULL_SCHEMA] = None

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _reject_tool_calls(cls, value: Any) -> Any:
        if value:
            raise _error("unsupported_parameter", "tool calls are not supported: this server has no tool calling")
        return value

    @property
    def text(self) -> str:
        """The message's text; parts are joined by newlines."""
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Annotated[Literal["text"], BeforeValidator(_check_response_format)]


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]


class _SamplingRequest(_Request):
    """Fields shared by chat and legacy completions; defaults are OpenAI's."""

    model: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # extension: 0 disables
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # extension: 0 disables
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=10.0)] = 1.0  # extension: 1 disables
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: Annotated[list[str], BeforeValidator(_str_to_list), _STOP_SCHEMA] = Field(default_factory=list)
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,9}$"}})
    ignore_eos: bool = False  # extension for benchmarks: generate exactly max_tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        # OpenAI reads an explicit null as "use the default", and SDKs send nulls for fields the caller left unset.
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str]) -> list[str]:
        if len(stop) > MAX_STOP_SEQUENCES:
            raise _error("invalid_value", "stop accepts at most {limit} sequences", limit=MAX_STOP_SEQUENCES)
        if "" in stop:
            raise _error("invalid_value", "stop sequences must not be empty strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, logit_bias: dict[str, float]) -> dict[str, float]:
        for token in logit_bias:
            # Bounded before int(): the engine keeps token ids in int64 arrays.
            if not (token.isascii() and token.isdigit() and len(token) <= 10 and int(token) <= MAX_TOKEN_ID):
                raise _error("invalid_value", "logit_bias keys must be token ids written as decimal strings, "
                             "at most {limit}", limit=MAX_TOKEN_ID)
        return logit_bias

    @model_validator(mode="after")
    def _check_stream_options(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise _error("invalid_value", "stream_options is only allowed when stream is true", param="stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage-only chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int, top_logprobs: int | None) -> SamplingParams:
        """`top_logprobs` None: no logprobs at all; k: the sampled token's logprob and the k most likely tokens'."""
        temperature = self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0
        return SamplingParams(
            temperature=temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
            max_tokens=max_tokens, stop=tuple(self.stop), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=tuple(sorted((int(token), bias) for token, bias in self.logit_bias.items())),
            logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0, n=self.n, ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_tokens: MaxTokens | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] = Field(default_factory=list, json_schema_extra=_EMPTY_LIST)
    functions: list[Any] = Field(default_factory=list, json_schema_extra=_EMPTY_LIST)
    tool_choice: Annotated[Any, _TOOL_CHOICE_SCHEMA] = None
    function_call: Annotated[Any, _TOOL_CHOICE_SCHEMA] = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise _error("invalid_value", "messages must contain at least one message")
        return messages

    @field_validator("tools", "functions")
    @classmethod
    def _reject_tools(cls, tools: list[Any]) -> list[Any]:
        if tools:
            raise _error("unsupported_parameter", "tools and functions are not supported: no tool calling here")
        return tools

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _reject_tool_choice(cls, choice: Any) -> Any:
        # With no tools, "none" and "auto" both mean plain text; anything else asks for a tool call we cannot make.
        if choice not in ("none", "auto"):
            raise _error("unsupported_value", "only 'none' and 'auto' are accepted: this server has no tool calling")
        return choice

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _error("invalid_value", "top_logprobs requires logprobs to be true", param="top_logprobs")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """The client's cap on generated tokens; max_completion_tokens wins over the deprecated max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as a chat template expects them: role ("developer" already mapped to "system") and text."""
        return [{"role": message.role, "content": message.text} for message in self.messages]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine parameters; `default_max_tokens` (the route passes the context left after the prompt) applies when
        the client set no cap."""
        top_logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.requested_max_tokens or default_max_tokens, top_logprobs)


def _check_prompt(prompt: Any) -> Any:
    """One prompt: a string, a list of token ids, or either wrapped in a one-element list (no prompt batching)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _error("unsupported_value", "prompt batching is not supported: send one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not all(isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in prompt):
            raise _error("invalid_value", "a token-id prompt must be a list of non-negative integers")
    elif not isinstance(prompt, str):
        raise _error("invalid_type", "prompt must be a string, a list of token ids, or a one-element list of either")
    if not prompt:
        raise _error("invalid_value", "prompt must not be empty")
    return prompt


class CompletionRequest(_SamplingRequest):
    """Legacy /v1/completions: one prompt (text or token ids), no echo, suffix or best_of ranking."""

    prompt: Annotated[str | list[int], BeforeValidator(_check_prompt), _PROMPT_SCHEMA]
    max_tokens: MaxTokens | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = Field(False, json_schema_extra={"enum": [False]})
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None

    @field_validator("echo")
    @classmethod
    def _reject_echo(cls, echo: bool) -> bool:
        if echo:
            raise _error("unsupported_parameter", "echo is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _reject_suffix(cls, suffix: str | None) -> str | None:
        if suffix:  # an empty suffix asks for nothing
            raise _error("unsupported_parameter", "suffix (fill-in-the-middle) is not supported")
        return suffix

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise _error("unsupported_value", "best_of must equal n: ranking candidates server-side is not supported",
                         param="best_of")
        return self

    def to_sampling_params(self, default_max_tokens: int = DEFAULT_COMPLETION_MAX_TOKENS) -> SamplingParams:
        """Engine parameters; `logprobs: k` means the sampled token's logprob plus the k most likely alternatives."""
        return self._sampling_params(self.max_tokens or default_max_tokens, self.logprobs)


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _now_s() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes: a token may be part of a multi-byte character


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A stream's first delta per choice carries the role (and content ""), later ones content, the last one nothing."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends {"content": "..."} and finally {}, never nulls inside a delta.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event. Every chunk of a stream shares id and created; with stream_options.include_usage the stream
    ends with a chunk whose choices are empty and whose usage is set (usage is null on all others)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None  # None only in stream chunks before the last


class Completion(BaseModel):
    """A /v1/completions response, and (with usage None or choices empty) one of its stream chunks: OpenAI streams
    legacy completions as `text_completion` objects of the same shape."""

    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now_s)
    owned_by: str = "bitserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
