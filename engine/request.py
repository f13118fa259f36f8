"""A generation request as the scheduler sees it, and the per-step output it hands back. Engine thread only."""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer, StopMatcher
from engine.sampling import Sampler, SamplingParams


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an EOS token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or the deadline passed
    ERROR = "error"  # the engine step serving it failed


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None  # (token_id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one engine step produced for one request; handed to the request's `on_output` callback."""

    request_id: str
    text: str  # newly completed text (never half a UTF-8 character, never part of a stop string)
    token_ids: list[int]  # newly sampled tokens
    logprobs: list[TokenLogprob]  # one per new token when requested, else empty
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    max_total_tokens: int  # the model's context length: prompt + output never exceed it
    on_output: Callable[[RequestOutput], None]  # called on the engine thread; must not block
    deadline_s: float | None = None  # time.monotonic() after which the request is aborted
    arrival_s: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache; everything else is computed next
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    first_scheduled_s: float | None = None
    choice_index: int = 0  # which of the n choices of one API request this is; varies the seeded stream

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params, self.prompt_ids, self.choice_index)
        self.stop_matcher = StopMatcher(list(self.params.stop))
        self.output_counts: Counter[int] = Counter()  # token id -> times generated, for the penalties

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, index: int) -> int:
        num_prompt = len(self.prompt_ids)
        return self.prompt_ids[index] if index < num_prompt else self.output_ids[index - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
