"""Is this a good DreamBooth identifier? ``sdtune check-token`` and ``sdtune suggest-tokens``.

DreamBooth binds the subject to a rare word ("a photo of sks dog"). Training goes best when that word means
as little as possible to the model beforehand (Ruiz et al. 2022, sec. 3.2), which in practice means:

- one token: a word cut into pieces brings the meanings of its pieces along;
- a late BPE merge: CLIP's ids follow merge order, and merges were learnt most-frequent-first, so a late id
  is a string that was rare in CLIP's training text (``rarity_percentile`` = where the id falls in the list);
- not a word in any language (``wordfreq``, 42 languages) and no known meaning (``sks`` is a rifle).

Every Stable Diffusion text encoder uses the same BPE (see :mod:`sdtune.tokens`), so the shipped vocabulary
answers for all of them; ``--tokenizer`` checks a model's own tokenizer(s) instead, both of them for SDXL.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sdtune import families
from sdtune.errors import SdtuneError
from sdtune.hub import offline_reason, offline_unless_reachable
from sdtune.tokens import BOS_TOKEN, EOS_TOKEN, VOCAB_SIZE, clip_tokenize, clip_vocab, readable_piece

# --- thresholds -------------------------------------------------------------------------------------------
# Word frequencies are Zipf values: log10 of occurrences per billion words (3 = once per million words).
COMMON_WORD_ZIPF = 4.0  # >= 10 per million words in some language: a common word, the model knows it: bad
WORD_ZIPF = 3.0  # >= 1 per million: a word people use (wordfreq's small lists start here): is_word, risky
RARE_WORD_ZIPF = 2.0  # listed at >= 1 per 100 million: a rare word, name or abbreviation: risky
# An identifier that reads as two common English words ("foxtv", "drwho") carries both meanings.
COMPOUND_PART_ZIPF = 4.0
# A token that is the last BPE piece of common English words is trained as part of them: risky.
FRAGMENT_WORD_ZIPF = 3.0
# Ids before the median merge are frequent strings (most short words and word endings): risky.
EARLY_MERGE_PERCENTILE = 50.0
# suggest-tokens is stricter than a good verdict: only the last quarter of the merges, and nothing that an
# English word listed at >= 1 per 100 million words ends with ("adish" reads as the end of "radish").
SUGGEST_MIN_PERCENTILE = 75.0
SUGGEST_TAIL_ZIPF = 2.0
SUGGEST_PATTERN = re.compile(r"[a-z]{3,5}")

# Identifiers people commonly use whose meaning wordfreq does not know (it lists words, not things).
KNOWN_MEANINGS: dict[str, tuple[str, str]] = {
    # The identifier of the DreamBooth examples (diffusers, XavierXiao/Dreambooth-Stable-Diffusion), and
    # the name of a rifle; users report rifles appearing in their results.
    "sks": (
        "the SKS, a Soviet semi-automatic carbine; models draw rifles for it",
        "https://en.wikipedia.org/wiki/SKS, https://github.com/PaddlePaddle/PaddleNLP/issues/3852",
    ),
}

LANGUAGES = {
    "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish",
    "fil": "Filipino", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian",
    "mk": "Macedonian", "ms": "Malay", "nb": "Norwegian", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sh": "Serbo-Croatian", "sk": "Slovak", "sl": "Slovenian",
    "sv": "Swedish", "ta": "Tamil", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese",
    "zh": "Chinese",
}


# --- the report -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What ``check-token`` found. ``pieces``/``ids`` are the first encoder's; ``encoders`` has them all."""

    word: str
    pieces: list[str]
    ids: list[int]
    single_token: bool
    rarity_percentile: float | None  # where the (commonest) piece's id falls in merge order; 100 = last
    is_word: bool  # Zipf >= WORD_ZIPF in some wordfreq language
    verdict: str  # "good", "risky" or "bad"
    reasons: list[str]  # reasons[0] explains the verdict
    encoders: list[dict] = field(default_factory=list)  # [{"name", "pieces", "ids"}], one per tokenizer
    frequencies: dict[str, float] = field(default_factory=dict)  # language code -> Zipf, where listed
    meaning: str | None = None  # from KNOWN_MEANINGS

    @property
    def summary(self) -> str:
        """One line: the verdict and its reason."""
        return f"{self.verdict}: {self.reasons[0]}"

    def as_dict(self) -> dict:
        """The report as a JSON-ready dict (what ``to_json`` writes)."""
        return asdict(self)

    def to_json(self) -> str:
        """The report as one JSON object."""
        return json.dumps(self.as_dict(), ensure_ascii=False)


