"""Build a small, randomly initialised MoE checkpoint in real Hugging Face format, fully offline.

The result is an ordinary model directory (config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json) that `moe_core.loader` loads exactly like a real Mixtral,
Qwen2-MoE or OLMoE checkpoint copied onto a box. Nothing here touches the network: the tokenizer is
trained on text already on the machine (Python's standard library and its documentation, plus
/usr/share/doc), and the weights come from `torch.manual_seed(seed)`.

Determinism: for a given machine (same Python install, same /usr/share/doc) and seed, the files
written are the same on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedConfig

ARCHS = (
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "qwen3_moe",
    "phimoe",
    "granitemoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
)

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3 (the Llama/Mixtral convention).
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
# A chat model's turn markers (ChatML's), special tokens 4 and 5 after the four above: each one
# token however the text around it is split, never part of decoded text (skip_special_tokens), and
# the end of a turn is an end-of-sequence id of the model's generation config.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
# The chat template such a tokenizer ships (chat_template.jinja): ChatML over those tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MAX_CONTEXT = 2048
PROSE_SHARE = 0.25  # of max_bytes; code fills the rest (prose may come out smaller if the machine has little)
MAX_FILE_BYTES = 128_000  # larger files are skipped so no single file dominates the corpus

_PROSE_SUFFIXES = frozenset({".txt", ".md", ".rst", ""})
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# --------------------------------------------------------------------------------------------------
# Corpus: which text the tokenizer learns from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One training document: a file on disk, or in-memory text (Python's doc topics)."""

    name: str
    size: int  # bytes on disk (or of the UTF-8 text); what the byte budget counts
    path: Path | None = None
    text: str | None = None

    def read(self) -> str | None:
        """The document's text, or None when it is not UTF-8 text (then it is left out)."""
        if self.text is not None:
            return self.text
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return None if "\x00" in text else text


