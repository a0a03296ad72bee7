"""The CLIP vocabulary, rebuilt offline from the BPE merge list shipped as package data.

Every Stable Diffusion text encoder (SD1.x's CLIP ViT-L/14, SD2's OpenCLIP ViT-H/14, both SDXL encoders)
uses the same byte-level BPE with 49,408 tokens. OpenAI publishes it as ``bpe_simple_vocab_16e6.txt.gz``;
token ids follow merge order, so the vocabulary can be rebuilt exactly the way ``clip/simple_tokenizer.py``
does it, and written in the ``vocab.json`` + ``merges.txt`` form that ``transformers.CLIPTokenizer`` reads.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's merge file has a header line, then 49152 - 256 - 2 merges are used (the rest are unused).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character map of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The 48,894 BPE merges CLIP uses, in rank order."""
    raw = resources.files("sdtune").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


@functools.cache
def clip_vocab() -> dict[str, int]:
    """Token string -> id, exactly CLIP's 49,408 entries (``sks</w>`` is 48136)."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge) for merge in clip_merges()]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face format) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in clip_merges()) + "\n", encoding="utf-8"
    )
    return vocab_file, merges_file


def clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, built offline.

    SD1.x pads with ``<|endoftext|>``; SD2 and SDXL's second encoder (OpenCLIP) pad with ``!``.
    """
    import tempfile

    from transformers import CLIPTokenizer

    # from_pretrained on a folder holding vocab.json + merges.txt works in transformers 4 and 5 alike
    # (their constructors differ: file paths in 4, in-memory vocab and merges in 5).
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=model_max_length)


# --------------------------------------------------------------------------------------------------------
# A pure-Python CLIP encoder: the same pieces as clip_tokenizer(), without importing transformers (~1 s),
# so the identifier check can run anywhere, fast. Mirrors the tokenizers pipeline step by step.

# Pre-tokenizer 1: CLIP's own split (clip/simple_tokenizer.py); whitespace between matches is dropped.
_CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# Pre-tokenizer 2: the ByteLevel step re-splits each piece with GPT-2's pattern. It only matters for the
# literal text '<|startoftext|>' (after lowercasing), which it cuts into '<|', 'startoftext', '|>'.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@functools.cache
def _regexes():
    import regex  # \p{L} and \p{N}, which the standard re module lacks

    return regex.compile(r"\s+"), regex.compile(_CLIP_SPLIT), regex.compile(_GPT2_SPLIT)


@functools.cache
def _byte_chars() -> dict[int, str]:
    return _bytes_to_unicode()


@functools.cache
def _merge_ranks() -> dict[tuple[str, str], int]:
    return {pair: rank for rank, pair in enumerate(clip_merges())}


@functools.lru_cache(maxsize=65536)
def _bpe(word: str) -> tuple[str, ...]:
    """BPE of one pre-token (already mapped to byte characters); the last symbol carries ``</w>``."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = _merge_ranks()
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        # Merge every occurrence, left to right. Merges that use the new symbol rank later than this one,
        # so this equals tokenizers' one-merge-at-a-time priority queue.
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(parts)


def clip_tokenize(text: str, pad_token: str = EOS_TOKEN) -> list[str]:
    """The CLIP tokens of ``text`` without BOS/EOS, exactly as ``clip_tokenizer(pad_token)`` splits it.

    ``clip_vocab()[t]`` gives the ids. The pad token matters: a pad token outside the vocabulary's own
    special tokens (SD2 and SDXL's second encoder pad with ``!``) is matched as a special token, so ``!``
    becomes id 0 there but ``!</w>`` (256) for SD1.x. Characters newer than Python's Unicode database and
    some stacks of combining marks can normalize differently from the Rust tokenizer; nothing else does.
    """
    import unicodedata

    import regex

    whitespace, clip_split, gpt2_split = _regexes()
    byte_chars = _byte_chars()
    specials = sorted({BOS_TOKEN, EOS_TOKEN, pad_token}, key=len, reverse=True)
    tokens: list[str] = []
    # Special tokens are cut out of the raw text first (they are not normalized), as tokenizers does.
    for i, chunk in enumerate(regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text)):
        if i % 2:
            tokens.append(chunk)
            continue
        # Normalizer: NFC, whitespace runs -> one space, then lowercase one character at a time (tokenizers
        # lowercases per character, so a final capital sigma becomes 'σ', not str.lower()'s 'ς').
        chunk = "".join(c.lower() for c in whitespace.sub(" ", unicodedata.normalize("NFC", chunk)))
        for piece in clip_split.findall(chunk):
            for word in gpt2_split.findall(piece):
                tokens.extend(_bpe("".join(byte_chars[b] for b in word.encode("utf-8"))))
    return tokens


def clip_encode(text: str, pad_token: str = EOS_TOKEN) -> list[int]:
    """The ids of :func:`clip_tokenize` (no BOS/EOS)."""
    vocab = clip_vocab()
    return [vocab[t] for t in clip_tokenize(text, pad_token)]

