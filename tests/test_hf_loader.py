"""Hugging Face directory loading: bad configs and broken safetensors files fail with the file and tensor named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.formats.errors import ModelFormatError
from engine.formats.hf_model import unpack_hf_ternary
from engine.formats.safetensors_file import read_safetensors, write_safetensors

_DTYPE_NAMES = {"|u1": "U8", "<f4": "F32"}


@pytest.fixture
def model_c(tmp_path: Path, fixtures_dir: Path) -> Path:
    target = tmp_path / "C"
    shutil.copytree(fixtures_dir / "bitnet" / "C" / "offline", target)
    return target


def _rewrite(model_dir: Path, edit: Callable[[dict[str, np.ndarray]], object]) -> None:
    """Rewrite model.safetensors with `edit` applied to its tensors; bf16 tensors keep their dtype (as raw bits)."""
    path = model_dir / "model.safetensors"
    stored = read_safetensors(path)
    tensors = {name: np.array(t.data) for name, t in stored.items()}
    edit(tensors)
    write_safetensors(path, {name: (stored[name].dtype if name in stored and array.dtype == np.uint16
                                    else _DTYPE_NAMES[array.dtype.str], array) for name, array in tensors.items()})


def test_unpack_matches_documented_layout() -> None:
    rng = np.random.default_rng(0)
    ternary = rng.integers(-1, 2, size=(8, 5)).astype(np.int8)
    rows = ternary.shape[0] // 4
    packed = np.zeros((rows, 5), dtype=np.uint8)
    for i in range(4):  # bit pair i holds output rows [i*R, (i+1)*R)
        packed |= ((ternary[i * rows:(i + 1) * rows] + 1).astype(np.uint8) << (2 * i))
    np.testing.assert_array_equal(unpack_hf_ternary(packed), ternary)


def test_unsupported_architecture(model_c: Path) -> None:
    config = json.loads((model_c / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (model_c / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"config.json.*GPT2LMHeadModel.*supported: BitNetForCausalLM"):
        load_model(model_c)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"no config\.json"):
        load_model(tmp_path)


def test_missing_tensor(model_c: Path) -> None:
    _rewrite(model_c, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelFormatError, match=r"model.safetensors, tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(model_c)


def test_mismatched_shape(model_c: Path) -> None:
    def shrink(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:, :100]

    _rewrite(model_c, shrink)
    with pytest.raises(ModelFormatError, match=r"k_proj.weight'.*\[48, 100\], expected packed ternary U8 \[48, 192\]"):
        load_model(model_c)


def test_bad_scale(model_c: Path) -> None:
    def zero_scale(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.layers.0.mlp.down_proj.weight_scale"] = np.zeros(1, dtype=np.float32)

    _rewrite(model_c, zero_scale)
    with pytest.raises(ModelFormatError, match=r"down_proj\.weight_scale.*finite and positive"):
        load_model(model_c)


def test_truncated_file(model_c: Path) -> None:
    weights = model_c / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"model.safetensors, tensor '.*past the end of the file"):
        load_model(model_c)


def test_garbage_header(model_c: Path) -> None:
    (model_c / "model.safetensors").write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: header length"):
        load_model(model_c)
