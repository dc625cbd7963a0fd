"""Modality detection: is a prompt prose, source code, or both, and in which language is the code?

`classify(prompt)` labels each line (code / prose / neutral) with a few regexes, lets weak lines
take the label of their strong neighbours, then decides:
  CODE  — no prose line (comments, docstrings and fenced blocks never count as prose);
  CODE  — also a single short line that is unmistakably code ("def f(x):", "import os");
  TEXT  — otherwise, fewer than two code lines;
  MIXED — a ``` fence with a line of three or more words outside it, or prose at the start/end of
          code, or a real share of both when they interleave.
Prose material that looks symbolic is neutralised first: URLs and e-mail addresses count as one
word, lines that are only file paths are neutral, and a leading "* " is a bullet (its text is
judged) unless the prompt has C comment markers. Code-only evidence includes a command followed
by an option ("python3 -m build", "set -e"); a make rule has at most two targets and is not a
changelog entry ("file.c (func): Fix ...").
The language comes from a fence tag when there is one, else from per-language keyword tables
scored over the first LANG_LINES code lines; it is None unless one language clearly leads.

Cost: pure Python, linear in the analysed text. Only the first HEAD_CHARS and the last TAIL_CHARS
of a longer prompt are analysed (whole lines), so any prompt costs at most about as much as a 16 KB one.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from itertools import islice
from typing import Any

from scheduler.jobs import Modality

HEAD_CHARS = 12_288
TAIL_CHARS = 4_096


@dataclass(frozen=True)
class Detection:
    """modality: the class; language: lower-case name ("python", "c", "shell", ...) or None when
    unsure or without code; confidence: 0–1, how one-sided the line evidence was."""

    modality: Modality
    language: str | None
    confidence: float


# ---- per-line evidence -------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+#.-]*)")
_COMMENT = re.compile(
    r"^\s*([rbuRBU]?(\"\"\"|\'\'\')|#(?![!\w])|#\s|//|/\*|\*/|\*(\s|$)|--\s|<!--|;;|%\s|=(head\d|pod|item|over|back|cut)\b)"
)
# Block constructs whose inside is prose-like but belongs to the code: (opener, closer) patterns.
_BLOCKS = (
    (re.compile(r'"""|\'\'\''), None),  # Python strings: the same token toggles
    (re.compile(r"/\*(?!.*\*/)"), re.compile(r"^(?!.*/\*).*\*/\s*$")),
    (re.compile(r"<!--(?!.*-->)"), re.compile(r"^(?!.*<!--).*-->")),
    (re.compile(r"^=(pod|head\d|item|over|begin|encoding|for)\b"), re.compile(r"^=cut\b")),
)
# Every opener and closer of _BLOCKS needs one of these: a line without any skips them (~3 µs a line).
_BLOCK_HINT = re.compile(r"\"\"\"|\'\'\'|/\*|\*/|<!--|-->|^=")
# Strong code evidence on a line: _STRONG_AT, patterns anchored at the line's start (one try, with
# .match), or _STRONG_IN, patterns anywhere (a search), each of which needs one of _STRONG_IN_CHARS.
# One alternation of both took ~43 µs on a 130-character English line (2-core box): sre tried every
# pattern at every position; split, about 3 µs.
_STRONG_AT = re.compile(
    r"""^\s*[}\])]
      | ^\s*(\#\s*(include|define|if|ifn?def|endif|else|elif|undef|pragma)\b | \#! | @@\s | diff\s--git
             | Traceback\s\(most | File\s".*",\sline\s\d | at\s[\w.$]+\(.*\)$ | [+-]{3}\s\S )
      | ^\s*</?[a-zA-Z][\w-]*(\s[^>]*)?/?>
      | ^\s*[\w.\[\]'"$@%>-]+\s*=\s*\S
      | ^\s*(def|class|import|elif|except|fn|func|package|typedef|struct|impl|sub|my|fi|esac|done|then|
             SELECT|INSERT|UPDATE|CREATE|ALTER|DROP|FROM|WHERE|RETURNS|AS|LANGUAGE|OUT|IN|BEGIN|END|SET|VALUES
             |GRANT|DECLARE|ORDER|GROUP|AND|OR|JOIN|LEFT)\b\s*[\w$@%(]?
      | ^\s*-\s[\w"'.-]+:\s | ^\s*[\w.-]+:\s*$ | ^\s*"[^"]+"\s*: | ^\s*-?\s*[a-z_][\w.-]*:\s+\S
      | ^[a-z_.%$][\w.%$()/-]*(\s+[\w.%$()/-]+)?\s*::?(\s|$)(?!\s*[A-Z][a-z]+\s)
      | ^\s*[a-z][\w.+-]*\s+--?[a-zA-Z][\w-]*(\s|=|$)
      | ^\s*[A-Z]\w*(Error|Exception):\s | ^\s*\\[a-z]+\b | ^\s*from\s+[\w.]+\s+import\b
      | ^\s*(echo|printf|exit|export|cd|rm|cp|mv|mkdir|sudo|apt-get|pip|npm|git|grep|sed|awk|chmod|chown|ln
             |unset|curl|wget|tar)\b.*[-"$'/|>&=]
    """,
    re.VERBOSE,
)
_STRONG_IN = re.compile(
    r"""[;{}]\s*$ | [\[(]\s*$ | \)\s*:\s*$
      | ==|!=|<=|>=|&&|\|\||->|=>|::|:=|\+=|-=|\+\+|<<|\$\(|\$\{
      | \w\([^()\s]*[,)] | \w\.\w+\(
    """,
    re.VERBOSE,
)
_STRONG_IN_CHARS = re.compile(r"[;{}\[()=!<>&|:+$-]")
_BULLET = re.compile(r"^\s*\*\s+")
_DEFINITE = re.compile(r"\w\([^()]*\)\s*[:;{]\s*$|^\s*(for|while|if|elif|with)\b[^.?!]*:\s*$")
# URLs and e-mail addresses are prose material (changelogs, docs): they count as one word.
_URL = re.compile(r"<?(https?://|www\.)[^\s>)]+>?|<?[\w.+-]+@[\w-]+(\.[\w-]+)+>?")
# A line that is only file paths ("src/lib/util.c", "libs/*") is a file list: neutral evidence.
_PATHS = re.compile(r"^\s*[-*]?\s*[\w.*+-]+/[\w.*+/-]*(?:[,;]?\s+[\w.*+-]+/[\w.*+/-]*)*[,;]?\s*$")
_SYMBOL = re.compile(r"[{}\[\]<>=;$#@\\|&*/+^~%_]")  # not (): prose has parentheses too
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_STOP = frozenset(
    [
        "the",
        "a",
        "an",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "to",
        "of",
        "and",
        "in",
        "that",
        "this",
        "it",
        "its",
        "for",
        "with",
        "you",
        "your",
        "on",
        "as",
        "by",
        "or",
        "not",
        "can",
        "will",
        "what",
        "how",
        "why",
        "does",
        "do",
        "if",
        "when",
        "which",
        "should",
        "would",
        "there",
        "their",
        "have",
        "has",
        "i",
        "we",
        "my",
        "me",
        "please",
        "from",
        "at",
        "but",
        "all",
        "any",
        "so",
        "than",
        "then",
        "into",
        "only",
        "also",
        "more",
        "some",
        "these",
        "those",
        "about",
    ]
)
_CODE, _PROSE, _NONE = 1, -1, 0


