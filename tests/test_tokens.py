from sdtune.tokens import EOS_TOKEN, VOCAB_SIZE, clip_tokenize, clip_tokenizer, clip_vocab


def test_vocabulary_is_clips():
    vocab = clip_vocab()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert vocab["sks</w>"] == 48136
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))


def test_tokenizer_matches_openai_clip_ids():
    # ids of the real openai/clip-vit-large-patch14 tokenizer for this sentence
    tok = clip_tokenizer()
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77


def test_sd2_tokenizer_pads_with_exclamation_mark():
    tok = clip_tokenizer(pad_token="!")
    ids = tok("a dog", padding="max_length", max_length=6).input_ids
    assert ids == [49406, 320, 1929, 49407, 0, 0]


# Edge cases from this file and tests/test_identifier.py: unicode (combining marks, final sigma, dotted I,
# CJK, RTL, Devanagari, emoji with modifiers and ZWJ), special tokens as literal text in any case, the pad
# token '!', punctuation, digits, contractions, whitespace runs and non-breaking spaces.
EDGE_CASES = [
    "", " ", "a photo of sks dog", "sks", "Dog", "ohwx", "ohwxx", "drwho", "qx", "zwx", "Straße",
    "sks dog", "sks\u00a0", "sks!", "!", "!!", "!sks!", "...", "a, b; c: d?!", "#$%&()*+-/<=>@[\\]^_`{|}~",
    "<|endoftext|>", "<|startoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>", "x<|endoftext|>y",
    "it's", "they'LL", "we're", "I'd've", "123", "3.14159", "v2", "٣٤", "²",
    " \t\n\u00a0\u3000 ", "a  \t b\n\nc",
    "e\u0301", "E\u0301\u0308", "\u0301\u0308\u200d", "éÉèüÜßçñøÆœ", "İı", "ΟΔΟΣ", "Σ", "σς", "ΑΒΓ ЖжЯя",
    "日本語", "中文字", "한국어", "مرحبا", "नमस्ते", "😀", "👍🏽", "🇫🇷", "❤️", "👨\u200d👩\u200d👧",
    "ﬁ", "Å", "Å", "ǅ", "\u00ad", "\x00\x01", "\ufeffbom",
]


def test_clip_encode_matches_the_transformers_tokenizer():
    import string

    import wordfreq

    from sdtune.tokens import clip_encode, clip_tokenize

    chars = list(string.printable) + [c for case in EDGE_CASES for c in case]
    texts = EDGE_CASES + chars + wordfreq.top_n_list("en", 20000)
    for pad in (EOS_TOKEN, "!"):
        tok = clip_tokenizer(pad_token=pad)
        expected = tok(texts, add_special_tokens=False).input_ids
        for text, ids in zip(texts, expected):
            assert clip_encode(text, pad) == ids, (pad, text)
            assert clip_tokenize(text, pad) == tok.convert_ids_to_tokens(ids), (pad, text)
    assert clip_encode("sks!") == [48136, 256] and clip_encode("sks!", "!") == [48136, 0]


def test_a_piece_reads_as_text_not_as_byte_characters():
    """check-token showed 日本's tokens as byte-level BPE's characters (æĹ¥ ...); a whole character reads as
    itself, the bytes of one cut between tokens as \\xNN, ASCII and the end-of-word mark as before."""
    from sdtune.identifier import check_identifier
    from sdtune.tokens import readable_piece

    assert [readable_piece(p) for p in clip_tokenize("日本")] == ["日", "\\xe6\\x9c", "\\xac</w>"]
    assert readable_piece("sks</w>") == "sks</w>" and readable_piece("</w>") == "</w>"
    assert "日 (39121) + \\xe6\\x9c (19277)" in check_identifier("日本").summary
