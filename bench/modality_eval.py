"""How well does `scheduler.modality.classify` label prompts? A labelled set built from this machine.

    python -m bench.modality_eval [--samples 2000] [--seed 7] [--rebuild] [--show-errors 0]

The set is cut from files that Python and the OS ship, so it needs no download:
  code  — windows of 3–40 lines from source files, labelled with the language of the file:
          Python (stdlib, site-packages), C (/usr/include, Python's headers), shell (scripts under
          /usr/bin, /usr/share, /usr/lib), Perl, JavaScript, CSS, HTML, SQL, YAML, Makefiles, JSON,
          Go, Rust, Java — whichever exist here.
  text  — windows of license texts (/usr/share/common-licenses), /usr/share/doc READMEs, NEWS,
          changelogs and copyright files, and the DESCRIPTION of man pages (troff stripped);
          half of them re-flowed into one line per paragraph, the way a chat prompt is typed.
  mixed — a prose paragraph (or a chat-style request) plus a code window: fenced with or without
          a language tag, unfenced after a colon, code first and prose after, prose on both sides.
A code window must be mostly statements (>= 60 % of its non-blank lines), judged with the state of
the whole file so that a window starting inside a construct knows it. Not statements: comment
lines, Python docstrings, /* block comments */, Perl POD (=head ... =cut), shell/Perl heredoc
bodies and multi-line shell strings (usage texts, licences, Unicode data tables), and lines of
literals only (numbers, quoted strings, punctuation; JSON excepted, it is all literals). An HTML
window must be mostly markup: >= 60 % of its lines carry a tag and at most five words outside tags
(documentation paragraphs wrapped in <p> are prose, not code). These rules describe what a code
sample is, and are applied to every window before the classifier sees it.
Windows are drawn with a seeded RNG from sorted file lists, so one machine always gets the same set;
it is cached as JSON lines under $XDG_CACHE_HOME/localmoe (default ~/.cache/localmoe).

Prints accuracy overall and per class, a confusion matrix, language accuracy (on samples where a
language was reported, and how often one was), and latency p50/p99 per prompt.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import statistics
import sys
import sysconfig
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from scheduler.jobs import Modality
from scheduler.modality import classify

BUILDER_VERSION = 4  # bump when the way samples are cut changes; it keys the cache file
_CLASSES = (Modality.TEXT, Modality.CODE, Modality.MIXED)
_SHARES = {Modality.CODE: 0.4, Modality.TEXT: 0.3, Modality.MIXED: 0.3}

_EXT_LANG = {
    ".py": "python", ".h": "c", ".c": "c", ".sh": "shell", ".bash": "shell", ".pl": "perl",
    ".pm": "perl", ".js": "javascript", ".mjs": "javascript", ".css": "css", ".html": "html",
    ".htm": "html", ".sql": "sql", ".yaml": "yaml", ".yml": "yaml", ".mk": "make", ".json": "json",
    ".go": "go", ".rs": "rust", ".java": "java",
}  # fmt: skip
_MIN_FILES = 10  # a language with fewer files would repeat the same few windows
_MAKEFILES = {"Makefile", "GNUmakefile", "makefile"}
# Line-comment / block-comment markers per language: a window must be mostly statements, not comments.
_COMMENT = {
    "python": re.compile(r"^\s*#"), "shell": re.compile(r"^\s*#"), "perl": re.compile(r"^\s*#"),
    "yaml": re.compile(r"^\s*#"), "make": re.compile(r"^\s*#"), "sql": re.compile(r"^\s*--"),
    "html": re.compile(r"^\s*<!--"),
}  # fmt: skip
# Languages that carry long prose inside their syntax: most lines of a window must show the syntax.
_SYNTAX = {"yaml": re.compile(r"^\s*(-\s|[\w.\"'-]+:(\s|$))"), "html": re.compile(r"</?[a-zA-Z][^>]*>")}
_C_COMMENT = re.compile(r"^\s*(//|/\*|\*)")
_PROSE_NAMES = re.compile(r"^(README|NEWS|changelog|copyright|TODO|AUTHORS|THANKS|HISTORY)(\.gz)?$", re.I)
_CHAT_INTROS = (
    "Explain this code:",
    "What does this do?",
    "Why does this fail?",
    "Can you refactor the following so it is easier to read?",
    "I get a wrong result from this snippet. What is wrong with it?",
    "Please add comments to this code.",
    "Is there a bug here?",
    "Convert this to something more idiomatic, please.",
    "Review the code below and point out anything unsafe.",
    "How can I make this faster?",
)


@dataclass(frozen=True)
class Sample:
    text: str
    modality: str  # a Modality value
    language: str | None  # the code's language; None for text
    origin: str  # how it was made, e.g. "code:/usr/include/stdio.h" or "mixed:fenced-tag"


# ---- finding material --------------------------------------------------------------------------


def _walk(root: str, max_files: int = 60_000) -> Iterator[Path]:
    seen = 0
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in ("c++", "__pycache__"))
        for f in sorted(files):
            seen += 1
            if seen > max_files:
                return
            yield Path(d, f)


def _shebang_lang(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if re.match(rb"#!\s*\S*/(env\s+)?(ba|da|k|z)?sh\b", head):
        return "shell"
    return None


def find_sources() -> tuple[dict[str, list[Path]], list[Path]]:
    """Code files by language, and prose files; each list sorted so the draw is reproducible."""
    paths = sysconfig.get_paths()
    code: dict[str, set[Path]] = defaultdict(set)
    prose: set[Path] = set()
    for root in dict.fromkeys([paths["stdlib"], paths["purelib"], paths["include"], "/usr/include"]):
        for p in _walk(root):
            lang = _EXT_LANG.get(p.suffix)
            if lang in ("python", "c"):
                code[lang].add(p)
            elif p.parent.name.endswith(".dist-info") and p.name.startswith(("LICENSE", "COPYING")):
                prose.add(p)
    for root in ("/usr/share", "/usr/lib"):
        for p in _walk(root, max_files=400_000):
            lang = "make" if p.name in _MAKEFILES else _EXT_LANG.get(p.suffix)
            if lang and lang not in ("python", "c") and not p.name.endswith(".min.js"):
                code[lang].add(p)
            elif (
                (_PROSE_NAMES.match(p.name) and p.is_relative_to("/usr/share/doc"))
                or p.is_relative_to("/usr/share/common-licenses")
                or (re.match(r"/usr/share/man/man[158]/", str(p)) and p.suffix == ".gz")
            ):
                prose.add(p)
    for root in ("/usr/bin", "/usr/sbin"):
        for p in _walk(root):
            if not p.is_symlink() and _shebang_lang(p) == "shell":
                code["shell"].add(p)
    return {k: sorted(v) for k, v in sorted(code.items())}, sorted(prose)


def _read(path: Path, limit: int = 400_000) -> str:
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read(limit)
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if b"\0" in raw[:4096]:
        return ""
    return raw.decode("utf-8", errors="replace")


# ---- turning files into prose ------------------------------------------------------------------

_TROFF_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\*(\(..|\[[^\]]*\]|.)|\\[&|^%:]|\\s[-+]?\d")
_DEB_LINE = re.compile(r"^([A-Z][\w-]*:( |$)|\s*\.\s*$| -- .*<.*@.*>|\S+ \([^)]*\) \S+; urgency=)")


def man_description(src: str) -> str:
    """The DESCRIPTION section of a troff man page as plain paragraphs (a crude renderer)."""
    out: list[str] = []
    keep = False
    for line in src.splitlines():
        if line.startswith((".SH", ".Sh")):
            keep = "DESCRIPTION" in line.upper()
            out.append("")
            continue
        if not keep or line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, args = line[1:].partition(" ")
            if macro in ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "SM"):
                line = args.replace('"', "")
            else:
                out.append("")  # .PP, .TP, .IP, .sp, ...: a paragraph break
                continue
        line = _TROFF_ESC.sub("", line).replace("\\-", "-").replace("\\e", "\\")
        out.append(line)
    paras = re.split(r"\n\s*\n", "\n".join(out))
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 78) for p in paras if len(p.split()) >= 8)


def prose_text(path: Path) -> str:
    src = _read(path)
    if "/man/" in str(path):
        return man_description(src)
    # Debian copyright fields, changelog headers and sign-offs are records, not prose.
    return "\n".join(line for line in src.splitlines() if not _DEB_LINE.match(line))


def _is_prose_window(lines: list[str]) -> bool:
    body = [x for x in lines if x.strip()]
    wordy = sum(len(re.findall(r"[A-Za-z]{2,}", x)) >= 4 for x in body)
    codeish = re.compile(r"```|^\s*\$ |[{};]\s*$|</?[a-z]+[ >]|^\s{4,}\S|\w\(\)|=>|->|::|==")
    return bool(body) and wordy >= 0.7 * len(body) and not any(codeish.search(x) for x in body)


def _reflow(text: str) -> str:
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


# ---- cutting windows ---------------------------------------------------------------------------


def _window(rng: random.Random, lines: list[str], lo: int, hi: int) -> list[str]:
    n = rng.randint(lo, hi)
    start = rng.randrange(max(1, len(lines) - n + 1))
    win = lines[start : start + n]
    while win and not win[0].strip():
        win.pop(0)
    while win and not win[-1].strip():
        win.pop()
    return win


_HEREDOC = re.compile(r"(?<!<)<<[-~]?\s*(['\"]?)([A-Za-z_]\w*)\1")
_BLOCK_COMMENT_LANGS = frozenset({"c", "javascript", "css", "sql", "go", "rust", "java"})
# A line of literals only: quoted strings, numbers (hex, with C suffixes) and punctuation.
_LITERAL = re.compile(
    r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|\b(?:0[xX])?[0-9A-Fa-f]*\d[0-9A-Fa-f.]*[uUlLfF]{0,3}\b"
)
_TAG = re.compile(r"<[^>]*>?|&#?\w+;")


def _unescaped_quotes(line: str) -> int:
    return len(re.findall(r'(?<!\\)"', line))


def _doc_mask(lang: str, lines: list[str]) -> list[bool]:
    """Per line of a whole file: True inside text that the language carries but that is not
    statements: Python docstrings, /* block comments */, Perl POD (=head ... =cut), shell/Perl
    heredoc bodies and multi-line shell strings (usage and licence texts, data tables). Computed
    from the top of the file, so a window that starts inside one of these knows it."""
    mask = [False] * len(lines)
    until: str | None = None  # the token that ends the construct we are inside; None: in code
    for i, line in enumerate(lines):
        if until is not None:
            mask[i] = True
            if until == "=cut":
                done = line.startswith("=cut")
            elif until in ('"""', "'''"):
                done = line.count(until) % 2 == 1
            elif until == "*/":
                done = "*/" in line
            elif until == '"':
                done = _unescaped_quotes(line) % 2 == 1
            else:
                done = line.strip() == until  # a heredoc terminator
            until = None if done else until
            continue
        if lang == "perl" and re.match(r"=[a-zA-Z]", line):
            mask[i], until = True, None if line.startswith("=cut") else "=cut"
        elif lang == "python":
            q = next((q for q in ('"""', "'''") if line.count(q) % 2 == 1), None)
            mask[i], until = q is not None, q
        elif lang in _BLOCK_COMMENT_LANGS and "/*" in line and "*/" not in line.split("/*", 1)[1]:
            mask[i], until = True, "*/"
        elif lang in ("shell", "perl") and (m := _HEREDOC.search(line)):
            until = m.group(2)
        elif lang == "shell" and not line.lstrip().startswith("#") and _unescaped_quotes(line) % 2 == 1:
            until = '"'
    return mask


