"""Train a small Mixtral-style MoE from scratch on code and prose found on this machine, fully offline.

The path of a run: corpus (Python sources of the standard library and of every site-packages folder,
Python's doc topics, /usr/share/doc, man pages) → split by package into train and held-out → tokenizer
(`checkpoint.train_tokenizer`) → packed fixed-length sequences → AdamW with warm-up and a cosine
schedule, the router load-balancing loss on → held-out loss every `eval_every` steps, the best weights
kept (and written to `<out_dir>.checkpoint` as training goes) → the instruction stage (the last
`instruct_minutes`: chat turns made from the same train split, moe_build.instruct; the tokenizer has
the chat markers as special tokens and a ChatML template from the start) → an ordinary Hugging Face
checkpoint that `moe_core.loader` loads like any other, plus `training.json` describing the run. The
same code runs on a CPU (the "cpu-test" preset, for tests) and on a CUDA GPU (the "small" preset, bf16
autocast).

The split is a rule, not a list: a document is held out when the hash of its unit (its top-level
package for code, its package folder for /usr/share/doc, its page for man pages and doc topics) falls
under `held_out_share`. The rule gives the same split on any machine; `bench/model_quality.py` uses it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm import tqdm

from moe_build.checkpoint import (
    BOS,
    EOS,
    PAD,
    PROSE_SHARE,
    _doc_topic_sources,
    _model_config,
    _say,
    _Source,
    _stdlib_sources,
    _take,
    _token_id,
    _usr_share_doc_sources,
    end_ids,
    is_checkpoint,
    train_tokenizer,
)
from moe_build.instruct import IGNORE, encode, make_pairs

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import MixtralConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CODE, PROSE = "code", "prose"
HELD_OUT_SHARE = 0.05  # of units (packages, pages), not of bytes
SPLIT_RULE = "sha1(unit) % 10000 < held_out_share * 10000"


@dataclass(frozen=True)
class Preset:
    """A model size and the run settings that suit it."""

    hidden: int
    intermediate: int  # per expert
    layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    seq_len: int
    batch_size: int
    lr: float
    corpus_bytes: int  # train text read from disk (held-out text comes on top: held_out_share of it)
    tokenizer_bytes: int  # what the BPE learns from (checkpoint._select_corpus)
    eval_every: int  # steps
    eval_sequences: int  # held-out sequences per kind per evaluation
    warmup_steps: int
    minutes: float
    instruct_minutes: float  # of `minutes`: the instruction stage's (moe_build.instruct), at the end
    tie_embeddings: bool = True  # the output layer reuses the embedding: a quarter fewer weights to ship
    instruct_eval_every: int = 0  # steps between the instruction stage's evaluations (0: eval_every)


# fmt: off
PRESETS: dict[str, Preset] = {
    # ~0.3 M parameters: a few dozen steps in seconds on one CPU core.
    "cpu-test": Preset(64, 128, 2, 4, 2, 1024, 64, 8, 3e-3, 600_000, 300_000, 10, 8, 5, 1.0, 0.25),
    # ~27 M parameters (~11 M active per token) for one H200 — 27 MB packed as int8 (moe_build.packed),
    # the embedded default's budget. 128 × 512 tokens per step in bf16.
    "small": Preset(
        384, 384, 6, 6, 2, 8192, 512, 128, 1e-3, 500_000_000, 20_000_000, 250, 128, 300, 14.0, 2.5,
        # the held-out answers were best at the stage's first evaluation (step 250 of 756) in a
        # 14-minute run: evaluated 5x as often, the weights kept are chosen from 15 points, not 3
        instruct_eval_every=50,
    ),
}
# fmt: on


# --------------------------------------------------------------------------------------------------
# Corpus: checkpoint.py's sources, plus site-packages and man pages, split by unit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ManPage(_Source):
    """A gzipped troff man page, read as plain text."""

    def read(self) -> str | None:
        assert self.path is not None
        try:
            text = gzip.decompress(self.path.read_bytes()).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError):
            return None
        return None if text.startswith(".so ") else _troff_to_text(text)


_TROFF_ESCAPES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\\f(\[[^]]*\]|\(..|.)"), ""),  # font changes: \fB \fI \fR \f(CW \f[B]
    (re.compile(r"\\\((aq|cq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\(\(..|\[[^]]*\]|[&/,|^%])"), ""),  # other special characters and spacing
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), r"\\"),
]
_TEXT_MACROS = re.compile(r"^\.(SH|SS|TH|B|I|BR|RB|BI|IB|IR|RI|SM|SB)\s+(.*)$")


def _troff_to_text(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            macro = _TEXT_MACROS.match(line)
            if macro is None:
                continue  # layout (.PP .TP .RS .br …) and comments
            line = macro.group(2).replace('"', "")
        for pattern, repl in _TROFF_ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _man_page_sources(root: Path = Path("/usr/share/man")) -> list[_Source]:
    sources: list[_Source] = []
    for section in sorted(root.glob("man[1-9]")):  # English only: translations live in man/<lang>/
        for path in sorted(section.glob("*.gz")):
            if path.is_file() and not path.is_symlink():
                # The budget counts text bytes; troff compresses about 3:1.
                sources.append(_ManPage(f"man:{path.name}", 3 * path.stat().st_size, path=path))
    return sources


def _site_package_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"]]
    candidates += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return sorted({Path(p).resolve() for p in candidates if Path(p).is_dir()})


def _site_package_sources(kind: str) -> list[_Source]:
    """Python files (code), or package descriptions and docs (prose: dist-info METADATA, .md, .rst,
    .txt; a machine without /usr/share/doc or man pages still has these)."""
    sources, seen = [], set()
    for root in _site_package_dirs():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                wanted = (
                    filename.endswith(".py")
                    if kind == CODE
                    # In *.dist-info only METADATA is prose (the rest: file lists, licences, entry points).
                    else filename == "METADATA"
                    or (path.suffix in (".md", ".rst", ".txt") and ".dist-info" not in dirpath)
                )
                if wanted and not path.is_symlink() and path not in seen:
                    seen.add(path)
                    name = f"site:{path.relative_to(root)}"
                    sources.append(_Source(name, path.stat().st_size, path=path))
    return sources


def unit_of(name: str) -> str:
    """The unit a document is held out with: its top-level package (a vendored copy counts as the
    package it copies, so pip/_vendor/urllib3 goes with urllib3), its doc folder, or itself."""
    if name.startswith(("pydoc:", "man:")):
        return name
    origin, _, rel = name.rpartition(":")
    parts = rel.split("/")
    for marker in ("_vendor", "vendored", "_vendored"):
        if marker in parts[:-1]:
            parts = parts[parts.index(marker) + 1 :]
    return f"{origin or 'stdlib'}:{parts[0].removesuffix('.py')}"


def is_held_out(name: str, held_out_share: float = HELD_OUT_SHARE) -> bool:
    digest = hashlib.sha1(unit_of(name).encode("utf-8")).hexdigest()
    return int(digest, 16) % 10_000 < held_out_share * 10_000


@dataclass
class Corpus:
    """Documents' texts by split and kind: texts["train"]["code"], texts["held_out"]["prose"], …"""

    texts: dict[str, dict[str, list[str]]]
    names: dict[str, dict[str, list[str]]]  # the same documents' names (training.json keeps held_out's)