def _line_kind(line: str, c_comments: bool = True) -> tuple[int, bool]:
    """(kind, strong) for one non-blank line outside fences and comment blocks. A "* " line is a
    comment continuation only when the prompt has C comment markers (c_comments); otherwise it
    is a bullet and its text is judged."""
    bullet = _BULLET.match(line)
    if bullet and not c_comments:
        line = line[bullet.end() :]
        if not line.strip():
            return _NONE, False
    elif _COMMENT.match(line):
        return _NONE, False
    if "/" in line and _PATHS.match(line):
        return _NONE, False
    if "://" in line or "@" in line or "www." in line:
        line = _URL.sub("url", line)
    s = line.strip()
    words = _WORD.findall(s)
    stop = sum(map(_STOP.__contains__, map(str.lower, words)))
    sym = len(_SYMBOL.findall(s))
    code = _STRONG_AT.match(line) is not None or (
        _STRONG_IN_CHARS.search(line) is not None and _STRONG_IN.search(line) is not None
    )
    sentence = s[0].isupper() and s[-1] in ".?!:"
    if code and not (stop >= 4 and sym <= 2 and len(words) >= 8):
        return _CODE, sym >= 2 or stop == 0
    if len(words) >= 3 and sym <= max(1, len(s) // 30) and (stop >= 1 or sentence):
        indented = len(line) - len(line.lstrip()) >= 4  # typed prose is not indented; docstrings are
        return _PROSE, not indented and ((stop >= 2 and len(words) >= 4) or sentence or len(words) >= 8)
    if sym >= 3 or (sym and not words) or (line.startswith("\t") and not stop):
        return _CODE, False
    return (_PROSE, False) if len(words) >= 2 and not sym else (_NONE, False)


def _clip(prompt: str) -> str:
    if len(prompt) <= HEAD_CHARS + TAIL_CHARS:
        return prompt
    head = prompt[:HEAD_CHARS].rsplit("\n", 1)[0]
    tail = prompt[-TAIL_CHARS:].split("\n", 1)[-1]
    return f"{head}\n{tail}"


@dataclass
class _Scan:
    kinds: list[int]  # per non-blank line outside fences: _CODE / _PROSE / _NONE
    strong: list[bool]
    code_lines: list[str]  # every line that is code (fenced, code-labelled, comment-like)
    fenced: int  # lines inside fences
    comments: int  # comment lines and lines inside comment blocks / docstrings
    fence_tag: str | None
    outside_words: int = 0  # the most words on one line outside fences, counted up to 3


def _scan(text: str) -> _Scan:
    sc = _Scan([], [], [], 0, 0, None)
    fence: str | None = None  # the open fence marker, or None outside fences
    block: int | None = None  # index into _BLOCKS while inside a comment/docstring block
    first_block_line: int | None = None
    c_comments = "/*" in text or "*/" in text
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1).startswith(fence[:3])):
            fence = None if fence else m.group(1)
            if fence and m.group(2) and sc.fence_tag is None:
                sc.fence_tag = m.group(2).lower()
            continue
        if fence:
            sc.fenced += 1
            sc.code_lines.append(line)
            continue
        if not line.strip():
            continue
        if block is not None:
            opener, closer = _BLOCKS[block]
            if (closer or opener).search(line):
                block = None
            sc.kinds.append(_NONE)
            sc.strong.append(False)
            sc.code_lines.append(line)
            sc.comments += 1
            continue
        kind, strong = _line_kind(line, c_comments)
        if sc.outside_words < 3:  # only "three or more" matters (see _decide): stop at three
            sc.outside_words = max(sc.outside_words, sum(1 for _ in islice(_WORD.finditer(line), 3)))
        sc.comments += kind == _NONE and _COMMENT.match(line) is not None
        if _BLOCK_HINT.search(line) is not None:  # else no opener or closer can match
            for i, (opener, closer) in enumerate(_BLOCKS):
                if closer is None:
                    odd = len(opener.findall(line)) % 2 == 1
                else:
                    odd = opener.search(line) is not None
                    if not odd and closer.search(line) and first_block_line is None:
                        _neutralise(sc)  # a closer first: we started inside a block
                if odd:
                    before = line[: opener.search(line).start()].strip()  # type: ignore[union-attr]
                    if (
                        closer is None
                        and first_block_line is None
                        and before
                        and not re.search(r"[=(,]\s*[rbuf]?$", before)
                    ):
                        _neutralise(sc)  # text then the quotes: the closing end of a docstring
                    else:
                        block = i
                    kind, strong = _NONE, False
                    first_block_line = len(sc.kinds)
                    break
        sc.kinds.append(kind)
        sc.strong.append(strong)
        if kind != _PROSE:
            sc.code_lines.append(line)
    return sc