def _is_code_window(lang: str, lines: list[str], doc: list[bool] | None = None) -> bool:
    """Mostly statements: at most 40 % of the non-blank lines may be comments, docstrings, POD,
    heredoc/string bodies (`doc`, from _doc_mask over the whole file) or lines of literals only."""
    if doc is None:
        doc = [False] * len(lines)
    body = [(x, d) for x, d in zip(lines, doc, strict=True) if x.strip()]
    if len(body) < 3 or any(len(x) > 200 for x, _ in body):
        return False  # minified or data blobs are not prompt-like
    if sum(bool(re.search(r"[A-Za-z]", x)) for x, _ in body) < 0.6 * len(body):
        return False  # tables of numbers
    if lang in _SYNTAX and sum(bool(_SYNTAX[lang].search(x)) for x, _ in body) < 0.6 * len(body):
        return False  # help text inside YAML block scalars, prose paragraphs in HTML
    if lang == "html" and sum(
        len(re.findall(r"[A-Za-z]{2,}", _TAG.sub(" ", x))) <= 5 for x, _ in body
    ) < 0.6 * len(body):
        return False  # an HTML document's prose paragraphs: mostly text between the tags
    if lang == "c" and any(re.search(r"\b(namespace|template\s*<|std::)", x) for x, _ in body):
        return False  # C++ in a .h
    comment = _COMMENT.get(lang, _C_COMMENT)
    statements = sum(
        not (d or comment.match(x) or (lang != "json" and not re.search(r"[A-Za-z]", _LITERAL.sub("", x))))
        for x, d in body
    )
    return statements >= 0.6 * len(body)


