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
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

if TYPE_CHECKING:  # transformers takes ~1 s to import; clip_tokenizer() imports it when called
    from transformers import CLIPTokenizer

    from sdtune.families import Family

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


def clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> CLIPTokenizer:
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
# The same pipeline as clip_tokenizer(), built on the Rust `tokenizers` library alone: no transformers import
# (~1 s), so the identifier check can run anywhere, fast. Mirrors transformers' CLIPTokenizer(Fast).

# CLIP's own split (clip/simple_tokenizer.py); the whitespace between matches is dropped.
_CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


@functools.cache
def _fast_tokenizer(pad_token: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` configured like ``clip_tokenizer(pad_token).backend_tokenizer``."""
    bpe = models.BPE(
        vocab=clip_vocab(),
        merges=list(clip_merges()),
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=EOS_TOKEN,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # transformers adds these un-normalized, so they are cut from the raw text before lowercasing:
    # '<|STARTOFTEXT|>' stays text. A pad token outside the vocabulary's own specials (OpenCLIP's '!')
    # becomes a special token too, which is why '!' is id 0 there but '!</w>' (256) for SD1.x.
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in (pad_token, BOS_TOKEN, EOS_TOKEN)]
    )
    return tokenizer


def readable_piece(piece: str) -> str:
    """A CLIP token as text: byte-level BPE writes each byte as a printable character ("æĹ¥" is the three
    UTF-8 bytes of 日); whole characters read as themselves, bytes of a character cut between tokens as \\xNN."""
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    word = piece.removesuffix("</w>")
    if not word or any(ch not in decoder for ch in word):
        return piece
    raw = bytes(decoder[ch] for ch in word)
    text = raw.decode("utf-8", errors="backslashreplace")
    return text + piece[len(word):]


def clip_tokenize(text: str, pad_token: str = EOS_TOKEN) -> list[str]:
    """The CLIP tokens of ``text`` without BOS/EOS, exactly as ``clip_tokenizer(pad_token)`` splits it.

    ``clip_vocab()[t]`` gives the ids. The pad token matters: a pad token outside the vocabulary's own
    special tokens (SD2 and SDXL's second encoder pad with ``!``) is matched as a special token, so ``!``
    becomes id 0 there but ``!</w>`` (256) for SD1.x.
    """
    return _fast_tokenizer(pad_token).encode(text, add_special_tokens=False).tokens


def clip_prefix(text: str, n: int, pad_token: str = EOS_TOKEN) -> str:
    """The start of ``text`` that its first ``n`` CLIP tokens cover, as written (all of it if shorter)."""
    offsets = _fast_tokenizer(pad_token).encode(text, add_special_tokens=False).offsets
    return text if len(offsets) <= n else text[: offsets[n - 1][1]]


def clip_encode(text: str, pad_token: str = EOS_TOKEN) -> list[int]:
    """The ids of :func:`clip_tokenize` (no BOS/EOS)."""
    return _fast_tokenizer(pad_token).encode(text, add_special_tokens=False).ids


def truncated_captions(family: Family, named: list[tuple[str, str, str | None]], tokenizers: list[Any]
                       ) -> list[str]:
    """One line per caption longer than a text encoder reads (CLIP: 77 tokens with start and end): the rest
    is cut off before the model sees it, sometimes with the identifier in it. ``named``: (how a line names it,
    caption, the identifier it should hold or None) of each caption, e.g. ('001.png', 'a photo of sks dog',
    'sks') or a class prompt's ('prior.class_prompt', 'a photo of a dog', None)."""
    lines = []
    tokenized: dict[tuple[int, str], list[int]] = {}  # each distinct caption once: 100,000 photos share a few
    for name, caption, identifier in named:
        for k, (spec, tokenizer) in enumerate(zip(family.text_encoders, tokenizers)):
            # T5 reads the family's prompt length (flux. / sd3.max_sequence_length), ending in its </s>; CLIP its
            # 77 tokens between <|startoftext|> and <|endoftext|>
            t5 = spec.model_class.startswith("T5")
            limit = (family.max_sequence_length or tokenizer.model_max_length) if t5 else tokenizer.model_max_length
            if (k, caption) not in tokenized:  # with the start and end tokens
                tokenized[(k, caption)] = tokenizer(caption, truncation=False).input_ids
            ids = tokenized[(k, caption)]
            if len(ids) <= limit:
                continue
            seen = tokenizer.decode(ids[0 if t5 else 1 : limit - 1], skip_special_tokens=True)
            lost = f" The identifier '{identifier}' is in the part cut off." \
                if identifier and identifier in caption and identifier not in seen.split() else ""
            lines.append(f"{name}: its caption is {len(ids)} tokens, {spec.label} reads {limit}, so everything after "
                         f"'...{seen[-30:]}' is ignored.{lost} fix: shorten it")
            break  # one line per caption, whatever the number of encoders
    return lines