def _sources(kind: str) -> list[_Source]:
    if kind == CODE:
        return _stdlib_sources() + _site_package_sources(CODE)
    return (
        _doc_topic_sources() + _usr_share_doc_sources() + _man_page_sources() + _site_package_sources(PROSE)
    )


def build_corpus(
    train_bytes: int, held_out_bytes: int, held_out_share: float = HELD_OUT_SHARE, progress: bool = True
) -> Corpus:
    """Read up to `train_bytes` of training text and `held_out_bytes` of held-out text, PROSE_SHARE
    of each prose where the machine has that much. Held-out documents never reach the train split,
    and neither does any train file whose text equals a held-out one."""
    texts: dict[str, dict[str, list[str]]] = {"train": {}, "held_out": {}}
    names: dict[str, dict[str, list[str]]] = {"train": {}, "held_out": {}}
    for kind, share in ((CODE, 1 - PROSE_SHARE), (PROSE, PROSE_SHARE)):
        sources = _sources(kind)
        held = [s for s in sources if is_held_out(s.name, held_out_share)]
        train = [s for s in sources if not is_held_out(s.name, held_out_share)]
        for split, pool, budget in (
            ("held_out", held, held_out_bytes * share),
            ("train", train, train_bytes * share),
        ):
            taken = _take(pool, int(budget))
            # Not checkpoint._read_corpus: the names must stay aligned with the texts read.
            reading = tqdm(taken, desc=f"reading {split} {kind}", unit="file", disable=not progress)
            kept = [(s.name, t) for s in reading if (t := s.read())]
            names[split][kind] = [n for n, _ in kept]
            texts[split][kind] = [t for _, t in kept]
        held_hashes = {hashlib.sha1(t.encode()).digest() for t in texts["held_out"][kind]}
        pairs = [
            (n, t)
            for n, t in zip(names["train"][kind], texts["train"][kind], strict=True)
            if hashlib.sha1(t.encode()).digest() not in held_hashes
        ]
        names["train"][kind] = [n for n, _ in pairs]
        texts["train"][kind] = [t for _, t in pairs]
    return Corpus(texts, names)


# --------------------------------------------------------------------------------------------------
# Tokens: documents → packed [N, seq_len] sequences
# --------------------------------------------------------------------------------------------------