@dataclass(frozen=True)
class _Encoder:
    name: str
    tokenize: Callable[[str], tuple[list[str], list[int]]]
    special_ids: frozenset[int]
    last_id: int  # the last regular (non-special) id: the 100th percentile
    judged: bool = True  # False: T5's SentencePiece (FLUX, SD3), shown but held to no single-token rule


def _shipped_encoder(name: str, pad_token: str) -> _Encoder:
    vocab = clip_vocab()
    if pad_token not in vocab:  # a text encoder with a vocabulary of its own (T5, ...): the shipped one is wrong
        raise SdtuneError(f"--family: {name} does not use CLIP's vocabulary, which is all sdtune ships; pass "
                          "--tokenizer MODEL to check with the model's own tokenizers")

    def tokenize(text: str) -> tuple[list[str], list[int]]:
        pieces = clip_tokenize(text, pad_token)
        return pieces, [vocab[p] for p in pieces]

    specials = frozenset(vocab[t] for t in (BOS_TOKEN, EOS_TOKEN, pad_token))
    return _Encoder(name, tokenize, specials, VOCAB_SIZE - 3)


def _hf_encoder(name: str, tokenizer: Any) -> _Encoder:
    def tokenize(text: str) -> tuple[list[str], list[int]]:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        return list(tokenizer.convert_ids_to_tokens(ids)), ids

    specials = frozenset(tokenizer.all_special_ids)
    # a vocabulary of special tokens only (a stub model's): nothing to rank against, the whole range
    last_id = max((i for i in tokenizer.get_vocab().values() if i not in specials), default=len(tokenizer))
    return _Encoder(name, tokenize, specials, last_id, judged="T5" not in type(tokenizer).__name__)


def _encoders(tokenizers: list | None, family: str | None = None) -> list[_Encoder]:
    if tokenizers:
        names = ["tokenizer"] + [f"tokenizer_{i + 1}" for i in range(1, len(tokenizers))]
        return [_hf_encoder(n, t) for n, t in zip(names, tokenizers)]
    if family is None:
        return [_shipped_encoder("CLIP", EOS_TOKEN)]
    # A family's encoders differ in their pad token: OpenCLIP (SD2, SDXL's second encoder) pads with '!',
    # which its tokenizer then matches as a special token.
    # T5 (FLUX, SD3) has a SentencePiece vocabulary sdtune does not ship: its CLIP encoders are what is checked
    return [_shipped_encoder(e.label, e.pad_token) for e in families.get(family).text_encoders
            if not e.model_class.startswith("T5")]


# --- word lists ---------------------------------------------------------------------------------------------


def _key(word: str) -> str:
    # wordfreq's lists are NFC and casefolded; looking the whole string up (no wordfreq tokenization) works
    # the same in every language and needs neither MeCab (ja, ko) nor jieba (zh).
    return unicodedata.normalize("NFC", word).casefold()


def _packed(key: str) -> bytes | None:
    """How msgpack stores a short string in wordfreq's cBpack files (fixstr: 0xa0 | length, then UTF-8)."""
    data = key.encode("utf-8")
    return bytes([0xA0 | len(data)]) + data if len(data) < 32 else None


# Up to this many words, a byte search of each decompressed list skips the languages that lack them: about
# 0.6 s in all instead of 1.6 s for unpacking all 42 lists, so a check can run at every train start.
_PREFILTER_MAX = 16


# Answers already looked up in this process (a train run checks once; tests and batches check many).
_FOUND: dict[str, dict[str, float]] = {"": {}}


