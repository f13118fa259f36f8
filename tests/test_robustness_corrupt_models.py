"""Corrupt model files: every kind of damage is refused with a ModelFormatError naming the file (and the tensor, where
one is at fault), both by engine.load_model and through the admin API of a running server, whose current model keeps
serving all the while.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from engine import load_model
from engine.formats.errors import ModelFormatError
from engine.formats.safetensors_file import read_safetensors, write_safetensors
from tests.gguf_builders import LLAMA, RawTensorSpec, encode, hf_weights, small_file, write_gguf
from tests.server_process import ServerProcess

ADMIN_TOKEN = "corrupt-models-admin-token"
WAIT_S = 60.0
Q_PROJ = "blk.0.attn_q.weight"
HF_Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _llama_gguf(path: Path, drop: str | None = None, replace: dict[str, np.ndarray] | None = None,
                raw: dict[str, tuple[GGMLQuantizationType, np.ndarray]] | None = None, **options: object) -> Path:
    """A tiny Llama GGUF (Q8_0 projections, F32 rest, a gpt2 vocabulary) that loads, unless told otherwise."""
    shape = options.pop("shape", LLAMA)
    weights = hf_weights(shape, np.random.default_rng(0)) | (replace or {})
    weights = {name: weight for name, weight in weights.items() if name != drop and name not in (raw or {})}
    types = {name: GGMLQuantizationType.Q8_0 for name in weights if ".attn_" in name or ".ffn_" in name
             if not name.endswith("norm.weight")}
    metadata = {"tokenizer.ggml.model": "gpt2"} | options.pop("metadata", {})
    write_gguf(path, shape, weights, types, metadata=metadata, raw_tensors=raw)
    return path


def _patched(path: Path, source: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(source.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def _nan_scale_q8_0(path: Path) -> Path:
    blocks = encode(hf_weights(LLAMA, np.random.default_rng(0))[Q_PROJ], GGMLQuantizationType.Q8_0).copy()
    blocks[3, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # a row's first block: d = NaN
    return _llama_gguf(path, raw={Q_PROJ: (GGMLQuantizationType.Q8_0, blocks)})


def _hf_dir(path: Path, fixtures_dir: Path) -> Path:
    shutil.copytree(fixtures_dir / "bitnet" / "A" / "offline", path)
    path.chmod(0o755)
    for file in path.iterdir():
        file.chmod(0o644)
    return path


def _hf_with_tensor(path: Path, fixtures_dir: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    directory = _hf_dir(path, fixtures_dir)
    tensors = {key: (tensor.dtype, np.array(tensor.data)) for key, tensor in
               read_safetensors(directory / "model.safetensors").items()}
    tensors[name] = (tensors[name][0], change(tensors[name][1]))
    write_safetensors(directory / "model.safetensors", tensors)
    return directory


def _hf_with_file(path: Path, fixtures_dir: Path, file: str, change: Callable[[bytes], bytes]) -> Path:
    directory = _hf_dir(path, fixtures_dir)
    (directory / file).write_bytes(change((directory / file).read_bytes()))
    return directory


def _bf16_nan(array: np.ndarray) -> np.ndarray:
    return np.full_like(array, 0x7FC0)  # bf16 quiet NaN


def _code_3(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[0, 0] = 0xFF  # four 2-bit codes of 3: not a ternary value
    return array


def _truncated(path: Path, ok: Path) -> Path:
    path.write_bytes(ok.read_bytes()[:3000])
    return path


def _cut(path: Path, num_bytes: int) -> Path:
    path.write_bytes(path.read_bytes()[:-num_bytes])
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _small(path: Path, **overrides: object) -> Path:
    small_file(path, **overrides)
    return path


def _f32(name: str) -> RawTensorSpec:
    return RawTensorSpec(name, (4,), GGMLQuantizationType.F32, bytes(16))


# kind -> (build(path, ok.gguf, fixtures dir) -> the damaged file or directory, words the error must contain, tensor)
Builder = Callable[[Path, Path, Path], Path]
CORRUPTIONS: dict[str, tuple[Builder, str, str | None]] = {
    "truncated file": (lambda p, ok, f: _truncated(p, ok), "the file ends at 3000", None),
    "zero-length file": (lambda p, ok, f: _empty(p), "not a GGUF file", None),
    "bad magic": (lambda p, ok, f: _patched(p, ok, 0, b"GGUX"), "expected magic b'GGUF'", None),
    "unsupported GGUF version": (lambda p, ok, f: _patched(p, ok, 4, struct.pack("<I", 99)),
                                 "GGUF version 99 is not supported", None),
    "absurd metadata count": (lambda p, ok, f: _patched(p, ok, 16, struct.pack("<Q", 2**60)),
                              "metadata entries", None),
    "unknown metadata value type": (lambda p, ok, f: _small(p, metadata={"x": (99, b"")}),
                                    "unknown value type 99", None),
    "unknown tensor type": (lambda p, ok, f: _small(p, tensors=[RawTensorSpec("a.weight", (2, 32), 99, bytes(68))]),
                            "tensor type 99 is not supported", "a.weight"),
    "tensor data past the end": (lambda p, ok, f: _cut(_small(p), 8), "truncated file or corrupt tensor table",
                                 "b.weight"),
    "duplicate tensor": (lambda p, ok, f: _small(p, tensors=[_f32("a.weight"), _f32("a.weight")]),
                         "appears twice", "a.weight"),
    "wrong tensor shape": (lambda p, ok, f: _llama_gguf(p, replace={Q_PROJ: np.zeros((32, 64), np.float32)}),
                           "expected [64, 64]", Q_PROJ),
    "missing tensor": (lambda p, ok, f: _llama_gguf(p, drop="blk.1.ffn_down.weight"), "missing tensor",
                       "blk.1.ffn_down.weight"),
    "NaN block scale": (lambda p, ok, f: _nan_scale_q8_0(p), "non-finite fp16 block scale in row", Q_PROJ),
    "non-finite metadata": (lambda p, ok, f: _llama_gguf(p, metadata={"llama.rope.freq_base": float("inf")}),
                            "expected a finite number", None),
    "unsupported architecture": (lambda p, ok, f: _llama_gguf(p, shape=dataclasses.replace(LLAMA,
                                                                                            architecture="mamba")),
                                 "architecture 'mamba' is not supported", None),
    "HF config.json not JSON": (lambda p, ok, f: _hf_with_file(p, f, "config.json", lambda b: b[:-20]),
                                "not valid JSON", None),
    "HF unsupported architecture": (lambda p, ok, f: _hf_with_file(
        p, f, "config.json", lambda b: b.replace(b"BitNetForCausalLM", b"MambaForCausalLM")), "is not supported", None),
    "HF safetensors header not JSON": (lambda p, ok, f: _hf_with_file(
        p, f, "model.safetensors", lambda b: b[:8] + b"\xff" + b[9:]), "header is not valid JSON", None),
    "HF safetensors truncated": (lambda p, ok, f: _hf_with_file(p, f, "model.safetensors", lambda b: b[:len(b) // 2]),
                                 "past the end of the file", None),
    "HF ternary code 3": (lambda p, ok, f: _hf_with_tensor(p, f, HF_Q_PROJ, _code_3), "bit pattern 3", HF_Q_PROJ),
    "HF NaN weight_scale": (lambda p, ok, f: _hf_with_tensor(p, f, HF_Q_PROJ + "_scale", _bf16_nan),
                            "must be finite", HF_Q_PROJ + "_scale"),
}


@pytest.fixture(scope="module")
def corrupt_dir(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One damaged model per kind, named after the kind; ok.gguf, the file most of them are cut from, loads."""
    root = tmp_path_factory.mktemp("models")
    ok = _llama_gguf(root / "ok.gguf")
    for kind, (build, _, _) in CORRUPTIONS.items():
        suffix = "" if kind.startswith("HF") else ".gguf"
        build(root / (kind.replace(" ", "-") + suffix), ok, fixtures_dir)
    return root