def pack(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int, progress: bool = False
) -> torch.Tensor:
    """Tokenize `texts`, join them with </s> after each, cut into [N, seq_len] int32 rows (the tail
    that does not fill a row is dropped)."""
    import numpy as np
    import torch

    assert isinstance(tokenizer.eos_token_id, int)
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    chunk = 512
    for start in tqdm(range(0, len(texts), chunk), desc="tokenizing", unit="chunk", disable=not progress):
        encoded = tokenizer(texts[start : start + chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for ids in encoded:
            parts += [np.asarray(ids, dtype=np.int32), eos]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    rows = len(flat) // seq_len
    return torch.from_numpy(flat[: rows * seq_len].copy()).view(rows, seq_len)


def spread_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Up to `n` rows taken evenly across `rows` (held-out files come one after another)."""
    import torch

    if len(rows) <= n:
        return rows
    return rows[torch.linspace(0, len(rows) - 1, n).long()]


PROSE_REPEAT = 4  # prose may come round at most this many times as often as code does


def prose_share(code_rows: int, prose_rows: int) -> float:
    """The share of every batch that is prose: PROSE_SHARE, or less where the machine has little prose.

    A machine with few docs (the H200 machine: 1.4 M prose tokens beside 103 M of code) would
    otherwise repeat its prose dozens of times while code goes round twice; held-out prose loss then
    rises after ~5 passes (measured: 3.02 → 3.46 nats) and, through the mixed loss, stops the run
    while code is still improving. Capped at PROSE_REPEAT × prose's share of the corpus instead.
    """
    if prose_rows == 0:
        return 0.0
    return min(PROSE_SHARE, PROSE_REPEAT * prose_rows / (code_rows + prose_rows))


class _Batches:
    """Endless training batches: each one `prose_rows` prose rows (`prose_share`) and the rest code,
    every stream walked in a fresh random order per pass."""

    def __init__(self, code: torch.Tensor, prose: torch.Tensor, batch_size: int, seed: int) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        share = prose_share(len(code), len(prose))
        self.prose_rows = max(1, round(batch_size * share)) if share else 0
        self.code_rows = batch_size - self.prose_rows
        self.prose_share = self.prose_rows / batch_size  # what the mixed held-out loss weighs prose by
        self.streams = [(code, self._order(code)), (prose, self._order(prose))]

    def _order(self, rows: torch.Tensor) -> Iterator[int]:
        import torch

        while len(rows):
            yield from torch.randperm(len(rows), generator=self.generator).tolist()

    def __next__(self) -> torch.Tensor:  # [batch_size, seq_len] int64
        import torch

        picked = [
            rows[[next(order) for _ in range(n)]]
            for (rows, order), n in zip(self.streams, (self.code_rows, self.prose_rows), strict=True)
            if n
        ]
        return torch.cat(picked).long()


# --------------------------------------------------------------------------------------------------
# Model, evaluation, schedule
# --------------------------------------------------------------------------------------------------


def model_config(preset: Preset, tokenizer: PreTrainedTokenizerFast, aux_loss_coef: float) -> MixtralConfig:
    """checkpoint's Mixtral (8 experts, top-2) at the preset's size, balance loss on."""
    ids = (_token_id(tokenizer, BOS), _token_id(tokenizer, EOS), _token_id(tokenizer, PAD))
    dims = (preset.hidden, preset.intermediate, preset.layers, preset.heads, preset.kv_heads)
    config = cast(
        "MixtralConfig",
        _model_config("mixtral", len(tokenizer), *ids, dims=dims, tie_embeddings=preset.tie_embeddings),
    )
    config.router_aux_loss_coef = aux_loss_coef
    return config


BALANCES = ("pooled", "per_layer")


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss per layer, averaged over layers: E · Σ_e f_e · P_e, where f_e is
    the share of the layer's top-k choices that go to expert e and P_e its mean router probability
    (1.0 when perfectly even). router_logits: one [tokens, experts] tensor per layer.

    transformers' own (`out.aux_loss`) concatenates every layer's logits first, so it balances the
    experts pooled over layers: one layer may send nearly every token to three experts while another
    makes up for it (measured on the first embedded model: layer 0 gave 3 experts 99 % of choices)."""
    import torch

    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # [T, E]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1)
        share = chosen.float().mean(dim=0) / top_k  # [E], sums to 1
        losses.append(probs.shape[-1] * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _bf16_grouped_experts() -> None:
    """Under autocast, transformers' grouped_mm expert path casts the input to the fp32 weights' dtype
    and runs the expert matmuls in fp32; casting both to the autocast dtype measured 759k vs 556k
    tokens/s on an H200 (a 37 M-parameter Mixtral, batch 128 × 512). A no-op where transformers has
    no such function."""
    import torch
    from transformers.integrations import moe

    original = getattr(moe, "_grouped_mm", None)
    if original is None or getattr(original, "_localmoe_autocast", False):
        return

    def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(input.device.type):
            dtype = torch.get_autocast_dtype(input.device.type)
            input, weight = input.to(dtype), weight.to(dtype)
        result: torch.Tensor = original(input, weight, offs)
        return result

    grouped_mm._localmoe_autocast = True  # type: ignore[attr-defined]
    moe._grouped_mm = grouped_mm


def _autocast(device: str) -> Any:
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU: float32 (bf16 autocast on CPU is slower, not faster)


def held_out_loss(
    model: Any, rows: torch.Tensor, device: str, batch_size: int, labels: torch.Tensor | None = None
) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over `rows` [N, seq_len]; with
    `labels` [N, seq_len], over the tokens they do not mark IGNORE (an answer's)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size].long().to(device)
            target = batch if labels is None else labels[start : start + batch_size].to(device)
            with _autocast(device):
                out = model(input_ids=batch, labels=target, output_router_logits=False)
            n = int((target[:, 1:] != IGNORE).sum())  # predicted tokens: each row's first is not
            total += out.loss.float() * n
            count += n
    model.train(was_training)
    return float(total) / max(count, 1)


def _weights(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU (best weights kept while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _lr(step: int, progress: float, preset_lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr/10 as progress goes 0 → 1."""
    if step < warmup:
        return preset_lr * (step + 1) / warmup
    return preset_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    step: int
    tokens: int
    seconds: float  # since training started
    code: float  # held-out loss, nats per token
    prose: float
    mixed: float  # code and prose weighed by their shares of the batches: what early stopping watches


@dataclass
class TrainingReport:
    """What training.json holds."""

    size: str
    device: str
    parameters: int
    active_parameters: int  # per token: everything but the experts a token is not routed to
    seq_len: int
    batch_size: int
    lr: float
    aux_loss_coef: float
    seed: int
    balance: str = "pooled"  # BALANCES: transformers' balance loss over all layers, or one per layer
    prose_share: float = 0.0  # of every batch's rows (prose_share())
    steps: int = 0
    tokens_seen: int = 0
    stopped_because: str = ""
    best: Evaluation | None = None
    evaluations: list[Evaluation] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)  # per step, cross-entropy only
    seconds: dict[str, float] = field(default_factory=dict)  # corpus, tokenizer, tokens, training, total
    tokens_per_s: float = 0.0  # training steps only (evaluations excluded)
    corpus: dict[str, dict[str, int]] = field(default_factory=dict)  # split → kind/count → tokens/files
    split: dict[str, Any] = field(default_factory=dict)  # the rule and the held-out documents
    instruct: InstructReport | None = None  # the instruction stage, when there was one


@dataclass
class InstructReport:
    """The instruction stage (moe_build.instruct): its pairs, steps and held-out losses before and
    after (answers: nats per answer token of the held-out pairs; code: the held-out code rows)."""

    pairs: dict[str, int]  # kind → training pairs
    held_out_pairs: int
    seq_len: int
    steps: int = 0
    seconds: float = 0.0
    answers_before: float = 0.0
    answers_after: float = 0.0  # of the weights kept: the best held-out answers' loss
    # (step, loss) every instruct_eval_every steps (eval_every if 0) and at the last step
    answers: list[tuple[int, float]] = field(default_factory=list)
    code: list[tuple[int, float]] = field(default_factory=list)  # held-out code, at the same steps
    stopped_because: str = ""
    code_before: float = 0.0
    code_after: float = 0.0  # of the weights kept
    kept_step: int = 0  # the step whose weights were kept
    within_code_slack: bool = True  # whether they are within settings' code_slack of code_before
    settings: dict[str, Any] = field(default_factory=dict)  # the InstructSettings it ran with


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch sees no CUDA GPU")
    return device


def _active_parameters(model: Any, config: MixtralConfig) -> int:
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    unused = experts * (1 - config.num_experts_per_tok / config.num_local_experts)
    return int(model.num_parameters() - unused)


def train(
    out_dir: Path,
    *,
    device: str = "auto",
    minutes: float | None = None,
    size: str = "small",
    seq_len: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    corpus_bytes: int | None = None,
    seed: int = 0,
    aux_loss_coef: float = 0.02,
    balance: str = "pooled",
    max_steps: int | None = None,
    instruct_minutes: float | None = None,
    instruct_steps: int | None = None,
    eval_every: int | None = None,
    patience: int = 6,
    held_out_share: float = HELD_OUT_SHARE,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every_s: float = 60.0,
) -> TrainingReport:
    """Train a `size` preset MoE from scratch and save the best weights (by held-out loss) to `out_dir`.

    minutes: wall-clock budget of the whole run, corpus and tokenizer included (the preset's if None).
    balance: "pooled" (transformers' router balance loss, over all layers at once) or "per_layer"
      (per_layer_balance_loss), weighed by aux_loss_coef.
    max_steps: also stop there, and run the cosine schedule over steps rather than over time.
    instruct_minutes: of `minutes`, the instruction stage's after pre-training (the preset's if None;
      0: none); instruct_steps: that stage's steps instead (its schedule over them).
    patience: stop after this many evaluations without a better held-out loss.
    checkpoint_every_s: new best weights are written to `<out_dir>.checkpoint` (a loadable checkpoint)
      at most this often, so a run that dies keeps them; a finished run removes it.
    Arguments left None take the preset's value. The directory appears complete or not at all; an
    existing non-empty `out_dir` is an error unless `overwrite`.
    """
    import torch
    from transformers import GenerationConfig, MixtralForCausalLM

    t0 = time.monotonic()
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(PRESETS)}")
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; expected one of {', '.join(BALANCES)}")
    preset = PRESETS[size]
    preset = replace(
        preset,
        seq_len=seq_len or preset.seq_len,
        batch_size=batch_size or preset.batch_size,
        lr=lr or preset.lr,
        corpus_bytes=corpus_bytes or preset.corpus_bytes,
        eval_every=eval_every or preset.eval_every,
        minutes=minutes if minutes is not None else preset.minutes,
        instruct_minutes=instruct_minutes if instruct_minutes is not None else preset.instruct_minutes,
    )
    instructing = preset.instruct_minutes > 0 or bool(instruct_steps)
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    device = _resolve_device(device)
    end = t0 + preset.minutes * 60
    deadline = end - (preset.instruct_minutes * 60 if instruct_steps is None else 0)  # pre-training's
    seconds: dict[str, float] = {}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)
    try:
        held_out_bytes = int(preset.corpus_bytes * held_out_share)
        corpus = build_corpus(preset.corpus_bytes, held_out_bytes, held_out_share, progress)
        seconds["corpus"] = time.monotonic() - t0
        tokenizer = train_tokenizer(
            tmp_dir,
            vocab_size=preset.vocab_size,
            max_bytes=preset.tokenizer_bytes,
            progress=progress,
            chat=True,
        )
        seconds["tokenizer"] = time.monotonic() - t0 - seconds["corpus"]
        rows = {
            (split, kind): pack(tokenizer, corpus.texts[split][kind], preset.seq_len, progress)
            for split in ("train", "held_out")
            for kind in (CODE, PROSE)
        }
        seconds["tokens"] = time.monotonic() - t0 - seconds["corpus"] - seconds["tokenizer"]
        if len(rows["train", CODE]) == 0 or len(rows["held_out", CODE]) == 0:
            raise RuntimeError("too little code on this machine for a train and a held-out split")

        torch.manual_seed(seed)
        config = model_config(preset, tokenizer, aux_loss_coef)
        model = MixtralForCausalLM(config).to(device)  # type: ignore[arg-type]  # as in loader.py
        _bf16_grouped_experts()
        report = TrainingReport(
            size=size,
            device=torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
            parameters=model.num_parameters(),
            active_parameters=_active_parameters(model, config),
            seq_len=preset.seq_len,
            batch_size=preset.batch_size,
            lr=preset.lr,
            aux_loss_coef=aux_loss_coef,
            seed=seed,
            balance=balance,
            corpus={
                split: {
                    f"{kind}_{what}": n
                    for kind in (CODE, PROSE)
                    for what, n in (
                        ("tokens", rows[split, kind].numel()),
                        ("files", len(corpus.names[split][kind])),
                    )
                }
                for split in ("train", "held_out")
            },
            split={
                "rule": SPLIT_RULE,
                "held_out_share": held_out_share,
                "corpus_bytes": preset.corpus_bytes,
                "held_out": corpus.names["held_out"],
            },
        )
        _say(
            f"{size}: {report.parameters / 1e6:.1f} M parameters ({report.active_parameters / 1e6:.1f} M "
            f"active) on {report.device}; train tokens: {report.corpus['train']}",
            progress,
        )
        evals = {kind: spread_rows(rows["held_out", kind], preset.eval_sequences) for kind in (CODE, PROSE)}
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=end_ids(tokenizer),
            pad_token_id=config.pad_token_id,
        )
        saved_at = [time.monotonic()]

        def save_checkpoint() -> None:
            if time.monotonic() - saved_at[0] < checkpoint_every_s:
                return
            _save_checkpoint(model, tmp_dir, checkpoint_dir, report)
            saved_at[0] = time.monotonic()

        best_state = _fit(
            model,
            preset,
            device,
            _Batches(rows["train", CODE], rows["train", PROSE], preset.batch_size, seed),
            evals,
            report,
            deadline,
            max_steps,
            patience,
            progress,
            save_checkpoint,
        )
        seconds["training"] = time.monotonic() - t0 - sum(seconds.values())

        model.load_state_dict(best_state)
        if instructing:
            report.instruct = _instruct(
                model, tokenizer, preset, device, corpus, rows["train", CODE], evals[CODE],
                end, instruct_steps, progress,
            )  # fmt: skip
            seconds["instruct"] = report.instruct.seconds
        model.save_pretrained(str(tmp_dir), save_original_format=True)
        report.seconds = {k: round(v, 1) for k, v in seconds.items()}
        report.seconds["total"] = round(time.monotonic() - t0, 1)
        (tmp_dir / "training.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
        _publish(tmp_dir, out_dir)
    except BaseException:
        if checkpoint_dir.exists():
            _say(f"training stopped; the best weights so far are in {checkpoint_dir}", progress)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone already after a successful rename
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the finished model supersedes it
    _say(f"saved to {out_dir}", progress)
    return report


def instruct_from(
    pre_trained: Path,
    out_dir: Path,
    device: str = "auto",
    minutes: float | None = None,
    instruct_steps: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    settings: InstructSettings | None = None,
) -> InstructReport:
    """The instruction stage alone, on a model `train` pre-trained without one (`localmoe model train
    --instruct-minutes 0`): its weights and tokenizer, its corpus and split read again from this
    machine (the same rule, the same bytes), so that the stage's settings can be tried again in its
    minutes rather than the pre-training's. minutes: the stage's budget (the preset's
    instruct_minutes if None); instruct_steps: its steps instead. `out_dir` gets the result, with the
    pre-training's record and this stage's in training.json; appears complete or not at all.
    settings: the stage's (InstructSettings() if None: the shipped recipe's)."""
    import torch
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    t0 = time.monotonic()
    pre_trained, out_dir = Path(pre_trained), Path(out_dir)
    record = json.loads((pre_trained / "training.json").read_text())
    if record.get("instruct"):
        raise ValueError(
            f"{pre_trained} has had an instruction stage already; start from a pre-trained model "
            "(localmoe model train --instruct-minutes 0)"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    preset = PRESETS[record["size"]]
    minutes = preset.instruct_minutes if minutes is None else minutes
    device = _resolve_device(device)
    split = record["split"]
    corpus = build_corpus(
        split["corpus_bytes"],
        int(split["corpus_bytes"] * split["held_out_share"]),
        split["held_out_share"],
        progress,
    )
    if corpus.names["held_out"] != split["held_out"]:
        raise RuntimeError(
            f"this machine's held-out documents are not those {pre_trained} was trained without"
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(pre_trained))
    seq_len = record["seq_len"]
    code_rows = pack(tokenizer, corpus.texts["train"][CODE], seq_len, progress)
    held_code = spread_rows(
        pack(tokenizer, corpus.texts["held_out"][CODE], seq_len, progress), preset.eval_sequences
    )
    model = MixtralForCausalLM.from_pretrained(str(pre_trained), dtype=torch.float32).to(device)  # type: ignore[arg-type]
    _bf16_grouped_experts()
    preset = replace(preset, seq_len=seq_len, batch_size=record["batch_size"], lr=record["lr"])
    end = time.monotonic() + minutes * 60
    stage = _instruct(
        model, tokenizer, preset, device, corpus, code_rows, held_code, end, instruct_steps, progress,
        settings or InstructSettings(),
    )  # fmt: skip
    record["instruct"] = asdict(stage)
    record["seconds"]["instruct"] = stage.seconds
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)
        _copy_tokenizer(pre_trained, tmp_dir)
        model.save_pretrained(str(tmp_dir), save_original_format=True)
        (tmp_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _say(f"saved to {out_dir} ({time.monotonic() - t0:.0f} s)", progress)
    return stage


def _save_checkpoint(model: Any, tmp_dir: Path, checkpoint_dir: Path, report: TrainingReport) -> None:
    """The model's weights (the best so far), written beside the output as a checkpoint the loader
    takes like any other (tokenizer, config, weights, training.json so far); replaced whole."""
    writing = checkpoint_dir.with_name(checkpoint_dir.name + ".writing")
    shutil.rmtree(writing, ignore_errors=True)
    writing.mkdir(parents=True)
    _copy_tokenizer(tmp_dir, writing)
    model.save_pretrained(str(writing), save_original_format=True)
    (writing / "training.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    writing.rename(checkpoint_dir)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer's files (and a chat model's template) of the model in `src` into `dst`."""
    for path in [
        *src.glob("tokenizer*"),
        *src.glob("special_tokens_map.json"),
        *src.glob("chat_template.jinja"),
    ]:
        shutil.copyfile(path, dst / path.name)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """A model written in full into `tmp_dir` becomes `out_dir` (_replace_dir), readable by all."""
    for path in tmp_dir.iterdir():
        path.chmod(0o644)  # transformers writes the weights owner-only; workers may run as others
    _replace_dir(tmp_dir, out_dir)


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Move `new` to `out_dir` by renames; an existing `out_dir` is renamed aside first, then removed."""
    old = None
    if out_dir.exists() and any(out_dir.iterdir()):
        if not is_checkpoint(out_dir) and not (out_dir / "training.json").exists():
            raise FileExistsError(f"{out_dir} is not empty and holds no checkpoint; not replacing it")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / "model")
    new.rename(out_dir)  # replaces an empty out_dir
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fit(
    model: Any,
    preset: Preset,
    device: str,
    batches: _Batches,
    evals: dict[str, torch.Tensor],
    report: TrainingReport,
    deadline: float,
    max_steps: int | None,
    patience: int,
    progress: bool,
    checkpoint: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The training loop; fills `report` and returns the best weights (on the CPU). `checkpoint` is
    called after an evaluation that found new best weights (they are the model's weights then)."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.startswith("cuda")
    )
    coef, top_k = model.config.router_aux_loss_coef, model.config.num_experts_per_tok
    tokens_per_step = preset.batch_size * preset.seq_len
    best_state: dict[str, torch.Tensor] = {}
    start = time.monotonic()
    eval_seconds = eval_total = 0.0  # the last evaluation's, all evaluations'
    pending: list[torch.Tensor] = []  # per-step losses not yet read back (reading syncs the GPU)
    bar = tqdm(total=max_steps, desc="training", unit="step", disable=not progress)

    def evaluate(step: int) -> bool:
        """Evaluate on the held-out rows; True when this is the best so far."""
        nonlocal best_state, eval_seconds, eval_total
        t = time.monotonic()
        code, prose = (held_out_loss(model, evals[k], device, preset.batch_size) for k in (CODE, PROSE))
        share = batches.prose_share if len(evals[PROSE]) else 0.0
        mixed = (1 - share) * code + share * prose
        e = Evaluation(step, step * tokens_per_step, round(t - start, 1), code, prose, mixed)
        report.evaluations.append(e)
        eval_seconds = time.monotonic() - t
        eval_total += eval_seconds
        if report.best is None or mixed < report.best.mixed:
            report.best = e
            best_state = _weights(model)
            if checkpoint is not None and step > 0:
                checkpoint()
            return True
        return False

    def read_losses() -> None:
        if pending:
            report.train_losses += [round(x, 4) for x in torch.stack(pending).tolist()]
            pending.clear()

    report.prose_share = batches.prose_share
    model.train()
    evaluate(0)
    stale, step = 0, 0
    report.stopped_because = "time budget"
    try:
        while True:
            now = time.monotonic()
            # Reserve time for the last evaluation and the save.
            if now + 2 * eval_seconds + 5 > deadline and step > 0:
                break
            if max_steps is not None and step >= max_steps:
                report.stopped_because = "max_steps"
                break
            fraction = (now - start) / max(deadline - start, 1e-9)
            if max_steps is not None:
                fraction = max(fraction, step / max_steps)
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, fraction, preset.lr, preset.warmup_steps)
            batch = next(batches).to(device, non_blocking=True)
            with _autocast(device):
                out = model(input_ids=batch, labels=batch, output_router_logits=True)
            cross_entropy = out.loss - coef * out.aux_loss
            if report.balance == "per_layer":
                loss = cross_entropy + coef * per_layer_balance_loss(out.router_logits, top_k)
            else:
                loss = out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append(cross_entropy.detach().float())
            step += 1
            bar.update(1)
            if step % preset.eval_every == 0:
                read_losses()
                stale = 0 if evaluate(step) else stale + 1
                _show(bar, report, step * tokens_per_step / (time.monotonic() - start - eval_total))
                if stale >= patience:
                    report.stopped_because = f"held-out loss not better for {patience} evaluations"
                    break
    except KeyboardInterrupt:
        report.stopped_because = "interrupted"  # the best weights so far are still saved
    read_losses()
    if report.evaluations[-1].step != step:
        evaluate(step)
    bar.close()
    report.steps, report.tokens_seen = step, step * tokens_per_step
    report.tokens_per_s = round(report.tokens_seen / max(time.monotonic() - start - eval_total, 1e-9))
    return best_state


INSTRUCT_MIN_LEN = 256  # tokens per instruction row at least: a function and its request fit
INSTRUCT_LR = 0.3  # of the preset's peak learning rate
INSTRUCT_CODE_SHARE = 0.5  # of each batch's rows: pre-training code, so that code is not forgotten
INSTRUCT_PATIENCE = 3  # evaluations without better weights to keep: the stage ends
# nats per token the held-out code may lose for weights to be kept: ~2 % perplexity. A 14-minute run
# with a quarter of each batch code and no such bound kept weights 0.056 nats worse on code (+5.8 %
# perplexity); of 300 held-out function headers they completed 39 % into code that parses, the
# pre-trained weights of the model shipped before 51 %.
INSTRUCT_CODE_SLACK = 0.02


@dataclass(frozen=True)
class InstructSettings:
    """The instruction stage's settings (the INSTRUCT_* constants by default), to try others on one
    pre-trained model (instruct_from) without a constant changed for the shipped recipe."""

    code_share: float = INSTRUCT_CODE_SHARE  # of each batch's rows: plain pre-training code
    code_slack: float = INSTRUCT_CODE_SLACK  # nats per token the held-out code may lose
    patience: int = INSTRUCT_PATIENCE  # evaluations without better weights: the stage ends
    lr: float = INSTRUCT_LR  # of the preset's peak learning rate
    # which evaluated weights within the code slack are kept (of those answering the held-out pairs
    # better than the pre-trained ones): "best_answers", the lowest held-out answers' loss; "last",
    # the latest (the stage then ends only at its budget or once the code leaves the slack)
    keep: str = "best_answers"

    def __post_init__(self) -> None:
        if self.keep not in ("best_answers", "last"):
            raise ValueError(f"keep must be best_answers or last, not {self.keep!r}")


def _instruct(
    model: Any,
    tokenizer: Any,
    preset: Preset,
    device: str,
    corpus: Corpus,
    code_rows: torch.Tensor,
    held_code: torch.Tensor,
    end: float,
    max_steps: int | None,
    progress: bool,
    settings: InstructSettings = InstructSettings(),
) -> InstructReport:
    """The instruction stage: the pre-trained model trained on moe_build.instruct's pairs of the train
    split (loss on the answers only), settings.code_share of each batch plain code, until `end` (or
    for max_steps) or until settings.patience evaluations found no better weights. Kept, of the
    evaluated weights that answer the held-out pairs better than the pre-trained ones: those with the
    best answers (settings.keep "last": the latest) among the ones within settings.code_slack of the
    pre-trained held-out code loss (the best answers of all, when none is); the pre-trained weights
    when none answers better."""
    import torch

    t0 = time.monotonic()
    length = max(preset.seq_len, INSTRUCT_MIN_LEN // preset.seq_len * preset.seq_len)
    pairs = make_pairs(corpus.texts["train"][CODE], corpus.texts["train"][PROSE])
    held = make_pairs(corpus.texts["held_out"][CODE], corpus.texts["held_out"][PROSE])
    x, y = encode(tokenizer, pairs, length)
    hx, hy = encode(tokenizer, held, length)
    picked = torch.linspace(0, max(len(hx) - 1, 0), min(len(hx), preset.eval_sequences)).long()
    hx, hy = hx[picked], hy[picked]
    per_row = length // preset.seq_len  # code rows joined end to end: they were cut from one stream
    code = code_rows[: len(code_rows) // per_row * per_row].reshape(-1, length)
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    report = InstructReport(kinds, len(held), length, settings=asdict(settings))
    if not len(x):
        raise RuntimeError("no instruction pairs could be made from this machine's code")

    def answers() -> float:
        return held_out_loss(model, hx, device, preset.batch_size, hy) if len(hx) else 0.0

    report.answers_before = answers()
    report.code_before = held_out_loss(model, held_code, device, preset.batch_size)
    _say(f"instruction stage: {kinds} pairs ({len(x)} rows of {length} tokens)", progress)
    lr = preset.lr * settings.lr
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.startswith("cuda")
    )
    generator = torch.Generator().manual_seed(1)
    n_code = round(preset.batch_size * settings.code_share) if len(code) else 0
    n_pairs = preset.batch_size - n_code
    warmup = max(1, min(preset.warmup_steps, (max_steps or 100) // 10))
    every = preset.instruct_eval_every or preset.eval_every
    start, step, stale = time.monotonic(), 0, 0
    # the weights to keep, of those that answer better than the pre-trained ones: ((outside the code
    # slack, held-out answers' loss or with keep "last" -step inside it) → lower is better, step,
    # held-out answers' loss, held-out code loss, weights). None: the pre-trained weights stay.
    best: tuple[tuple[bool, float], int, float, float, dict[str, torch.Tensor]] | None = None
    pre_trained = _weights(model)

    def evaluate() -> bool:
        """Held-out answers and code of the weights at `step`; kept when better. → True: stop."""
        nonlocal best, stale
        loss, code_loss = answers(), held_out_loss(model, held_code, device, preset.batch_size)
        report.answers.append((step, round(loss, 4)))
        report.code.append((step, round(code_loss, 4)))
        bar.set_postfix(held_answers=f"{loss:.3f}", held_code=f"{code_loss:.3f}")
        outside = code_loss > report.code_before + settings.code_slack
        key = (outside, loss if settings.keep == "best_answers" or outside else -step)
        if loss < report.answers_before and (best is None or key < best[0]):
            best, stale = (key, step, loss, code_loss, _weights(model)), 0
            return False
        stale += 1
        return stale >= settings.patience

    bar = tqdm(total=max_steps, desc="instruction stage", unit="step", disable=not progress)
    model.train()
    report.stopped_because = "max_steps" if max_steps else "time budget"
    while max_steps is None or step < max_steps:
        now = time.monotonic()
        if max_steps is None and now + 10 > end:  # the evaluation and the save after it
            break
        if step and step % every == 0 and len(hx) and evaluate():
            report.stopped_because = f"no better weights for {settings.patience} evaluations"
            break
        fraction = step / max_steps if max_steps else (now - start) / max(end - start, 1e-9)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, fraction, lr, warmup)
        take = torch.randint(len(x), (n_pairs,), generator=generator)
        inputs, labels = [x[take]], [y[take]]
        if n_code:
            plain = code[torch.randint(len(code), (n_code,), generator=generator)].long()
            inputs.append(plain)
            labels.append(plain)
        batch, target = torch.cat(inputs).to(device), torch.cat(labels).to(device)
        with _autocast(device):
            out = model(input_ids=batch, labels=target, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
    if len(hx) and (not report.answers or report.answers[-1][0] != step):
        evaluate()  # the last weights are candidates too
    bar.close()
    report.steps = step
    if not len(hx):  # no held-out pairs to choose by: the last weights
        best = ((False, 0.0), step, 0.0, held_out_loss(model, held_code, device, preset.batch_size), {})
    (outside, _), report.kept_step, report.answers_after, report.code_after, weights = best or (
        (False, 0.0), 0, report.answers_before, report.code_before, pre_trained
    )  # fmt: skip
    report.within_code_slack = not outside
    if report.kept_step != step:
        model.load_state_dict(weights)
    report.seconds = round(time.monotonic() - t0, 1)
    _say(
        f"instruction stage: {step} steps, step {report.kept_step}'s weights kept; held-out answers "
        f"{report.answers_before:.3f} → {report.answers_after:.3f}, code {report.code_before:.3f} → "
        f"{report.code_after:.3f} nats/token"
        + ("" if report.within_code_slack else f" (no evaluation within {settings.code_slack} of the code)"),
        progress,
    )
    return report


def _show(bar: Any, report: TrainingReport, tokens_per_s: float) -> None:
    recent = report.train_losses[-20:]
    loss = sum(recent) / len(recent)
    last = report.evaluations[-1]
    bar.set_postfix(
        loss=f"{loss:.3f}",
        ppl=f"{math.exp(loss):.1f}",
        held_code=f"{last.code:.3f}",
        held_prose=f"{last.prose:.3f}",
        tok_s=f"{tokens_per_s:,.0f}",
    )
