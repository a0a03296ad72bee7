"""check-token / suggest-tokens: the identifier check, its CLI, and agreement with the real tokenizers."""

from __future__ import annotations

import argparse
import json
import random
import string

import pytest

from sdtune.cli.data import add_commands
from sdtune.errors import SdtuneError
from sdtune.identifier import (
    SUGGEST_PATTERN,
    check_identifier,
    check_identifiers,
    suggest_identifiers,
    tokenizers_at,
    word_frequencies,
)
from sdtune.tokens import clip_tokenize, clip_tokenizer

REQUIRED_KEYS = {"pieces", "ids", "single_token", "rarity_percentile", "is_word", "verdict", "reasons"}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run a check-token / suggest-tokens command line; (exit code, stdout)."""
    parser = argparse.ArgumentParser(prog="sdtune")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


# --- verdicts ---------------------------------------------------------------------------------------------


def test_sks_is_one_late_token_but_a_rifle():
    r = check_identifier("sks")
    assert r.pieces == ["sks</w>"] and r.ids == [48136] and r.single_token
    assert r.rarity_percentile == pytest.approx(100 * 48136 / 49405, abs=0.05)
    assert r.verdict == "risky"
    assert "rifle" in r.reasons[0] and r.meaning
    assert r.summary.startswith("risky: ") and "\n" not in r.summary


def test_common_words_are_bad():
    for r in check_identifiers(["dog", "Dog", "house"]):
        assert r.single_token and r.is_word
        assert r.verdict == "bad"
        assert "common word in English" in r.reasons[0]
        assert r.frequencies["en"] >= 4.0


def test_unusable_identifiers_are_bad():
    cases = {
        "ohwxx": "3 tokens",  # oh + w + xx</w>
        "": "empty",
        "sks dog": "whitespace",
        "sks\u00a0": "whitespace",
        "<|endoftext|>": "special token",
    }
    for (word, says), r in zip(cases.items(), check_identifiers(list(cases))):
        assert r.verdict == "bad", word
        assert says in r.reasons[0], (word, r.reasons)


def test_a_hand_made_new_token_says_sdtune_makes_those_itself():
    """`<s0><s1>` (the diffusers advanced script's pivotal-tuning tokens) or `<name>` (textual inversion) in
    plain CLIP are pieces; the report says what sdtune does instead. A word with a '<' inside gets no such note."""
    for word in ("<s0><s1>", "<sks>"):
        r = check_identifier(word)
        assert r.verdict == "bad" and any("sdtune adds those itself (pivotal.enabled: true" in x for x in r.reasons)
    for word in ("ohwx", "a<b", "<s0> <s1>"):
        assert not any("pivotal" in x for x in check_identifier(word).reasons), word


def test_a_rare_single_token_nobody_uses_is_good():
    r = check_identifier("ohwx")
    assert r.verdict == "good" and r.single_token and not r.is_word
    assert r.pieces == ["ohwx</w>"] and r.rarity_percentile > 90
    assert r.frequencies == {}


def test_early_merges_and_compounds_are_risky():
    drwho, qx = check_identifiers(["drwho", "qx"])
    # 'drwho' is one late token that no word list has, but it reads as 'dr' + 'who'.
    assert drwho.verdict == "risky" and "'dr' + 'who'" in drwho.reasons[0]
    assert qx.verdict != "good", qx.reasons


def test_an_article_and_a_word_read_as_both_and_percentiles_are_ordinals():
    """'adog' is one late token, but reads as 'a dog' (suggest-tokens offered it, check-token called it good);
    percentiles read 91st, 92nd, 93rd, not 91th."""
    adog, aboss, ohwx = check_identifiers(["adog", "aboss", "ohwx"])
    assert adog.verdict == "risky" and adog.reasons[0] == "'adog' reads as the English words 'a' + 'dog'"
    assert aboss.verdict == "risky" and "'a' + 'boss'" in aboss.reasons[0]
    assert ohwx.verdict == "good" and "(id 47993, 97th percentile: a late merge)" in ohwx.reasons[0]
    dog = check_identifier("\U0001f436")  # it was "a rare word in German", by wordfreq's lists
    assert dog.verdict == "risky" and "the emoji or symbol 'dog face'" in dog.reasons[0]
    from sdtune.identifier import _ordinal

    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 91.2, 92, 93, 100)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "91st", "92nd", "93rd", "100th"]


def test_word_lookup_is_the_same_for_one_word_and_for_many(monkeypatch):
    import wordfreq

    from sdtune import identifier

    words = ("dog", "sks", "ohwx", "Straße")
    monkeypatch.setattr(identifier, "_FOUND", {"": {}})  # no answers from earlier tests
    many = word_frequencies(list(words) + [f"filler{i}" for i in range(40)])  # unpacks every list
    monkeypatch.setattr(identifier, "_FOUND", {"": {}})
    one = word_frequencies(words)  # few words: byte search first
    assert all(one[w] == many[w] for w in words)
    assert one["dog"]["en"] == wordfreq.zipf_frequency("dog", "en")
    assert one["Straße"]["de"] == wordfreq.zipf_frequency("Straße", "de")
    assert one["ohwx"] == {}
    assert set(identifier.LANGUAGES) == set(wordfreq.available_languages("best"))  # names for every list


# --- suggestions ------------------------------------------------------------------------------------------


def test_suggestions_are_single_tokens_that_check_good():
    words = suggest_identifiers(20)
    assert len(words) == 20 and len(set(words)) == 20
    assert words == suggest_identifiers(20)  # deterministic
    for w in words:
        assert SUGGEST_PATTERN.fullmatch(w)
        assert clip_tokenize(w) == [w + "</w>"]
    reports = check_identifiers(words)
    assert [r.verdict for r in reports] == ["good"] * 20, [r.summary for r in reports if r.verdict != "good"]


def test_seeded_suggestions_are_reproducible_samples():
    a, b = suggest_identifiers(10, seed=1), suggest_identifiers(10, seed=1)
    assert a == b and len(set(a)) == 10
    assert suggest_identifiers(10, seed=2) != a
    assert set(a) <= set(suggest_identifiers(10_000))
    with pytest.raises(SdtuneError):
        suggest_identifiers(0)


# --- command line -----------------------------------------------------------------------------------------


def test_check_token_exit_codes_and_one_line_reason(capsys):
    for word, code, verdict in [("ohwx", 0, "good"), ("sks", 1, "risky"), ("dog", 1, "bad"), ("zwx", 1, "bad")]:
        got, out = run_cli(["check-token", word], capsys)
        assert got == code, word
        assert out.splitlines()[0].startswith(f"{verdict}: "), out
        assert all(line.startswith("  ") for line in out.splitlines()[1:])  # details, indented


def test_check_token_json(capsys):
    for word in ["sks", "dog", "zwx", "ohwx", ""]:
        code, out = run_cli(["check-token", word, "--json"], capsys)
        assert len(out.strip().splitlines()) == 1
        report = json.loads(out)
        assert REQUIRED_KEYS <= report.keys()
        assert report["verdict"] in ("good", "risky", "bad")
        assert code == (0 if report["verdict"] == "good" else 1)
        assert report["ids"] == clip_tokenizer()(word, add_special_tokens=False).input_ids
        assert isinstance(report["reasons"], list) and report["reasons"]


def test_suggest_tokens_cli(capsys):
    code, out = run_cli(["suggest-tokens", "--n", "5"], capsys)
    assert code == 0 and out.split() == suggest_identifiers(5)
    code, out = run_cli(["suggest-tokens", "--n", "3", "--seed", "4"], capsys)
    assert out.split() == suggest_identifiers(3, seed=4)


def test_sdxl_family_checks_both_encoders(capsys):
    # OpenCLIP's tokenizer (SD2, SDXL's second encoder) pads with '!', so '!' is a special token there.
    r = check_identifiers(["sks!"], family="sdxl")[0]
    assert [e["ids"] for e in r.encoders] == [[48136, 256], [48136, 0]]
    assert r.verdict == "bad"
    code, out = run_cli(["check-token", "ohwx", "--family", "sdxl"], capsys)
    assert code == 0 and "CLIP ViT-L/14" in out and "OpenCLIP ViT-bigG/14" in out


# --- agreement with the real tokenizers ----------------------------------------------------------------------

ALPHABET = (
    string.ascii_letters + string.digits + string.punctuation + " \t\n\u00a0\u3000"
    + "éÉèüÜßçñøÆœİıΣσςΑΒΓЖжЯя" + "日本語中文字한국어" + "مرحبا" + "नमस्ते" + "😀👍🏽🇫🇷❤️" + "\u0301\u0308\u200d"
)
CHUNKS = ["'s", "'LL", "'re", "<|endoftext|>", "<|startoftext|>", "<|STARTOFTEXT|>", "sks", "!!", "..."]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Letters, digits, mixed case, punctuation, whitespace, unicode (combining marks, emoji), contractions."""
    rng = random.Random(seed)
    kinds = [
        string.ascii_lowercase,
        string.ascii_letters + string.digits,
        string.ascii_letters + string.punctuation,
        ALPHABET,
    ]
    out = []
    for i in range(n):
        symbols = list(kinds[i % 4]) if i % 5 else CHUNKS + list(ALPHABET)
        out.append("".join(rng.choice(symbols) for _ in range(rng.randint(0, 12))))
    return out


def test_check_token_agrees_with_the_clip_tokenizer_on_random_strings():
    words = random_strings(3000)
    for family, pad in (("sd15", "<|endoftext|>"), ("sd2", "!")):
        tok = clip_tokenizer(pad_token=pad)
        reports = check_identifiers(words, family=family)
        for word, report, ids in zip(words, reports, tok(words, add_special_tokens=False).input_ids):
            assert report.ids == ids, word
            assert report.pieces == tok.convert_ids_to_tokens(ids), word
            assert report.single_token == (len(ids) == 1)


def test_check_token_agrees_with_a_model_folders_tokenizers(tiny_model):
    tokenizers = tokenizers_at(str(tiny_model("sdxl")), family="sdxl")
    assert len(tokenizers) == 2
    words = random_strings(1000, seed=1)
    from_model = check_identifiers(words, tokenizers)
    shipped = check_identifiers(words, family="sdxl")
    for word, a, b in zip(words, from_model, shipped):
        assert [e["ids"] for e in a.encoders] == [e["ids"] for e in b.encoders], word
        assert (a.verdict, a.single_token, a.rarity_percentile) == (b.verdict, b.single_token, b.rarity_percentile)


def test_tokenizer_option_errors(tiny_model, tmp_path):
    with pytest.raises(SdtuneError, match="not an SDXL model"):
        tokenizers_at(str(tiny_model("sd15")), family="sdxl")
    with pytest.raises(SdtuneError, match="cannot read a CLIP tokenizer"):
        tokenizers_at(str(tmp_path))
    assert len(tokenizers_at(str(tiny_model("sdxl") / "tokenizer_2"))) == 1


def test_t5_is_shown_but_not_held_to_the_single_token_rule():
    """FLUX / SD3 pipelines hand the check a T5 tokenizer too: SentencePiece splits any made-up word, which must
    not make every identifier 'bad' (what training warned for each FLUX run); the CLIP part is judged, T5's
    pieces are shown with a note. Without the model (--family), T5 is named as not checked."""
    from sdtune.families.t5 import tiny_t5_tokenizer

    report = check_identifier("ohwx", [clip_tokenizer(), tiny_t5_tokenizer()])
    assert report.verdict == "good" and report.single_token
    assert [e["name"] for e in report.encoders] == ["tokenizer", "tokenizer_2"]
    assert len(report.encoders[1]["pieces"]) > 1  # T5 did split it
    assert any("(T5) is not judged" in r for r in report.reasons)
    assert check_identifier("rifle", [clip_tokenizer(), tiny_t5_tokenizer()]).verdict != "good"  # CLIP still judges
    shipped = check_identifiers(["ohwx"], family="flux")[0]
    assert shipped.verdict == "good" and [e["name"] for e in shipped.encoders] == ["CLIP ViT-L/14"]
    assert any("T5-XXL is not checked" in r for r in shipped.reasons)


def test_training_names_the_identifiers_verdict_with_each_pointer_once(tiny_model, tmp_path, capsys):
    """The run's warning about a weak identifier adds `sdtune check-token X` and `suggest-tokens` to the verdict,
    which may already point at suggest-tokens ("... (see `sdtune suggest-tokens`) (see ..., `sdtune
    suggest-tokens`)" was printed for zwx)."""
    from conftest import overrides
    from sdtune.config import load_config
    from sdtune.train import train

    train(load_config(None, overrides(tiny_model("sd15"), tmp_path / "run", "data.identifier=zwx",
                                      "data.instance_prompt=a photo of zwx toy", "train.max_steps=1")))
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: data.identifier")]
    assert line.count("suggest-tokens") == 1 and "`sdtune check-token zwx`" in line, line


def test_a_tokenizer_hub_id_with_no_network_fails_at_once(unreachable_hub, capsys):
    """`check-token --tokenizer owner/name` tried several subfolders, each retried five times with back-off: about
    8 minutes with no network. One HEAD now switches to the cache, and the line says why it failed."""
    import time

    from sdtune.cli import main

    start = time.monotonic()
    code = main(["check-token", "ohwx", "--tokenizer", "someone/nosuch"])
    assert time.monotonic() - start < 10
    assert code == 2
    assert "--tokenizer: cannot load someone/nosuch (not in the Hugging Face cache, and the Hub cannot be reached " \
        "from here)" in capsys.readouterr().err
