"""GGUF reading: the container against gguf.GGUFReader, weights against gguf's reference dequantizers, llama.cpp's
q/k permutation undone, metadata -> ModelArgs, and every malformed file rejected with the file and tensor named."""

from __future__ import annotations

import dataclasses
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ModelArgs
from engine.formats.errors import ModelFormatError
from engine.formats.ggml import GGMLType
from engine.formats.gguf_file import GGUFFile, read_gguf
from engine.formats.gguf_model import decode_i2_s, decode_tq1_0, decode_tq2_0, load_gguf, model_args_from_gguf
from engine.linear.base import Linear
from engine.weights import ModelWeights
from tests.gguf_builders import (
    BITNET,
    LLAMA,
    PROJECTIONS,
    RawTensorSpec,
    TinyShape,
    encode,
    hf_weights,
    i2_s_model,
    pack_i2_s,
    random_q6_k,
    small_file,
    write_gguf,
    write_raw_gguf,
)

# LayerWeights field -> GGUF tensor base name, spelled out here so a wrong entry in the loader's table fails a test.
LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
NORMS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
SUB_NORMS = {"attn_sub_norm": "attn_sub_norm", "ffn_sub_norm": "ffn_sub_norm"}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def all_rows(linear: Linear) -> np.ndarray:
    """Every row of a Linear as float32: (out_features, in_features)."""
    return linear.dequantize_rows(np.arange(linear.out_features, dtype=np.int64))


def roundtrip(weight: np.ndarray, ggml_type: Q) -> np.ndarray:
    """What llama.cpp's reference code reads back after storing `weight` as `ggml_type`."""
    return dequantize(encode(weight, ggml_type), ggml_type).reshape(weight.shape)


def check_layers(model: ModelWeights, expected: dict[str, np.ndarray], rtol: float = 0.0) -> None:
    for i, layer in enumerate(model.layers):
        for field, base in LINEARS.items():
            np.testing.assert_allclose(all_rows(getattr(layer, field)), expected[f"blk.{i}.{base}.weight"],
                                       rtol=rtol, atol=rtol, err_msg=f"layer {i} {field}")
        sub_norms = SUB_NORMS if model.args.architecture == "bitnet" else {}
        for field, base in {**NORMS, **sub_norms}.items():
            np.testing.assert_array_equal(getattr(layer, field), expected[f"blk.{i}.{base}.weight"])
        if model.args.architecture == "llama":
            assert layer.attn_sub_norm is None and layer.ffn_sub_norm is None


def assert_no_view_of_file(model: ModelWeights, gguf_file: GGUFFile) -> None:
    """Loaded weights must own their memory: a file truncated under a live mapping would crash the process."""
    mapping = next(iter(gguf_file.tensors.values())).data
    while isinstance(mapping.base, np.ndarray):
        mapping = mapping.base  # up to the memmap of the whole file
    linears = [model.embedding.table, model.lm_head] + [getattr(layer, f) for layer in model.layers for f in LINEARS]
    arrays = [a for linear in linears for a in vars(linear).values() if isinstance(a, np.ndarray)]
    arrays += [model.final_norm] + [getattr(layer, f) for layer in model.layers for f in NORMS]
    assert arrays and not any(np.may_share_memory(array, mapping) for array in arrays)


# --- weights and the q/k permutation -----------------------------------------------------------------------------