def _neutralise(sc: _Scan) -> None:
    sc.kinds = [_NONE] * len(sc.kinds)
    sc.strong = [False] * len(sc.strong)


def _resolve(kinds: list[int], strong: list[bool]) -> list[int]:
    """Weak lines take the label of the nearest strong line; neutral lines are dropped."""
    anchors = [i for i, s in enumerate(strong) if s and kinds[i] != _NONE]
    out: list[int] = []
    j = 0
    for i, k in enumerate(kinds):
        if k == _NONE:
            continue
        if strong[i] or not anchors:
            out.append(k)
            continue
        while j + 1 < len(anchors) and abs(anchors[j + 1] - i) <= abs(anchors[j] - i):
            j += 1
        out.append(kinds[anchors[j]] if abs(anchors[j] - i) <= 2 else k)
    return out


def _decide(sc: _Scan) -> tuple[Modality, float]:
    labels = _resolve(sc.kinds, sc.strong)
    code = labels.count(_CODE) + sc.fenced
    prose = labels.count(_PROSE)
    if sc.fenced and (prose or sc.outside_words >= 3):
        return Modality.MIXED, 1.0  # a fenced block with words around it: a question about code
    if not prose and code + sc.comments >= 2:
        return Modality.CODE, 1.0
    if not prose and code and _definite(sc):
        return Modality.CODE, 0.8  # a one-line completion prompt: "def f(x):", "import os"
    if code < 2 or (prose and code < 3 and prose > code):
        return Modality.TEXT, (prose + 1) / (prose + code + 1)
    if not prose:
        return Modality.CODE, 1.0
    runs = [k for i, k in enumerate(labels) if i == 0 or labels[i - 1] != k]
    share = min(code, prose) / (code + prose)
    edge_prose = runs[0] == _PROSE or runs[-1] == _PROSE
    solid = runs == [_PROSE, _CODE, _PROSE] or share >= 0.1 or _solid_prose(sc, labels)
    if len(runs) <= 3 and edge_prose and code >= 2 and prose >= 1 and solid:
        return Modality.MIXED, 0.5 + share
    if share >= 0.25:
        return Modality.MIXED, 0.5 + share
    return (Modality.CODE if code > prose else Modality.TEXT), 1.0 - share


