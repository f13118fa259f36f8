"""The Grafana dashboard verified for real: Debian's `prometheus` scrapes a running bitserve every second, and after
some traffic every PromQL expression of deploy/grafana/dashboards/bitserve.json must return data via its HTTP API."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "bitserve.json"
WAIT_S = 60.0  # bound on each wait for Prometheus (start, a scrape); a healthy run needs a few seconds
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


def _prometheus_binary() -> str:
    path = shutil.which("prometheus", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin"]))
    if path is None:
        pytest.fail("the prometheus binary is not installed: install Debian's package as .ci/run does "
                    "(apt-get install -y prometheus)")
    return path


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(default_model_path, "--max-num-seqs", "4", log_path=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


class Prometheus:
    """A real Prometheus on 127.0.0.1 with its own config and storage, scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "bitserve", "scrape_timeout": "900ms",
                                "static_configs": [{"targets": [target]}]}],
        }))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_s = time.monotonic()
        self.process = subprocess.Popen(
            [_prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self._log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def wait_until(self, expr: str, what: str) -> None:
        """Until `expr` has a sample with a value above zero."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if any(float(r["value"][1]) > 0 for r in self.query(expr)):
                    return
            except httpx.TransportError:
                pass  # not listening yet
            except json.JSONDecodeError:
                pass  # listening, but still starting: it answers 503 "Service Unavailable" in plain text
            time.sleep(0.2)
        pytest.fail(f"{what} did not happen within {WAIT_S:.0f} s; prometheus log: {self.log_path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def prometheus(server: ServerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    instance = Prometheus(tmp_path, f"127.0.0.1:{server.port}")
    try:
        yield instance
    finally:
        instance.stop()


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target, folded rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for panel in dashboard["panels"] for p in (panel, *panel.get("panels", []))]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


async def _traffic(base_url: str) -> None:
    """Streamed and plain chats, several at once, and one request for a model that does not exist (a 404)."""
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "Name three rivers."}]

    async def chat(stream: bool) -> None:
        reply = await client.chat.completions.create(model="default", messages=question, max_tokens=8, stream=stream)
        if stream:
            async for _ in reply:
                pass

    await asyncio.gather(*[chat(stream=i % 2 == 0) for i in range(6)])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=question, max_tokens=1)


def test_every_dashboard_query_returns_data(server: ServerProcess, prometheus: Prometheus) -> None:
    # Prometheus takes a counter series' first sample as its start, not zero: traffic before and after a scrape,
    # so every request counter has risen between two samples whatever the timing.
    asyncio.run(_traffic(server.base_url))
    prometheus.wait_until('sum(bitserve_requests_total) >= 6', "a first scrape after traffic")
    asyncio.run(_traffic(server.base_url))
    prometheus.wait_until("sum(bitserve_requests_total) >= 12", "a scrape after the second traffic")
    prometheus.wait_until('count_over_time(bitserve_requests_total{finish_reason="length"}[1h]) >= 2',
                          "a second scrape after the traffic")
    # Grafana's variables as its "All" would set them; the rate window reaches back before the traffic.
    window = f"{math.ceil(time.monotonic() - prometheus.started_s) + 5}s"
    empty = []
    for title, expr in _dashboard_exprs():
        query = expr.replace("$__rate_interval", window).replace("$model", ".*")
        values = [float(r["value"][1]) for r in prometheus.query(query)]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {query} -> {values}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    models = httpx.get(f"{prometheus.url}/api/v1/label/model/values",
                       params={"match[]": "bitserve_model_weight_bytes"}).json()["data"]
    assert models == [MODEL_ID]  # the dashboard's $model variable