def test_llama_gguf_loads_back_to_hf_layout(tmp_path: Path, rng: np.random.Generator) -> None:
    weights = hf_weights(LLAMA, rng)
    stored = write_gguf(tmp_path / "m.gguf", LLAMA, weights)
    # The file really holds llama.cpp's permuted q/k rows; loading must give the HF rows back exactly.
    assert not np.array_equal(stored["blk.0.attn_q.weight"], weights["blk.0.attn_q.weight"])
    assert not np.array_equal(stored["blk.1.attn_k.weight"], weights["blk.1.attn_k.weight"])
    args, model, _ = load_gguf(tmp_path / "m.gguf")
    check_layers(model, weights)
    np.testing.assert_array_equal(all_rows(model.embedding.table), weights["token_embd.weight"])
    np.testing.assert_array_equal(model.final_norm, weights["output_norm.weight"])
    assert args.tie_word_embeddings and model.lm_head is model.embedding.table


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_block_and_float_types_match_reference_dequantize(tmp_path: Path, rng: np.random.Generator,
                                                          ggml_type: Q) -> None:
    weights = hf_weights(LLAMA, rng)
    weights["output.weight"] = rng.standard_normal((LLAMA.vocab_size, LLAMA.hidden_size)).astype(np.float32)
    quantized = [n for n in weights if n.split(".")[-2] in PROJECTIONS or n.startswith(("token_embd", "output."))]
    write_gguf(tmp_path / "m.gguf", LLAMA, weights, dict.fromkeys(quantized, ggml_type))
    args, model, gguf_file = load_gguf(tmp_path / "m.gguf")
    assert_no_view_of_file(model, gguf_file)
    # Quantization is per row, so dequantize(quantize(permuted W)) is the permuted dequantize(quantize(W)).
    expected = {name: roundtrip(w, ggml_type) if name in quantized else w for name, w in weights.items()}
    check_layers(model, expected, rtol=1e-6)
    np.testing.assert_allclose(all_rows(model.embedding.table), expected["token_embd.weight"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(all_rows(model.lm_head), expected["output.weight"], rtol=1e-6, atol=1e-6)
    assert not args.tie_word_embeddings and model.lm_head is not model.embedding.table


@pytest.mark.parametrize("architecture", ["bitnet", "bitnet-b1.58", "llama"])
@pytest.mark.parametrize("ggml_type", [Q.TQ1_0, Q.TQ2_0], ids=lambda t: t.name)
def test_ternary_block_types_match_reference_dequantize(tmp_path: Path, rng: np.random.Generator, ggml_type: Q,
                                                        architecture: str) -> None:
    shape = dataclasses.replace(BITNET, architecture=architecture)
    weights = hf_weights(shape, rng)
    for name in weights:
        if name.split(".")[-2] in PROJECTIONS:  # ternary times a per-row scale, as a BitNet checkpoint holds
            ternary = rng.choice(np.array([-1, 0, 1], np.float32), size=weights[name].shape, p=[0.35, 0.3, 0.35])
            weights[name] = ternary * rng.uniform(0.01, 0.1, (len(ternary), 1)).astype(np.float32)
    types = {name: ggml_type for name in weights if name.split(".")[-2] in PROJECTIONS} | {"token_embd.weight": Q.F16}
    write_gguf(tmp_path / "m.gguf", shape, weights, types)
    args, model, gguf_file = load_gguf(tmp_path / "m.gguf")
    assert_no_view_of_file(model, gguf_file)
    # Per-row blocks commute with llama's row permutation; bitnet files are not permuted at all.
    expected = {name: roundtrip(w, types.get(name, Q.F32)) for name, w in weights.items()}
    check_layers(model, expected)
    assert args.hidden_act == ("silu" if architecture == "llama" else "relu2")
    np.testing.assert_array_equal(all_rows(model.lm_head), expected["token_embd.weight"])


def test_scale_tensor_multiplies_ternary_weights_and_is_never_ignored(tmp_path: Path,
                                                                      rng: np.random.Generator) -> None:
    weights = hf_weights(BITNET, rng)
    types = {name: Q.TQ2_0 for name in weights if name.split(".")[-2] in PROJECTIONS}
    with_scale = weights | {"blk.0.attn_q.scale": np.array([2.5], np.float32)}
    write_gguf(tmp_path / "ternary.gguf", BITNET, with_scale, types)
    _, model, _ = load_gguf(tmp_path / "ternary.gguf")
    expected = roundtrip(weights["blk.0.attn_q.weight"], Q.TQ2_0) * np.float32(2.5)
    np.testing.assert_array_equal(all_rows(model.layers[0].q_proj), expected)
    write_gguf(tmp_path / "float.gguf", BITNET, with_scale)
    with pytest.raises(ModelFormatError, match="only supported for ternary weights, not F32"):
        load_gguf(tmp_path / "float.gguf")


@pytest.mark.parametrize("ggml_type", [Q.TQ1_0, Q.TQ2_0], ids=lambda t: t.name)
def test_ternary_decoders_match_gguf_on_random_blocks(rng: np.random.Generator, ggml_type: Q) -> None:
    rows, num_blocks = 5, 3
    if ggml_type == Q.TQ1_0:  # every byte value is a valid packing of 5 (or 4) trits
        blocks = rng.integers(0, 256, (rows, num_blocks, 54), dtype=np.uint8)
    else:
        codes = rng.integers(0, 3, (rows, num_blocks, 2, 4, 32), dtype=np.uint8)
        packed = (codes << np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)).sum(axis=3, dtype=np.uint8)
        blocks = np.concatenate([packed.reshape(rows, num_blocks, 64), np.zeros((rows, num_blocks, 2), np.uint8)], 2)
    blocks[..., -2:] = rng.uniform(0.01, 2.0, (rows, num_blocks, 1)).astype("<f2").view(np.uint8)
    raw = blocks.reshape(rows, -1)
    ternary, scales = (decode_tq1_0 if ggml_type == Q.TQ1_0 else decode_tq2_0)(raw)
    assert ternary.dtype == np.int8 and set(np.unique(ternary)) <= {-1, 0, 1}
    np.testing.assert_array_equal(ternary * np.repeat(scales, 256, axis=1), dequantize(raw, ggml_type))
    # And encoding a ternary matrix with gguf's quantizer decodes back to exactly that matrix.
    original = rng.integers(-1, 2, (rows, 512)).astype(np.int8)
    encoded = quantize(original * np.float32(0.5), ggml_type)
    decoded, _ = (decode_tq1_0 if ggml_type == Q.TQ1_0 else decode_tq2_0)(encoded)
    np.testing.assert_array_equal(decoded, original)


def test_tq2_0_code_3_is_rejected_naming_the_tensor(tmp_path: Path, rng: np.random.Generator) -> None:
    weights = hf_weights(BITNET, rng)
    bad = quantize(weights["blk.0.ffn_up.weight"], Q.TQ2_0)
    bad[0, 0] |= 3
    del weights["blk.0.ffn_up.weight"]
    write_gguf(tmp_path / "m.gguf", BITNET, weights, raw_tensors={"blk.0.ffn_up.weight": (Q.TQ2_0, bad)})
    with pytest.raises(ModelFormatError, match=r"blk\.0\.ffn_up\.weight.*code 3"):
        load_gguf(tmp_path / "m.gguf")


def test_q6_k_embedding_is_requantized_within_q8_0_error(tmp_path: Path, rng: np.random.Generator) -> None:
    weights = hf_weights(BITNET, rng)
    del weights["token_embd.weight"]
    head = random_q6_k(rng, BITNET.vocab_size, BITNET.hidden_size)
    write_gguf(tmp_path / "m.gguf", BITNET, weights, raw_tensors={"token_embd.weight": (Q.Q6_K, head)})
    _, model, _ = load_gguf(tmp_path / "m.gguf")
    reference = dequantize(head, Q.Q6_K)  # (vocab, hidden) float32
    loaded = all_rows(model.lm_head)
    assert model.lm_head is model.embedding.table
    # Q8_0: per 32 values, error at most half a step (amax/127) plus the step's own fp16 rounding.
    bound = np.repeat(np.abs(reference).reshape(-1, 32).max(axis=1), 32).reshape(reference.shape) / 127 * 0.6
    assert np.all(np.abs(loaded - reference) <= bound + 1e-7)
    assert not np.array_equal(loaded, reference)  # it really went through 8 bits


def test_i2_s_model_decodes_to_ternary_times_scale(tmp_path: Path, rng: np.random.Generator) -> None:
    ternaries = i2_s_model(tmp_path / "m.gguf", rng)
    args, model, gguf_file = load_gguf(tmp_path / "m.gguf")
    assert gguf_file.tensors["blk.0.attn_q.weight"].ggml_type == GGMLType.I2_S
    assert gguf_file.tensors["blk.0.attn_q.weight"].trailer.size == 32
    for field, base in LINEARS.items():
        ternary, scale = ternaries[f"blk.0.{base}.weight"]
        np.testing.assert_array_equal(all_rows(getattr(model.layers[0], field)), ternary * np.float32(scale))
    assert args.architecture == "bitnet" and args.vocab_size == BITNET.vocab_size and args.rope_theta == 500000.0


def test_decode_i2_s_inverts_bitnet_cpp_packing(rng: np.random.Generator) -> None:
    ternary = rng.integers(-1, 2, (3, 384)).astype(np.int8)
    blob = np.frombuffer(pack_i2_s(ternary, 0.75), np.uint8)
    decoded, scale = decode_i2_s(blob[:-32].reshape(3, 96), blob[-32:], 384)
    np.testing.assert_array_equal(decoded, ternary)
    assert scale == 0.75
    with pytest.raises(ValueError, match="multiple of the I2_S block"):
        decode_i2_s(blob[:-32].reshape(6, 48), blob[-32:], 192)
    with pytest.raises(ValueError, match="code 3"):
        decode_i2_s(np.full((1, 32), 0xFF, np.uint8), blob[-32:], 128)


def test_progress_is_reported_once_per_tensor(tmp_path: Path, rng: np.random.Generator) -> None:
    write_gguf(tmp_path / "m.gguf", LLAMA, hf_weights(LLAMA, rng))
    calls: list[tuple[int, int]] = []
    _, _, gguf_file = load_gguf(tmp_path / "m.gguf", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, len(gguf_file.tensors)) for done in range(1, len(gguf_file.tensors) + 1)]


