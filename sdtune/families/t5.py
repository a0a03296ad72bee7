"""T5 v1.1's encoder as FLUX.1 and SD3 use it: a tiny tokenizer built offline and the encoder's configs.

Both families condition on T5-XXL's last hidden states (FLUX.1: ``text_encoder_2``, SD3: ``text_encoder_3``)
and never LoRA it; tests and ``sdtune random-model`` build the tiny encoder here.

transformers is imported inside the functions (see ``families.sd``).
"""

from __future__ import annotations

from typing import Any

# the words the tests' captions use, as whole Unigram pieces (the rest falls back to single characters)
_WORDS = ("a", "photo", "of", "sks", "toy", "dog", "cat", "on", "the", "beach", "in", "and", "with")


def tiny_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A ``T5TokenizerFast`` built offline: a Unigram vocabulary of T5's special tokens, single characters and
    a few words (T5's sentencepiece model is not shipped); pads with <pad> = 0, ends with </s> = 1 as T5's."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in _WORDS]
    vocab += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_config(size: str, **overrides: Any) -> Any:
    """A ``T5Config`` of T5 v1.1's encoder: tiny (tests; 128 ids cover ``tiny_t5_tokenizer``'s 111) or T5-XXL's
    shapes; ``overrides`` replace single fields (SD3's tiny encoder is wider than its two CLIPs together)."""
    from transformers import T5Config

    if size == "tiny":
        shape: dict[str, Any] = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8)
    else:
        shape = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    return T5Config(**{**shape, **overrides}, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                    use_cache=False, dropout_rate=0.0)