def _path(corrupt_dir: Path, kind: str) -> Path:
    return corrupt_dir / (kind.replace(" ", "-") + ("" if kind.startswith("HF") else ".gguf"))


def test_the_undamaged_file_loads(corrupt_dir: Path) -> None:
    assert load_model(corrupt_dir / "ok.gguf").args.vocab_size == LLAMA.vocab_size


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_loader_rejects_corrupt_model(corrupt_dir: Path, kind: str) -> None:
    _, words, tensor = CORRUPTIONS[kind]
    path = _path(corrupt_dir, kind)
    with pytest.raises(ModelFormatError) as raised:
        load_model(path)
    message = str(raised.value)
    assert str(path) in message and words in message, message
    if tensor is not None:
        assert f"tensor '{tensor}'" in message, message


@pytest.fixture(scope="module")
def server(default_model_path: Path, corrupt_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(default_model_path, "--models-dir", str(corrupt_dir), "--admin-token", ADMIN_TOKEN,
                            "--max-num-seqs", "4", log_path=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def _traffic(base_url: str, stop: threading.Event, statuses: list[int]) -> None:
    with httpx.Client(base_url=base_url, timeout=WAIT_S) as client:
        while not stop.is_set():
            statuses.append(client.post("/v1/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).status_code)


def test_admin_loads_of_corrupt_models_fail_while_the_old_model_serves(server: ServerProcess,
                                                                       corrupt_dir: Path) -> None:
    admin = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=WAIT_S)
    active = admin.get("/admin/models").json()["active"]
    stop, statuses = threading.Event(), []
    traffic = threading.Thread(target=_traffic, args=(server.base_url, stop, statuses))
    traffic.start()
    messages = {}
    try:
        for index, kind in enumerate(CORRUPTIONS):
            path = _path(corrupt_dir, kind).name
            accepted = admin.post("/admin/models/load", json={"id": f"c{index}", "path": path, "activate": True})
            assert accepted.status_code == 202, (kind, accepted.text)
            deadline = time.monotonic() + WAIT_S
            entry = {"state": "loading"}
            while entry["state"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
                entry = next(m for m in admin.get("/admin/models").json()["data"] if m["id"] == f"c{index}")
            messages[kind] = entry["message"]
            assert entry["state"] == "failed", (kind, entry)
            assert admin.post("/admin/models/unload", json={"id": f"c{index}"}).status_code == 202
            statuses.append(admin.post("/v1/chat/completions", json={  # and right after it, the old model answers
                "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).status_code)
    finally:
        stop.set()
        traffic.join(WAIT_S)
    for kind, message in messages.items():
        _, words, _ = CORRUPTIONS[kind]
        assert message.startswith("ModelFormatError: ") and words in message, (kind, message)
    listing = admin.get("/admin/models").json()
    assert listing["active"] == active and [m["id"] for m in listing["data"]] == [active]
    print(f"\ncorrupt models: {len(messages)} kinds refused through the admin API; {len(statuses)} requests to the "
          f"old model meanwhile, statuses {sorted(set(statuses))}")
    assert len(statuses) >= len(CORRUPTIONS) and set(statuses) == {200}