def _closed(text: str) -> bool:
    """No docstring or block comment left open at either end (so prose next to it stays prose)."""
    return text.count('"""') % 2 == 0 and text.count("'''") % 2 == 0 and text.count("/*") == text.count("*/")


def code_window(
    rng: random.Random, files: list[Path], lang: str, lo: int, hi: int, closed: bool = False
) -> str | None:
    for _ in range(30):
        lines = _read(rng.choice(files)).splitlines()
        if len(lines) < lo:
            continue
        n = rng.randint(lo, hi)
        start = rng.randrange(max(1, len(lines) - n + 1))
        win, doc = lines[start : start + n], _doc_mask(lang, lines)[start : start + n]
        while win and not win[0].strip():
            win, doc = win[1:], doc[1:]
        while win and not win[-1].strip():
            win, doc = win[:-1], doc[:-1]
        if _is_code_window(lang, win, doc) and (not closed or _closed("\n".join(win))):
            return "\n".join(win)
    return None


def prose_window(rng: random.Random, files: list[Path], lo: int, hi: int) -> str | None:
    for _ in range(30):
        lines = prose_text(rng.choice(files)).splitlines()
        if len(lines) < lo:
            continue
        win = _window(rng, lines, lo, hi)
        if _is_prose_window(win):
            text = "\n".join(win)
            return _reflow(text) if rng.random() < 0.5 else text
    return None