def word_frequencies(words: Iterable[str]) -> dict[str, dict[str, float]]:
    """Zipf frequency of each word in each wordfreq language that lists it (casefolded, exact match)."""
    import msgpack  # wordfreq's own data format
    import wordfreq

    keys = {w: _key(w) for w in words}
    wanted = {k.encode("utf-8"): k for k in set(keys.values()) - _FOUND.keys()}
    found: dict[str, dict[str, float]] = {k: {} for k in wanted.values()}
    for lang, path in sorted(wordfreq.available_languages("best").items()) if wanted else []:
        raw = gzip.decompress(Path(path).read_bytes())
        todo = set(wanted)
        if len(wanted) <= _PREFILTER_MAX:
            todo = {b for b, k in wanted.items() if (p := _packed(k)) is None or p in raw}
            if not todo:
                continue
        # cBpack: a header, then bucket i holds the words at -i centibels: frequency 10**(-i/100), Zipf
        # 9 - i/100 (wordfreq.read_cBpack's format; read here without decoding 9 million strings).
        header, *buckets = msgpack.unpackb(raw, raw=True)
        if header.get(b"format") != b"cB" or header.get(b"version") != 1:
            raise RuntimeError(f"{path}: not a wordfreq cBpack file (header {header!r})")
        for i, bucket in enumerate(buckets):
            # Buckets are sorted (read_cBpack's docs; UTF-8 byte order is code point order): bisect a few
            # words, scan for many.
            hits = todo.intersection(bucket) if len(todo) > _PREFILTER_MAX else (b for b in todo if _has(bucket, b))
            for b in hits:
                found[wanted[b]][lang] = round(9 - i / 100, 2)
    _FOUND.update(found)
    return {w: dict(_FOUND[k]) for w, k in keys.items()}


def _has(sorted_list: list[bytes], item: bytes) -> bool:
    j = bisect.bisect_left(sorted_list, item)
    return j < len(sorted_list) and sorted_list[j] == item


@functools.cache
def _english() -> dict[str, float]:
    """English words at Zipf >= SUGGEST_TAIL_ZIPF (about 100k), with their Zipf."""
    import wordfreq

    words: dict[str, float] = {}
    for i, bucket in enumerate(wordfreq.read_cBpack(wordfreq.available_languages("best")["en"])):
        zipf = 9 - i / 100
        if zipf < min(FRAGMENT_WORD_ZIPF, COMPOUND_PART_ZIPF, SUGGEST_TAIL_ZIPF):
            break
        words.update(dict.fromkeys(bucket, round(zipf, 2)))
    return words


def _compound(word: str) -> tuple[str, str] | None:
    """A split of ``word`` into two common English words of 2+ letters, or the article 'a' and one ("adog"
    reads as "a dog"), if there is one."""
    english = _english()
    for i in range(1 if word.startswith("a") else 2, len(word) - 1):
        if min(english.get(word[:i], 0), english.get(word[i:], 0)) >= COMPOUND_PART_ZIPF:
            return word[:i], word[i:]
    return None


def _fragment_of(token: str) -> list[tuple[str, list[str]]]:
    """Common English words whose CLIP tokens end in ``token`` (a whole-word token, ``...</w>``)."""
    stem = token.removesuffix("</w>")
    hits = []
    for w, zipf in _english().items():
        if zipf >= FRAGMENT_WORD_ZIPF and len(w) > len(stem) and w.endswith(stem):
            pieces = clip_tokenize(w)
            if len(pieces) > 1 and pieces[-1] == token:
                hits.append((w, pieces))
    return hits


# --- the check ------------------------------------------------------------------------------------------------


def _ordinal(value: float) -> str:
    """91 -> '91st', 92 -> '92nd', 93 -> '93rd', 11 -> '11th' (rounded to a whole number)."""
    n = round(value)
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _per_million(zipf: float) -> str:
    n = 10 ** (zipf - 3)
    return f"{n:.0f}" if n >= 10 else f"{n:.2g}"


def _word_reason(word: str, freqs: dict[str, float]) -> tuple[str, str] | None:
    """(verdict, reason) when ``word`` is listed often enough in some language to matter."""
    top = max(freqs.values(), default=0.0)
    floor = next((z for z in (COMMON_WORD_ZIPF, WORD_ZIPF, RARE_WORD_ZIPF) if top >= z), None)
    if floor is None:
        return None
    # Name English first when it is in the same class as the top language: that is what readers check.
    langs = sorted((lg for lg, z in freqs.items() if z >= floor), key=lambda lg: (lg != "en", -freqs[lg]))
    lang, zipf = langs[0], freqs[langs[0]]
    also = f"; also {', '.join(LANGUAGES.get(lg, lg) for lg in langs[1:4])}" if len(langs) > 1 else ""
    where = f"{LANGUAGES.get(lang, lang)} (Zipf {zipf:.1f}, about {_per_million(zipf)} per million words{also})"
    if floor == COMMON_WORD_ZIPF:
        return "bad", f"'{word}' is a common word in {where}: the model already has a picture for it"
    if floor == WORD_ZIPF:
        return "risky", f"'{word}' is a word in {where}"
    return "risky", f"'{word}' is a rare word, name or abbreviation in {where}"


