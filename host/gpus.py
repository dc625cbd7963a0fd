"""This box's GPUs through NVML: what each is doing (telemetry) and how they are wired (topology).

Indices here are NVML's device indices: PCI bus order, the numbers `nvidia-smi` shows. NVML ignores
CUDA_VISIBLE_DEVICES, so a worker pinned with CUDA_VISIBLE_DEVICES="2" (which CUDA calls device 0)
reports `gpu_stats(visible_nvml_indices())`: physical GPU 2. CUDA numbers integer entries in
CUDA_DEVICE_ORDER, FASTEST_FIRST by default; that agrees with PCI bus order on a box of identical
GPUs, and CUDA_DEVICE_ORDER=PCI_BUS_ID makes it agree on any box. GPU-UUID entries are exact.

Without NVML (no driver, no GPU) every reader answers "absent" ([] or None) and never raises.
NVML is initialised once per process, on first use, and never shut down.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import combinations
from typing import Any, TypeVar

import pynvml
from pydantic import BaseModel, Field, model_validator

log = logging.getLogger(__name__)
T = TypeVar("T")

# -- NVML, once per process ------------------------------------------------------------------------

_lock = threading.Lock()
_ready: bool | None = None  # None: not tried yet; False: no NVML in this process (not retried)


@dataclass(frozen=True)
class _Device:
    handle: Any  # pynvml's c_nvmlDevice_t
    name: str | None
    uuid: str | None


# NVML index -> handle and the fields that never change. Two threads may both fill an entry: same value.
_devices: dict[int, _Device] = {}


def nvml_ready() -> bool:
    """Whether NVML answers in this process; the first call initialises it (thread-safe)."""
    global _ready
    if _ready is None:
        with _lock:
            if _ready is None:
                try:
                    pynvml.nvmlInit()
                    _ready = True
                except pynvml.NVMLError as e:  # no driver or no library: a CPU box
                    log.info("NVML unavailable (%s): no GPU telemetry or topology", e)
                    _ready = False
    return bool(_ready)


def _get(fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args), or None where NVML cannot give it (not supported on this GPU, no permission...)."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _count() -> int:
    return (_get(pynvml.nvmlDeviceGetCount) or 0) if nvml_ready() else 0


def _device(index: int) -> _Device | None:
    if index not in _devices:
        handle = _get(pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return None
        name = _get(pynvml.nvmlDeviceGetName, handle)
        _devices[index] = _Device(handle, name, _get(pynvml.nvmlDeviceGetUUID, handle))
    return _devices[index]


# -- telemetry -------------------------------------------------------------------------------------

# nvml.h's nvmlClocksEventReason* bits (formerly nvmlClocksThrottleReason*): why clocks are below max.
CLOCK_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}


def decode_clock_reasons(mask: int, *, include_idle: bool = False) -> list[str]:
    """Names of the bits set in an NVML clocks-event mask, lowest bit first; an unknown bit reads
    "unknown_0x…". gpu_idle is left out unless asked for: it is set whenever no kernel runs, is
    not a throttle, and the utilization already says so."""
    names = []
    for bit in (1 << i for i in range(mask.bit_length())):
        if mask & bit and (bit != 0x001 or include_idle):
            names.append(CLOCK_REASONS.get(bit, f"unknown_{bit:#x}"))
    return names


def _clock_reasons(handle: Any) -> int | None:
    try:
        return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    except pynvml.NVMLError_FunctionNotFound:  # drivers before 535 have only the older name
        return _get(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
    except pynvml.NVMLError:
        return None


class GpuStats(BaseModel):
    """One GPU, sampled now. A field NVML cannot give on this GPU is None."""

    index: int = Field(description="NVML device index (nvidia-smi's), not the CUDA ordinal")
    name: str | None = None
    uuid: str | None = None
    utilization_pct: int | None = Field(None, description="% of the last sample period a kernel ran")
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = Field(None, description="The enforced power limit")
    throttle_reasons: list[str] | None = Field(
        None, description="Why clocks are below max (decode_clock_reasons; gpu_idle left out)"
    )


def _stats(index: int, dev: _Device) -> GpuStats:
    h = dev.handle
    util = _get(pynvml.nvmlDeviceGetUtilizationRates, h)
    mem = _get(pynvml.nvmlDeviceGetMemoryInfo, h)
    power_mw = _get(pynvml.nvmlDeviceGetPowerUsage, h)
    limit_mw = _get(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
    reasons = _clock_reasons(h)
    return GpuStats(
        index=index,
        name=dev.name,
        uuid=dev.uuid,
        utilization_pct=None if util is None else util.gpu,
        memory_used_bytes=None if mem is None else mem.used,
        memory_total_bytes=None if mem is None else mem.total,
        temperature_c=_get(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
        power_w=None if power_mw is None else power_mw / 1000,
        power_limit_w=None if limit_mw is None else limit_mw / 1000,
        throttle_reasons=None if reasons is None else decode_clock_reasons(reasons),
    )


def gpu_stats(indices: list[int] | None = None) -> list[GpuStats]:
    """Every GPU's stats (indices None) or those of these NVML indices, in the order given; an index
    NVML does not know is skipped. [] without NVML. Cheap enough for once a second: after the
    first call (NVML init, handles, name and UUID cached) it is six NVML queries per GPU."""
    if indices == []:  # a worker that sees no GPU: NVML is not even started
        return []
    n = _count()
    wanted = range(n) if indices is None else [i for i in indices if 0 <= i < n]
    return [_stats(i, dev) for i in wanted if (dev := _device(i)) is not None]


def nvml_index(entry: str, uuids: Sequence[str] | None) -> int | None:
    """The NVML index one CUDA_VISIBLE_DEVICES entry names: an integer (checked against the device
    count when uuids are known), or a GPU UUID or a unique prefix of one ("GPU-5f2c"); None for
    anything else (MIG-…, unknown UUIDs, negatives)."""
    entry = entry.strip()
    if entry.isdigit():
        return int(entry) if uuids is None or int(entry) < len(uuids) else None
    if not entry.startswith("GPU-") or uuids is None:
        return None
    hits = [i for i, u in enumerate(uuids) if u.startswith(entry)]
    return hits[0] if len(hits) == 1 else None


def parse_visible_devices(value: str, uuids: Sequence[str] | None) -> list[int]:
    """NVML indices of a CUDA_VISIBLE_DEVICES value, in its order. Like CUDA, the list ends at the
    first entry that names no GPU; a repeated GPU ends it too. uuids[i] is NVML device i's UUID
    (None: not known, so only integer entries can be read)."""
    out: list[int] = []
    for entry in value.split(","):
        index = nvml_index(entry, uuids)
        if index is None or index in out:
            break
        out.append(index)
    return out


def visible_nvml_indices() -> list[int] | None:
    """NVML indices of the GPUs CUDA_VISIBLE_DEVICES lets this process see; None when it is unset
    (every GPU), [] when it is empty."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return parse_visible_devices(value, _uuids() if "GPU-" in value else None)


