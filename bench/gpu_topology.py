"""What NVML says about this box's GPUs, and what one telemetry sample costs.

    python -m bench.gpu_topology [--calls 20]

Prints the topology matrix, the tensor-parallel groups for sizes 1, 2 and 4 (where there are
enough GPUs), gpu_stats() for every GPU, and the mean time of one gpu_stats() call (the worker's
heartbeat makes one a second). Without an NVIDIA driver it prints "no NVIDIA GPU visible".
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from host.gpus import describe, gpu_stats, group_gpus, read_topology, visible_nvml_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20, help="gpu_stats() calls to time")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    topology = read_topology()
    first_s = time.perf_counter() - start  # NVML init, handles, every pair's link
    if topology is None:
        print("no NVIDIA GPU visible")
        return
    print(f"topology of {topology.size} GPU(s), read in {first_s * 1e3:.1f} ms:\n{describe(topology)}\n")
    for size in (1, 2, 4):
        if size <= topology.size:
            groups = group_gpus(topology, size)
            worst = [topology.worst(g).value for g in groups]
            print(f"groups of {size}: {groups}  slowest link inside each: {worst}")
    print(f"CUDA_VISIBLE_DEVICES as NVML indices: {visible_nvml_indices()} (None: unset, every GPU)\n")

    for stats in gpu_stats():
        print(stats.model_dump_json())
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        gpu_stats()
        times.append(time.perf_counter() - start)
    print(
        f"\ngpu_stats() over {topology.size} GPU(s): mean {statistics.mean(times) * 1e3:.3f} ms, "
        f"max {max(times) * 1e3:.3f} ms over {args.calls} calls"
    )


if __name__ == "__main__":
    main()
