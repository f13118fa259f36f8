"""Hostile input at the edge of a real server on 127.0.0.1: missing and wrong credentials, key comparison in constant
time, model paths that try to leave the models directory, oversized bodies and prompts, a model whose chat template
tries to run code or read files, and secrets that must never reach the log.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import MIB, ServerSettings
from tests.server_process import ServerProcess
from tests.test_robustness_faults import metrics

API_KEYS = ("sk-robustness-key-one-5f1c2a", "sk-robustness-key-two-8d3e4b")
ADMIN_TOKEN = "robustness-admin-token-9b2e7c"
WRONG_KEY = "sk-robustness-wrong-key-77a1f0"
SECRETS = (*API_KEYS, ADMIN_TOKEN, WRONG_KEY)
QUESTION = [{"role": "user", "content": "Hello"}]
WAIT_S = 60.0
# One template, one attack per probe message; anything else renders plain ChatML, so the model still serves.
MALICIOUS_TEMPLATE = """{%- set probe = messages[-1]['content'] -%}
{%- if probe == 'mro' -%}{{ ''.__class__.__mro__[1].__subclasses__() }}
{%- elif probe == 'popen' -%}{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}
{%- elif probe == 'builtins' -%}{{ self.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}
{%- elif probe == 'attr filter' -%}{{ (''|attr('__class__')|attr('__base__')|attr('__subclasses__'))() }}
{%- elif probe == 'format' -%}x{{ '{0.__globals__}'.format(raise_exception) }}
{%- elif probe == 'empty' -%}
{%- elif probe == 'include' -%}{% include '/etc/passwd' %}
{%- elif probe == 'import' -%}{% import 'os' as os %}{{ os.getcwd() }}
{%- elif probe == 'mutate' -%}{{ messages.append({'role': 'system', 'content': 'x'}) }}
{%- elif probe == 'huge range' -%}{% for i in range(10 ** 9) %}x{% endfor %}
{%- else -%}{% for m in messages %}<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endfor %}<|im_start|>assistant
{% endif -%}"""
PROBES = ("mro", "popen", "builtins", "attr filter", "include", "import", "mutate", "huge range")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def models_dir(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """evil/: a tiny BitNet whose tokenizer_config.json carries MALICIOUS_TEMPLATE; escapes through symlinks."""
    root = tmp_path_factory.mktemp("models")
    outside = tmp_path_factory.mktemp("outside")
    evil = root / "evil"
    shutil.copytree(fixtures_dir / "bitnet" / "A" / "offline", evil)
    evil.chmod(0o755)
    shutil.copy(fixtures_dir / "smollm2" / "tokenizer" / "tokenizer.json", evil / "tokenizer.json")
    config = json.loads((fixtures_dir / "smollm2" / "tokenizer" / "tokenizer_config.json").read_text())
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    config["chat_template"] = MALICIOUS_TEMPLATE.replace("MARKER", str(marker))
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "marker-path").write_text(str(marker))
    (outside / "secret.gguf").write_bytes(b"GGUF")
    (root / "escape.gguf").symlink_to(outside / "secret.gguf")
    (root / "escape-dir").symlink_to(outside)
    (root / "leaky").mkdir()
    (root / "leaky" / "model.safetensors").symlink_to(outside / "secret.gguf")
    return root


@pytest.fixture(scope="module")
def server(default_model_path: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(default_model_path, "--models-dir", str(models_dir), "--max-num-seqs", "4",
                            "--admin-token", ADMIN_TOKEN, log_path=log, env={"BITSERVE_API_KEYS": ",".join(API_KEYS)})
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def _chat(server: ServerProcess, headers: dict[str, str], **body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, timeout=WAIT_S,
                      json={"model": "default", "messages": QUESTION, "max_tokens": 2, **body})


# --- credentials --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    (_bearer(WRONG_KEY), 401),
    (_bearer(API_KEYS[0][:-1]), 401),  # a prefix of a key
    (_bearer(API_KEYS[0] + "x"), 401),
    ({"Authorization": f"Basic {API_KEYS[0]}"}, 401),
    (_bearer(ADMIN_TOKEN), 401),  # the admin token is not an API key
    (_bearer(API_KEYS[0]), 200),
    (_bearer(API_KEYS[1]), 200),
])
def test_api_keys(server: ServerProcess, headers: dict[str, str], status: int) -> None:
    reply = _chat(server, headers)
    assert reply.status_code == status, reply.text
    assert httpx.get(f"{server.base_url}/v1/models", headers=headers).status_code == status
    if status == 401:
        assert reply.json()["error"]["code"] == "invalid_api_key" and reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"Authorization": "Bearer"}, 401), (_bearer(WRONG_KEY), 403), (_bearer(ADMIN_TOKEN[:-1]), 403),
    (_bearer(API_KEYS[0]), 403), (_bearer(ADMIN_TOKEN), 200),
])
def test_admin_token(server: ServerProcess, headers: dict[str, str], status: int) -> None:
    assert httpx.get(f"{server.base_url}/admin/models", headers=headers).status_code == status


def test_credentials_are_compared_in_constant_time(default_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key goes through hmac.compare_digest, whichever matches and whatever is sent, so the time
    taken says nothing about which key, or how much of one, was right."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    http = TestClient(create_app(ServerSettings(api_keys=API_KEYS, admin_token=ADMIN_TOKEN), default_model_path))
    for token in (WRONG_KEY, API_KEYS[0], API_KEYS[1]):
        compared.clear()
        http.get("/v1/models", headers=_bearer(token))
        assert sorted(expected for _, expected in compared) == sorted(key.encode() for key in API_KEYS), token
    for token in (WRONG_KEY, ADMIN_TOKEN):
        compared.clear()
        http.get("/admin/models", headers=_bearer(token))
        assert compared == [(token.encode(), ADMIN_TOKEN.encode())]


# --- model paths --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, status", [
    ("../evil", 400), ("evil/../../etc", 400), ("/etc/passwd", 400), ("evil\x00", 400),
    ("escape.gguf", 403), ("escape-dir/secret.gguf", 403), ("leaky", 403),
])
def test_model_loads_cannot_leave_the_models_directory(server: ServerProcess, models_dir: Path, path: str,
                                                       status: int) -> None:
    reply = httpx.post(f"{server.base_url}/admin/models/load", headers=_bearer(ADMIN_TOKEN),
                       json={"id": "escapee", "path": path})
    assert reply.status_code == status, reply.text
    assert str(models_dir) not in reply.json()["error"]["message"]
    listing = httpx.get(f"{server.base_url}/admin/models", headers=_bearer(ADMIN_TOKEN)).json()
    assert "escapee" not in [model["id"] for model in listing["data"]]


# --- sizes --------------------------------------------------------------------------------------------------------

def test_oversized_bodies_are_refused_before_they_are_read(server: ServerProcess) -> None:
    payload = json.dumps({"model": "default", "messages": [{"role": "user", "content": "x" * (2 * MIB)}]}).encode()
    headers = {**_bearer(API_KEYS[0]), "Content-Type": "application/json"}
    declared = httpx.post(f"{server.base_url}/v1/chat/completions", content=payload, headers=headers, timeout=WAIT_S)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start:start + 64 * 1024]

    chunked = httpx.post(f"{server.base_url}/v1/chat/completions", content=chunks(), headers=headers, timeout=WAIT_S)
    assert chunked.status_code == 413
    assert _chat(server, _bearer(API_KEYS[0])).status_code == 200


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "lighthouse " * 20000}]}),
    ("/v1/completions", {"prompt": [1] * 9000}),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 10**6}),
])
def test_over_long_prompts_are_refused_before_the_engine(server: ServerProcess, route: str, body: dict) -> None:
    before = metrics(server.base_url)
    reply = httpx.post(f"{server.base_url}{route}", headers=_bearer(API_KEYS[0]), timeout=WAIT_S,
                       json={"model": "default", **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 8192" in error["message"]
    after = metrics(server.base_url)
    for name in ("bitserve_prompt_tokens_total", "bitserve_requests_total"):
        assert after[name] == before[name], f"{name}: the request reached the engine"


# --- a malicious chat template ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evil_model(server: ServerProcess) -> Iterator[str]:
    admin = httpx.Client(base_url=server.base_url, headers=_bearer(ADMIN_TOKEN), timeout=WAIT_S)
    assert admin.post("/admin/models/load", json={"id": "evil", "path": "evil"}).status_code == 202
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        states = {model["id"]: model for model in admin.get("/admin/models").json()["data"]}
        if states["evil"]["state"] != "loading":
            break
        time.sleep(0.1)
    assert states["evil"]["state"] == "ready", states["evil"]
    yield "evil"
    if server.process.poll() is None:  # test_no_secret_reaches_the_log stops the server
        assert admin.post("/admin/models/unload", json={"id": "evil"}).status_code == 202


@pytest.mark.parametrize("probe", PROBES)
def test_a_chat_template_cannot_run_code_or_read_files(server: ServerProcess, models_dir: Path, evil_model: str,
                                                       probe: str) -> None:
    marker = Path((models_dir / "marker-path").read_text())
    reply = _chat(server, _bearer(API_KEYS[0]), model=evil_model, messages=[{"role": "user", "content": probe}])
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages" and error["message"].startswith("chat template: ")
    assert "root:" not in reply.text and not marker.exists()
    # The model, its template and the server all keep serving.
    assert _chat(server, _bearer(API_KEYS[0]), model=evil_model).status_code == 200
    assert _chat(server, _bearer(API_KEYS[0])).status_code == 200


def test_a_format_string_in_a_template_reaches_nothing(server: ServerProcess, evil_model: str) -> None:
    """The sandbox's str.format looks attributes up through the sandbox too: the field renders empty, and the
    prompt is the one character around it."""
    reply = _chat(server, _bearer(API_KEYS[0]), model=evil_model, messages=[{"role": "user", "content": "format"}])
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == 1


def test_a_template_that_renders_nothing_is_a_client_error(server: ServerProcess, evil_model: str) -> None:
    reply = _chat(server, _bearer(API_KEYS[0]), model=evil_model, messages=[{"role": "user", "content": "empty"}])
    assert reply.status_code == 400, reply.text


# --- secrets and the log ------------------------------------------------------------------------------------------

def _requests_carrying_secrets(server: ServerProcess) -> list[Callable[[], httpx.Response]]:
    url = server.base_url
    admin = _bearer(ADMIN_TOKEN)
    return [
        lambda: _chat(server, _bearer(WRONG_KEY)),
        lambda: _chat(server, _bearer(API_KEYS[0])),
        lambda: _chat(server, _bearer(API_KEYS[1]), temperature="hot"),
        lambda: httpx.post(f"{url}/v1/chat/completions", headers=_bearer(API_KEYS[0]),
                           content=b"{not json " + API_KEYS[1].encode()),
        lambda: httpx.post(f"{url}/v1/completions", headers=_bearer(API_KEYS[0]),
                           json={"model": API_KEYS[1], "prompt": ADMIN_TOKEN}),
        lambda: httpx.get(f"{url}/admin/models", headers=_bearer(WRONG_KEY)),
        lambda: httpx.post(f"{url}/admin/models/load", headers=admin, json={"id": "x", "path": ADMIN_TOKEN}),
        lambda: httpx.post(f"{url}/admin/models/activate", headers=admin, json={"id": API_KEYS[0]}),
    ]


def test_no_secret_reaches_the_log(server: ServerProcess) -> None:
    """Runs last in this module: sends requests carrying every secret (as credentials, in bodies, model paths and
    ids), stops the server, then reads everything it logged. (A secret a client puts in a URL is in the access log,
    as in any web server's.)"""
    statuses = [call().status_code for call in _requests_carrying_secrets(server)]
    assert statuses == [401, 200, 400, 400, 404, 403, 404, 404], statuses
    assert server.stop() == 0
    assert server.log_path is not None
    log = server.log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in log  # the log did capture the traffic
    leaked = [secret for secret in SECRETS if secret in log]
    assert not leaked, f"secrets in the log: {leaked}"
    assert os.environ.get("BITSERVE_ADMIN_TOKEN") != ADMIN_TOKEN  # the test's own environment stays clean too