# --- metadata -> ModelArgs ---------------------------------------------------------------------------------------

def test_model_args_from_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    write_gguf(tmp_path / "m.gguf", LLAMA, hf_weights(LLAMA, rng), metadata={"tokenizer.ggml.eot_token_id": 7})
    assert model_args_from_gguf(read_gguf(tmp_path / "m.gguf")) == ModelArgs(
        architecture="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
        vocab_size=40, rms_norm_eps=float(np.float32(1e-6)), rope_theta=50000.0, max_position_embeddings=256,
        hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2, 7), head_dim=16)


def test_vocab_size_falls_back_to_the_embedding_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    write_gguf(tmp_path / "m.gguf", LLAMA, hf_weights(LLAMA, rng), metadata={"tokenizer.ggml.tokens": None})
    assert model_args_from_gguf(read_gguf(tmp_path / "m.gguf")).vocab_size == LLAMA.vocab_size


# --- the container -----------------------------------------------------------------------------------------------

def assert_matches_gguf_reader(path: Path) -> None:
    ours, reference = read_gguf(path), gguf.GGUFReader(path)
    assert ours.metadata == {name: field.contents() for name, field in reference.fields.items()}
    assert ours.data_offset == reference.data_offset and list(ours.tensors) == [t.name for t in reference.tensors]
    for expected in reference.tensors:
        tensor = ours.tensors[expected.name]
        assert tensor.ggml_type == int(expected.tensor_type)
        assert tensor.shape == tuple(reversed(expected.shape.tolist()))
        assert tensor.data.tobytes() == expected.data.tobytes() and not tensor.data.flags.writeable


