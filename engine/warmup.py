"""`python -m engine.warmup`: compile every kernel into NUMBA_CACHE_DIR ahead of time (image build, CI set-up),
so no server start and no request pays for JIT."""

from __future__ import annotations

import sys
import time

from engine.config import KV_CACHE_DTYPES, ModelArgs
from engine.formats.ggml import GGMLType
from engine.linear.calibrate import calibrate_zero_skipping, skipping_down_projections
from engine.linear.head import with_refined_head
from engine.loaded_model import LoadedModel
from engine.random_model import random_model
from engine.weights import ModelWeights

# Small shapes that still take every kernel path: in_features past one 256-weight block, GQA, several tokens, and a
# head_dim (64) that every KV cache mode stores.
_WARMUP_ARGS = ModelArgs(architecture="bitnet", hidden_size=320, num_layers=1, num_heads=4, num_kv_heads=2,
                         intermediate_size=640, vocab_size=256, max_position_embeddings=64, hidden_act="relu2",
                         head_dim=64)


# Past the AMX kernels' token thresholds (engine/kernels/ternary.py AMX_MIN_TOKENS, blockq_amx_rows.py MIN_TOKENS),
# so prefill takes those paths too, and block-quantized matrices are laid out for them before any request.
WARMUP_PROMPT_TOKENS = 56


def warm_up(model: LoadedModel) -> None:
    """Run every kernel shape a request will hit (a long and a short prefill, single-token decodes) once, so JIT or
    cache loading happens here and never inside a request. Where down projections keep sign masks, also time the
    zero-skipping kernel against the dense one and set when to skip (engine/linear/calibrate.py): call this on the
    thread, with the thread count, that will serve the model."""
    num_prompt = max(1, min(WARMUP_PROMPT_TOKENS, model.args.max_position_embeddings - 2))
    model.generate([token % model.args.vocab_size for token in range(num_prompt)], max_new_tokens=2)
    model.generate([token % model.args.vocab_size for token in range(3)], max_new_tokens=2)
    skipping = skipping_down_projections(model.weights)
    if skipping:
        calibrate_zero_skipping(skipping)


def warmup_weights() -> list[ModelWeights]:
    """One tiny model per weight layout the loaders produce."""
    llama_args = ModelArgs(**{**_WARMUP_ARGS.__dict__, "architecture": "llama", "hidden_act": "silu"})
    return [
        random_model(_WARMUP_ARGS, head_type=GGMLType.F32),
        random_model(_WARMUP_ARGS, head_type=GGMLType.Q8_0),
        *(random_model(llama_args, linear_type=kind, head_type=kind)
          for kind in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.F32)),
    ]


def main() -> int:
    start = time.monotonic()
    models = warmup_weights()
    for weights in models:
        warm_up(LoadedModel(with_refined_head(weights), tokenizer=None))
    warm_up(LoadedModel(with_refined_head(models[1], scan="q4_0"), tokenizer=None))  # the Q4_0 head scan's kernel
    for weights in models[:2] + models[3:4]:  # ternary and Q4_1 layers in the a4.8 mode (and its masks)
        warm_up(LoadedModel(with_refined_head(weights), tokenizer=None, activations="a4.8"))
    for dtype in KV_CACHE_DTYPES:  # the KV kernels take every mode's branches at run time; run each once anyway
        LoadedModel(weights, tokenizer=None, kv_cache_dtype=dtype).generate([1, 2, 3, 4, 5], max_new_tokens=3)
    print(f"kernels compiled and cached in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
