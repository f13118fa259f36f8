"""Writes a randomly initialised BitNet b1.58 model as a Hugging Face directory in the packed "offline" format of
microsoft/bitnet-b1.58-2B-4T, so the server loads it exactly like the real download (no hub access needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from engine.config import ModelArgs
from engine.formats.safetensors_file import bfloat16_bits, write_safetensors

# Any tokenizer with at most vocab_size tokens serves for load tests; the fixtures carry SmolLM2's (49152 tokens).
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "smollm2" / "tokenizer"


def write_random_bitnet(args: ModelArgs, model_dir: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    model_dir.mkdir(parents=True, exist_ok=True)
    q_out = args.num_heads * args.head_dim
    shapes = {("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + name: shape
              for name, shape in args.linear_shapes.items()}
    norms = {"input_layernorm": args.hidden_size, "post_attention_layernorm": args.hidden_size,
             "self_attn.attn_sub_norm": q_out, "mlp.ffn_sub_norm": args.intermediate_size}
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    embedding = rng.standard_normal((args.vocab_size, args.hidden_size), dtype=np.float32) * np.float32(0.1)
    tensors["model.embed_tokens.weight"] = ("BF16", bfloat16_bits(embedding))
    del embedding
    for layer in range(args.num_layers):
        prefix = f"model.layers.{layer}."
        for name, (out_features, in_features) in shapes.items():
            # Codes 0/1/2 (= T + 1) in four bit pairs, byte [r, c] holding rows r, r+R, r+2R, r+3R (R = out / 4).
            codes = rng.integers(0, 3, size=(4, out_features // 4, in_features), dtype=np.uint8)
            packed = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)  # (out / 4, in) uint8
            tensors[prefix + name + ".weight"] = ("U8", packed)
            scale = np.array([rng.uniform(0.02, 0.06)], dtype=np.float32)
            tensors[prefix + name + ".weight_scale"] = ("BF16", bfloat16_bits(scale))
        for name, size in norms.items():
            tensors[prefix + name + ".weight"] = ("BF16", bfloat16_bits(rng.uniform(0.6, 1.4, size).astype(np.float32)))
    tensors["model.norm.weight"] = ("BF16", bfloat16_bits(np.ones(args.hidden_size, dtype=np.float32)))
    write_safetensors(model_dir / "model.safetensors", tensors)
    config = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings, "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"},
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURE_TOKENIZER / name, model_dir / name)
    return model_dir