def _uuids() -> list[str] | None:
    devs = [_device(i) for i in range(_count())]
    return [d.uuid or "" for d in devs if d is not None] if devs and None not in devs else None


# -- topology --------------------------------------------------------------------------------------


class Link(StrEnum):
    """How two GPUs reach each other, best first; the values are `nvidia-smi topo -m`'s labels."""

    SELF = "X"
    NVLINK = "NV"  # peer-to-peer over NVLink: a bridge, or NVSwitch
    INTERNAL = "INT"  # NVML_TOPOLOGY_INTERNAL: two GPUs on one board
    PIX = "PIX"  # NVML_TOPOLOGY_SINGLE: one PCIe switch
    PXB = "PXB"  # NVML_TOPOLOGY_MULTIPLE: several PCIe switches, no host bridge
    PHB = "PHB"  # NVML_TOPOLOGY_HOSTBRIDGE: through a CPU's PCIe host bridge
    NODE = "NODE"  # NVML_TOPOLOGY_NODE: between host bridges of one NUMA node
    SYS = "SYS"  # NVML_TOPOLOGY_SYSTEM: across NUMA nodes, over the CPU interconnect

    @property
    def rank(self) -> int:
        """0 for SELF, larger is slower."""
        return list(Link).index(self)


_NVML_LEVEL = {0: Link.INTERNAL, 10: Link.PIX, 20: Link.PXB, 30: Link.PHB, 40: Link.NODE, 50: Link.SYS}


class Topology(BaseModel):
    """The GPUs of one box by NVML index: names[i], uuids[i] and links[i][j] (N×N, symmetric,
    X on the diagonal). Stored as JSON (model_dump_json / model_validate_json)."""

    names: list[str]
    uuids: list[str]
    links: list[list[Link]]

    @model_validator(mode="after")
    def _square(self) -> Topology:
        n = len(self.names)
        if len(self.uuids) != n or len(self.links) != n or any(len(row) != n for row in self.links):
            raise ValueError(f"a topology of {n} GPUs needs {n} uuids and an {n}×{n} links matrix")
        for a in range(n):
            for b in range(n):
                if (self.links[a][b] == Link.SELF) != (a == b) or self.links[a][b] != self.links[b][a]:
                    raise ValueError(f"links[{a}][{b}] breaks symmetry or the X diagonal")
        return self

    @property
    def size(self) -> int:
        return len(self.names)

    def worst(self, group: Sequence[int]) -> Link:
        """The slowest link inside a group (SELF for one GPU)."""
        return max((self.links[a][b] for a in group for b in group), key=lambda link: link.rank)