def mixed_sample(rng: random.Random, code: str, lang: str, prose: str) -> tuple[str, str]:
    """(prompt, layout) for one prose part and one code part."""
    layout = rng.choice(("fenced-tag", "fenced", "colon", "code-first", "sandwich", "chat-fenced", "chat"))
    if layout.startswith("chat"):
        prose = rng.choice(_CHAT_INTROS)
    fence = f"```{lang}" if layout in ("fenced-tag", "sandwich", "chat-fenced") else "```"
    if layout in ("fenced-tag", "fenced", "chat-fenced"):
        return f"{prose}\n\n{fence}\n{code}\n```", layout
    if layout == "sandwich":
        ask = rng.choice(_CHAT_INTROS)
        return f"{prose}\n\n{fence}\n{code}\n```\n\n{ask}", layout
    if layout == "code-first":
        return f"{code}\n\n{prose}", layout
    return f"{prose.rstrip('.:')}:\n\n{code}", layout  # colon, chat


# ---- the set -----------------------------------------------------------------------------------


def build(n: int, seed: int) -> list[Sample]:
    """`n` samples, shares per class as in _SHARES, code languages in turn; deterministic per machine."""
    code_files, prose_files = find_sources()
    if not code_files or not prose_files:
        raise RuntimeError("no source or prose files found on this machine")
    langs = [k for k, v in code_files.items() if len(v) >= _MIN_FILES]
    rng = random.Random(seed)
    out: list[Sample] = []
    want = {m: round(n * s) for m, s in _SHARES.items()}
    want[Modality.CODE] += n - sum(want.values())
    for m in _CLASSES:
        made = 0
        while made < want[m]:
            lang = langs[made % len(langs)]
            code: str | None
            sample: Sample | None
            if m is Modality.TEXT:
                text = prose_window(rng, prose_files, 3, 40)
                sample = Sample(text, m.value, None, "text") if text else None
                code = ""
            elif m is Modality.CODE:
                code = code_window(rng, code_files[lang], lang, 3, 40)
                sample = Sample(code, m.value, lang, f"code:{lang}") if code else None
            else:
                code = code_window(rng, code_files[lang], lang, 3, 20, closed=True)
                prose = prose_window(rng, prose_files, 1, 6)
                if code and prose:
                    text, layout = mixed_sample(rng, code, lang, prose)
                    sample = Sample(text, m.value, lang, f"mixed:{layout}")
                else:
                    sample = None
            if sample is None:
                if code is None:
                    langs = [x for x in langs if x != lang]  # no usable window in its files
                if not langs:
                    raise RuntimeError("ran out of usable source files")
                continue
            out.append(sample)
            made += 1
    return out


def cache_path(n: int, seed: int) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmoe"
    return base / f"modality_eval-v{BUILDER_VERSION}-n{n}-s{seed}.jsonl"


def load_or_build(n: int, seed: int, rebuild: bool = False) -> list[Sample]:
    path = cache_path(n, seed)
    if path.exists() and not rebuild:
        return [Sample(**json.loads(line)) for line in path.read_text().splitlines()]
    samples = build(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples))
    tmp.replace(path)
    return samples


# ---- scoring -----------------------------------------------------------------------------------


