"""Every engine through LocalMoE's engine protocol on the GPU reference model, beside raw vLLM.

On the GPU machine:

    python -m bench.engines_gpu --model reference-model [--engines torch,deepspeed,vllm,raw_vllm]
    python -m bench.engines_gpu --model reference-model --engines deepspeed,deepspeed_tp2,vllm_tp2  # 2 GPUs

builds the reference bf16 Mixtral (`localmoe model init --size reference`, 4.76 B) unless it exists,
then runs each engine on 1 × (128 → 256) and 256 × (512 → 256), greedy with EOS ignored (every
request makes exactly 256 tokens); vLLM (which compiles and captures CUDA graphs per shape) once
untimed with the real shapes first, the others warm from their own load(). Prints
output tokens/s, TTFT p50, peak GPU memory and, at batch 1, the fraction of the HBM bound
(measured read bandwidth ÷ bytes of weights one token reads). `raw_vllm` is vLLM's own AsyncLLM
with the same arguments, measured in the same process, the baseline for LocalMoE's vLLM engine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from host.settings import EngineSettings
from moe_build.checkpoint import build_checkpoint, is_checkpoint
from moe_core.choice import Backend
from moe_core.engine import Engine, GenerationRequest, SamplingParams
from workers.engine_setup import construct

WORKLOADS = {"1x(128->256)": (1, 128, 256), "256x(512->256)": (256, 512, 256)}


@dataclass
class Result:
    engine: str
    workload: str
    tokens_per_s: float
    ttft_p50_ms: float
    peak_gib: float
    bound_fraction: float | None = None


def make_prompts(model: Path, n: int, length: int) -> list[str]:
    """n distinct prompts of about `length` tokens, cut from the tokenizer's own training text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f).read_text() for f in ("argparse.py", "typing.py", "inspect.py", "ast.py"))
    ids = tok(text).input_ids
    step = max(1, (len(ids) - length) // max(n, 1))
    return [str(tok.decode(ids[i * step : i * step + length])) for i in range(n)]


class GpuMemory:
    """Peak GPU memory in use on the busiest GPU, sampled from NVML (vLLM allocates in another
    process; a tensor-parallel rank i runs on GPU i)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._hs = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._nvml = pynvml
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = max(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._hs)
            self.peak = max(self.peak, used)
            time.sleep(0.02)

    def __enter__(self) -> GpuMemory:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run_protocol(engine: Engine, prompts: list[str], max_tokens: int) -> tuple[float, float]:
    """→ (output tokens/s, TTFT p50 in ms), all requests added at once."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}-{start}", p, params))
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_unfinished():
        for d in engine.step():
            tokens += len(d.token_ids)
            if d.token_ids and d.request_id not in first:
                first[d.request_id] = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return tokens / elapsed, statistics.median(first.values()) * 1000