def test_reader_matches_gguf_reader(tmp_path: Path, rng: np.random.Generator) -> None:
    weights = hf_weights(LLAMA, rng)
    types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1,
             "blk.0.ffn_up.weight": Q.F16, "blk.0.ffn_gate.weight": Q.BF16}
    metadata = {"x.flag": True, "x.name": "héllo ✓", "x.ints": [1, -2, 3], "x.floats": [0.5, 1.25],
                "x.strings": ["a", "", "✓"], "x.bools": [True, False]}
    write_gguf(tmp_path / "m.gguf", LLAMA, weights, types, metadata=metadata)
    assert_matches_gguf_reader(tmp_path / "m.gguf")


def test_raw_metadata_values_are_plain_python(tmp_path: Path) -> None:
    metadata = {"general.architecture": (V.STRING, "llama"), "u8": (V.UINT8, 255), "i8": (V.INT8, -3),
                "u16": (V.UINT16, 65535), "i16": (V.INT16, -300), "i64": (V.INT64, -(2**40)), "u64": (V.UINT64, 2**63),
                "f64": (V.FLOAT64, 0.1), "f32": (V.FLOAT32, 0.5), "b": (V.BOOL, False),
                "nested": (V.ARRAY, (V.ARRAY, [(V.INT32, [1, 2]), (V.INT32, [])])), "empty": (V.ARRAY, (V.STRING, []))}
    write_raw_gguf(tmp_path / "m.gguf", metadata, [], version=2)
    result = read_gguf(tmp_path / "m.gguf")
    assert {key: result.metadata[key] for key in metadata} == {
        "general.architecture": "llama", "u8": 255, "i8": -3, "u16": 65535, "i16": -300, "i64": -(2**40),
        "u64": 2**63, "f64": 0.1, "f32": 0.5, "b": False, "nested": [[1, 2], []], "empty": []}
    assert result.version == 2 and result.tensors == {}


