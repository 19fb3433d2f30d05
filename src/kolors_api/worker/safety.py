"""Content safety: prompt screening before the engine, output screening after it.

Both run in the worker. A block ends the job FAILED with ``"content blocked: <reason>"``; the
store refunds FAILED jobs and keeps no image.

- **Prompts** (always on): the prompt (not the negative prompt: that is what the user does *not*
  want) is reduced to a skeleton (`normalize`: NFKC, case-folded, stripped of invisible format
  characters and combining marks, Unicode TR39 look-alikes mapped to Latin), then matched against
  blocked terms on word boundaries, so ``ＬＯＬＩ``, ``Loli``, ``lo\u200bli``, ``lo\u0301li`` and
  ``lоli`` (a Cyrillic ``о``) are caught and ``classic`` does not match ``ass``.
  The terms are a short built-in list (`DEFAULT_BLOCKED_TERMS`) or, when
  `Settings.blocked_terms_file` is set, that file instead.
- **Images** (opt-in): each `Screener` named in `Settings.screeners` sees the encoded images.
  The one screener shipped is NudeNet's ONNX detector (the optional ``safety`` extra; its wheel
  ships an AGPL-3.0 licence file, which is why it is never installed by default).

Example::

    KOLORS_API_BLOCKED_TERMS_FILE=/etc/kolors/blocked.txt \\
    KOLORS_API_SCREENERS=nudenet KOLORS_API_NUDENET_THRESHOLD=0.5 kolors-api serve

This module imports neither torch nor nudenet at import time.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kolors_api.schema import GenerateParams
    from kolors_api.settings import Settings

log = logging.getLogger("kolors_api.worker.safety")

#: Used when no `blocked_terms_file` is configured: sexual content involving minors, which no
#: deployment wants. Deliberately short; operators who want more write their own file.
#: A trailing ``*`` matches any word that starts with the term (``pedophil*``: pedophile, pedophilia).
DEFAULT_BLOCKED_TERMS: tuple[str, ...] = (
    "child porn*",
    "csam",
    "jailbait",
    "kiddie porn*",
    "loli",
    "lolis",
    "lolicon",
    "naked child*",
    "nude child*",
    "nude minor*",
    "paedo",
    "paedophil*",
    "pedo",
    "pedos",
    "pedophil*",
    "preteen nude*",
    "preteen sex*",
    "shota",
    "shotacon",
    "underage nude*",
    "underage porn*",
    "underage sex*",
    # Kolors reads Chinese too: child pornography, paedophilia (simplified and traditional).
    "儿童色情",
    "兒童色情",
    "恋童",
    "戀童",
)

#: Every class NudeNet 3.4's detector reports.
NUDENET_CLASSES: frozenset[str] = frozenset({
    "ANUS_COVERED", "ANUS_EXPOSED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "BELLY_COVERED",
    "BELLY_EXPOSED", "BUTTOCKS_COVERED", "BUTTOCKS_EXPOSED", "FACE_FEMALE", "FACE_MALE",
    "FEET_COVERED", "FEET_EXPOSED", "FEMALE_BREAST_COVERED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_COVERED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
})

# Scripts written without spaces between words: a term in them matches inside a run of text, and
# their letters do not count as word characters next to a Latin term ("一个loli" is caught).
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_WORD_CHAR = f"[^\\W_{_UNSPACED}]"
_SEPARATORS = r"[\W_]+"


#: Look-alikes of Latin letters, after NFKC and case folding: the lower-case Latin entries of Unicode
#: TR39's confusables.txt for the Cyrillic, Greek, Armenian and IPA letters a prompt can hide a term
#: with (``lоli`` with a Cyrillic ``о``), and the digits it maps to letters (``0`` → o, ``1`` → l).
CONFUSABLES: dict[str, str] = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ӏ": "l", "ј": "j", "к": "k",
    "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "ү": "y", "х": "x", "ԝ": "w", "ь": "b",
    "ɡ": "g", "ѵ": "v", "ѡ": "w", "ҽ": "e", "ӕ": "ae",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "σ": "o",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ϲ": "c", "ϳ": "j", "ω": "w",
    # Armenian, Latin extensions and IPA
    "օ": "o", "ս": "u", "ո": "n", "հ": "h", "ց": "g", "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ǀ": "l",
    "ɪ": "i", "ʟ": "l", "ᴏ": "o", "ᴘ": "p", "ꮪ": "s", "ɢ": "g", "ʜ": "h", "ᴋ": "k", "ɴ": "n",
    # digits read as letters
    "0": "o", "1": "l",
}
_SKELETON = str.maketrans(CONFUSABLES)


def normalize(text: str) -> str:
    """What matching sees, a skeleton of the text: NFKC, case-folded, without format characters
    (zero-width and the like) or combining marks (``lo\u0301li``), look-alikes (`CONFUSABLES`) as
    the Latin letters they imitate. Terms and prompts both go through it."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    visible = "".join(ch for ch in unicodedata.normalize("NFD", folded)
                      if unicodedata.category(ch) not in ("Cf", "Mn", "Me"))
    return unicodedata.normalize("NFC", visible.translate(_SKELETON))


def _term_pattern(term: str) -> re.Pattern[str]:
    prefix = term.endswith("*")
    words = [w for w in re.split(_SEPARATORS, term.rstrip("*")) if w]
    if not words:  # only symbols (an emoji, say): a plain substring
        return re.compile(re.escape(term.rstrip("*")))
    body = _SEPARATORS.join(re.escape(w) for w in words)
    before = f"(?<!{_WORD_CHAR})" if re.fullmatch(_WORD_CHAR, words[0][0]) else ""
    after = f"(?!{_WORD_CHAR})" if re.fullmatch(_WORD_CHAR, words[-1][-1]) and not prefix else ""
    return re.compile(before + body + after)


