from sdtune.tokens import VOCAB_SIZE, clip_tokenizer, clip_vocab


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
