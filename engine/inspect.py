"""`bitserve info`: a model file's architecture, shape, tensor types and byte counts, without loading its weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from engine.formats.gguf_file import read_gguf
from engine.formats.hf_model import model_args_from_hf, read_hf_config
from engine.formats.safetensors_file import read_safetensors


def describe_model(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    counts: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    lines = [f"path: {path}"]
    if path.is_dir():
        config = read_hf_config(path)
        args = model_args_from_hf(config, path / "config.json")
        quant = config.get("quantization_config") or {}
        lines.append(f"format: Hugging Face safetensors ({quant.get('quantization_mode', 'float')}"
                     f"{', ' + quant['linear_class'] if 'linear_class' in quant else ''})")
        for file in sorted(path.glob("*.safetensors")):
            for tensor in read_safetensors(file).values():
                counts[tensor.dtype] += 1
                type_bytes[tensor.dtype] += tensor.data.nbytes
    else:
        gguf = read_gguf(path)
        from engine.formats.gguf_model import model_args_from_gguf

        args = model_args_from_gguf(gguf)
        lines.append(f"format: GGUF v{gguf.metadata.get('GGUF.version', '?')}, "
                     f"name {gguf.metadata.get('general.name', '?')!r}")
        for tensor in gguf.tensors.values():
            counts[tensor.ggml_type.name] += 1
            type_bytes[tensor.ggml_type.name] += tensor.data.nbytes
    lines.append(f"architecture: {args.architecture}")
    lines.append(f"layers: {args.num_layers}  hidden: {args.hidden_size}  ffn: {args.intermediate_size}  "
                 f"heads: {args.num_heads}/{args.num_kv_heads} (head_dim {args.head_dim})  vocab: {args.vocab_size}")
    lines.append(f"context: {args.max_position_embeddings}  rope_theta: {args.rope_theta:g}  act: {args.hidden_act}  "
                 f"tied embeddings: {args.tie_word_embeddings}")
    lines.append("tensors:")
    for type_name, count in sorted(counts.items(), key=lambda item: -type_bytes[item[0]]):
        lines.append(f"  {type_name:6s} {count:5d} tensors  {type_bytes[type_name]:>14,d} bytes")
    lines.append(f"  total  {sum(counts.values()):5d} tensors  {sum(type_bytes.values()):>14,d} bytes")
    return "\n".join(lines)
