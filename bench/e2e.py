"""End-to-end decode and prefill speed: tokens/s, weight bytes read per token, RSS, and the split between time in
kernels and time in the Python interpreter. Baselines measured in the same run: the DRAM read bandwidth (so each
speed is also a fraction of its memory-bound floor). Run from the repository root: `python -m bench.e2e --help`.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))

import numpy as np

import engine.model as model_module
from bench.kernels import measure_read_bandwidth_gbs
from engine import load_model
from engine.default_model import pull_default_model
from engine.formats.ggml import GGMLType
from engine.linear.a4_8 import ACTIVATION_MODES
from engine.linear.calibrate import ZERO_FRACTIONS, calibrate_zero_skipping, skipping_down_projections
from engine.linear.head import with_refined_head
from engine.linear.ternary import TernaryLinear
from engine.loaded_model import LoadedModel
from engine.random_model import BITNET_2B4T_ARGS, random_model
from engine.runtime import configure_threads
from engine.weights import ModelWeights

# Peers from PEERS.md, 2 threads, same machine type: (decode tok/s, prefill tok/s at 128 tokens).
PEERS = {
    "bitnet-2b4t-random": {"llama.cpp TQ2_0": (27.97, 54.10), "bitnet.cpp I2_S (Jan 2026)": (27.1, 97.7)},
    "smollm2-135m-q4_1": {"llama.cpp Q4_1": (126.1, 354.4)},
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def weight_bytes_per_token(weights: ModelWeights) -> int:
    """Bytes of weights a decode step reads: the matrices each layer's forward pass calls (the fused q|k|v and
    gate|up where present, not the views of them) and the output head (not the embedding rows)."""
    linears = []
    for layer in weights.layers:
        linears += [layer.qkv_proj] if layer.qkv_proj is not None else [layer.q_proj, layer.k_proj, layer.v_proj]
        linears += [layer.gate_up_proj] if layer.gate_up_proj is not None else [layer.gate_proj, layer.up_proj]
        linears += [layer.o_proj, layer.down_proj]
    # A refined head reads only its scan, a ternary matrix its TL2 layout when it keeps one (a single token's read).
    return sum(linear.bytes_read_per_token for linear in [*linears, weights.lm_head])


class KernelClock:
    """Adds up the wall time spent inside kernel calls (every Linear and the attention kernels) while active."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    @contextmanager
    def measuring(self, weights: ModelWeights) -> Iterator[KernelClock]:
        linears = {weights.lm_head}
        for layer in weights.layers:
            linears |= {layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj, layer.up_proj,
                        layer.down_proj}
        originals = {cls: cls.__call__ for cls in {type(linear) for linear in linears}}
        for cls, call in originals.items():
            cls.__call__ = self.wrap(call)
        attention_kernels = model_module.paged_attention, model_module.write_kv
        model_module.paged_attention = self.wrap(model_module.paged_attention)
        model_module.write_kv = self.wrap(model_module.write_kv)
        try:
            yield self
        finally:
            for cls, call in originals.items():
                cls.__call__ = call
            model_module.paged_attention, model_module.write_kv = attention_kernels


def measure(model: LoadedModel, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.args.vocab_size, size=prompt_tokens)
    model.generate(prompt[:8], max_new_tokens=2)  # warm every kernel shape
    # Prefill as served (and as llama-bench's pp test counts it): the prompt into the KV cache and the logits of its
    # last position, which give the first generated token.
    first_s = min(_timed(lambda: model.generate(prompt, max_new_tokens=1)) for _ in range(repeats))
    # Decode: the time per generated token after the prompt, prompt time subtracted.
    total_s = min(_timed(lambda: model.generate(prompt, max_new_tokens=decode_tokens + 1)) for _ in range(repeats))
    decode_s = (total_s - first_s) / decode_tokens
    clock = KernelClock()
    with clock.measuring(model.weights):
        step_s = _timed(lambda: model.generate(prompt, max_new_tokens=decode_tokens + 1))
        kernel_s = clock.seconds
        clock.seconds = 0.0
        first_step_s = _timed(lambda: model.generate(prompt, max_new_tokens=1))
        kernel_s = (kernel_s - clock.seconds) / decode_tokens
        step_s = (step_s - first_step_s) / decode_tokens
    return {"prefill_tok_s": prompt_tokens / first_s, "decode_tok_s": 1.0 / decode_s,
            "kernel_fraction": kernel_s / step_s, "interpreter_ms": (step_s - kernel_s) * 1e3}


