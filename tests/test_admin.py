"""The admin API and `bitserve admin` against a real uvicorn server: auth, path safety, the memory check, load,
activate, unload (RSS back to baseline), a failed load under traffic, and swaps under 8 concurrent streaming clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.cli import main as cli_main
from server.settings import ServerSettings
from tests.server_process import ServerProcess, free_port

ADMIN_TOKEN = "admin-token-for-tests"
API_KEY = "api-key-for-tests"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WAIT_S = 60.0  # bound on any single load, unload or settle; a healthy run needs a few seconds
NUM_CLIENTS = 8
NUM_SWAPS = 6


def _copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the same bytes, no copy, when the file system allows it
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture(scope="module")
def models_dir(default_model_path: Path, fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A.gguf and B.gguf (the default model), tiny/ (a random 2-layer BitNet), damaged files, and symlinks."""
    root = tmp_path_factory.mktemp("models")
    outside = tmp_path_factory.mktemp("outside")
    _copy(default_model_path, root / "A.gguf")
    _copy(default_model_path, root / "B.gguf")
    (root / "A-link.gguf").symlink_to(root / "A.gguf")  # stays inside: allowed
    shutil.copytree(fixtures_dir / "bitnet" / "A" / "offline", root / "tiny")
    for file in (fixtures_dir / "smollm2" / "tokenizer").iterdir():
        shutil.copy(file, root / "tiny" / file.name)
    for directory in (root / "tiny", *((root / "tiny").iterdir())):
        directory.chmod(0o755 if directory.is_dir() else 0o644)  # the fixtures are read-only
    with open(default_model_path, "rb") as source:
        (root / "truncated.gguf").write_bytes(source.read(5_000_000))  # valid header, tensor data cut short
    (root / "garbage.gguf").write_bytes(b"this is not a model\n" * 100)
    _copy(default_model_path, outside / "secret.gguf")
    (root / "escape.gguf").symlink_to(outside / "secret.gguf")
    (root / "escape-dir").symlink_to(outside)
    (root / "leaky").mkdir()
    (root / "leaky" / "model.safetensors").symlink_to(outside / "secret.gguf")  # a directory with a file outside
    with open(root / "huge.gguf", "wb") as huge:
        huge.truncate(2 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # sparse: twice the RAM, no disk
    return root


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(models_dir / "A.gguf", "--models-dir", str(models_dir), "--admin-token", ADMIN_TOKEN,
                            "--max-num-seqs", "8", "--max-queue", "64", log_path=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=30) as client:
        yield client
    # Every test leaves the server as it found it: A alone, and active.
    listing = client_listing(server)
    assert [(m["id"], m["state"], m["active"]) for m in listing["data"]] == [("A", "ready", True)], listing


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def client_listing(server: ServerProcess) -> dict:
    response = httpx.get(f"{server.base_url}/admin/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def _entry(listing: dict, model_id: str) -> dict | None:
    return next((model for model in listing["data"] if model["id"] == model_id), None)


def _wait_listing(admin: httpx.Client, until: Callable[[dict], bool], what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        listing = admin.get("/admin/models").json()
        if until(listing):
            return listing
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {WAIT_S:.0f} s; last listing: {listing}")


def _counter(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _rss_mib(server: ServerProcess) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc status")


def _chat(client: openai.OpenAI, model: str = "default", max_tokens: int = 8) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=max_tokens)


# --- auth ---------------------------------------------------------------------------------------------------------

ENDPOINTS = [("GET", "/admin/models", None), ("POST", "/admin/models/load", {"id": "B", "path": "B.gguf"}),
             ("POST", "/admin/models/activate", {"id": "A"}), ("POST", "/admin/models/unload", {"id": "A"})]


@pytest.mark.parametrize("method, path, body", ENDPOINTS)
def test_every_admin_call_needs_the_admin_token(server: ServerProcess, admin: httpx.Client, method: str, path: str,
                                                body: dict | None) -> None:
    def call(headers: dict[str, str]) -> httpx.Response:
        return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=30)

    assert call({}).status_code == 401
    assert call({"Authorization": f"Basic {ADMIN_TOKEN}"}).status_code == 401
    assert call({"Authorization": "Bearer"}).status_code == 401
    wrong = call({"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "permission_denied"
    assert call({"Authorization": f"Bearer {ADMIN_TOKEN}x"}).status_code == 403
    assert _entry(client_listing(server), "B") is None  # nothing was loaded by the refused calls


def _app_without_model(default_model_path: Path, **settings: object) -> TestClient:
    """The app in-process without its lifespan: routes and auth, no model loaded (the registry is empty)."""
    return TestClient(create_app(ServerSettings(**settings), default_model_path))


def test_an_api_key_is_not_the_admin_token(default_model_path: Path) -> None:
    http = _app_without_model(default_model_path, api_keys=(API_KEY,), admin_token=ADMIN_TOKEN)
    assert http.get("/admin/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 403
    assert http.get("/admin/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["data"] == []


def test_the_admin_token_is_not_an_api_key(default_model_path: Path) -> None:
    http = _app_without_model(default_model_path, api_keys=(API_KEY,), admin_token=ADMIN_TOKEN)
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 401
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_admin_api_absent_without_admin_token(default_model_path: Path) -> None:
    http = _app_without_model(default_model_path, admin_token=None)
    for method, path, body in ENDPOINTS:
        response = http.request(method, path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 404, (path, response.text)


# --- paths and refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, status, code", [
    ("/etc/passwd", 400, "invalid_path"),
    ("../A.gguf", 400, "invalid_path"),
    ("tiny/../../A.gguf", 400, "invalid_path"),
    (".", 400, "invalid_path"),
    ("", 400, None),
    ("escape.gguf", 403, "path_outside_models_dir"),
    ("escape-dir/secret.gguf", 403, "path_outside_models_dir"),
    ("leaky", 403, "path_outside_models_dir"),
    ("missing.gguf", 404, "model_file_not_found"),
])
def test_load_paths_outside_the_models_directory_are_refused(admin: httpx.Client, models_dir: Path, path: str,
                                                             status: int, code: str | None) -> None:
    response = admin.post("/admin/models/load", json={"id": "x", "path": path})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert str(models_dir) not in error["message"]  # the server's own paths stay private


def test_absolute_path_inside_the_models_directory_is_refused_too(admin: httpx.Client, models_dir: Path) -> None:
    response = admin.post("/admin/models/load", json={"id": "x", "path": str(models_dir / "B.gguf")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "path"


@pytest.mark.parametrize("body, status", [
    ({"id": "default", "path": "B.gguf"}, 400),
    ({"id": "../x", "path": "B.gguf"}, 400),
    ({"id": "A", "path": "B.gguf"}, 409),  # already loaded
    ({"id": "x", "path": "B.gguf", "unexpected": 1}, 400),
])
def test_load_refuses_bad_ids(admin: httpx.Client, body: dict, status: int) -> None:
    assert admin.post("/admin/models/load", json=body).status_code == status


def test_activate_and_unload_refusals(admin: httpx.Client) -> None:
    assert admin.post("/admin/models/activate", json={"id": "nope"}).status_code == 404
    assert admin.post("/admin/models/unload", json={"id": "nope"}).status_code == 404
    active = admin.post("/admin/models/unload", json={"id": "A"})
    assert active.status_code == 409 and "activate another model first" in active.json()["error"]["message"]


def test_load_that_would_not_fit_in_memory_is_refused(server: ServerProcess, admin: httpx.Client) -> None:
    failures = _counter(server, "bitserve_model_swaps_total", result="failure")
    response = admin.post("/admin/models/load", json={"id": "huge", "path": "huge.gguf"})
    assert response.status_code == 507, response.text
    message = response.json()["error"]["message"]
    assert "not enough memory" in message and "MiB are available" in message
    assert _entry(admin.get("/admin/models").json(), "huge") is None
    assert _counter(server, "bitserve_model_swaps_total", result="failure") == failures  # refused, not attempted


# --- load, activate, unload ---------------------------------------------------------------------------------------

def test_load_activate_unload_and_rss_returns_to_baseline(server: ServerProcess, admin: httpx.Client,
                                                          client: openai.OpenAI) -> None:
    assert _chat(client).model == "A"
    baseline = _rss_mib(server)
    accepted = admin.post("/admin/models/load", json={"id": "B", "path": "B.gguf"})
    assert accepted.status_code == 202 and accepted.json()["state"] == "loading"
    progress: list[float] = []

    def ready(listing: dict) -> bool:
        entry = _entry(listing, "B")
        assert entry is not None and entry["state"] in ("loading", "ready"), entry
        progress.append(entry["progress"])
        return entry["state"] == "ready"

    listing = _wait_listing(admin, ready, "load of B")
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert listing["active"] == "A" and _entry(listing, "B")["weight_bytes"] > 50e6
    assert _chat(client, "B").model == "B" and _chat(client).model == "A"

    assert admin.post("/admin/models/activate", json={"id": "B"}).json()["active"] == "B"
    assert _chat(client).model == "B"
    assert {m.id for m in client.models.list().data} == {"default", "A", "B"}
    assert admin.post("/admin/models/activate", json={"id": "A"}).json()["active"] == "A"
    after_load = _rss_mib(server)

    unloading = admin.post("/admin/models/unload", json={"id": "B"})
    assert unloading.status_code == 202
    _wait_listing(admin, lambda listing: _entry(listing, "B") is None, "unload of B")
    with pytest.raises(openai.NotFoundError):
        _chat(client, "B")
    after_unload = _rss_mib(server)
    print(f"\nRSS: baseline {baseline:.0f} MiB, with B loaded {after_load:.0f} MiB, after unloading B "
          f"{after_unload:.0f} MiB")
    assert after_load - baseline > 50, "loading a 98 MB model should show in RSS"
    assert after_unload < baseline + 32, "RSS did not return to its baseline after unload"


def test_load_by_inside_symlink_and_cli(server: ServerProcess, admin: httpx.Client, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_ADMIN_TOKEN", ADMIN_TOKEN)
    target = ["--url", server.base_url]
    assert cli_main(["admin", "load", "C", "A-link.gguf", "--wait", *target]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "ready"
    assert cli_main(["admin", "activate", "C", *target]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "C"
    assert cli_main(["admin", "activate", "A", *target]) == 0
    capsys.readouterr()
    assert cli_main(["admin", "unload", "C", "--wait", *target]) == 0
    assert _entry(json.loads(capsys.readouterr().out), "C") is None

    dead = f"http://127.0.0.1:{free_port()}"
    replicas = tmp_path / "replicas"
    replicas.write_text(f"# the fleet\n{server.base_url}\n{server.base_url}/\n{dead}\n")
    assert cli_main(["admin", "list", "--all", "--replicas-file", str(replicas)]) == 1  # one replica is down
    out = capsys.readouterr().out
    assert out.count(": ok\n") == 2 and f"# {dead}: FAILED" in out and "ConnectError" in out
    monkeypatch.setenv("BITSERVE_REPLICAS", f"{server.base_url},{server.base_url}")
    assert cli_main(["admin", "list", "--all"]) == 0
    assert capsys.readouterr().out.count('"active": "A"') == 2
    assert cli_main(["admin", "list", *target, "--admin-token", "wrong"]) == 1
    assert '"http_status": 403' in capsys.readouterr().out


# --- failed loads under traffic -----------------------------------------------------------------------------------

async def _traffic(base_url: str, stop: asyncio.Event, served_by: list[str], num_clients: int) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one_client() -> None:
        while not stop.is_set():
            stream = await client.chat.completions.create(model="default", messages=QUESTION, temperature=0,
                                                          max_tokens=8, stream=True)
            async for chunk in stream:
                served_by.append(chunk.model)

    await asyncio.gather(*[one_client() for _ in range(num_clients)])


@pytest.mark.parametrize("path, reason", [("truncated.gguf", "truncated"), ("garbage.gguf", "garbage.gguf")])
def test_failed_load_under_traffic_leaves_the_old_model_serving(server: ServerProcess, admin: httpx.Client, path: str,
                                                                reason: str) -> None:
    failures = _counter(server, "bitserve_model_swaps_total", result="failure")

    async def scenario() -> tuple[dict, list[str]]:
        stop, served_by = asyncio.Event(), []
        traffic = asyncio.create_task(_traffic(server.base_url, stop, served_by, num_clients=4))
        await asyncio.sleep(1.0)
        accepted = await asyncio.to_thread(admin.post, "/admin/models/load",
                                           json={"id": "broken", "path": path, "activate": True})
        assert accepted.status_code == 202, accepted.text
        listing = await asyncio.to_thread(_wait_listing, admin, lambda listing: _entry(listing, "broken")["state"]
                                          != "loading", "the failed load")
        await asyncio.sleep(1.0)  # keep serving a little after the failure
        stop.set()
        await asyncio.wait_for(traffic, WAIT_S)
        return listing, served_by

    listing, served_by = asyncio.run(scenario())
    failed = _entry(listing, "broken")
    assert failed["state"] == "failed" and reason in failed["message"], failed
    assert listing["active"] == "A"
    assert served_by and set(served_by) == {"A"}
    assert _counter(server, "bitserve_model_swaps_total", result="failure") == failures + 1
    assert admin.post("/admin/models/unload", json={"id": "broken"}).status_code == 202  # forgets the failure
    assert _entry(admin.get("/admin/models").json(), "broken") is None


# --- swaps under load ---------------------------------------------------------------------------------------------

@dataclass
class StreamResult:
    models: set[str]
    text: str
    finish_reason: str | None
    num_completion_tokens: int | None


async def _streaming_client(client: openai.AsyncOpenAI, stop: asyncio.Event, results: list[StreamResult]) -> None:
    while not stop.is_set():
        stream = await client.chat.completions.create(
            model="default", messages=QUESTION, temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        result = StreamResult(set(), "", None, None)
        async for chunk in stream:
            result.models.add(chunk.model)
            for choice in chunk.choices:
                result.text += choice.delta.content or ""
                result.finish_reason = choice.finish_reason or result.finish_reason
            if chunk.usage is not None:
                result.num_completion_tokens = chunk.usage.completion_tokens
        results.append(result)


async def _wait_async(admin: httpx.AsyncClient, until: Callable[[dict], bool], what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        listing = (await admin.get("/admin/models")).json()
        if until(listing):
            return listing
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {WAIT_S:.0f} s; last listing: {listing}")


def _swapped_to(model_id: str) -> Callable[[dict], bool]:
    def check(listing: dict) -> bool:
        entry = _entry(listing, model_id)
        assert entry is None or entry["state"] != "failed", entry
        return listing["active"] == model_id

    return check


@dataclass
class StormReport:
    in_flight_at_unload: list[int]  # per swap: requests running or queued on the old model when it was unloaded
    rss_mib: list[float]  # under load on A before the first swap, then after each swap once it served every client


async def _swap_storm(server: ServerProcess, results: list[StreamResult]) -> StormReport:
    """NUM_SWAPS swaps between A and tiny, each loading the new model and unloading the old one, while NUM_CLIENTS
    clients stream without pause."""
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    stop = asyncio.Event()
    clients = asyncio.gather(*[_streaming_client(client, stop, results) for _ in range(NUM_CLIENTS)])

    async def until_served(model_id: str, num_results: int) -> None:
        # Every client gets a turn on the model (clients.done() early: one of them failed).
        while sum(model_id in r.models for r in results) < num_results and not clients.done():
            await asyncio.sleep(0.05)

    report = StormReport([], [])
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        try:
            await until_served("A", NUM_CLIENTS)
            report.rss_mib.append(_rss_mib(server))
            old, path = "A", {"A": "A.gguf", "tiny": "tiny"}
            for swap in range(NUM_SWAPS):
                new = "tiny" if swap % 2 == 0 else "A"
                served_before = sum(new in r.models for r in results)
                accepted = await admin.post("/admin/models/load", json={"id": new, "path": path[new], "activate": True})
                assert accepted.status_code == 202, accepted.text
                old_entry = _entry(await _wait_async(admin, _swapped_to(new), f"swap {swap}"), old)
                report.in_flight_at_unload.append(old_entry["num_running"] + old_entry["num_waiting"])
                assert (await admin.post("/admin/models/unload", json={"id": old})).status_code == 202
                await _wait_async(admin, lambda listing, old=old: _entry(listing, old) is None, f"unload {swap}")
                await until_served(new, served_before + NUM_CLIENTS)
                report.rss_mib.append(_rss_mib(server))
                old = new
        finally:
            stop.set()
            await asyncio.wait_for(clients, WAIT_S)
    return report


def test_swaps_under_load_drop_no_request(server: ServerProcess, admin: httpx.Client) -> None:
    successes = _counter(server, "bitserve_model_swaps_total", result="success")
    results: list[StreamResult] = []
    report = asyncio.run(asyncio.wait_for(_swap_storm(server, results), 6 * WAIT_S))

    by_model: dict[str, set[str]] = {}
    for result in results:
        assert len(result.models) == 1, f"one stream named several models: {result.models}"
        assert result.finish_reason == "length" and result.num_completion_tokens == 12, result
        by_model.setdefault(next(iter(result.models)), set()).add(result.text)
    print(f"\nswaps under load: {NUM_SWAPS} swaps, {NUM_CLIENTS} streaming clients, {len(results)} streams, all "
          f"complete; requests in flight on the old model at each unload: {report.in_flight_at_unload}; RSS in MiB "
          f"on A before the first swap, then after each swap (tiny, A, ...): {[round(r) for r in report.rss_mib]}")
    assert set(by_model) == {"A", "tiny"}
    # Greedy output is the same at any batch composition, so each model has one answer, and the two differ:
    # a response's `model` names the model whose weights actually produced it.
    assert all(len(texts) == 1 for texts in by_model.values()), by_model
    assert by_model["A"] != by_model["tiny"]
    assert sum(report.in_flight_at_unload) > 0, "no swap happened while the old model still had requests running"
    assert _counter(server, "bitserve_model_swaps_total", result="success") == successes + NUM_SWAPS
