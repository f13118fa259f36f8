"""Hugging Face model directories (config.json + model.safetensors): BitNet b1.58 packed or bf16, and float Llama.

Maps HF tensor names onto engine weights and repacks ternary matrices into the kernel layout; never runs model code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelArgs
from engine.formats.errors import ModelFormatError
from engine.formats.safetensors_file import SafeTensor, read_safetensors
from engine.linear.base import Linear
from engine.linear.dense import DenseLinear
from engine.linear.ternary import TernaryLinear
from engine.weights import Embedding, LayerWeights, ModelWeights

SUPPORTED_ARCHITECTURES = {"BitNetForCausalLM": "bitnet", "LlamaForCausalLM": "llama"}

# LayerWeights field -> HF tensor name inside `model.layers.{i}.`
_LINEAR_NAMES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_NORM_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(model_dir, "no config.json: expected a Hugging Face model directory or a .gguf file")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(config_path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(config_path, "expected a JSON object")
    return config


def model_args_from_hf(config: dict[str, Any], config_path: Path) -> ModelArgs:
    architectures = config.get("architectures") or []
    architecture = next((SUPPORTED_ARCHITECTURES[a] for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise ModelFormatError(
            config_path,
            f"architectures {architectures} (model_type {config.get('model_type')!r}) is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    try:
        return ModelArgs(
            architecture=architecture,
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            hidden_act="relu2" if config.get("hidden_act", "silu") == "relu2" else "silu",
            tie_word_embeddings=config.get("tie_word_embeddings", architecture == "bitnet"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            head_dim=config.get("head_dim") or 0,
        )
    except KeyError as exc:
        raise ModelFormatError(config_path, f"missing required key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(config_path, str(exc)) from None


def load_hf(model_dir: str | Path, progress: Callable[[int, int], None] | None = None) -> ModelWeights:
    model_dir = Path(model_dir)
    config = read_hf_config(model_dir)
    args = model_args_from_hf(config, model_dir / "config.json")
    quant = config.get("quantization_config") or {}
    if args.architecture == "bitnet" and quant.get("quant_method", "bitnet") != "bitnet":
        raise ModelFormatError(model_dir / "config.json",
                               f"quant_method {quant.get('quant_method')!r}; expected 'bitnet'")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(model_dir, "no *.safetensors weights file")
    tensors: dict[str, SafeTensor] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    reader = _HFReader(files[0] if len(files) == 1 else model_dir, tensors, args, quant)
    return reader.read(progress)


class _HFReader:
    def __init__(self, path: Path, tensors: dict[str, SafeTensor], args: ModelArgs, quant: dict[str, Any]) -> None:
        self.path = path
        self.tensors = tensors
        self.args = args
        self.offline = quant.get("quantization_mode", "offline") == "offline"
        # `autobitlinear` multiplies the output by weight_scale; `bitlinear` divides by it.
        self.divide_scale = quant.get("linear_class", "autobitlinear") == "bitlinear"

    def read(self, progress: Callable[[int, int], None] | None) -> ModelWeights:
        args = self.args
        embed = DenseLinear(self._float("model.embed_tokens.weight", (args.vocab_size, args.hidden_size)))
        layers = []
        for i in range(args.num_layers):
            layers.append(self._layer(i))
            if progress:
                progress(i + 1, args.num_layers)
        if args.tie_word_embeddings or "lm_head.weight" not in self.tensors:
            lm_head: Linear = embed
        else:
            lm_head = DenseLinear(self._float("lm_head.weight", (args.vocab_size, args.hidden_size)))
        final_norm = self._float("model.norm.weight", (args.hidden_size,))
        return ModelWeights(args, Embedding(embed), layers, final_norm, lm_head)

    def _layer(self, i: int) -> LayerWeights:
        args = self.args
        q_out = args.num_heads * args.head_dim
        shapes = args.linear_shapes
        prefix = f"model.layers.{i}."
        fields: dict[str, Any] = {
            field: self._linear(prefix + name + ".weight", shapes[field]) for field, name in _LINEAR_NAMES.items()
        }
        norm_sizes = {"attn_norm": args.hidden_size, "ffn_norm": args.hidden_size,
                      "attn_sub_norm": q_out, "ffn_sub_norm": args.intermediate_size}
        for field, name in _NORM_NAMES.items():
            if field.endswith("sub_norm") and args.architecture != "bitnet":
                continue
            fields[field] = self._float(prefix + name + ".weight", (norm_sizes[field],))
        return LayerWeights(**fields)

    def _tensor(self, name: str) -> SafeTensor:
        if name not in self.tensors:
            raise ModelFormatError(self.path, "missing tensor", name)
        return self.tensors[name]

    def _float(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        tensor = self._tensor(name)
        if tensor.shape != shape:
            raise ModelFormatError(self.path, f"shape {list(tensor.shape)}, expected {list(shape)}", name)
        if tensor.dtype not in ("F32", "F16", "BF16"):
            raise ModelFormatError(self.path, f"dtype {tensor.dtype}, expected a float type", name)
        return np.ascontiguousarray(tensor.to_float32())

    def _linear(self, name: str, shape: tuple[int, int]) -> Linear:
        if self.args.architecture != "bitnet":
            return DenseLinear(self._float(name, shape))
        if not self.offline:
            return _ternarize_absmean(self._float(name, shape))
        packed = self._tensor(name)
        out_features, in_features = shape
        expected = (out_features // 4, in_features)
        if packed.dtype != "U8" or packed.shape != expected or out_features % 4:
            raise ModelFormatError(self.path, f"{packed.dtype} {list(packed.shape)}, expected packed ternary U8 "
                                              f"{list(expected)} for a {out_features}x{in_features} matrix", name)
        scale_name = name + "_scale"
        stored_scale = float(self._float(scale_name, (1,))[0])
        if not np.isfinite(stored_scale) or stored_scale <= 0:
            raise ModelFormatError(self.path, f"weight_scale {stored_scale} must be finite and positive", scale_name)
        ternary = unpack_hf_ternary(np.asarray(packed.data))
        if (ternary > 1).any():
            raise ModelFormatError(self.path, "bit pattern 3 found; packed ternary codes must be 0, 1 or 2", name)
        weight_scale = float(np.float32(1.0) / np.float32(stored_scale)) if self.divide_scale else stored_scale
        return TernaryLinear.from_ternary(ternary, weight_scale=weight_scale)


def unpack_hf_ternary(packed: np.ndarray) -> np.ndarray:
    """packed: (out/4, in) uint8, bit pair i of byte [r, c] holds T[i*R + r, c] + 1 -> (out, in) int8 in {-1,0,1}.

    Returns values up to 2 if the (invalid) bit pattern 3 occurs, so the caller can reject the file.
    """
    rows = packed.shape[0]
    ternary = np.empty((4 * rows, packed.shape[1]), dtype=np.int8)  # (out_features, in_features) int8
    for i in range(4):
        ternary[i * rows:(i + 1) * rows] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    return ternary


def _ternarize_absmean(weight: np.ndarray) -> TernaryLinear:
    """BitNet b1.58 absmean quantization of a master weight: T = clamp(round(W / mean|W|), -1, 1), scale mean|W|."""
    absmean = np.float32(max(np.abs(weight, dtype=np.float32).mean(dtype=np.float32), np.float32(1e-5)))
    ternary = np.clip(np.rint(weight * (np.float32(1.0) / absmean)), -1, 1).astype(np.int8)
    return TernaryLinear.from_ternary(ternary, weight_scale=float(absmean))