def _definite(sc: _Scan) -> bool:
    """A short line that is strong code or ends the way only code ends ("for i in range(3):").
    Long lines are left out: a one-paragraph prompt full of paths is prose, not code."""
    short = [line for line in sc.code_lines if len(line) <= 120]
    strong = any(k == _CODE and st for k, st in zip(sc.kinds, sc.strong, strict=True))
    return bool(short) and (strong or any(_DEFINITE.search(line) for line in short))


def _solid_prose(sc: _Scan, labels: list[int]) -> bool:
    # One strong prose line at an edge (e.g. "Why does this fail?") is enough to call it mixed.
    return (
        sum(sc.strong[i] and k == _PROSE for i, k in enumerate(sc.kinds)) >= 1 and labels.count(_PROSE) >= 1
    )


# ---- language ----------------------------------------------------------------------------------

_ALIASES = {
    "py": "python", "python3": "python", "sh": "shell", "bash": "shell", "zsh": "shell",
    "console": "shell", "shell-session": "shell", "js": "javascript", "node": "javascript",
    "jsx": "javascript", "ts": "typescript", "h": "c", "c++": "cpp", "cc": "cpp", "hpp": "cpp",
    "yml": "yaml", "makefile": "make", "mk": "make", "rs": "rust", "golang": "go", "pl": "perl",
    "patch": "diff", "htm": "html", "postgresql": "sql", "psql": "sql",
}  # fmt: skip
_M = re.MULTILINE
# Per language: (pattern, weight); a language's score is the weighted count of matches.
_TABLES: dict[str, list[tuple[str, float]]] = {
    "python": [
        (r"^\s*def \w+\(.*\)\s*(->.*)?:\s*$", 4),
        (r"^\s*(from [\w.]+ )?import \w[\w.]*(, \w+)*( as \w+)?\s*$", 3),
        (r"^\s*class \w+(\(.*\))?:\s*$", 4),
        (r"\bself\.", 2),
        (r"\b(None|True|False)\b", 1),
        (r"^\s*(elif|except|try|finally|with|for|while|if|else)\b.*:\s*$", 2),
        (r"^\s*@\w+", 1),
        (r'"""', 2),
        (r"__\w+__", 1),
        (r"^\s*raise \w", 2),
        (r"\bis not\b|\bnot in\b|\blambda\b", 1),
        (r"^Traceback \(most recent call last\):|^\s+File \".*\", line \d+", 6),
    ],
    "c": [
        (r"^\s*#\s*(include|define|ifn?def|endif|if|else|elif|undef|pragma)\b", 3),
        (r"\b(typedef|struct|union|unsigned|extern|volatile|sizeof|size_t|u?int\d+_t)\b", 2),
        (r"\b(static|const|void|char|int|long|short|enum)\b", 1),
        (r";\s*$", 0.5),
        (r"\w->\w", 1),
        (r"\bNULL\b", 2),
        (r"^\s*(/\*|\*/|\* )", 1),
        (r"\w\s*\*\s*\w+\s*[;,)=\[]", 1),
    ],
    "shell": [
        (r"^#!.*\b(ba|da|z|k)?sh\b", 8),
        (r"\$\{?\w+\}?", 1),
        (r"^\s*(if|elif|while|until)\s+\[", 3),
        (r"^\s*(fi|esac|done|then|do)\b\s*;?\s*$", 3),
        (r";;\s*$", 2),
        (r"\$\(|`", 1),
        (r"^\s*(echo|printf|export|local|set|exit|cd|rm|mkdir|test|case|shift|unset|exec|return)\b", 2),
        (r"\|\||&&|2>&1|>\s*/dev/null", 1),
        (r'"\$[\w{@]', 2),
        (r"^\s*[\w-]+\s*\(\)\s*\{?\s*$", 3),
        (r"^\s*[A-Za-z_]\w*=[^=\s]", 2),
        (r"^\s*\$ \w", 3),
        (r"\s-[a-zA-Z]\b|\s--[a-z][\w-]+", 0.5),
    ],
    "perl": [
        (r"\bmy\s*[\$@%(]", 4),
        (r"\$\w+(->|\{|\[)", 2),
        (r"^\s*sub \w+", 4),
        (r"=~|!~", 3),
        (r"^\s*use (strict|warnings|vars|constant|parent|base|\w+::)", 4),
        (r"^\s*package [\w:]+;", 4),
        (r"@_|\$_\b|\$@|\$!", 3),
        (r"\w::\w", 1),
        (r"\bunless\b|\belsif\b", 3),
        (r"\bqw[(/{]", 3),
        (r"^=(head\d|pod|cut|item|over|back)", 3),
        (r"\b(croak|confess|bless)\b", 2),
        (r"\bundef\b", 2),
    ],
    "javascript": [
        (r"\b(const|let|var)\s+[\w{\[]+\s*=", 2),
        (r"\bfunction\b\s*\*?\s*\w*\s*\(", 4),
        (r"=>", 1),
        (r"\brequire\(['\"]", 4),
        (r"module\.exports|\bexports\.\w", 4),
        (r"===|!==", 3),
        (r"\bconsole\.\w+\(", 4),
        (r"\bthis\.\w", 2),
        (r"\bundefined\b", 2),
        (r"\}\);?\s*$", 2),
        (r"^\s*(export|import)\b.*\bfrom\s+['\"]", 4),
        (r"\bnew (Promise|Error|Map|Set)\b", 2),
        (r"\.(then|forEach|push|length|prototype)\b", 1),
        (r"['\"]use strict['\"]", 4),
        (r"\bnull\b", 1),
    ],
    "css": [
        (r"^\s*[.#@:]?[\w-]+([\s,>+~]*[.#:]{1,2}[\w-]+)*\s*,?\s*\{\s*$", 1),
        (r"^\s*[a-z-]+\s*:\s*[^;{}]+;\s*$", 3),
        (r"\d(px|em|rem|pt|vh|vw)\b", 2),
        (r"#[0-9a-fA-F]{3,6}\b", 1),
        (r"@media|@import|@font-face|!important", 3),
        (
            r"^\s*(margin|padding|color|background|font|border|display|width|height|position|text)[\w-]*\s*:",
            3,
        ),
    ],
    "html": [
        (
            r"<(html|head|body|div|span|p|a|table|tr|td|th|ul|ol|li|h[1-6]|meta|link|script|style|br|img|pre"
            r"|code|dl|dt|dd|form|input|em|strong|b|i|section|nav|title|tt|hr)\b[^>]*>",
            3,
        ),
        (r"</\w+>", 2),
        (r"&(lt|gt|amp|nbsp|quot|#\d+);", 1),
        (r"<!DOCTYPE|<!--", 3),
        (r"\b(class|href|id|src|name)=\"", 2),
    ],
    "sql": [
        (
            r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|GRANT|REVOKE|COMMENT ON|BEGIN|COMMIT|"
            r"RETURNS|LANGUAGE|WHERE|FROM|VALUES|SET|AS|ORDER BY|GROUP BY|LEFT JOIN|JOIN)\b",
            3,
        ),
        (r"\b(select|create table|insert into|where)\b", 1),
        (r"--\s", 1),
        (r"\$\$|::\w+", 2),
        (
            r"\b(VARCHAR|INTEGER|BOOLEAN|NOT NULL|PRIMARY KEY|REFERENCES|SERIAL|TIMESTAMP|int4|int8|oid|"
            r"RETURNS|STRICT|IMMUTABLE|FUNCTION|TABLE)\b",
            2,
        ),
        (r"\bLANGUAGE (C|plpgsql|sql)\b", 4),
        (r"\bMODULE_PATHNAME\b", 4),
    ],
    "yaml": [
        (r"^\s*[\w.-]+:\s*$", 1),
        (r"^\s*-\s+[\w\"'.-]+(:\s|$)", 2),
        (r"^\s*[\w.-]+:\s+[^\s{(;].*$", 1),
        (r"^---\s*$", 3),
        (r"^\s*[\w-]+:\s*[|>][-+]?\s*$", 3),
    ],
    "make": [
        (r"^[\w.%$()/-]+(\s+[\w.%$()/-]+)*\s*::?(?!=)\s*[^=]*$", 1),
        (r"^\t", 1),
        (r"\$\([\w@<^*]+\)|\$[@<^]", 4),
        (r"^\s*[\w.]+\s*[:?+]?=", 1),
        (r"^\s*(ifeq|ifneq|ifdef|ifndef|endif|include|override|define|endef)\b", 3),
        (r"^\.PHONY|^\.\w+:", 4),
        (r"\$\((shell|wildcard|patsubst|foreach|call|filter|addprefix) ", 4),
    ],
    "json": [(r'^\s*"[^"]+"\s*:\s*', 2), (r"^\s*[\[{]\s*$|^\s*[\]}],?\s*$", 1), (r"\A\s*[\[{]", 3)],
    "go": [
        (r"^package \w+\s*$", 3),
        (r"\bfunc\s+(\(\w+ \*?\w+\)\s*)?\w+\(", 5),
        (r":=", 2),
        (r"\bfmt\.\w+\(", 4),
        (r"\berr != nil\b", 5),
        (r"^import \(", 3),
        (r"\b(chan|defer|go func|interface\{\})", 3),
        (r"\[\](byte|string|int)", 2),
    ],
    "rust": [
        (r"\bfn \w+(<.*>)?\(", 4),
        (r"\blet mut\b", 4),
        (r"\bimpl\b", 3),
        (r"\bpub (fn|struct|enum|mod|trait)\b", 4),
        (r"^\s*use \w+(::\w+)+", 4),
        (r"&mut |&self|&'\w", 3),
        (r"\b(Some|Ok|Err)\(|\.unwrap\(\)", 2),
        (r"#\[\w+", 4),
        (r"\b\w+!\(", 2),
        (r"::new\(", 2),
    ],
    "java": [
        (r"\b(public|private|protected)\s+(static\s+)?(final\s+)?[\w<>\[\]]+\s+\w+\s*[(;=]", 4),
        (r"\bSystem\.(out|err)\.", 5),
        (r"^import (java|javax|org|com)\.[\w.*]+;", 5),
        (r"@Override", 3),
        (r"\bnew [A-Z]\w*(<.*>)?\(", 2),
        (r"\b(String|Integer|boolean|ArrayList)\b", 1),
        (r"\bthrows \w", 3),
        (r"^\s*(public |final |abstract )*class \w+( extends \w+)?( implements [\w, ]+)?\s*\{", 4),
        (r"^\s+at [\w.$]+\([\w.]+:\d+\)", 5),
    ],
    "diff": [(r"^(\+\+\+|---) \S", 4), (r"^@@ -\d+(,\d+)? \+\d+", 6), (r"^diff --git", 6)],
}
LANG_LINES = 40  # the language is scored on the first code lines only
_MIN_SCORE = 4.0
_LEAD = 1.5  # the best language must score this many times the runner-up