def piece_list(pieces: list[str], ids: list[int]) -> str:
    """``sks</w> (48136) + ...``: tokens with their ids, for reports."""
    return " + ".join(f"{readable_piece(p)} ({i})" for p, i in zip(pieces, ids))


# What a rare token means for T5 (issue #17): nothing like CLIP's single-token rule holds there.
T5_NOTE = ("{name} (T5) is not judged: its SentencePiece vocabulary splits a made-up word into pieces ({pieces}), "
           "and FLUX and SD3 read most of a prompt through T5 in context; the single-token checks above are for "
           "the CLIP part, and the LoRA teaches T5's pieces what they mean here")


def _pivotal_note(word: str) -> list[str]:
    """What sdtune does instead of a hand-made token such as ``<s0>`` (the diffusers advanced script's
    pivotal-tuning tokens, textual inversion's ``<name>``): a note for one, else none."""
    if not re.fullmatch(r"<[^<>\s]+>(<[^<>\s]+>)*", word):
        return []
    return [f"'{word}' looks like a new token of pivotal tuning or textual inversion: sdtune adds those itself "
            "(pivotal.enabled: true trains new tokens for the identifier, written into prompts in its place), "
            "so keep a rare word as the identifier"]


def _check(word: str, encoders: list[_Encoder], freqs: dict[str, float]) -> Report:
    problems: list[tuple[str, str]] = []  # (verdict, reason), the worst first once sorted
    notes = [T5_NOTE.format(name=e.name, pieces=piece_list(*e.tokenize(word))) for e in encoders if not e.judged]
    tokenized = [(e, *e.tokenize(word)) for e in encoders if e.judged]
    pieces, ids = tokenized[0][1], tokenized[0][2]
    single = all(len(p) == 1 for _, p, _ in tokenized)
    regular = [
        100.0 * min(i, e.last_id) / e.last_id for e, _, ids_ in tokenized for i in ids_ if i not in e.special_ids
    ]
    rarity = round(min(regular), 1) if regular else None
    word_key = _key(word)
    meaning = KNOWN_MEANINGS.get(word_key, (None, ""))[0]

    if not word:
        problems.append(("bad", "empty identifier; pick a rare single token (see `sdtune suggest-tokens`)"))
    elif any(c.isspace() for c in word):
        problems.append(("bad", f"{word!r} contains whitespace, so prompts read it as several words; use one word"))
    for e, p, i in tokenized:
        name = f" in {e.name}" if len(encoders) > 1 else ""
        if any(x in e.special_ids for x in i):
            problems.append(("bad", f"{word!r} contains a special token{name} ({piece_list(p, i)})"))
        elif len(p) > 1:
            problems.append((
                "bad",
                f"{word!r} is {len(p)} tokens{name} ({piece_list(p, i)}): the pieces bring their own meanings; "
                "use a single token (see `sdtune suggest-tokens`)",
            ))
    if meaning:
        problems.append(("risky", f"'{word_key}' already means something: {meaning}"))
    symbols = [unicodedata.name(c, "").lower() for c in dict.fromkeys(word) if unicodedata.category(c) == "So"]
    if symbols:  # emoji are in CLIP's captions (the dog face is id 10631): they mean what they show
        shown = ", ".join(f"'{n}'" for n in symbols if n) or "a symbol"
        problems.append(("risky", f"{word!r} holds the emoji or symbol {shown}: CLIP learnt them from captions, "
                                  "so it already means that; pick a rare single token (see `sdtune suggest-tokens`)"))
    elif found := _word_reason(word_key, freqs):
        problems.append(found)
    if single and not problems:
        token = pieces[0]
        if rarity is not None and rarity < EARLY_MERGE_PERCENTILE:
            problems.append((
                "risky",
                f"'{token}' is an early merge (id {ids[0]}, {_ordinal(rarity)} percentile): a frequent string in "
                "CLIP's training text, so it means something",
            ))
        if token.endswith("</w>") and (parts := _compound(word_key)):
            problems.append(("risky", f"'{word_key}' reads as the English words '{parts[0]}' + '{parts[1]}'"))
        if token.endswith("</w>") and (frags := _fragment_of(token)):
            examples = ", ".join(f"{w} = {' + '.join(p)}" for w, p in frags[:3])
            problems.append(("risky", f"'{token}' is the last piece of common English words ({examples})"))
    if word != word_key and word.strip():
        notes.append(f"CLIP lowercases text: '{word}' is the same as '{word_key}'")
    notes += _pivotal_note(word)

    problems.sort(key=lambda pr: pr[0] != "bad")  # stable: bad first, in the order found
    if problems:
        verdict, reasons = problems[0][0], [r for _, r in problems]
    else:
        verdict = "good"
        listed = "in none of" if not freqs else f"at most a stray entry (Zipf < {RARE_WORD_ZIPF:g}) in"
        reasons = [
            f"'{pieces[0]}' is a single token (id {ids[0]}, {_ordinal(rarity)} percentile: a late merge), {listed} "
            f"wordfreq's word lists ({len(LANGUAGES)} languages), no known meaning"
        ]
    return Report(
        word=word, pieces=pieces, ids=ids, single_token=single, rarity_percentile=rarity,
        is_word=max(freqs.values(), default=0.0) >= WORD_ZIPF, verdict=verdict, reasons=reasons + notes,
        encoders=[{"name": e.name, "pieces": p, "ids": i} for e, p, i in ((e, *e.tokenize(word)) for e in encoders)],
        frequencies=dict(sorted(freqs.items(), key=lambda kv: -kv[1])), meaning=meaning,
    )


