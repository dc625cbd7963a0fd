"""A trained checkpoint in a form small enough to ship with the project, and back.

`pack(model_dir, out_dir)` stores every weight matrix as int8 with one float32 scale per row
(symmetric, absmax / 127) and everything else (norms, other vectors) as float32, in safetensors
shards of at most `shard_bytes`; config, generation config, tokenizer and training.json are copied
as they are. `unpack(packed_dir, out_dir)` writes an ordinary Hugging Face checkpoint (float32
model.safetensors, hub layout, the same JSON files) that `moe_core.loader` loads like any other:
int8 × float32 scale is exact in float32, so every unpack of one pack gives the same weights.

Why int8 rather than bf16: the embedded default must stay near 30 MB in the repository; int8 holds
twice the parameters of bf16 in that budget, and per-row scales keep every weight within 1 %
(relative RMS) and a trained model's held-out loss within 1 % (tests/test_embedded_model.py).
Layout of a packed folder:

    PACKED.json                    {"format": "localmoe-int8-rows/1", "shards": [...], "tensors": N}
    weights-0000N.safetensors      name.q int8 [rows, cols] + name.scale float32 [rows]; or name float32
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json, training.json, ...
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMAT = "localmoe-int8-rows/1"
# The embedded default: `localmoe model train` on the H200 machine, then `localmoe model pack`
# (BENCHMARKS.md has the run and its quality figures).
EMBEDDED = Path(__file__).parent / "assets" / "localmoe-small"
MANIFEST = "PACKED.json"
_MIN_QUANTIZED = 4096  # elements: smaller matrices (routers of tiny models) stay float32
_COPIED = ("*.json", "*.txt", "*.model", "*.jinja")  # every non-weight file of a checkpoint folder


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float → (int8 [rows, cols], float32 scale [rows]) with w ≈ q * scale[:, None]."""
    import torch

    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack(model_dir: Path, out_dir: Path, shard_bytes: int = 15 * 2**20) -> Path:
    """Write the packed form of checkpoint `model_dir` to `out_dir` (created; must not exist)."""
    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        weight = tensors[name]
        if weight.dim() == 2 and weight.numel() >= _MIN_QUANTIZED:
            q, scale = _quantize(weight)
            entry = {f"{name}.q": q, f"{name}.scale": scale}
        else:
            entry = {name: weight.float().contiguous()}
        nbytes = sum(t.numel() * t.element_size() for t in entry.values())
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1].update(entry)
        size += nbytes
    names = [f"weights-{i + 1:05d}.safetensors" for i in range(len(shards))]
    for shard, shard_name in zip(shards, names, strict=True):
        save_file(shard, str(out_dir / shard_name), metadata={"format": FORMAT})
    for pattern in _COPIED:
        for path in sorted(model_dir.glob(pattern)):
            if path.name != "model.safetensors.index.json":
                shutil.copyfile(path, out_dir / path.name)
    manifest = {"format": FORMAT, "shards": names, "tensors": len(tensors)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir


def is_packed(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def unpack(packed_dir: Path, out_dir: Path) -> Path:
    """Expand `packed_dir` into an ordinary checkpoint at `out_dir`; the folder appears whole or not at all
    (built beside it, then renamed; a concurrent unpack that finished first wins)."""
    from safetensors.torch import load_file, save_file

    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    manifest = json.loads((packed_dir / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{packed_dir}: unknown packed format {manifest.get('format')!r}")
    stored: dict[str, torch.Tensor] = {}
    for name in manifest["shards"]:
        stored.update(load_file(str(packed_dir / name)))
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith(".q"):
            base = name.removesuffix(".q")
            weights[base] = tensor.float() * stored[f"{base}.scale"][:, None]
        elif not name.endswith(".scale"):
            weights[name] = tensor
    if len(weights) != manifest["tensors"]:
        raise ValueError(
            f"{packed_dir}: {len(weights)} tensors unpacked, manifest says {manifest['tensors']}"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)
    try:
        save_file(weights, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        for pattern in _COPIED:  # what pack() copied, less its own manifest
            for path in sorted(packed_dir.glob(pattern)):
                if path.name != MANIFEST:
                    shutil.copyfile(path, tmp_dir / path.name)
        config_path = tmp_dir / "config.json"
        config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = "float32"  # what the weights now are
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        for path in tmp_dir.iterdir():
            path.chmod(0o644)
        try:
            tmp_dir.rename(out_dir)
        except OSError:
            if not (out_dir / "model.safetensors").is_file():
                raise FileExistsError(
                    f"{out_dir} exists and is not empty; refusing to overwrite it"
                ) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
