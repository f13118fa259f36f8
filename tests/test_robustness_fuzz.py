"""Schema-driven fuzzing: schemathesis generates requests from the server's own /openapi.json (valid and invalid ones)
and sends them to a real server on 127.0.0.1. No answer may be a 5xx, and every answer must match the schema.

Generation is capped at MAX_FUZZ_TOKENS tokens per request, so a case costs a prefill and a few decode steps.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode

from server import protocol
from tests.server_process import ServerProcess

ADMIN_TOKEN = "fuzz-admin-token"
MAX_FUZZ_TOKENS = 4  # generated tokens per request; the schema allows 2**31 - 1
REQUEST_TIMEOUT_S = 30  # a case generates at most 16 x MAX_FUZZ_TOKENS tokens: seconds, not minutes
QUICK_CASES = 150  # the always-run sample
FULL_CASES = 1000  # the slow run

# Checks on every response. positive_data_acceptance and negative_data_rejection are left out on purpose: OpenAI's
# API (and so this one) rejects some schema-valid combinations (top_logprobs without logprobs, a prompt longer than
# the context) and reads an explicit null as "use the default", which JSON Schema cannot say.
CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_headers_conformance", "response_schema_conformance")
# Known gaps of the schema's description, outside the files this test may fix; see docs/robustness.md.
STREAM_CHECK_NAMES = ("not_a_server_error", "status_code_conformance")  # text/event-stream is not documented
METRICS_CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "response_headers_conformance")  # text/plain
STREAM_CHUNKS = {"/v1/chat/completions": protocol.ChatCompletionChunk, "/v1/completions": protocol.Completion}


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models_dir = tmp_path_factory.mktemp("models")
    (models_dir / "served.gguf").symlink_to(default_model_path)
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(models_dir / "served.gguf", "--models-dir", str(models_dir), "--admin-token", ADMIN_TOKEN,
                            "--max-num-seqs", "16", "--max-queue", "16", "--request-timeout-s", "60", log_path=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def _cap_generation(body: object, served: bool) -> None:
    """At most MAX_FUZZ_TOKENS generated tokens (values of the wrong type stay, so validation still sees them); with
    `served`, a string `model` names the served model, so the request reaches the engine rather than a 404."""
    if not isinstance(body, dict):
        return
    if served and isinstance(body.get("model"), str):
        body["model"] = "default"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            body[key] = MAX_FUZZ_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_FUZZ_TOKENS


def _check_stream(path: str, text: str) -> None:
    """An SSE answer: chunks of the endpoint's chunk model, then [DONE]; or chunks then one OpenAI error event."""
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert events, "empty stream"
    for event in events[:-1]:
        try:
            STREAM_CHUNKS[path].model_validate_json(event)
        except ValidationError as exc:
            raise AssertionError(f"stream chunk does not match {STREAM_CHUNKS[path].__name__}: {event[:300]}") from exc
    last = events[-1]
    if last != "[DONE]":
        error = json.loads(last).get("error")
        assert isinstance(error, dict) and error.get("message"), f"stream ended without [DONE]: {last[:300]}"


def _fuzz(server: ServerProcess, num_cases: int) -> Counter[str]:
    """Run at least num_cases cases; returns the cases run per operation and status ("POST /v1/completions 200").

    Operations with a body get valid and invalid bodies; a path parameter (any string is valid) only valid ones;
    operations without input run once. The generation endpoints, where a request reaches the engine, get twice the
    share of the others.
    """
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    plan: list[tuple[schemathesis.APIOperation, GenerationMode, int]] = []  # (operation, mode, weight)
    for operation in (result.ok() for result in schema.get_all_operations()):
        weight = 2 if operation.path in STREAM_CHUNKS else 1
        if operation.body:
            plan += [(operation, GenerationMode.POSITIVE, weight), (operation, GenerationMode.NEGATIVE, weight)]
        else:
            plan.append((operation, GenerationMode.POSITIVE, weight if operation.path_parameters else 0))
    per_weight = -(-num_cases // sum(weight for _, _, weight in plan))
    ran: Counter[str] = Counter()
    for operation, mode, weight in plan:
        _fuzz_operation(operation, mode, max(1, weight * per_weight), ran)
    return ran


def _fuzz_operation(operation: schemathesis.APIOperation, mode: GenerationMode, max_examples: int,
                    ran: Counter[str]) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    settings = hypothesis.settings(max_examples=max_examples, deadline=None, database=None,
                                   derandomize=True,  # the same cases every run
                                   phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                                   print_blob=False)

    @settings
    @given(case=operation.as_strategy(generation_mode=mode), served=st.sampled_from([True, True, True, False]))
    def run_case(case: schemathesis.Case, served: bool) -> None:
        if operation.path in STREAM_CHUNKS:
            _cap_generation(case.body, served)
        response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
        ran[f"{operation.label} {response.status_code}"] += 1
        content_type = response.headers.get("content-type", [""])[0]
        if content_type.startswith("text/event-stream"):
            names = STREAM_CHECK_NAMES
            if response.status_code == 200:
                _check_stream(operation.path, response.text)
        else:
            names = METRICS_CHECK_NAMES if operation.path == "/metrics" else CHECK_NAMES
        case.validate_response(response, checks=[getattr(schemathesis.checks, name) for name in names],
                               headers=headers)

    run_case()


def _report(ran: Counter[str], elapsed_s: float) -> None:
    print(f"\nschemathesis: {sum(ran.values())} cases in {elapsed_s:.0f} s: "
          + ", ".join(f"{label} {count}" for label, count in sorted(ran.items())))


def _assert_still_serving(server: ServerProcess) -> None:
    import httpx

    assert httpx.get(f"{server.base_url}/ready", timeout=10).status_code == 200
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def test_fuzz_sample_no_server_error_and_schema_conformance(server: ServerProcess) -> None:
    start = time.monotonic()
    ran = _fuzz(server, QUICK_CASES)
    _report(ran, time.monotonic() - start)
    assert sum(ran.values()) >= QUICK_CASES
    _assert_still_serving(server)


@pytest.mark.slow
def test_fuzz_full_no_server_error_and_schema_conformance(server: ServerProcess) -> None:
    start = time.monotonic()
    ran = _fuzz(server, FULL_CASES)
    _report(ran, time.monotonic() - start)
    assert sum(ran.values()) >= FULL_CASES
    _assert_still_serving(server)