def check_identifiers(words: list[str], tokenizers: list | None = None, family: str | None = None) -> list[Report]:
    """:func:`check_identifier` for many words at once (one pass over the word lists). Without tokenizers,
    ``family`` picks the shipped encoders to check (both of SDXL's; default: SD1.x's CLIP)."""
    encoders = _encoders(tokenizers, family)
    freqs = word_frequencies(w for w in words if w)
    reports = [_check(w, encoders, freqs.get(w, {})) for w in words]
    t5 = [e.label for e in families.get(family).text_encoders if e.model_class.startswith("T5")] \
        if family and not tokenizers else []
    # the shipped vocabularies are CLIP's: T5's view needs the model's tokenizer
    notes = [f"{label} is not checked without the model's tokenizer (--tokenizer MODEL shows its pieces); T5 has "
             "no single-token rule: FLUX and SD3 read the pieces in context" for label in t5]
    return [replace(r, reasons=r.reasons + notes) for r in reports] if notes else reports


def check_identifier(word: str, tokenizers: list | None = None) -> Report:
    """Check a DreamBooth identifier with the shipped CLIP vocabulary, or with the given tokenizers (e.g. a
    pipeline's ``[tokenizer, tokenizer_2]``; all must give one token). Takes about a second."""
    return check_identifiers([word], tokenizers)[0]


# --- suggestions --------------------------------------------------------------------------------------------


def suggest_identifiers(
    n: int = 20, seed: int | None = None, tokenizers: list | None = None, family: str | None = None
) -> list[str]:
    """Good identifiers: single whole-word tokens of 3-5 lowercase letters from the last quarter of the merges,
    absent from every wordfreq list, no known meaning, not two English words, not the end of an English word
    (about 60 in all).

    Latest merge first; with ``seed``, a random (reproducible) sample of the candidates instead. With
    ``tokenizers`` (a model's own) or ``family`` (its shipped encoders), only candidates that check good
    there, every encoder giving one token (see :func:`suggestion_reports`).
    """
    if tokenizers is None and family is None:
        if n < 1:
            raise SdtuneError(f"--n: must be at least 1, got {n}")
        # The pool was built from the shipped vocabulary to pass these checks: no need to run them again.
        return _candidates(n, seed)[:n]
    return [r.word for r in suggestion_reports(n, seed, tokenizers, family)]


def suggestion_reports(
    n: int = 20, seed: int | None = None, tokenizers: list | None = None, family: str | None = None
) -> list[Report]:
    """The check-token reports of up to ``n`` suggestions (in :func:`suggest_identifiers`' order) that are
    good and a single token in every encoder: of ``tokenizers``, else of ``family``'s shipped encoders, else
    of CLIP's. Fewer than ``n`` when fewer candidates pass; SdtuneError when none does."""
    if n < 1:
        raise SdtuneError(f"--n: must be at least 1, got {n}")
    candidates = _candidates(n, seed)
    found: list[Report] = []
    # Checking costs about 10 ms a word (the English fragment scan): check in batches, stop once n pass.
    batch = max(n, 8)
    for start in range(0, len(candidates), batch):
        for r in check_identifiers(candidates[start:start + batch], tokenizers, family):
            if r.single_token and r.verdict == "good":
                found.append(r)
                if len(found) == n:
                    return found
    if not found:
        where = "the given tokenizer(s)" if tokenizers else f"{family or 'CLIP'}'s text encoders"
        raise SdtuneError(f"none of the {len(candidates)} candidate identifiers is a single rare token in {where}; "
                          "pick a word with `sdtune check-token WORD --tokenizer MODEL`")
    return found