def read_terms(path: Path) -> list[str]:
    """Terms from a file: one per line, UTF-8; blank lines and lines starting with ``#`` skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"blocked_terms_file: cannot read {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class PromptScreen:
    """Blocked-term matching on normalised text.

    >>> PromptScreen(["ass"]).check("ａｓｓ hat")
    'prompt contains a blocked term: "ass"'
    >>> PromptScreen(["ass"]).check("a classic assassin") is None
    True
    """

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms: list[str] = list(dict.fromkeys(t for t in (normalize(raw.strip()) for raw in terms)
                                                   if t.rstrip("*")))
        self._patterns = [_term_pattern(term) for term in self.terms]

    @classmethod
    def from_file(cls, path: Path) -> PromptScreen:
        return cls(read_terms(path))

    def match(self, text: str) -> str | None:
        """The first configured term that `text` contains, or None."""
        normalized = normalize(text)
        for term, pattern in zip(self.terms, self._patterns, strict=True):
            if pattern.search(normalized):
                return term
        return None

    def check(self, text: str) -> str | None:
        term = self.match(text)
        # The configured term, not the user's text: it says what to change without echoing it.
        return None if term is None else f'prompt contains a blocked term: "{term}"'


class Screener(Protocol):
    """An output check: the encoded images of one job in, a reason to block them (or None) out."""

    name: str

    def screen(self, images: list[bytes]) -> str | None: ...


class NudeNetScreener:
    """NudeNet's ONNX detector (the 320n model inside the `nudenet` wheel) on CPU, via onnxruntime.

    Blocks when any detection of a class in `classes` scores at least `threshold`. NudeNet itself
    drops detections under 0.2, so thresholds below 0.2 act as 0.2. Loading takes a fraction of a
    second and never touches the network.
    """

    name = "nudenet"

    def __init__(self, classes: set[str] | frozenset[str], threshold: float) -> None:
        unknown = sorted(set(classes) - NUDENET_CLASSES)
        if unknown:
            raise ValueError(f"nudenet_classes: unknown {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(NUDENET_CLASSES))})")
        if not classes:
            raise ValueError("nudenet_classes: empty; name at least one class or drop nudenet from screeners")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"nudenet_threshold: must be between 0 and 1, got {threshold}")
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise RuntimeError(
                "screeners=nudenet needs the optional `safety` extra (pip install 'kolors-api[safety]'; "
                f"NudeNet ships an AGPL-3.0 licence file, so it is not installed by default): {exc}") from None
        self.classes = frozenset(classes)
        self.threshold = threshold
        self._detector: Any = NudeDetector()

    def detect(self, image: bytes) -> list[dict[str, Any]]:
        """NudeNet's detections on one encoded image (webp, jpg, png…): class, score, box."""
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(image)) as img:
            rgb = np.asarray(img.convert("RGB"))
        # NudeNet's own path is cv2.imread: BGR, 8-bit, three channels.
        detections: list[dict[str, Any]] = self._detector.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        return detections

    def screen(self, images: list[bytes]) -> str | None:
        for i, image in enumerate(images):
            hits = [d for d in self.detect(image) if d["class"] in self.classes and d["score"] >= self.threshold]
            if hits:
                worst = max(hits, key=lambda d: float(d["score"]))
                where = f"image {i}: " if len(images) > 1 else ""
                return f"{self.name}: {where}{worst['class']} {worst['score']:.2f} >= {self.threshold:g}"
        return None


class Safety:
    """The worker's `SafetyLike`: the prompt screen before the engine, the screeners after it."""

    def __init__(self, prompt: PromptScreen | None = None, screeners: Sequence[Screener] = ()) -> None:
        self.prompt = prompt
        self.screeners = list(screeners)

    def check_prompt(self, params: GenerateParams) -> str | None:
        if self.prompt is None:
            return None
        reason = self.prompt.check(params.prompt)
        if reason:
            log.info("prompt blocked: %s", reason)
        return reason

    def check_images(self, images: list[bytes]) -> str | None:
        for screener in self.screeners:
            reason = screener.screen(images)
            if reason:
                log.info("output blocked: %s", reason)
                return reason
        return None


def _nudenet(settings: Settings) -> Screener:
    classes = {c.strip().upper() for c in settings.nudenet_classes.split(",") if c.strip()}
    return NudeNetScreener(classes, settings.nudenet_threshold)


#: Screener name (as written in `Settings.screeners`) -> factory.
SCREENERS: dict[str, Callable[[Settings], Screener]] = {"nudenet": _nudenet}


def build_safety(settings: Settings) -> Safety:
    """The `Safety` that `settings` describe; raises at start-up on a bad file, name or class."""
    if settings.blocked_terms_file is not None:
        prompt = PromptScreen.from_file(settings.blocked_terms_file)
    else:
        prompt = PromptScreen(DEFAULT_BLOCKED_TERMS)
    names = [n.strip().lower() for n in settings.screeners.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCREENERS]
    if unknown:
        raise ValueError(f"screeners: unknown {', '.join(unknown)} (known: {', '.join(SCREENERS)})")
    screeners = [SCREENERS[n](settings) for n in dict.fromkeys(names)]
    log.info("content safety: %d blocked terms%s, screeners: %s", len(prompt.terms),
             f" from {settings.blocked_terms_file}" if settings.blocked_terms_file else " (default list)",
             ", ".join(s.name for s in screeners) or "none")
    return Safety(prompt, screeners)
