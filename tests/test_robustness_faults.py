"""Faults under a running server: an engine step that raises, a model file deleted or rewritten while it is served,
and SIGTERM during a stream. Each fault fails only what it touches; the server goes on serving, or drains and exits 0.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from engine import load_model
from engine.model import ForwardBatch
from server.app import create_app
from server.settings import ServerSettings
from tests.server_process import ServerProcess, free_port

QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
WAIT_S = 60.0  # bound on any wait for the server to settle; a healthy run needs well under a second
SHUTDOWN_TIMEOUT_S = 20.0  # --shutdown-timeout-s of the SIGTERM test
STREAM_TOKENS = 60


class InProcessServer:
    """create_app + uvicorn on a thread of this process, so a test can reach into the served model."""

    def __init__(self, model_path: Path, **settings: Any) -> None:
        self.app = create_app(ServerSettings(**settings), model_path)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.bitserve

    def start(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 300  # a first start may compile kernels
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("in-process server not ready")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(WAIT_S)


@contextmanager
def in_process_server(model_path: Path, **settings: Any) -> Iterator[InProcessServer]:
    server = InProcessServer(model_path, **settings)
    try:
        yield server.start()
    finally:
        server.stop()


def metrics(base_url: str) -> dict[str, float]:
    """Every sample summed over its labels: one model is served, so per-model series are that model's."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def wait_idle(base_url: str) -> dict[str, float]:
    """Wait until nothing runs or waits and every KV block is free; returns the last metrics."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        values = metrics(base_url)
        if (values["bitserve_num_requests_running"] == 0 and values["bitserve_num_requests_waiting"] == 0
                and values["bitserve_kv_cache_usage_ratio"] == 0):
            return values
        time.sleep(0.05)
    raise AssertionError(f"server did not return to idle within {WAIT_S:.0f} s: {metrics(base_url)}")


def chat(base_url: str, max_tokens: int = 4, timeout_s: float = WAIT_S, **extra: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=timeout_s, json={
        "model": "default", "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **extra})


# --- an exception inside one engine step ----------------------------------------------------------------------------

class FailingForward:
    """Wraps Transformer.forward; once armed, the next forward over a batch of `batch_size` sequences raises."""

    def __init__(self, forward: Any, batch_size: int) -> None:
        self.forward = forward
        self.batch_size = batch_size
        self.armed = threading.Event()
        self.fired = threading.Event()

    def __call__(self, batch: ForwardBatch, cache: Any) -> Any:
        if self.armed.is_set() and len(batch.block_tables) == self.batch_size:
            self.armed.clear()
            self.fired.set()
            raise RuntimeError("injected fault")
        return self.forward(batch, cache)


def _read_stream(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_exception_in_one_engine_step_fails_only_its_requests(default_model_path: Path) -> None:
    """Two requests run (one streamed, one not) and a third waits for a slot when the step fails: the two running
    get a clear error, the waiting one and every later request are served, and no KV block is left behind."""
    with in_process_server(default_model_path, max_num_seqs=2, max_queue=8, shutdown_timeout_s=5) as server:
        transformer = server.state.registry.active.model.transformer
        fault = FailingForward(transformer.forward, batch_size=2)
        transformer.forward = fault
        results: dict[str, Any] = {}

        def non_stream() -> None:
            results["non_stream"] = chat(server.base_url, 200, ignore_eos=True)

        def stream() -> None:
            body = {"model": "default", "messages": QUESTION, "max_tokens": 200, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=WAIT_S) as reply:
                results["stream_status"] = reply.status_code
                results["stream"] = _read_stream(reply)

        def waiting() -> None:
            results["waiting"] = chat(server.base_url, 8)

        threads = [threading.Thread(target=target) for target in (non_stream, stream)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WAIT_S
        while server.state.registry.active.engine_loop.num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads.append(threading.Thread(target=waiting))
        threads[-1].start()
        while server.state.registry.active.engine_loop.num_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        fault.armed.set()
        for thread in threads:
            thread.join(WAIT_S)
        assert fault.fired.is_set(), "the fault never fired"

        failed = results["non_stream"]
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["type"] == "server_error" and "engine step failed: injected fault" in error["message"]
        assert results["stream_status"] == 200
        last = results["stream"][-1]
        assert "engine step failed: injected fault" in last["error"]["message"], results["stream"][-3:]
        assert results["waiting"].status_code == 200, results["waiting"].text
        later = [chat(server.base_url) for _ in range(3)]
        assert [reply.status_code for reply in later] == [200] * 3
        assert metrics(server.base_url)["bitserve_requests_total"] >= 5
        wait_idle(server.base_url)


def test_logit_bias_past_the_vocabulary_fails_one_request(default_model_path: Path) -> None:
    """A logit_bias id the model does not have passes validation (the protocol does not know the vocabulary) and
    makes the sampler raise on the engine thread: that request must fail, not the engine."""
    with in_process_server(default_model_path, shutdown_timeout_s=0) as server:
        reply = chat(server.base_url, timeout_s=5, logit_bias={"60000": 1})
        assert reply.status_code in (400, 500) and reply.json()["error"]["message"]
        assert chat(server.base_url, timeout_s=5).status_code == 200


# --- the model file changes under a running server ------------------------------------------------------------------

def _mapped_files(pid: int) -> set[str]:
    return {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_model_file_changed_under_a_running_server(default_model_path: Path, tmp_path: Path) -> None:
    """The served file is truncated and rewritten in place (same inode: a live mapping of it would fault with
    SIGBUS), then replaced by another file, then deleted; every request after each change is served as before."""
    model = tmp_path / "served.gguf"
    shutil.copyfile(default_model_path, model)
    process = ServerProcess(model, "--max-num-seqs", "4", log_path=tmp_path / "server.log")
    try:
        process.wait_ready()
        # The weights are copies in memory: no mapping of the file is left once it is loaded.
        assert str(model) not in _mapped_files(process.process.pid)
        before = chat(process.base_url, 8)
        assert before.status_code == 200
        for change in ("truncated and rewritten in place", "replaced by another file", "deleted"):
            if change == "deleted":
                model.unlink()
            elif change == "replaced by another file":
                replacement = tmp_path / "replacement"
                replacement.write_bytes(b"GGUF" + b"\xff" * 4096)
                replacement.replace(model)
            else:
                with open(model, "r+b") as file:
                    file.truncate(0)
                    file.write(b"garbage" * 1000)
            after = chat(process.base_url, 8)
            assert after.status_code == 200, (change, after.text)
            assert after.json()["choices"] == before.json()["choices"], change  # the same weights, greedy
            assert httpx.get(f"{process.base_url}/ready", timeout=10).status_code == 200, change
            assert process.process.poll() is None, change
    finally:
        assert process.stop() == 0


def test_loaded_weights_hold_no_mapping_of_the_model_files(default_model_path: Path, fixtures_dir: Path,
                                                           tmp_path: Path) -> None:
    """Both readers (GGUF and HF safetensors) map the file while loading; the weights must not keep the mapping."""
    shutil.copyfile(default_model_path, tmp_path / "model.gguf")
    shutil.copytree(fixtures_dir / "bitnet" / "A" / "offline", tmp_path / "hf")
    models = [load_model(tmp_path / "model.gguf"), load_model(tmp_path / "hf")]
    gc.collect()
    mapped = [path for path in _mapped_files(os.getpid()) if path.startswith(str(tmp_path))]
    assert mapped == [], f"weights still map {mapped}"
    assert all(model.weights.num_bytes > 0 for model in models)


# --- SIGTERM ------------------------------------------------------------------------------------------------------

def test_sigterm_drains_a_running_stream_then_exits_0(default_model_path: Path, tmp_path: Path) -> None:
    process = ServerProcess(default_model_path, "--shutdown-timeout-s", str(SHUTDOWN_TIMEOUT_S),
                            log_path=tmp_path / "server.log")
    try:
        process.wait_ready()
        body = {"model": "default", "messages": QUESTION, "max_tokens": STREAM_TOKENS, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{process.base_url}/v1/chat/completions", json=body, timeout=WAIT_S) as reply:
            lines = reply.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            signalled_s = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        events = [first, *rest]
        assert events[-1] == "data: [DONE]", events[-3:]
        usage = json.loads(events[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == STREAM_TOKENS
        with pytest.raises(httpx.TransportError):  # draining: no new connections
            httpx.get(f"{process.base_url}/health", timeout=2)
        exit_code = process.process.wait(SHUTDOWN_TIMEOUT_S + 15)
        print(f"\nSIGTERM: stream of {STREAM_TOKENS} tokens completed, exit {exit_code} "
              f"{time.monotonic() - signalled_s:.1f} s after the signal")
        assert exit_code == 0
    finally:
        process.stop()