def _spread_order(name: str) -> str:
    # Hashing the name spreads the picks over the whole tree (sorting by path alone would fill the
    # budget from the first few packages) while staying deterministic across runs and machines.
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def _stdlib_sources() -> list[_Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if filename.endswith(".py") and not path.is_symlink():
                sources.append(_Source(str(path.relative_to(root)), path.stat().st_size, path=path))
    return sources


def _doc_topic_sources() -> list[_Source]:
    try:
        from pydoc_data.topics import topics  # Python's own reference documentation, as text
    except ImportError:
        return []
    return [
        _Source(f"pydoc:{key}", len(topics[key].encode("utf-8")), text=topics[key]) for key in sorted(topics)
    ]


def _usr_share_doc_sources(root: Path = Path("/usr/share/doc")) -> list[_Source]:
    if not root.is_dir():
        return []
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            # "copyright" files are near-identical licence texts: they would teach repetition, not prose.
            if path.suffix not in _PROSE_SUFFIXES or filename == "copyright" or path.is_symlink():
                continue
            sources.append(_Source(str(path.relative_to(root)), path.stat().st_size, path=path))
    return sources


def _take(sources: Iterable[_Source], budget: int) -> list[_Source]:
    """Sources in spread order, skipping oversized ones, until `budget` bytes are taken."""
    taken, used = [], 0
    for source in sorted(sources, key=lambda s: _spread_order(s.name)):
        if source.size > MAX_FILE_BYTES or used + source.size > budget:
            continue
        taken.append(source)
        used += source.size
    return taken


def _select_corpus(max_bytes: int) -> list[_Source]:
    # Python's doc topics come first (they are the most on-topic prose), /usr/share/doc tops it up.
    prose_budget = int(max_bytes * PROSE_SHARE)
    topics = _take(_doc_topic_sources(), prose_budget)
    used = sum(s.size for s in topics)
    prose = topics + _take(_usr_share_doc_sources(), prose_budget - used)
    used = sum(s.size for s in prose)
    return _take(_stdlib_sources(), max_bytes - used) + prose


def _read_corpus(sources: list[_Source], progress: bool) -> list[str]:
    texts = []
    for source in tqdm(sources, desc="reading corpus", unit="file", disable=not progress):
        text = source.read()
        if text:
            texts.append(text)
    return texts


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _train_bpe(
    texts: Iterator[str],
    n_texts: int,
    vocab_size: int,
    progress: bool,
    special: tuple[str, ...] = SPECIAL_TOKENS,
) -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # "\n" is split off before the byte-level split, so no token ever spans a newline and the
    # indentation after it: a prompt that ends in a bare newline is then in-distribution.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        # All 256 byte symbols are in the vocabulary, so any string encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=n_texts)
    return tokenizer


def train_tokenizer(
    out_dir: Path,
    vocab_size: int = 4096,
    max_bytes: int = 6_000_000,
    progress: bool = True,
    chat: bool = False,
    context: int = MAX_CONTEXT,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on code and prose found on this machine and save it into `out_dir`.

    Writes tokenizer.json and tokenizer_config.json (plus special_tokens_map.json where the installed
    transformers writes one). Deterministic for a given machine. chat: with CHAT_TOKENS as special
    tokens and CHAT_TEMPLATE (chat_template.jinja) beside it.
    """
    special = SPECIAL_TOKENS + (CHAT_TOKENS if chat else ())
    if vocab_size < len(special) + 256:
        raise ValueError(f"vocab_size must be at least {len(special) + 256}, got {vocab_size}")
    sources = _select_corpus(max_bytes)
    megabytes = sum(s.size for s in sources) / 1e6
    _say(f"training tokenizer on {len(sources)} files ({megabytes:.1f} MB)…", progress)
    texts = _read_corpus(sources, progress)
    backend = _train_bpe(iter(texts), len(texts), vocab_size, progress, special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS) if chat else None,
        model_max_length=context,
        # Decoding must invert encoding exactly: no " ." -> "." style clean-up.
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


# name → (hidden, intermediate, layers, heads, KV heads). "reference" is the GPU reference model the
# benchmarks use: 4.76 B parameters as a Mixtral (2.75 GB of active bf16 weights per token); a
# batch's decode step on an H100 is bound by the engine's CPU, not the GPU. "large" has Mixtral
# 8x7B's widths at half its depth: 23.5 B parameters, 47 GB in bf16 (32,000 tokens), for steps
# bound by the GPU, as a served model's are: a large batch's decode step reads most of the 47 GB,
# ~15 ms of an H100's memory bandwidth by estimate (one H100 holds it).
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 256, 4, 4, 2),
    "reference": (2048, 5632, 16, 16, 8),
    "large": (4096, 14336, 16, 32, 8),
}


# Latent attention's widths as every DeepSeek-V2/V3 checkpoint has them, whatever its size: vLLM's
# CUDA MLA kernels take few others. Decode (FlashAttention-MLA, FlashMLA) reads latent cache rows of
# kv_lora_rank + qk_rope_head_dim = 576; prefill on Hopper has FlashAttention alone, which takes
# (qk_nope, qk_rope, v) = (128, 64, 128) and two other families' triples, not (16, 64, 16).
MLA_HEAD_DIMS: dict[str, Any] = dict(
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128
)


def _model_config(
    arch: str,
    vocab_size: int,
    bos: int,
    eos: int,
    pad: int,
    size: str = "tiny",
    dims: tuple[int, int, int, int, int] | None = None,
    tie_embeddings: bool = False,
    context: int = MAX_CONTEXT,
) -> PreTrainedConfig:
    """dims: (hidden, intermediate per expert, layers, heads, kv heads); None: SIZES[size]'s.
    tie_embeddings: the output layer shares the input embedding's matrix. context: the longest
    sequence in tokens (max_position_embeddings: RoPE's tables, the engines' limit)."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Glm4MoeConfig,
        GptOssConfig,
        GraniteMoeConfig,
        MixtralConfig,
        OlmoeConfig,
        PhimoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    hidden, intermediate, layers, heads, kv_heads = dims or SIZES[size]
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        num_experts_per_tok=2,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=intermediate, num_local_experts=8, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            intermediate_size=intermediate,  # only used by dense layers, of which there are none
            moe_intermediate_size=intermediate // 2,
            shared_expert_intermediate_size=intermediate,
            num_experts=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            **common,
        )
    if arch == "olmoe":
        return OlmoeConfig(intermediate_size=intermediate, num_experts=8, **common)
    if arch == "qwen3_moe":  # Qwen3-30B-A3B's shape: no shared expert, top-k weights renormalised
        config = Qwen3MoeConfig(
            intermediate_size=intermediate,  # only used by dense layers, of which there are none
            moe_intermediate_size=intermediate // 2,
            num_experts=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            use_sliding_window=False,
            **common,
        )
        # the real checkpoints carry head_dim (128); the config class takes it only as an extra
        setattr(config, "head_dim", hidden // heads)  # noqa: B010
        return config
    if arch == "phimoe":  # Phi-3.5-MoE: Mixtral's layout, biased attention, LayerNorm
        return PhimoeConfig(
            intermediate_size=intermediate, num_local_experts=8, attention_bias=True, **common
        )
    if arch == "granitemoe":  # Granite MoE: Mixtral's layout with muP multipliers
        return GraniteMoeConfig(
            intermediate_size=intermediate,
            num_local_experts=8,
            embedding_multiplier=12.0,
            logits_scaling=4.0,
            residual_multiplier=0.22,
            attention_multiplier=1.0 / (hidden // heads),
            **common,
        )
    if arch == "deepseek_v2":  # DeepSeek-V2-Lite's shape, scaled down: latent attention with full-rank
        # queries, two shared experts, greedy top-k over softmax scores, a dense first layer
        return DeepseekV2Config(
            intermediate_size=intermediate,
            moe_intermediate_size=intermediate // 2,
            n_routed_experts=8,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=1,  # as V2-Lite's config says: one group, so grouped top-k is plain top-k
            topk_group=1,
            topk_method="greedy",
            norm_topk_prob=False,
            q_lora_rank=None,
            **MLA_HEAD_DIMS,
            **{**common, "num_key_value_heads": heads},  # latent attention: no grouped KV heads
        )
    if arch == "deepseek_v3":  # multi-head latent attention, a shared expert, grouped routing,
        # a dense first layer (DeepSeek-V3's shape, scaled down)
        v3 = DeepseekV3Config(
            intermediate_size=intermediate,
            moe_intermediate_size=intermediate // 2,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=48,
            **MLA_HEAD_DIMS,
            **{**common, "num_key_value_heads": heads},  # latent attention: no grouped KV heads
        )
        # as DeepSeek-V3's config.json says; transformers always routes so and takes them only as
        # extras, vLLM reads them (and loads the router's score-correction bias only under noaux_tc)
        setattr(v3, "topk_method", "noaux_tc")  # noqa: B010
        setattr(v3, "scoring_func", "sigmoid")  # noqa: B010
        return v3
    if arch == "glm4_moe":  # GLM-4.5(-Air): a shared expert, sigmoid routing, a dense first layer
        glm = Glm4MoeConfig(
            intermediate_size=intermediate,
            moe_intermediate_size=intermediate // 2,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            use_qk_norm=True,
            **common,
        )
        # the real checkpoints carry head_dim (GLM-4.5-Air: 128), which vLLM reads
        setattr(glm, "head_dim", hidden // heads)  # noqa: B010
        return glm
    if arch == "gpt_oss":  # gpt-oss-20b / 120b: sliding and full attention in turn, attention sinks,
        # biased experts with a clamped SwiGLU, softmax over the top-k router logits
        return GptOssConfig(
            intermediate_size=intermediate,
            num_local_experts=8,
            head_dim=hidden // heads,
            sliding_window=16,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


# config.json's `architectures` where the real checkpoints name another class than transformers'
# save_pretrained writes (transformers loads by model_type either way). Phi-3.5-MoE ships
# PhiMoEForCausalLM; vLLM knows only that name and runs PhimoeForCausalLM through its generic
# transformers backend, which fails on this version's router.
HUB_ARCHITECTURES = {"phimoe": "PhiMoEForCausalLM"}


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token_id
    return token_id


def end_ids(tokenizer: PreTrainedTokenizerFast) -> int | list[int]:
    """The generation config's eos_token_id: </s>, and a chat tokenizer's <|im_end|> beside it (the
    end of a turn ends generation as </s> does)."""
    eos = _token_id(tokenizer, EOS)
    return [eos, _token_id(tokenizer, IM_END)] if IM_END in tokenizer.all_special_tokens else eos


def _save_model(
    out_dir: Path,
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    progress: bool,
    size: str = "tiny",
    context: int = MAX_CONTEXT,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    bos, eos, pad = (_token_id(tokenizer, token) for token in (BOS, EOS, PAD))
    config = _model_config(arch, len(tokenizer), bos, eos, pad, size, context=context)
    if size == "tiny":
        model = AutoModelForCausalLM.from_config(config)  # float32: exact parity tests on CPU
    else:  # billions of parameters: bf16, initialised on the GPU when there is one (minutes on a CPU)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _say(f"building {arch}: {model.num_parameters() / 1e6:.1f} M parameters…", progress)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=end_ids(tokenizer), pad_token_id=pad
    )
    # Transformers 5 fuses experts in memory (gate_up_proj); save_original_format writes them back in the
    # hub layout (e.g. block_sparse_moe.experts.N.w1) so other engines (vLLM) read the file as they would
    # a real checkpoint. Weights go to model.safetensors (transformers 5 writes safetensors only).
    model.save_pretrained(str(out_dir), save_original_format=True)
    hub_name = HUB_ARCHITECTURES.get(arch)
    if hub_name is not None:  # the name the real checkpoints carry, which vLLM's registry knows
        config_file = out_dir / "config.json"
        written = json.loads(config_file.read_text())
        written["architectures"] = [hub_name]
        config_file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o644)  # transformers writes the weights owner-only; workers may run as other users


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished build to `out_dir` in one rename (atomic on one filesystem)."""
    try:
        tmp_dir.rename(out_dir)  # replaces an empty out_dir; fails on a non-empty one
    except OSError:
        if not is_checkpoint(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it") from None
        # Someone else finished the same build first: theirs stands, ours is dropped by the caller.


def build_checkpoint(
    out_dir: Path,
    arch: str = "mixtral",
    *,
    vocab_size: int = 4096,
    seed: int = 0,
    progress: bool = True,
    size: str = "tiny",
    chat: bool = False,
    context: int = MAX_CONTEXT,
) -> Path:
    """Build a tiny random `arch` checkpoint (tokenizer included) at `out_dir` and return `out_dir`.
    chat: a chat model's tokenizer (train_tokenizer's), <|im_end|> ending generation. context: the
    model's longest sequence in tokens (e.g. 8192 for prompts of several thousand tokens).

    The directory appears complete or not at all: everything is written to a temporary sibling
    directory which is then renamed into place. An existing non-empty `out_dir` is an error unless it
    already is a checkpoint built concurrently by someone else.
    """
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if context < 128:
        raise ValueError(f"context must be at least 128 tokens, got {context}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it owner-only; the published checkpoint must be readable by workers
    try:
        tokenizer = train_tokenizer(
            tmp_dir, vocab_size=vocab_size, progress=progress, chat=chat, context=context
        )
        torch.manual_seed(seed)
        _save_model(tmp_dir, arch, tokenizer, progress, size, context)
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone already after a successful rename
    _say(f"saved to {out_dir}", progress)
    return out_dir


def is_checkpoint(path: Path) -> bool:
    """True when `path` holds a config, a fast tokenizer and at least one safetensors weight file."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer.json").is_file()
        and any(path.glob("*.safetensors"))
    )