def _top_level_alternation(pattern: str) -> bool:
    depth, i, in_class = 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 1
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


def _rule(pattern: str) -> tuple[re.Pattern[str], bool]:
    """(regex, word_start) with the same matches as `pattern` under re.MULTILINE, rewritten so that
    re can jump to a literal first character: a leading ^ becomes a newline (the text is scored with
    one prepended), and a leading \\b is dropped and checked on each match instead (word_start)."""
    if not _top_level_alternation(pattern):
        if pattern.startswith("^"):
            return re.compile("\n" + pattern[1:], _M), False
        if pattern.startswith("\\b") and re.match(r"\\b(\(\?:|\()?[A-Za-z]", pattern):
            return re.compile(pattern[2:], _M), True
    return re.compile(pattern, _M), False


_LANGS = {lang: [(*_rule(p), w) for p, w in pats] for lang, pats in _TABLES.items()}


def _needed(pattern: str) -> list[frozenset[str]]:
    """Sets of strings such that every match of `pattern` (under re.MULTILINE) contains a string of
    each set: a text that lacks all of one set has no match. Read from re's own parse of the
    pattern, so they follow every edit of the tables; only literals, small character classes,
    groups, alternations and repeats of at least one are understood, anything else counts as
    "could be anything". Best set first; a set with a bare newline is left out (the text always has
    one, see _rule)."""
    try:  # re's own parser (private, stable since 3.11); without it no short cut, the same results
        c = importlib.import_module("re._constants")
        _parser = importlib.import_module("re._parser")
    except ImportError:  # pragma: no cover
        return []
    Items = list[tuple[Any, Any]]  # re._parser's (opcode, argument) pairs

    def chars(av: Items) -> set[str] | None:
        out: set[str] = set()
        for op, arg in av:
            if op is c.LITERAL:
                out.add(chr(arg))
            elif op is c.RANGE and arg[1] - arg[0] < 16:
                out.update(chr(i) for i in range(arg[0], arg[1] + 1))
            else:
                return None  # NEGATE, CATEGORY, a wide range
        return out

    def exact(items: Items) -> set[str] | None:
        """Every string the sequence can match, when they are few."""
        out = {""}
        for op, av in items:
            part: set[str] | None
            if op is c.LITERAL:
                part = {chr(av)}
            elif op is c.IN:
                part = chars(av)
            elif op is c.AT:
                part = {""}  # zero width: adds nothing to the matched text
            elif op is c.SUBPATTERN and not av[1] and not av[2]:
                part = exact(av[3].data)
            elif op is c.BRANCH:
                subs = [exact(b.data) for b in av[1]]
                part = None if any(x is None for x in subs) else {t for x in subs if x for t in x}
            else:
                return None
            if part is None or len(out) * len(part) > 64:
                return None
            out = {a + b for a in out for b in part}
        return out

    def need(items: Items) -> list[set[str]]:
        found: list[set[str]] = []
        run: Items = []
        for item in [*items, (None, None)]:
            if item[0] is not None and exact([item]) is not None:
                run.append(item)  # a run of fixed pieces: their concatenations are needed
                continue
            if run:
                whole = exact(run)
                found += [whole] if whole is not None else [e for e in (exact([i]) for i in run) if e]
                run = []
            op, av = item
            if op is c.SUBPATTERN and not av[1] and not av[2]:
                found += need(av[3].data)
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT) and av[0] >= 1:
                found += need(list(av[2]))
            elif op is c.BRANCH:
                subs = [need(b.data) for b in av[1]]
                if all(subs):  # one set of each branch, the best: their union is needed
                    found.append(set().union(*(x[0] for x in subs)))
        return sorted(
            (x for x in found if x and "" not in x),
            key=lambda x: (-min(len(t.strip()) for t in x), -min(map(len, x)), len(x)),
        )

    try:
        parsed = _parser.parse(pattern, _M)
        if parsed.state.flags & ~(re.MULTILINE | re.UNICODE):
            return []
        sets = need(parsed.data)
    except Exception:  # pragma: no cover - see above
        return []
    return [frozenset(x) for x in sets if "\n" not in x]