def run_raw_vllm(llm: Any, prompts: list[str], max_tokens: int) -> tuple[float, float]:
    from vllm import SamplingParams as VSP
    from vllm.sampling_params import RequestOutputKind

    params = VSP(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(i: int, p: str, start: float) -> tuple[int, float]:
        n, first = 0, 0.0
        async for out in llm.generate(p, params, request_id=f"raw{i}-{start}"):
            if n == 0 and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            n += len(out.outputs[0].token_ids)
        return n, first

    async def all_of() -> tuple[float, float]:
        start = time.perf_counter()
        res = await asyncio.gather(*[one(i, p, start) for i, p in enumerate(prompts)])
        elapsed = time.perf_counter() - start
        return sum(n for n, _ in res) / elapsed, statistics.median(f for _, f in res) * 1000

    result: tuple[float, float] = llm_loop(llm).run_until_complete(all_of())
    return result


_LOOPS: dict[int, Any] = {}


def llm_loop(llm: Any) -> Any:
    """The event loop a raw AsyncLLM lives on (it binds to the loop it first runs in)."""
    return _LOOPS.setdefault(id(llm), asyncio.new_event_loop())


def hbm_read_bandwidth() -> float:
    """Bytes/s: a 4 GiB bf16 tensor summed, best of 10."""
    x = torch.empty(2 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    best = float("inf")
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x.sum()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / 1000)
    del x
    torch.cuda.empty_cache()
    return (4 << 30) / best


def active_bytes_per_token(model: Path) -> int:
    """bf16 bytes of the weights one decode step reads for one token: everything but the input
    embedding table and the experts the router did not pick."""
    c = json.loads((model / "config.json").read_text())
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    e, k, v = c["num_local_experts"], c["num_experts_per_tok"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    attention = h * h * 2 + h * kv * 2
    per_layer = attention + k * 3 * h * i + h * e + 2 * h
    return 2 * (layers * per_layer + v * h + h)


def make_engine(
    name: str, model: Path, batch: int, gpu_share: float = 0.8, tuned_config_dir: Path | None = None
) -> Any:
    """The engine as a worker builds it (workers/engine_setup.py), with this benchmark's settings.
    name: a backend, or deepspeed_tpN / vllm_tpN for tensor parallelism over the first N GPUs."""
    backend, _, tp = name.partition("_tp")
    cfg = EngineSettings(backend=cast(Backend, backend), dtype="bfloat16", max_batch_size=batch)
    cfg.vllm.gpu_memory_utilization, cfg.vllm.max_num_batched_tokens = gpu_share, 16384
    cfg.vllm.tuned_config_dir = tuned_config_dir
    if tp:
        cfg.vllm.tensor_parallel_size = cfg.deepspeed.tensor_parallel_size = int(tp)
    return construct(cast(Backend, backend), model, "cuda", cfg)


def make_raw_vllm(model: Path, batch: int) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model),
        dtype="bfloat16",
        max_num_seqs=batch,
        gpu_memory_utilization=0.8,
        max_num_batched_tokens=16384,
        disable_log_stats=True,
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    llm = AsyncLLM.from_engine_args(args)
    _LOOPS[id(llm)] = loop
    return llm


def bench_engine(name: str, model: Path, bound: float) -> list[Result]:
    results = []
    batch = max(n for n, _, _ in WORKLOADS.values())
    torch.cuda.reset_peak_memory_stats()
    with GpuMemory() as mem:
        t = time.perf_counter()
        engine = make_raw_vllm(model, batch) if name == "raw_vllm" else make_engine(name, model, batch)
        if name != "raw_vllm":
            engine.load()
        print(f"  {name}: loaded in {time.perf_counter() - t:.1f} s", flush=True)
        for workload, (n, plen, out) in WORKLOADS.items():
            prompts = make_prompts(model, n, plen)
            run = run_raw_vllm if name == "raw_vllm" else run_protocol
            if name.startswith(("vllm", "raw_vllm")):  # compile and CUDA graphs: warm up with the real shapes
                run(engine, prompts, out)
            tps, ttft = run(engine, prompts, out)
            frac = tps / bound if n == 1 else None
            results.append(Result(name, workload, tps, ttft, mem.peak / 2**30, frac))
            print(
                f"  {name:10s} {workload:15s} {tps:9.1f} tok/s  TTFT p50 {ttft:8.1f} ms  "
                f"peak {mem.peak / 2**30:6.1f} GiB" + (f"  {frac:.0%} of the HBM bound" if frac else ""),
                flush=True,
            )
    t = time.perf_counter()
    if name == "raw_vllm":
        engine.shutdown()  # AsyncLLM's
    else:
        engine.close()  # the engine protocol's
    print(f"  {name}: closed in {time.perf_counter() - t:.2f} s", flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="built here (reference size) unless present")
    ap.add_argument("--engines", default="torch,deepspeed,vllm,raw_vllm")
    args = ap.parse_args()
    if not is_checkpoint(args.model):
        print(f"[build] the 4.76 B reference Mixtral in {args.model}", flush=True)
        build_checkpoint(args.model, size="reference", vocab_size=32000, progress=True)
    bw = hbm_read_bandwidth()
    active = active_bytes_per_token(args.model)
    bound = bw / active
    print(
        f"HBM read {bw / 1e12:.2f} TB/s; {active / 1e9:.2f} GB read per token"
        f" → batch-1 bound {bound:.0f} tok/s"
    )
    results: list[Result] = []
    for name in args.engines.split(","):
        try:
            results += bench_engine(name, args.model, bound)
        except Exception as e:  # one engine failing must not hide the others' figures
            print(f"  {name}: FAILED: {type(e).__name__}: {e}", flush=True)
    print(json.dumps([r.__dict__ for r in results], indent=1))
    ours = {r.workload: r for r in results if r.engine == "vllm"}
    for r in results:
        if r.engine == "raw_vllm" and r.workload in ours:
            ratio = ours[r.workload].tokens_per_s / r.tokens_per_s
            print(f"LocalMoE vLLM ÷ raw vLLM, {r.workload}: {ratio:.3f} (goal ≥ 0.95)")


if __name__ == "__main__":
    main()
