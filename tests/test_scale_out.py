"""Scale-out as deployed: two real `bitserve serve` replicas behind a real nginx running the repo's
deploy/nginx/nginx.conf unchanged, all on 127.0.0.1. Traffic reaches both replicas, SSE streams through token by token,
`bitserve admin --all` swaps the model on every replica, and a replica killed mid-run leaves the other serving.

The tests share one cluster and run in file order: the last one kills a replica."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
NGINX_DIR = REPO / "deploy" / "nginx"
INSTALL_HINT = ("install it with the README's test command (`apt-get install -y --no-install-recommends nginx "
                "prometheus docker-compose`, as root)")

ADMIN_TOKEN = "admin-token-for-scale-out"
NEW_MODEL_ID = "smollm2-swapped"
NEW_MODEL_FILE = "smollm2-swapped.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NUM_REPLICAS = 2
WAIT_S = 60.0  # bound on any one wait for nginx, a counter, a load or a request; a healthy run needs a few seconds
MAX_ATTEMPTS = 3  # client-side attempts per request in the kill test


@dataclass
class Cluster:
    replicas: list[ServerProcess]
    nginx: subprocess.Popen[bytes]
    url: str  # nginx's base URL
    work_dir: Path


def _nginx_binary() -> str:
    # Debian installs nginx in /usr/sbin, which a non-root PATH may lack.
    path = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        pytest.fail(f"nginx is not installed: {INSTALL_HINT}")
    return path


def _write_nginx_config(conf_dir: Path, replica_ports: list[int], listen_port: int) -> None:
    """The repo's nginx.conf verbatim; the repo's upstreams.conf with its `server` hosts moved to the replicas' ports
    (every other parameter kept); a listen.conf on a free loopback port."""
    conf_dir.mkdir()
    shutil.copy(NGINX_DIR / "nginx.conf", conf_dir / "nginx.conf")
    server = re.compile(r"(server\s+)[\w.-]+:\d+")
    upstreams = (NGINX_DIR / "upstreams.conf").read_text()
    num_servers = len(server.findall(upstreams))
    assert num_servers == len(replica_ports), \
        f"deploy/nginx/upstreams.conf names {num_servers} replicas; this test runs {len(replica_ports)}"
    ports = iter(replica_ports)
    (conf_dir / "upstreams.conf").write_text(server.sub(lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", upstreams))
    (conf_dir / "listen.conf").write_text(f"listen 127.0.0.1:{listen_port} default_server;\n")


def _start_nginx(binary: str, work_dir: Path, replica_ports: list[int]) -> tuple[subprocess.Popen[bytes], str]:
    conf_dir, prefix = work_dir / "nginx-conf", work_dir / "nginx-prefix"
    prefix.mkdir()
    port = free_port()
    _write_nginx_config(conf_dir, replica_ports, port)
    with open(work_dir / "nginx.log", "wb") as log:
        # A session of its own, so cleanup can signal the master and its workers as one group.
        process = subprocess.Popen([binary, "-p", f"{prefix}/", "-c", str(conf_dir / "nginx.conf"),
                                    "-e", "stderr", "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {(work_dir / 'nginx.log').read_text()}")
        try:
            if httpx.get(f"{url}/lb-health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    _stop_nginx(process)
    raise TimeoutError(f"nginx did not answer /lb-health within {WAIT_S:.0f} s; log: {work_dir / 'nginx.log'}")


def _stop_nginx(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # nginx's fast shutdown: the master stops its workers, then exits
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def cluster(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nginx_binary = _nginx_binary()  # fail before starting any replica
    work_dir = tmp_path_factory.mktemp("scale-out")
    models_dir = work_dir / "models"
    models_dir.mkdir()
    model = models_dir / default_model_path.name
    for target in (model, models_dir / NEW_MODEL_FILE):
        try:
            os.link(default_model_path, target)  # the same bytes under another name, without a copy
        except OSError:
            shutil.copyfile(default_model_path, target)
    # The two cores are split between the replicas, as deploy/compose.scale.yml does.
    flags = ("--threads", "1", "--kv-cache-bytes", str(64 << 20), "--max-num-seqs", "4", "--admin-token", ADMIN_TOKEN,
             "--models-dir", str(models_dir))
    replicas: list[ServerProcess] = []
    nginx = None
    try:
        for index in range(NUM_REPLICAS):
            replicas.append(ServerProcess(model, *flags, log_path=work_dir / f"replica-{index}.log"))
        for replica in replicas:
            replica.wait_ready()
        nginx, url = _start_nginx(nginx_binary, work_dir, [replica.port for replica in replicas])
        yield Cluster(replicas, nginx, url, work_dir)
    finally:
        if nginx is not None:
            _stop_nginx(nginx)
        for replica in replicas:
            replica.stop()


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)


def _samples(replica: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{replica.base_url}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _metric(replica: ServerProcess, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(value for sample_name, sample_labels, value in _samples(replica)
               if sample_name == name and labels.items() <= sample_labels.items())


def _wait_for_total(replicas: list[ServerProcess], before: list[float], expected: float, **labels: str) -> list[float]:
    """Per-replica increase of bitserve_requests_total, once the increases add up to `expected`. A request's counter
    is bumped by its engine step, which may land just after its response has reached the client, so poll."""
    deadline = time.monotonic() + WAIT_S
    while True:
        increases = [_metric(replica, "bitserve_requests_total", **labels) - start
                     for replica, start in zip(replicas, before, strict=True)]
        if sum(increases) >= expected or time.monotonic() > deadline:
            return increases
        time.sleep(0.1)


def test_requests_are_spread_over_both_replicas(cluster: Cluster) -> None:
    num_requests = 12
    before = [_metric(replica, "bitserve_requests_total") for replica in cluster.replicas]
    client = _client(cluster)
    for _ in range(num_requests):
        reply = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=4)
        assert reply.choices[0].message.content
    increases = _wait_for_total(cluster.replicas, before, num_requests)
    assert sum(increases) == num_requests, f"requests counted per replica: {increases}"
    assert all(increase > 0 for increase in increases), f"a replica served nothing: requests per replica {increases}"


def test_stream_arrives_token_by_token_through_nginx(cluster: Cluster) -> None:
    num_tokens = 24
    itl = "bitserve_inter_token_latency_seconds"
    before = [(_metric(r, f"{itl}_sum"), _metric(r, f"{itl}_count")) for r in cluster.replicas]
    stream = _client(cluster).chat.completions.create(model="default", messages=QUESTION, max_tokens=num_tokens,
                                                      stream=True, extra_body={"ignore_eos": True})
    arrivals = []  # monotonic arrival time of each chunk that carries text
    finish_reason = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].finish_reason:
            finish_reason = chunk.choices[0].finish_reason
    assert finish_reason == "length"
    assert len(arrivals) >= num_tokens // 2, f"only {len(arrivals)} chunks with text for {num_tokens} tokens"

    # The server's own record of this request: the sum of its inter-token gaps is how long generation took from the
    # first token to the last. Streamed through, the client sees about that spread; buffered, a burst at the end.
    deltas = [(_metric(r, f"{itl}_sum") - s, _metric(r, f"{itl}_count") - c)
              for r, (s, c) in zip(cluster.replicas, before, strict=True)]
    server_span_s, num_gaps = max(deltas, key=lambda delta: delta[1])
    assert num_gaps >= num_tokens - 1, f"inter-token latency samples per replica: {deltas}"
    client_span_s = arrivals[-1] - arrivals[0]
    gaps_ms = [round((b - a) * 1e3, 1) for a, b in itertools.pairwise(arrivals)]
    assert client_span_s >= 0.5 * server_span_s, (
        f"chunks arrived over {client_span_s * 1e3:.1f} ms, but the server spent {server_span_s * 1e3:.1f} ms "
        f"between the first and last token ({server_span_s / num_gaps * 1e3:.1f} ms per token): nginx buffered the "
        f"stream; gaps between chunks in ms: {gaps_ms}")
    # No single burst either: at least half of the gaps are a sizeable fraction of the server's inter-token time.
    assert statistics.median(gaps_ms) >= 0.25 * server_span_s / num_gaps * 1e3, f"gaps between chunks in ms: {gaps_ms}"


def _admin_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.cli", "admin", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=2 * WAIT_S + 30, check=False, cwd=REPO,
                            env={**os.environ, "BITSERVE_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})})
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_fan_out_swap_reaches_every_replica(cluster: Cluster) -> None:
    urls = [replica.base_url for replica in cluster.replicas]
    replicas_file = cluster.work_dir / "replicas.txt"
    replicas_file.write_text("# one replica base URL per line\n" + "\n".join(urls) + "\n")

    # The load goes through --replicas-file and the activation through BITSERVE_REPLICAS: both ways of naming them.
    loaded = _admin_cli("load", "--all", "--replicas-file", str(replicas_file), "--wait", "--timeout-s", str(WAIT_S),
                        NEW_MODEL_ID, NEW_MODEL_FILE)
    assert loaded.stdout.count(": ok") == len(urls), loaded.stdout
    activated = _admin_cli("activate", "--all", NEW_MODEL_ID, env={"BITSERVE_REPLICAS": ",".join(urls)})
    assert activated.stdout.count(": ok") == len(urls), activated.stdout

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for url in urls:
        listing = httpx.get(f"{url}/admin/models", headers=admin, timeout=10).raise_for_status().json()
        assert listing["active"] == NEW_MODEL_ID, f"{url}: {listing}"
        ids = {model["id"] for model in httpx.get(f"{url}/v1/models", timeout=10).raise_for_status().json()["data"]}
        assert {NEW_MODEL_ID, "default"} <= ids, f"{url}: {ids}"

    # Through the load balancer, `default` is now the new model on whichever replica answers, and both answer.
    num_requests = 6
    before = [_metric(replica, "bitserve_requests_total", model=NEW_MODEL_ID) for replica in cluster.replicas]
    client = _client(cluster)
    for _ in range(num_requests):
        reply = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=4)
        assert reply.model == NEW_MODEL_ID
    increases = _wait_for_total(cluster.replicas, before, num_requests, model=NEW_MODEL_ID)
    assert all(increase > 0 for increase in increases), f"requests on {NEW_MODEL_ID} per replica: {increases}"


@dataclass
class Outcome:
    started_s: float  # monotonic time of the first attempt
    attempts: int
    ok: bool
    error: str = ""  # what the last failed attempt saw


def _request_with_retries(url: str) -> Outcome:
    started_s, error = time.monotonic(), ""
    body = {"model": "default", "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=WAIT_S)
            if response.status_code == 200 and response.json()["choices"][0]["message"]["content"]:
                return Outcome(started_s, attempt, True, error)
            error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    return Outcome(started_s, MAX_ATTEMPTS, False, error)


def test_killing_a_replica_leaves_the_other_serving(cluster: Cluster) -> None:
    survivor, victim = cluster.replicas
    num_requests, num_before_kill = 20, 4
    survivor_before = _metric(survivor, "bitserve_requests_total")
    with ThreadPoolExecutor(max_workers=2) as pool:  # two requests in flight at all times
        futures = [pool.submit(_request_with_retries, cluster.url) for _ in range(num_requests)]
        deadline = time.monotonic() + WAIT_S
        while sum(f.done() for f in futures) < num_before_kill and time.monotonic() < deadline:
            wait(futures, timeout=1, return_when=FIRST_COMPLETED)
        assert sum(f.done() for f in futures) >= num_before_kill, "the requests before the kill did not finish"
        victim.process.send_signal(signal.SIGKILL)
        killed_s = time.monotonic()
        victim.process.wait(10)
        pending = wait(futures, timeout=2 * WAIT_S).not_done
        assert not pending, f"{len(pending)} requests still running {2 * WAIT_S:.0f} s after the kill"
    outcomes = [future.result() for future in futures]
    after_kill = [outcome for outcome in outcomes if outcome.started_s > killed_s]
    assert len(after_kill) >= num_requests // 2, f"only {len(after_kill)} requests started after the kill"
    failed = [outcome for outcome in outcomes if not outcome.ok]
    assert not failed, f"{len(failed)} of {num_requests} requests failed ({len(after_kill)} started after the kill): " \
                       f"{[outcome.error for outcome in failed]}"
    # Client retries would hide a load balancer that passes the dead replica's errors on. nginx itself must retry on
    # the survivor (proxy_next_upstream), so no request sent after the kill sees an error. The requests in flight at
    # the kill may need one more attempt: a response cut off after its header cannot be retried by nginx.
    retried = [outcome for outcome in after_kill if outcome.attempts > 1]
    assert not retried, f"{len(retried)} of {len(after_kill)} requests after the kill saw an error from nginx: " \
                        f"{[outcome.error for outcome in retried]}"
    # The survivor answered every request that started after the kill, and the load balancer still stands.
    increase = _wait_for_total([survivor], [survivor_before], len(after_kill))[0]
    assert increase >= len(after_kill), f"survivor served {increase}, {len(after_kill)} started after the kill"
    assert cluster.nginx.poll() is None, "nginx exited"
    assert httpx.get(f"{survivor.base_url}/ready", timeout=10).status_code == 200