def down_input_zero_fraction(model: LoadedModel, prompt: np.ndarray) -> float | None:
    """Fraction of exact zeros among the int8 inputs of ternary down projections (ReLU² leaves many) over a prompt
    and 8 generated tokens; None for other models."""
    down_ids = {id(layer.down_proj) for layer in model.weights.layers if isinstance(layer.down_proj, TernaryLinear)}
    if not down_ids:
        return None
    counts = np.zeros(2, dtype=np.int64)  # zeros, inputs
    original = TernaryLinear.matmul_quantized

    def counting(self: TernaryLinear, xq: np.ndarray, x_scale: np.ndarray, act_sum: np.ndarray) -> np.ndarray:
        if id(self) in down_ids:
            counts[:] += (np.count_nonzero(xq[:, :self.in_features] == 0), xq.shape[0] * self.in_features)
        return original(self, xq, x_scale, act_sum)

    TernaryLinear.matmul_quantized = counting
    try:
        model.generate(prompt, max_new_tokens=8)
    finally:
        TernaryLinear.matmul_quantized = original
    return counts[0] / counts[1]


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-q4_1", "bitnet-2b4t-random"],
                        choices=list(PEERS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head", choices=["q8_0", "q4_0", "f32"], default="q8_0",
                        help="output head: f32 (random BitNet only), q8_0, or q8_0 scanned in a Q4_0 copy")
    parser.add_argument("--activations", choices=ACTIVATION_MODES, default="a8", help="activation mode (a4_8.py)")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    bandwidth_gbs = measure_read_bandwidth_gbs()
    print(f"threads={threads}  DRAM read bandwidth (same run) = {bandwidth_gbs:.1f} GB/s")
    for name in args.models:
        rss_before = rss_bytes()
        if name == "smollm2-135m-q4_1":
            model = load_model(pull_default_model(), head="q4_0" if args.head == "q4_0" else "auto",
                               activations=args.activations)
        else:
            head = GGMLType.F32 if args.head == "f32" else GGMLType.Q8_0
            weights = random_model(BITNET_2B4T_ARGS, seed=0, head_type=head)
            model = LoadedModel(with_refined_head(weights, scan="q4_0" if args.head == "q4_0" else "q8_0"), None,
                                activations=args.activations)
        skipping = skipping_down_projections(model.weights)
        if skipping:  # as the server's warm-up does: time zero-column skipping here and set when it is used
            calibration = calibrate_zero_skipping(skipping)
            ratios = ", ".join(f"{100 * fraction:.0f}% {skipping_s / dense_s:.2f}x" for fraction, dense_s, skipping_s
                               in zip(ZERO_FRACTIONS, calibration.dense_s, calibration.skipping_s, strict=True))
            print(f"  zero skipping, time against the dense kernel at each zero fraction: {ratios}; skips from "
                  f"{'never' if calibration.threshold is None else f'{100 * calibration.threshold:.0f}% zeros'}")
        result = measure(model, args.prompt_tokens, args.decode_tokens, args.repeats)
        bytes_per_token = weight_bytes_per_token(model.weights)
        floor_tok_s = bandwidth_gbs * 1e9 / bytes_per_token
        print(f"\n{name}: {bytes_per_token / 1e6:.1f} MB of weights read per token, "
              f"RSS +{(rss_bytes() - rss_before) / 1e6:.0f} MB")
        print(f"  decode  {result['decode_tok_s']:7.1f} tok/s  = {result['decode_tok_s'] / floor_tok_s:.2f}x the "
              f"bandwidth floor ({floor_tok_s:.0f} tok/s), {bytes_per_token * result['decode_tok_s'] / 1e9:.1f} GB/s")
        print(f"  prefill {result['prefill_tok_s']:7.1f} tok/s  ({args.prompt_tokens}-token prompt)")
        zero_fraction = down_input_zero_fraction(model, np.arange(3, 3 + args.prompt_tokens))
        if zero_fraction is not None:
            print(f"  down-projection inputs: {100 * zero_fraction:.1f}% exact zeros")
        print(f"  decode step: {100 * result['kernel_fraction']:.0f}% in kernels, "
              f"{result['interpreter_ms']:.2f} ms/token in the interpreter")
        for peer, (decode, prefill) in PEERS[name].items():
            print(f"  vs {peer}: decode {result['decode_tok_s'] / decode:.2f}x, prefill "
                  f"{result['prefill_tok_s'] / prefill:.2f}x (PEERS.md figures)")
        del model


if __name__ == "__main__":
    main()