@dataclass
class Report:
    n: int
    accuracy: float
    per_class: dict[str, float]
    confusion: dict[str, Counter[str]]  # truth -> predicted -> count
    language_accuracy: float  # on samples with a true language where one was reported
    language_reported: float  # share of samples with a true language where one was reported
    per_language: dict[str, tuple[int, int, int]]  # truth -> (samples, reported, right)
    p50_ms: float
    p99_ms: float
    by_size: dict[str, tuple[int, float, float]]  # size band -> (samples, p50 ms, p99 ms)
    errors: list[tuple[Sample, str, str | None]]


_BANDS = ((1000, "a: < 1 KB"), (2500, "b: 1-2.5 KB"), (9000, "c: 2.5-9 KB"))


def _band(size: int) -> str:
    return next((name for limit, name in _BANDS if size < limit), "d: >= 9 KB")


def _p99(sorted_times: list[float]) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(0.99 * len(sorted_times)))]


def evaluate(samples: list[Sample], progress: bool = False) -> Report:
    confusion: dict[str, Counter[str]] = {m.value: Counter() for m in _CLASSES}
    per_lang: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    times: list[float] = []
    sized: dict[str, list[float]] = defaultdict(list)
    errors: list[tuple[Sample, str, str | None]] = []
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        d = classify(s.text)
        times.append(time.perf_counter() - t0)
        sized[_band(len(s.text.encode()))].append(times[-1])
        confusion[s.modality][d.modality.value] += 1
        if s.language:
            row = per_lang[s.language]
            row[0] += 1
            row[1] += d.language is not None
            row[2] += d.language == s.language
        if d.modality.value != s.modality or (d.language and s.language and d.language != s.language):
            errors.append((s, d.modality.value, d.language))
        if progress and ((i + 1) % 250 == 0 or i + 1 == len(samples)):
            print(f"\rclassified {i + 1}/{len(samples)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    right = sum(confusion[m][m] for m in confusion)
    reported = sum(r[1] for r in per_lang.values())
    times.sort()
    return Report(
        n=len(samples),
        accuracy=right / len(samples),
        per_class={m: c[m] / max(1, sum(c.values())) for m, c in confusion.items()},
        confusion=confusion,
        language_accuracy=sum(r[2] for r in per_lang.values()) / max(1, reported),
        language_reported=reported / max(1, sum(r[0] for r in per_lang.values())),
        per_language={k: (v[0], v[1], v[2]) for k, v in sorted(per_lang.items())},
        p50_ms=statistics.median(times) * 1e3,
        p99_ms=_p99(times) * 1e3,
        by_size={
            b: (len(t), statistics.median(t) * 1e3, _p99(sorted(t)) * 1e3) for b, t in sorted(sized.items())
        },
        errors=errors,
    )


def print_report(r: Report) -> None:
    print(f"samples {r.n}   accuracy {r.accuracy:.1%}")
    print("per class: " + "   ".join(f"{m} {a:.1%}" for m, a in r.per_class.items()))
    print("confusion (rows truth, columns predicted):")
    print(f"  {'':>6} " + " ".join(f"{m.value:>6}" for m in _CLASSES))
    for m, c in r.confusion.items():
        print(f"  {m:>6} " + " ".join(f"{c[p.value]:>6}" for p in _CLASSES))
    print(
        f"language: accuracy {r.language_accuracy:.1%} where reported, reported on {r.language_reported:.1%}"
    )
    for lang, (n, rep, ok) in r.per_language.items():
        print(f"  {lang:<11} samples {n:>4}  reported {rep / n:>6.1%}  right {ok / max(1, rep):>6.1%}")
    print(f"latency per prompt: p50 {r.p50_ms:.3f} ms   p99 {r.p99_ms:.3f} ms")
    for band, (n, p50, p99) in r.by_size.items():
        print(f"  {band[3:]:<11} samples {n:>4}  p50 {p50:.3f} ms  p99 {p99:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rebuild", action="store_true", help="ignore the cached set")
    ap.add_argument("--show-errors", type=int, default=0, metavar="N", help="print N misclassified samples")
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(
        f"building/loading {args.samples} samples (cache {cache_path(args.samples, args.seed)})",
        file=sys.stderr,
    )
    samples = load_or_build(args.samples, args.seed, args.rebuild)
    print(f"set ready in {time.perf_counter() - t0:.1f} s; classifying", file=sys.stderr)
    report = evaluate(samples, progress=True)
    print_report(report)
    for s, got, lang in report.errors[: args.show_errors]:
        print(f"\n--- truth {s.modality}/{s.language} got {got}/{lang} ({s.origin})\n{s.text[:600]}")


if __name__ == "__main__":
    main()
