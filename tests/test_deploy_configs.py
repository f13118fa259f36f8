"""Deployment files checked by the tools that consume them (docker-compose, promtool, nginx), and the Grafana dashboard
checked against the metric names of DESIGN §6. Needs no Docker daemon and no network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.default_model import DEFAULT_MODEL_FILE

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bitserve.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
UPSTREAMS = DEPLOY / "nginx" / "upstreams.conf"

INSTALL_HINT = "install it as .ci/run does (apt-get install -y docker-compose prometheus nginx)"

# DESIGN §6, plus the HTTP status counter of the errors panel and the process collector's RSS.
HISTOGRAMS = {
    "bitserve_time_to_first_token_seconds", "bitserve_inter_token_latency_seconds",
    "bitserve_e2e_request_latency_seconds", "bitserve_request_queue_time_seconds", "bitserve_engine_step_seconds",
    "bitserve_batch_size",
}
COUNTERS = {
    "bitserve_prompt_tokens_total", "bitserve_generation_tokens_total", "bitserve_requests_total",
    "bitserve_model_swaps_total", "bitserve_http_requests_total",
}
GAUGES = {
    "bitserve_num_requests_running", "bitserve_num_requests_waiting", "bitserve_kv_cache_usage_ratio",
    "bitserve_kv_cache_bytes", "bitserve_model_weight_bytes", "process_resident_memory_bytes",
}
SERIES = COUNTERS | GAUGES | {name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

# What Grafana substitutes before a query reaches Prometheus; "All" models is the variable's allValue.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "inf", "nan"}


def _tool(name: str) -> str:
    # nginx lives in /usr/sbin, which a non-root PATH may lack.
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return path


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def _compose(env_file: Path, *files: str, args: tuple[str, ...] = ("config",)) -> subprocess.CompletedProcess[str]:
    cmd = [_tool("docker-compose"), "--project-directory", str(REPO), "--env-file", str(env_file)]
    for file in files:
        cmd += ["-f", str(REPO / file)]
    # The caller's own BITSERVE_*/GRAFANA_* variables would win over the env file and hide a missing one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BITSERVE_", "GRAFANA_", "PROMETHEUS_"))}
    return _run([*cmd, *args], env=env, cwd=REPO)


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    shutil.copy(REPO / ".env.example", path)
    return path


def _services(env_file: Path, *files: str) -> set[str]:
    result = _compose(env_file, *files, args=("config", "--services"))
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_compose_config_is_valid(env_file: Path) -> None:
    result = _compose(env_file, "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    assert "BITSERVE_API_KEYS: replace-with-a-long-random-key" in result.stdout  # secrets come from .env
    assert f"BITSERVE_MODEL: /opt/bitserve/models/{DEFAULT_MODEL_FILE}" in result.stdout
    assert _services(env_file, "docker-compose.yml") == {"bitserve", "prometheus", "grafana"}


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    empty = tmp_path / ".env"
    empty.write_text("")
    result = _compose(empty, "docker-compose.yml")
    assert result.returncode != 0
    assert "BITSERVE_API_KEYS" in result.stderr


def test_compose_scale_override_is_valid(env_file: Path) -> None:
    files = ("docker-compose.yml", "deploy/compose.scale.yml")
    result = _compose(env_file, *files)
    assert result.returncode == 0, result.stderr
    services = _services(env_file, *files)
    replicas = {name for name in services if re.fullmatch(r"bitserve-\d+", name)}
    assert len(replicas) >= 2
    assert {"nginx", "prometheus", "grafana"} <= services
    # Every replica is behind the load balancer, and the load balancer points at no replica that does not exist.
    upstream_hosts = set(re.findall(r"^\s*server\s+([\w.-]+):8000\b", UPSTREAMS.read_text(), re.MULTILINE))
    assert upstream_hosts == replicas
    # nginx.conf's includes resolve next to it, at /etc/nginx/ in the container: compose mounts each one there.
    includes = re.findall(r"^\s*include\s+([\w.-]+);", (DEPLOY / "nginx" / "nginx.conf").read_text(), re.MULTILINE)
    assert "upstreams.conf" in includes
    for name in includes:
        assert f"/deploy/nginx/{name}:/etc/nginx/{name}:ro" in result.stdout, f"compose does not mount {name} for nginx"


def test_default_model_path_is_the_same_everywhere() -> None:
    baked = f"/opt/bitserve/models/{DEFAULT_MODEL_FILE}"
    for path in ("Dockerfile", "docker-compose.yml", "deploy/compose.scale.yml", "deploy/k8s/configmap.yaml"):
        assert baked in (REPO / path).read_text(), f"{path} does not name the baked default model {baked}"


def test_promtool_accepts_prometheus_config() -> None:
    result = _run([_tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_accepts_config(tmp_path: Path) -> None:
    # nginx resolves upstream names when it loads its config, and bitserve-N exist only inside compose's network.
    # So the repo's nginx.conf and listen.conf are tested verbatim, next to the repo's upstreams.conf with its hosts
    # moved to loopback. Every parameter of those `server` lines is still checked.
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    for name in ("nginx.conf", "listen.conf"):
        shutil.copy(DEPLOY / "nginx" / name, conf_dir / name)
    ports = iter(range(18001, 18100))
    (conf_dir / "upstreams.conf").write_text(
        re.sub(r"(server\s+)[\w.-]+:\d+", lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", UPSTREAMS.read_text()))
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    result = _run([_tool("nginx"), "-T", "-p", f"{prefix}/", "-c", str(conf_dir / "nginx.conf"), "-e", "stderr"])
    assert result.returncode == 0, result.stderr
    dump = result.stdout
    for directive in ("least_conn;", "max_fails=", "fail_timeout=", "proxy_buffering off;", "proxy_cache off;",
                      "proxy_http_version 1.1;", "proxy_next_upstream error timeout http_502 http_503",
                      "proxy_read_timeout 600s;", "client_max_body_size 1m;",
                      "listen 8000 default_server;"):  # the container port that compose publishes
        assert directive in dump, f"nginx config lacks {directive!r}"


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels folded inside a collapsed row
    return [p for p in panels if p.get("type") != "row"]


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, label names or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        followed_by = text[match.end():].lstrip()[:1]
        if followed_by != "(" and match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def _substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_dashboard_queries_use_known_metrics_and_parse(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = re.search(r"^\s*uid:\s*(\S+)\s*$", DATASOURCE.read_text(), re.MULTILINE).group(1)
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"model"}

    panels = _panels(dashboard)
    assert panels
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    exprs, used = [], set()
    for panel in panels:
        title = panel.get("title")
        assert panel["type"] in ("timeseries", "stat"), title
        assert panel["datasource"]["uid"] == datasource_uid, title
        assert panel.get("targets"), f"panel {title!r} has no targets"
        for target in panel["targets"]:
            assert target.get("expr"), f"panel {title!r} has a target without expr"
            assert target.get("datasource", panel["datasource"])["uid"] == datasource_uid, title
            names = _metric_names(target["expr"])
            assert names, f"panel {title!r}: no metric in {target['expr']!r}"
            assert names <= SERIES, f"panel {title!r}: unknown metrics {sorted(names - SERIES)}"
            used |= names
            exprs.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            assert variable["datasource"]["uid"] == datasource_uid
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            assert set(re.findall(r"label_values\((\w+)", query)) <= SERIES, query

    # Every metric of §6 is on some panel (histograms through their buckets).
    expected = COUNTERS | GAUGES | {name + "_bucket" for name in HISTOGRAMS}
    assert expected <= used, f"metrics on no panel: {sorted(expected - used)}"

    # promtool parses every query as Prometheus will, once Grafana has substituted its variables.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _substitute(expr)} for i, expr in enumerate(exprs)]}]}
    rules_file = tmp_path / "dashboard_rules.json"  # JSON is YAML, so promtool reads it as a rules file
    rules_file.write_text(json.dumps(rules))
    result = _run([_tool("promtool"), "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr
