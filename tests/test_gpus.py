"""GPU telemetry, topology and tensor-parallel grouping, without a GPU.

The topologies under tests/data are in read_topology's JSON format, written by hand for boxes we
have not recorded yet: 4×L40S with two GPUs per PCIe switch and the pairs on different sockets
(SYS across, no NVLink), and 8×A100 PCIe whose NVLink bridges join GPUs under different switches.
A fake NVML built from a topology checks that read_topology and gpu_stats read NVML's answers right.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from host import gpus
from host.gpus import (
    GpuStats,
    Link,
    Topology,
    decode_clock_reasons,
    describe,
    group_gpus,
    parse_visible_devices,
    visible_nvml_indices,
)
from host.settings import EngineSettings
from localmoe.up import engine_tp, worker_plan

DATA = Path(__file__).parent / "data"
L40S = Topology.model_validate_json((DATA / "topology_4xL40S.json").read_text())
A100 = Topology.model_validate_json((DATA / "topology_8xA100_nvlink_bridges.json").read_text())


def ladder(n: int) -> Topology:
    """n GPUs: PIX in pairs, PXB in fours, NODE in eights, SYS beyond."""

    def link(a: int, b: int) -> Link:
        if a == b:
            return Link.SELF
        return next(
            (lk for lk, k in ((Link.PIX, 2), (Link.PXB, 4), (Link.NODE, 8)) if a // k == b // k), Link.SYS
        )

    links = [[link(a, b) for b in range(n)] for a in range(n)]
    return Topology(names=["GPU"] * n, uuids=[f"GPU-{i}" for i in range(n)], links=links)


# -- grouping --------------------------------------------------------------------------------------


def test_l40s_pairs_stay_under_their_switch() -> None:
    assert group_gpus(L40S, 1) == [[0], [1], [2], [3]]
    assert group_gpus(L40S, 2) == [[0, 1], [2, 3]]
    assert group_gpus(L40S, 4) == [[0, 1, 2, 3]]
    assert group_gpus(L40S, 2, [3, 2, 0, 1]) == [[0, 1], [2, 3]]  # input order does not matter
    assert group_gpus(L40S, 2, [0, 2]) == [[0, 2]]  # a subset takes what it has


def test_leftover_is_the_gpu_whose_absence_leaves_the_best_group(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="host.gpus"):
        assert group_gpus(L40S, 2, [0, 2, 3]) == [[2, 3]]
    assert "GPUs [0] form no full group of 2" in caplog.text
    assert group_gpus(L40S, 2, [0, 1, 2]) == [[0, 1]]
    assert group_gpus(L40S, 3) == [[0, 1, 2]]  # every triple crosses SYS: lowest indices win


def test_nvlink_beats_a_shared_switch() -> None:
    assert group_gpus(A100, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_gpus(A100, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # NODE inside, never SYS
    assert group_gpus(A100, 2, [0, 1, 4, 5]) == [[0, 1], [4, 5]]
    assert [A100.worst(g) for g in group_gpus(A100, 4)] == [Link.NODE, Link.NODE]


def test_greedy_above_eight_gpus_and_agrees_on_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    big = ladder(16)
    assert group_gpus(big, 2) == [[i, i + 1] for i in range(0, 16, 2)]
    assert group_gpus(big, 4) == [[i, i + 1, i + 2, i + 3] for i in range(0, 16, 4)]
    assert group_gpus(big, 2, [0, 2, 4, 5, 6, 8, 9, 10, 12, 14]) == [
        [0, 2],
        [4, 5],
        [6, 10],
        [8, 9],
        [12, 14],
    ]
    exhaustive = {k: group_gpus(A100, k) for k in (2, 4)}
    monkeypatch.setattr(gpus, "EXHAUSTIVE_MAX", 0)
    assert {k: group_gpus(A100, k) for k in (2, 4)} == exhaustive


@pytest.mark.parametrize(
    ("size", "subset", "match"),
    [(0, None, "groups of 0"), (8, None, "groups of 8"), (2, [0, 0], "distinct"), (2, [3, 4], "below 4")],
)
def test_bad_grouping_requests_fail(size: int, subset: list[int] | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_gpus(L40S, size, subset)


# -- topology model --------------------------------------------------------------------------------


def test_topology_json_round_trip_and_checks() -> None:
    assert Topology.model_validate_json(A100.model_dump_json()) == A100
    assert '"PIX"' in L40S.model_dump_json()  # readable labels, as nvidia-smi writes them
    with pytest.raises(ValueError, match="symmetry"):
        Topology(names=["a", "b"], uuids=["u", "v"], links=[[Link.SELF, Link.PIX], [Link.SYS, Link.SELF]])
    with pytest.raises(ValueError, match="2×2"):
        Topology(names=["a", "b"], uuids=["u", "v"], links=[[Link.SELF]])


def test_describe_reads_like_nvidia_smi() -> None:
    lines = describe(L40S).splitlines()
    assert lines[0].split() == ["GPU0", "GPU1", "GPU2", "GPU3"]
    assert lines[3].split() == ["GPU2", "SYS", "SYS", "X", "PIX", "NVIDIA", "L40S"]
    assert lines[-1].startswith("X self, NV NVLink")


# -- worker plan -----------------------------------------------------------------------------------


def test_worker_plan_groups_tensor_parallel_workers_by_topology(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="localmoe.up"):
        assert worker_plan(["0", "2", "1", "3"], 2, lambda: L40S) == [("gpu0-1", "0,1"), ("gpu2-3", "2,3")]
    assert "slowest link PIX" in caplog.text and "GPU3" in caplog.text  # the why, and the matrix
    assert worker_plan(["0", "1", "2", "3"], 4, lambda: L40S) == [("gpu0-1-2-3", "0,1,2,3")]
    assert worker_plan(["1", "2", "3"], 2, lambda: L40S) == [("gpu2-3", "2,3")]
    u = L40S.uuids
    assert worker_plan([u[3], u[0], u[2], u[1]], 2, lambda: L40S) == [
        (f"gpu{u[0]}-{u[1]}", f"{u[0]},{u[1]}"),
        (f"gpu{u[2]}-{u[3]}", f"{u[2]},{u[3]}"),
    ]


def test_worker_plan_without_topology_keeps_the_order_given(caplog: pytest.LogCaptureFixture) -> None:
    assert worker_plan(["0", "2", "1", "3"], 2, lambda: None) == [("gpu0-2", "0,2"), ("gpu1-3", "1,3")]
    with caplog.at_level(logging.WARNING, logger="localmoe.up"):
        assert worker_plan(["0", "1", "2"], 2, lambda: None) == [("gpu0-1", "0,1")]
    assert "['2'] form no full group" in caplog.text
    assert worker_plan(["MIG-x", "0"], 2, lambda: L40S) == [("gpuMIG-x-0", "MIG-x,0")]  # not on the map


def test_worker_plan_edges() -> None:
    def unread() -> Topology:
        raise AssertionError("tp=1 needs no topology")

    assert worker_plan(["0", "1"], 1, unread) == [("gpu0", "0"), ("gpu1", "1")]
    assert worker_plan([], 2, unread) == [("cpu0", "")]  # a CPU box serves with the torch engine
    with pytest.raises(SystemExit, match="tensor_parallel_size 4 needs 4 GPUs"):
        worker_plan(["0", "1"], 4, lambda: L40S)


def test_engine_tp_follows_the_backend() -> None:
    vllm, ds = {"tensor_parallel_size": 4}, {"tensor_parallel_size": 2}
    assert engine_tp(EngineSettings(backend="auto", vllm=vllm, deepspeed=ds)) == 4
    assert engine_tp(EngineSettings(backend="vllm", vllm=vllm, deepspeed=ds)) == 4
    assert engine_tp(EngineSettings(backend="deepspeed", vllm=vllm, deepspeed=ds)) == 2
    assert engine_tp(EngineSettings(backend="torch", vllm=vllm, deepspeed=ds)) == 1


# -- telemetry helpers -----------------------------------------------------------------------------


def test_clock_reasons_decode() -> None:
    assert decode_clock_reasons(0) == []
    assert decode_clock_reasons(0x1) == []  # idle is not a throttle
    assert decode_clock_reasons(0x1, include_idle=True) == ["gpu_idle"]
    assert decode_clock_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_clock_reasons(0x8 | 0x20 | 0x80) == ["hw_slowdown", "sw_thermal_slowdown", "hw_power_brake"]
    assert decode_clock_reasons(0x2 | 0x10 | 0x100) == [
        "applications_clocks_setting",
        "sync_boost",
        "display_clock_setting",
    ]
    assert decode_clock_reasons(pynvml.nvmlClocksEventReasonSwPowerCap | 1 << 20) == [
        "sw_power_cap",
        "unknown_0x100000",
    ]


def test_visible_devices_parse() -> None:
    u = L40S.uuids
    assert parse_visible_devices("2", u) == [2]
    assert parse_visible_devices(" 1 , 3", u) == [1, 3]
    assert parse_visible_devices(f"{u[2]},0", u) == [2, 0]
    assert parse_visible_devices(u[3][:12], u) == []  # a prefix shared by all four names none
    assert parse_visible_devices("0,-1,2", u) == [0]  # CUDA stops at the first invalid entry
    assert parse_visible_devices("0,7,1", u) == [0]
    assert parse_visible_devices("1,1,2", u) == [1]
    assert parse_visible_devices("MIG-abc", u) == []
    assert parse_visible_devices("5,GPU-x,1", None) == [5]  # without NVML: integers only


def test_visible_nvml_indices_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_nvml_indices() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_nvml_indices() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert visible_nvml_indices() == [2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert visible_nvml_indices() == [3, 1]


# -- NVML: this machine, and a fake one ------------------------------------------------------------


def test_readers_answer_absent_on_this_gpu_less_machine() -> None:
    if gpus.nvml_ready():
        pytest.skip("an NVIDIA driver answers here")
    assert gpus.gpu_stats() == [] and gpus.gpu_stats([0]) == []
    assert gpus.read_topology() is None


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def fake_nvml(topology: Topology, *, init_error: int | None = None) -> SimpleNamespace:
    """NVML answering for topology's GPUs: GPU 1 supports no power readings and the driver
    predates nvmlDeviceGetCurrentClocksEventReasons."""
    level = {v: k for k, v in gpus._NVML_LEVEL.items()}

    def init() -> None:
        if init_error is not None:
            raise nvml_error(init_error)

    def power(h: int) -> int:
        if h == 1:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 300_000 + h

    def p2p(a: int, b: int, cap: int) -> int:
        assert cap == pynvml.NVML_P2P_CAPS_INDEX_NVLINK
        return pynvml.NVML_P2P_STATUS_OK if topology.links[a][b] == Link.NVLINK else 1

    def ancestor(a: int, b: int) -> int:  # NVLinked GPUs still have a PCIe path: say NODE
        return level.get(topology.links[a][b], 40)

    def new_reasons(h: int) -> int:
        raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    fns: dict[str, Any] = {
        "nvmlInit": init,
        "nvmlDeviceGetCount": lambda: topology.size,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: topology.names[h],
        "nvmlDeviceGetUUID": lambda h: topology.uuids[h],
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=10 * h, memory=0),
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=h << 30, total=48 << 30, free=0),
        "nvmlDeviceGetTemperature": lambda h, sensor: 40 + h,
        "nvmlDeviceGetPowerUsage": power,
        "nvmlDeviceGetEnforcedPowerLimit": power,
        "nvmlDeviceGetCurrentClocksEventReasons": new_reasons,
        "nvmlDeviceGetCurrentClocksThrottleReasons": lambda h: (0x1 | 0x4) if h == 0 else 0,
        "nvmlDeviceGetP2PStatus": p2p,
        "nvmlDeviceGetTopologyCommonAncestor": ancestor,
    }
    names = [n for n in dir(pynvml) if n.startswith(("NVMLError", "NVML_"))]
    return SimpleNamespace(**{n: getattr(pynvml, n) for n in names}, **fns)


@pytest.fixture
def fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(gpus, "_ready", None)
    monkeypatch.setattr(gpus, "_devices", {})
    return monkeypatch


def test_read_topology_from_nvml(fresh_nvml: pytest.MonkeyPatch) -> None:
    fresh_nvml.setattr(gpus, "pynvml", fake_nvml(A100))
    assert gpus.read_topology() == A100


def test_gpu_stats_from_nvml(fresh_nvml: pytest.MonkeyPatch) -> None:
    fresh_nvml.setattr(gpus, "pynvml", fake_nvml(L40S))
    stats = gpus.gpu_stats()
    assert [s.index for s in stats] == [0, 1, 2, 3]
    assert stats[0] == GpuStats(
        index=0,
        name="NVIDIA L40S",
        uuid=L40S.uuids[0],
        utilization_pct=0,
        memory_used_bytes=0,
        memory_total_bytes=48 << 30,
        temperature_c=40,
        power_w=300.0,
        power_limit_w=300.0,
        throttle_reasons=["sw_power_cap"],
    )
    assert stats[1].power_w is None and stats[1].power_limit_w is None  # not supported there
    assert stats[1].temperature_c == 41 and stats[1].throttle_reasons == []
    assert GpuStats.model_validate_json(stats[1].model_dump_json()) == stats[1]
    assert [s.index for s in gpus.gpu_stats([2, 9, 0])] == [2, 0]  # unknown indices are skipped
    fresh_nvml.setenv("CUDA_VISIBLE_DEVICES", f"{L40S.uuids[3]},1")
    assert visible_nvml_indices() == [3, 1]


def test_no_driver_means_absent_not_an_error(fresh_nvml: pytest.MonkeyPatch) -> None:
    fresh_nvml.setattr(gpus, "pynvml", fake_nvml(L40S, init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert gpus.gpu_stats() == [] and gpus.read_topology() is None
    assert not gpus.nvml_ready()