def test_default_model_reads_and_loads(default_model_path: Path) -> None:
    assert_matches_gguf_reader(default_model_path)
    args, weights, gguf_file = load_gguf(default_model_path)
    assert gguf_file.architecture == "llama" and len(weights.layers) == args.num_layers == 30
    assert (args.hidden_size, args.num_heads, args.num_kv_heads, args.vocab_size) == (576, 9, 3, 49152)
    assert args.tie_word_embeddings and weights.lm_head is weights.embedding.table
    assert Counter(t.ggml_type.name for t in gguf_file.tensors.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


# --- malformed files ---------------------------------------------------------------------------------------------

def test_every_truncation_is_a_model_format_error(tmp_path: Path) -> None:
    small_file(tmp_path / "full.gguf")
    blob = (tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in range(len(blob)):
        cut.write_bytes(blob[:size])
        with pytest.raises(ModelFormatError, match=re.escape(str(cut))):
            read_gguf(cut)


BAD_FILES = {
    "bad magic": (dict(magic=b"GGML"), "not a GGUF file", None),
    "version 1": (dict(version=1), "version 1 is not supported", None),
    "version 4": (dict(version=4), "version 4 is not supported", None),
    "big-endian": (dict(version=3 << 24), "big-endian", None),
    "unknown type id": (dict(tensors=[RawTensorSpec("w.weight", (2, 32), 99, bytes(64))]),
                        r"type 99 is not supported; supported types: F32, F16, .*I2_S", "w.weight"),
    "type ggml knows but we do not": (dict(tensors=[RawTensorSpec("w.weight", (1, 256), 13, bytes(176))]),
                                      r"13 \(Q5_K\) is not supported", "w.weight"),
    "data past the end": (dict(tensors=[RawTensorSpec("w.weight", (64, 64), Q.F32, bytes(100))]),
                          r"needs bytes \[\d+, \d+\) but the file ends at", "w.weight"),
    "misaligned offset": (dict(tensors=[RawTensorSpec("w.weight", (4,), Q.F32, bytes(16), offset=8)]),
                          "not a multiple of the alignment 32", "w.weight"),
    "partial block": (dict(tensors=[RawTensorSpec("w.weight", (2, 40), Q.Q4_0, bytes(46))]),
                      "row length 40 is not a multiple of the Q4_0 block size 32", "w.weight"),
    "five dimensions": (dict(tensors=[RawTensorSpec("w.weight", (1, 1, 1, 1, 4), Q.F32, bytes(16))]),
                        "5 dimensions", "w.weight"),
    "duplicate tensor": (dict(tensors=[RawTensorSpec("w.weight", (4,), Q.F32, bytes(16))] * 2),
                         "appears twice", "w.weight"),
    "bad alignment": (dict(metadata={"general.alignment": (V.UINT32, 24)}), "power of two", None),
    "unknown value type": (dict(metadata={"k": (13, b"")}), "unknown value type 13", None),
    "invalid utf-8": (dict(metadata={"k": (V.STRING, b"\xff\xfe")}), "not valid UTF-8", None),
    "absurd array length": (dict(metadata={"k": (V.ARRAY, (V.UINT8, []))}), None, None),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_container_names_file_and_tensor(tmp_path: Path, case: str) -> None:
    overrides, message, tensor = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    small_file(path, **overrides)
    if case == "absurd array length":  # set the item count of the (empty) array to 2**40
        blob = bytearray(path.read_bytes())
        count_at = 24 + 8 + 1 + 4 + 4  # header, key length, "k", value type, item type
        blob[count_at:count_at + 8] = struct.pack("<Q", 2**40)
        path.write_bytes(bytes(blob))
        message = "corrupt file: 1099511627776 items"
    with pytest.raises(ModelFormatError, match=message) as error:
        read_gguf(path)
    assert str(path) in str(error.value) and error.value.tensor == tensor
    assert tensor is None or f"'{tensor}'" in str(error.value)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 10**6), noise=st.binary(min_size=1, max_size=8))
def test_corrupted_headers_raise_only_model_format_error(tmp_path_factory: pytest.TempPathFactory, position: int,
                                                         noise: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    small_file(path)
    blob = bytearray(path.read_bytes())
    position %= len(blob)
    blob[position:position + len(noise)] = noise
    path.write_bytes(bytes(blob))
    try:
        read_gguf(path)
    except ModelFormatError as error:
        assert str(path) in str(error)


def model_error(path: Path, rng: np.random.Generator, shape: TinyShape = LLAMA, drop: str | None = None,
                replace: dict[str, np.ndarray] | None = None, **kwargs: Any) -> ModelFormatError:
    weights = hf_weights(shape, rng) | (replace or {})
    weights.pop(drop, None)
    write_gguf(path, shape, weights, **kwargs)
    with pytest.raises(ModelFormatError) as error:
        load_gguf(path)
    assert str(path) in str(error.value)
    return error.value


def test_missing_tensor_is_named_with_its_shape(tmp_path: Path, rng: np.random.Generator) -> None:
    error = model_error(tmp_path / "m.gguf", rng, drop="blk.1.ffn_up.weight")
    assert error.tensor == "blk.1.ffn_up.weight" and "missing tensor; expected shape [96, 64]" in str(error)


def test_wrong_shape_names_expected_and_actual(tmp_path: Path, rng: np.random.Generator) -> None:
    error = model_error(tmp_path / "m.gguf", rng, replace={"blk.0.attn_v.weight": np.zeros((16, 64), np.float32)})
    assert error.tensor == "blk.0.attn_v.weight"
    assert "shape [16, 64] (GGUF ne [64, 16]), expected [32, 64]" in str(error)


def test_unsupported_architecture_is_named(tmp_path: Path, rng: np.random.Generator) -> None:
    error = model_error(tmp_path / "m.gguf", rng, shape=dataclasses.replace(LLAMA, architecture="gpt2"))
    assert "architecture 'gpt2' is not supported; supported: llama, bitnet, bitnet-25, bitnet-b1.58" in str(error)


def test_unused_tensor_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    error = model_error(tmp_path / "m.gguf", rng, replace={"rope_freqs.weight": np.ones(8, np.float32)})
    assert error.tensor == "rope_freqs.weight"


def test_quantized_norm_and_missing_metadata_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    error = model_error(tmp_path / "a.gguf", rng, types={"blk.0.ffn_norm.weight": Q.Q8_0})
    assert error.tensor == "blk.0.ffn_norm.weight" and "type Q8_0" in str(error)
    error = model_error(tmp_path / "b.gguf", rng, metadata={"llama.block_count": None})
    assert "missing metadata key 'llama.block_count'" in str(error)
