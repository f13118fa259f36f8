"""The OpenAI-compatible API over a real uvicorn server on 127.0.0.1, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(default_model_path, "--max-num-seqs", "8", "--max-queue", "32", log_path=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="default", messages=kwargs.pop("messages", QUESTION), **kwargs)


def _metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_models_lists_default_alias(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list().data]
    assert "default" in ids and "SmolLM2-135M-Instruct.Q4_1" in ids
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_greedy_reply_and_response_fields(client: openai.OpenAI) -> None:
    reply = _chat(client, temperature=0, max_tokens=12)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "SmolLM2-135M-Instruct.Q4_1"
    assert reply.system_fingerprint
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == 37  # fixtures/smollm2/prompt0.json renders to 37 ids
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Count from one to fifty in words."}]
    assert _chat(client, messages=prompt, temperature=0, max_tokens=3).usage.completion_tokens == 3
    reply = _chat(client, messages=prompt, temperature=0, max_tokens=9, max_completion_tokens=4)
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"


def test_stream_joins_to_non_stream(client: openai.OpenAI) -> None:
    full = _chat(client, temperature=0, max_tokens=16).choices[0].message.content
    chunks = list(client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=16,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == full


def test_stream_include_usage_sends_usage_chunk_last(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="default", messages=QUESTION, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return _chat(client, temperature=1.0, seed=seed, max_tokens=12).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_stop_string_is_cut_and_excluded(client: openai.OpenAI) -> None:
    full = _chat(client, temperature=0, max_tokens=16).choices[0].message.content
    middle = len(full) // 2
    stop = full[middle:middle + 4]  # four characters from mid-reply: likely to straddle a token boundary
    stopped = _chat(client, temperature=0, max_tokens=16, stop=[stop, "zzz"])
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_n_choices_and_logprobs(client: openai.OpenAI) -> None:
    reply = _chat(client, temperature=0.8, seed=3, n=3, max_tokens=6, logprobs=True, top_logprobs=2)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert len(entries) >= 1 and all(len(entry.top_logprobs) == 2 for entry in entries)
        assert all(entry.logprob <= 0 for entry in entries)


def test_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    token_id = 330  # any ordinary token: with +100 it must win every step
    reply = _chat(client, temperature=0, max_tokens=4, logit_bias={str(token_id): 100})
    forced = _chat(client, temperature=0, max_tokens=1, logit_bias={str(token_id): 100})
    assert reply.choices[0].message.content == forced.choices[0].message.content * 4


def test_penalties_change_repetitive_output(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Repeat the word 'cat' many times."}]
    plain = _chat(client, messages=prompt, temperature=0, max_tokens=16).choices[0].message.content
    penalised = _chat(client, messages=prompt, temperature=0, max_tokens=16, frequency_penalty=2.0,
                      presence_penalty=2.0, user="tester").choices[0].message.content
    assert plain != penalised


def test_greedy_same_alone_and_with_eight_concurrent(server: ServerProcess, client: openai.OpenAI) -> None:
    prompts = [[{"role": "user", "content": f"Tell me one fact about the number {i}."}] for i in range(8)]
    alone = [_chat(client, messages=p, temperature=0, max_tokens=10).choices[0].message.content for p in prompts[:3]]

    async def together() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*[async_client.chat.completions.create(
            model="default", messages=p, temperature=0, max_tokens=10) for p in prompts])
        return [reply.choices[0].message.content for reply in replies]

    assert asyncio.run(together())[:3] == alone


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5,
                                      temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    streamed = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5,
                                         temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == reply.choices[0].text


def test_disconnect_mid_stream_frees_blocks(server: ServerProcess) -> None:
    body = {"model": "default", "messages": QUESTION, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break  # got real content: hang up mid-stream
    for _ in range(100):
        metrics = _metrics(server)
        if metrics["bitserve_num_requests_running"] == 0 and metrics["bitserve_kv_cache_usage_ratio"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metrics["bitserve_num_requests_running"] == 0
    assert metrics["bitserve_kv_cache_usage_ratio"] == 0
    assert metrics['bitserve_requests_total'] >= 1


@pytest.mark.parametrize("body, param", [
    ({"model": "default", "messages": []}, "messages"),
    ({"model": "default", "messages": QUESTION, "max_tokens": -1}, "max_tokens"),
    ({"model": "default", "messages": QUESTION, "max_tokens": 10**9}, "messages"),
    ({"model": "default", "messages": QUESTION, "n": 1000}, "n"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "default", "messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"model": "default", "messages": "hello"}, "messages"),
    ({"model": "default", "messages": QUESTION, "response_format": {"type": "json_object"}}, "response_format.type"),
    ({"model": "default", "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_bad_input_gets_400_in_openai_format(server: ServerProcess, body: dict, param: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_404_invalid_utf8_and_huge_body(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert not_found.value.code == "model_not_found"
    bad_utf8 = httpx.post(f"{server.base_url}/v1/chat/completions", content=b'{"model": "default", "messages": "\xff"}',
                          headers={"content-type": "application/json"})
    assert bad_utf8.status_code == 400
    ten_megabytes = json.dumps({"model": "default", "messages": [{"role": "user", "content": "x" * 10**7}]})
    huge = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30, content=ten_megabytes,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert _chat(client, max_tokens=2).choices[0].message.content  # still serving


def test_full_queue_answers_429_with_retry_after(default_model_path: Path, tmp_path: Path) -> None:
    server = ServerProcess(default_model_path, "--max-num-seqs", "1", "--max-num-batched-tokens", "64",
                           "--max-queue", "1", log_path=tmp_path / "server.log").wait_ready()
    try:
        async def burst() -> list[httpx.Response]:
            body = {"model": "default", "messages": QUESTION, "max_tokens": 32, "ignore_eos": True}
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
                return await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(6)])

        statuses = [response.status_code for response in asyncio.run(burst())]
        assert set(statuses) == {200, 429}, statuses
        for response in asyncio.run(burst()):
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["type"] == "rate_limit_exceeded" or response.json()["error"]["code"]
    finally:
        server.stop()