def _any_of(strings: frozenset[str] | set[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(t) for t in sorted(strings, key=lambda t: (-len(t), t))))


# A rule with its filters: strings that must all be in the text, then patterns (sets of several
# strings) that must all find one; failing any, the rule's count is 0 without running it.
_Rule = tuple[tuple[str, ...], tuple[re.Pattern[str], ...], re.Pattern[str], bool, float]


def _plan(rules: list[tuple[re.Pattern[str], bool, float]]) -> tuple[list[re.Pattern[str]], list[_Rule]]:
    """(language filters, rules with their filters). Language filter k finds a string of each rule's
    k-th needed set (its last where it has fewer): where one finds nothing, no rule can match and
    the language scores 0 at the cost of a search or two."""
    needed = [_needed(rx.pattern) for rx, _, _ in rules]
    planned = [
        (
            tuple(next(iter(x)) for x in sets if len(x) == 1),
            tuple(_any_of(x) for x in sets if len(x) > 1),
            rx,
            ws,
            w,
        )
        for sets, (rx, ws, w) in zip(needed, rules, strict=True)
    ]
    if not all(needed):
        return [], planned  # a rule without a filter: the language always runs its rules
    depth = max(map(len, needed))
    layers = [set().union(*(sets[min(k, len(sets) - 1)] for sets in needed)) for k in range(depth)]
    return [_any_of(x) for x in layers], planned