def read_topology() -> Topology | None:
    """Every NVML GPU and the link between each pair: NVLINK where NVML reports peer-to-peer over
    NVLink (works through NVSwitch too; GPUs without NVLink, like the L40S, just answer no), else
    the PCIe common ancestor; SYS where NVML cannot say. None without NVML or GPUs."""
    found = [_device(i) for i in range(_count())]
    devs = [d for d in found if d is not None]
    if not devs or len(devs) < len(found):
        return None
    n = len(devs)
    links = [[Link.SELF] * n for _ in range(n)]
    for a, b in combinations(range(n), 2):
        ha, hb = devs[a].handle, devs[b].handle
        p2p = _get(pynvml.nvmlDeviceGetP2PStatus, ha, hb, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
        level = _get(pynvml.nvmlDeviceGetTopologyCommonAncestor, ha, hb)
        if p2p == pynvml.NVML_P2P_STATUS_OK:
            links[a][b] = links[b][a] = Link.NVLINK
        else:
            links[a][b] = links[b][a] = Link.SYS if level is None else _NVML_LEVEL.get(level, Link.SYS)
    names = [d.name or "?" for d in devs]
    return Topology(names=names, uuids=[d.uuid or "" for d in devs], links=links)


def describe(topology: Topology) -> str:
    """A matrix like `nvidia-smi topo -m`, one row per GPU ending in its name, then a legend."""
    n = topology.size
    head = " " * 6 + "".join(f"{'GPU' + str(b):>6}" for b in range(n))
    cells = ["".join(f"{link.value:>6}" for link in row) for row in topology.links]
    rows = [f"{'GPU' + str(a):<6}{cells[a]}   {topology.names[a]}" for a in range(n)]
    legend = (
        "X self, NV NVLink, INT one board, PIX one PCIe switch, PXB several PCIe switches, "
        "PHB a CPU host bridge, NODE host bridges of one NUMA node, SYS across NUMA nodes"
    )
    return "\n".join([head, *rows, legend])


# -- grouping for tensor parallelism ---------------------------------------------------------------

EXHAUSTIVE_MAX = 8  # GPUs up to which group_gpus tries every partition (105 for 8 in pairs)


def group_gpus(topology: Topology, group_size: int, gpus: list[int] | None = None) -> list[list[int]]:
    """Split the GPUs (all of the topology's, or these NVML indices) into groups of group_size for
    tensor-parallel engines, so that the worst link inside any group is as good as it can be; ties
    go to better second-worst groups, then fewer slow links, then lower indices (deterministic).

    Returns full groups only, each sorted, ordered by first GPU. When the count is not a multiple of
    group_size, the len % group_size GPUs whose absence leaves the best groups are in no group (a
    warning names them). Every partition is tried up to EXHAUSTIVE_MAX GPUs, a greedy search above.
    Raises ValueError for group_size < 1, fewer GPUs than group_size, or unknown/repeated indices.
    """
    pool = sorted(range(topology.size) if gpus is None else gpus)
    if group_size < 1 or len(pool) < group_size:
        raise ValueError(f"cannot make groups of {group_size} from GPUs {pool}")
    if len(set(pool)) != len(pool) or not all(0 <= g < topology.size for g in pool):
        raise ValueError(f"GPUs {pool} must be distinct indices below {topology.size}")
    if group_size == 1:
        groups = [[g] for g in pool]
    elif len(pool) <= EXHAUSTIVE_MAX:
        spare = len(pool) % group_size
        groups = min(_partitions(pool, group_size, spare), key=lambda p: _cost(topology, p))
    else:
        groups = _greedy(topology, pool, group_size)
    left = sorted(set(pool).difference(*groups))
    if left:
        log.warning("GPUs %s form no full group of %d and stay unused", left, group_size)
    return groups


def _cost(topology: Topology, groups: list[list[int]]) -> tuple[Any, ...]:
    worst = sorted((topology.worst(g).rank for g in groups), reverse=True)  # worst group first
    pairs = sum(topology.links[a][b].rank for g in groups for a, b in combinations(g, 2))
    return worst, pairs, groups


def _partitions(pool: list[int], size: int, spare: int) -> Iterator[list[list[int]]]:
    """Every way to cut sorted pool into groups of size leaving out spare GPUs; each group sorted,
    groups ordered by first GPU. Invariant: (len(pool) - spare) % size == 0."""
    if len(pool) == spare:
        yield []
        return
    first, rest = pool[0], pool[1:]
    for mates in combinations(rest, size - 1):
        remaining = [g for g in rest if g not in mates]
        for tail in _partitions(remaining, size, spare):
            yield [[first, *mates], *tail]
    if spare:
        yield from _partitions(rest, size, spare - 1)  # first left out


def _greedy(topology: Topology, pool: list[int], size: int) -> list[list[int]]:
    """Repeatedly take the best group grown from any free GPU by adding the closest free GPU."""
    free, groups = list(pool), []
    while len(free) >= size:
        best = min((_grow(topology, seed, free, size) for seed in free), key=lambda g: _cost(topology, [g]))
        groups.append(best)
        free = [g for g in free if g not in best]
    return sorted(groups)


def _grow(topology: Topology, seed: int, free: list[int], size: int) -> list[int]:
    group = [seed]
    while len(group) < size:
        ranks = {g: [topology.links[g][m].rank for m in group] for g in free if g not in group}
        group.append(min(ranks, key=lambda g: (max(ranks[g]), sum(ranks[g]), g)))
    return sorted(group)