def _candidates(n: int, seed: int | None) -> list[str]:
    """Every candidate, in suggestion order: latest merge first, or with ``seed`` the reproducible sample of
    ``n`` first (as earlier versions gave it), then the rest shuffled by the same seed."""
    words = list(_suggestion_pool())
    if seed is None:
        return words
    first = random.Random(seed).sample(words, min(n, len(words)))
    chosen = set(first)
    rest = [w for w in words if w not in chosen]
    random.Random(seed).shuffle(rest)
    return first + rest


@functools.cache
def _suggestion_pool() -> tuple[str, ...]:
    last = VOCAB_SIZE - 3
    pool = {
        t.removesuffix("</w>"): i for t, i in clip_vocab().items()
        if t.endswith("</w>") and SUGGEST_PATTERN.fullmatch(t.removesuffix("</w>"))
        and 100.0 * i / last >= SUGGEST_MIN_PERCENTILE and t.removesuffix("</w>") not in KNOWN_MEANINGS
    }
    listed = word_frequencies(pool)
    english = _english()
    tails = {w[-k:] for w, z in english.items() if z >= SUGGEST_TAIL_ZIPF for k in range(3, 6) if len(w) > k}
    good = (w for w in pool if not listed[w] and w not in tails and _compound(w) is None)
    return tuple(sorted(good, key=lambda w: -pool[w]))


# --- a model's own tokenizers ------------------------------------------------------------------------------


def tokenizers_at(path_or_id: str, family: str | None = None) -> list:
    """The tokenizer(s) of a model folder or hub id (``tokenizer/``, ``tokenizer_2/``, ... as its family has
    them), or of a tokenizer folder or tokenizer repo."""
    from transformers import CLIPTokenizer

    names = list(dict.fromkeys(e.tokenizer_name for f in families.registered() for e in f.text_encoders))

    def load(subfolder: str | None) -> Any:
        try:
            tok = CLIPTokenizer.from_pretrained(path_or_id, **({"subfolder": subfolder} if subfolder else {}))
        except Exception:  # not there, not on the hub, offline without a cached copy: the caller reports it
            return None
        # transformers 5 gives an empty tokenizer, instead of an error, for a folder without vocabulary files.
        return tok if len(tok.get_vocab()) > len(tok.all_special_tokens) else None

    hint = ("a model folder with tokenizer/, a tokenizer folder with vocab.json + merges.txt, or a hub id "
            "(offline, it must be in the Hugging Face cache)")
    local = Path(path_or_id)
    if local.is_file():
        raise SdtuneError(f"--tokenizer: {path_or_id} is a file; give {hint}")
    if local.is_dir():
        subfolders: list[str | None] = [s for s in names if (local / s).is_dir()] or [None]
        tokenizers = [load(s) for s in subfolders]
        for s, tok in zip(subfolders, tokenizers):
            if tok is None:
                raise SdtuneError(f"--tokenizer: cannot read a CLIP tokenizer from {local / (s or '')}; give {hint}")
    else:
        # no network: straight to the Hugging Face cache, not minutes of retries per subfolder tried
        offline = offline_unless_reachable()
        first = load(names[0])
        tokenizers = [first if first is not None else load(None)]  # a model repo, or a tokenizer repo
        if tokenizers[0] is None:
            why = f" (not in the Hugging Face cache, and {offline_reason()})" if offline else ""
            raise SdtuneError(f"--tokenizer: cannot load {path_or_id}{why}; give {hint}")
        tokenizers += [tok for tok in map(load, names[1:]) if tok is not None]
    expected = len(families.get(family).text_encoders) if family else len(tokenizers)
    if len(tokenizers) != expected:
        raise SdtuneError(f"--family {family}: {path_or_id} has {len(tokenizers)} tokenizer(s), so it is not an "
                          f"{families.get(family).label} model (which has {expected})")
    return tokenizers