# Filters first: most languages cost a search or two of a few strings, most rules none (before, each
# language ran one alternation of all its rules; the cost before and after: BENCHMARKS.md, modality).
_PLAN = {lang: _plan(rules) for lang, rules in _LANGS.items()}


def _count(rx: re.Pattern[str], word_start: bool, text: str) -> int:
    if not word_start:
        return len(rx.findall(text))
    return sum(not (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_") for m in rx.finditer(text))


def _language(sc: _Scan) -> str | None:
    if sc.fence_tag:
        return _ALIASES.get(sc.fence_tag, sc.fence_tag)
    code = "\n" + "\n".join(sc.code_lines[:LANG_LINES])  # the leading newline: see _rule
    scores: list[tuple[float, str]] = []
    # The filters inline, as loops: this runs for every rule of every language of a code prompt, and
    # a helper function with all() over generators took classify on a 2-line prompt 110 → 240 µs.
    for lang, (layers, rules) in _PLAN.items():
        score: float = 0
        for layer in layers:
            if layer.search(code) is None:
                break
        else:
            for words, sets, rx, ws, w in rules:
                for word in words:
                    if word not in code:
                        break
                else:
                    for needed in sets:
                        if needed.search(code) is None:
                            break
                    else:
                        score += w * _count(rx, ws, code)
        scores.append((score, lang))
    scores.sort(reverse=True)
    (best, lang), (second, _) = scores[0], scores[1]
    return lang if best >= _MIN_SCORE and best >= _LEAD * second else None


# ---- the public functions ----------------------------------------------------------------------


def classify(prompt: str) -> Detection:
    text = _clip(prompt)
    if not text.strip():
        return Detection(Modality.TEXT, None, 1.0)
    sc = _scan(text)
    modality, confidence = _decide(sc)
    language = None if modality is Modality.TEXT else _language(sc)
    return Detection(modality, language, round(min(1.0, confidence), 3))


def detect(prompt: str) -> Modality:
    return classify(prompt).modality
