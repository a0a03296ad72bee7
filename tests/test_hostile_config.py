"""Hostile recipes and overrides end in one ``error:`` line each and exit code 2: never a traceback, a hang or
a silently kept value. None of these tests loads a model; every problem is found while reading the recipe."""

from pathlib import Path

import pytest

from conftest import DEMO_DATA
from sdtune.cli import main
from sdtune.config import MAX_DEPTH, MAX_VALUES, SEED_MAX, ConfigError, load_config

MINIMAL = f"model: {{pretrained: MODEL}}\ndata: {{instance_dir: {DEMO_DATA}, identifier: sks}}\n"


def _recipe(tmp_path: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def _errors(capsys, recipe: Path | str, *args: str) -> list[str]:
    """Run ``sdtune train RECIPE ARGS``; it must fail with exit code 2 and only ``error:`` lines."""
    code = main(["train", str(recipe), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "this is a bug" not in err, err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert all(len(line) < 400 for line in lines), "a problem line stays one readable line"
    return [line.removeprefix("error: ") for line in lines]


def test_unreadable_recipes_are_one_line(tmp_path, capsys, monkeypatch):
    bad = _recipe(tmp_path, MINIMAL.encode() + b"train: {output_dir: caf\xff}\n", "bad.yaml")
    position = len(MINIMAL.encode()) + len(b"train: {output_dir: caf")
    assert _errors(capsys, bad, "--dry-run") == [
        f"recipe {bad}: not UTF-8 text (byte 0xff at position {position}, line 3); save it as UTF-8"
    ]
    utf16 = _recipe(tmp_path, MINIMAL.encode("utf-16"), "utf16.yaml")
    assert _errors(capsys, utf16, "--dry-run") == [f"recipe {utf16}: UTF-16 text; save it as UTF-8"]
    # a UTF-8 byte-order mark (Windows editors write one) is fine
    bom = _recipe(tmp_path, b"\xef\xbb\xbf" + MINIMAL.encode(), "bom.yaml")
    assert load_config(bom).data.identifier == "sks"

    folder = tmp_path / "recipes.yaml"
    folder.mkdir()
    [line] = _errors(capsys, folder, "--print-config")
    assert line.startswith(f"recipe {folder}: is a folder; give the .yaml file")
    [line] = _errors(capsys, tmp_path / "nope.yaml", "--print-config")
    assert line == f"recipe {tmp_path / 'nope.yaml'}: no such file"

    # chmod 000 does not stop root (as in CI containers), so the file system's refusal is simulated
    locked = _recipe(tmp_path, MINIMAL, "locked.yaml")
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    assert _errors(capsys, locked, "--print-config") == [
        f"recipe {locked}: cannot be read (Permission denied); check its permissions"
    ]
    monkeypatch.undo()

    big = _recipe(tmp_path, MINIMAL + "#" * (1 << 20), "big.yaml")
    [line] = _errors(capsys, big, "--print-config")
    assert line.startswith(f"recipe {big}: larger than 1 MiB")
    nul = _recipe(tmp_path, MINIMAL + "train: {output_dir: a\0b}\n", "nul.yaml")
    assert _errors(capsys, nul, "--print-config") == [
        f"recipe {nul} line 3: character #x0000 is not allowed in YAML; remove it"
    ]


def test_duplicate_keys_are_refused_with_both_lines(tmp_path, capsys):
    text = MINIMAL + "train:\n  seed: 1\n  max_steps: 3\n  max_steps: 4\nlora: {rank: 8}\ntrain:\n  batch_size: 2\n"
    r = _recipe(tmp_path, text)
    assert _errors(capsys, r, "--dry-run") == [
        f"recipe {r} line 6: 'train.max_steps' appears twice (first on line 5); keep one",
        f"recipe {r} line 8: 'train' appears twice (first on line 3); merge the two",
    ]
    # in flow style and quoted too; an override of the same key is no duplicate (it is meant to win)
    r = _recipe(tmp_path, MINIMAL + 'sample: {steps: 3, "steps": 4}\n')
    assert _errors(capsys, r, "sample.steps=5") == [
        f"recipe {r} line 3: 'sample.steps' appears twice (first on line 3); keep one"
    ]
    assert _errors(capsys, _recipe(tmp_path, MINIMAL), "sample.prompts={a: 1, a: 2}") == [
        "override 'sample.prompts={a: 1, a: 2}': 'a' appears twice (first on line 1); keep one"
    ]

    # YAML merge keys still work: the keys a merge brings may be overridden next to it
    merged = MINIMAL + "train: {<<: {seed: 5, max_steps: 7}, seed: 6}\nsample: {<<: [{steps: 3}, {every: 2}]}\n"
    cfg = load_config(_recipe(tmp_path, merged))
    assert (cfg.train.seed, cfg.train.max_steps, cfg.sample.steps, cfg.sample.every) == (6, 7, 3, 2)


def _laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each level an anchored list of `width` aliases of the level below."""
    lines = ["  l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(120)
def test_resource_bombs_are_refused_quickly(tmp_path, capsys):
    too_many = f"more than {MAX_VALUES} values (an alias counts all of its values each time it is used)"
    # in an unknown section, in a known one, and where a value is read: all stopped before anything is built
    for body in ("bomb:\n" + _laughs(), "sample:\n" + _laughs() + "  prompts: *l9\n",
                 "train:\n  seed: &s [[1, 2], [3]]\nsample:\n" + _laughs().replace("lol", "*s")):
        r = _recipe(tmp_path, MINIMAL + body)
        for flag in ("--dry-run", "--print-config"):
            [line] = _errors(capsys, r, flag)
            assert line.startswith(f"recipe {r} line ") and too_many in line

    # an alias inside its own anchor would expand forever
    [line] = _errors(capsys, _recipe(tmp_path, MINIMAL + "sample: {prompts: &p [a, *p]}\n"), "--dry-run")
    assert too_many in line

    # 10,000 levels of nesting: a line, not a RecursionError
    deep = "[" * 10_000 + "]" * 10_000
    r = _recipe(tmp_path, MINIMAL + f"sample: {{prompts: {deep}}}\n")
    assert _errors(capsys, r, "--dry-run") == [
        f"recipe {r} line 3: nested more than {MAX_DEPTH} levels deep; a recipe needs four at most"
    ]

    # the same bounds for an override's value (read as YAML); the value is shown cut short
    [line] = _errors(capsys, _recipe(tmp_path, MINIMAL), f"sample.prompts={deep}", "--dry-run")
    assert line.startswith("override 'sample.prompts=[[[[") and line.endswith(
        f"]]]]': nested more than {MAX_DEPTH} levels deep; a recipe needs four at most"
    )
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    [line] = _errors(capsys, _recipe(tmp_path, MINIMAL), f"sample.prompts=[{', '.join(levels)}]", "--dry-run")
    assert line.startswith("override 'sample.prompts=[&l0 [lol,") and too_many in line
    flat = "[" + ", ".join(["[a, a, a, a, a, a, a, a, a, a]"] * 2000) + "]"
    [line] = _errors(capsys, _recipe(tmp_path, MINIMAL), f"sample.prompts={flat}", "--print-config")
    assert line.startswith("override 'sample.prompts=[[a, a,") and too_many in line


def test_seeds_and_non_finite_numbers(tmp_path, capsys):
    r = _recipe(tmp_path, MINIMAL + "lora: {alpha: .inf}\nprior: {loss_weight: .nan}\ntrain: {seed: -1}\n")
    problems = _errors(capsys, r, "train.learning_rate=.nan", "train.max_grad_norm=-.inf", "train.noise_offset=inf",
                       f"sample.seeds=[0, {SEED_MAX + 1}]", "--dry-run")
    assert problems == [
        "prior.loss_weight: input should be a finite number (got nan)",
        "lora.alpha: input should be a finite number (got inf)",
        "train.seed: must be a whole number from 0 to 4294967295 (got -1)",
        "train.learning_rate: input should be a finite number (got nan)",
        "train.max_grad_norm: input should be a finite number (got -inf)",
        "train.noise_offset: input should be a finite number (got 'inf')",
        f"sample.seeds.1: must be a whole number from 0 to {SEED_MAX} (got {SEED_MAX + 1})",
    ]
    for seed, shown in (("-1", "-1"), ("4294967296", "4294967296"), ("1e30", "1000000000000000019884624838656")):
        assert _errors(capsys, _recipe(tmp_path, MINIMAL), f"train.seed={seed}", "--print-config") == [
            f"train.seed: must be a whole number from 0 to {SEED_MAX} (got {shown})"
        ]
    cfg = load_config(_recipe(tmp_path, MINIMAL), [f"train.seed={SEED_MAX}", "sample.seeds=[0, 4000000000]"])
    assert cfg.train.seed == SEED_MAX and cfg.sample.seeds == [0, 4_000_000_000]


def test_other_hostile_shapes(tmp_path, capsys):
    r = _recipe(tmp_path, "- model\n- data\n")
    assert _errors(capsys, r, "--dry-run") == [
        f"recipe {r}: expected a mapping of sections (model:, data:, train:, ...), got ['model', 'data']"
    ]
    # keys that YAML does not read as names
    r = _recipe(tmp_path, MINIMAL + "1: x\n? [a]\n: y\nsample: {no: 3, ~: 1}\n")
    assert _errors(capsys, r, "--dry-run") == [
        f"recipe {r} line 3: key '1' reads as YAML int, not a name; keys are names like max_steps",
        f"recipe {r} line 4: a list used as a key; keys are names like max_steps",
        f"recipe {r} line 6: key 'no' in sample reads as YAML bool, not a name; keys are names like max_steps",
        f"recipe {r} line 6: key '~' in sample reads as YAML null, not a name; keys are names like max_steps",
    ]
    # scalars PyYAML fails on with a ValueError / KeyError deep inside
    r = _recipe(tmp_path, MINIMAL + "train: {resume: 2024-13-45}\n")
    assert _errors(capsys, r, "--dry-run") == [
        f"recipe {r} line 3: '2024-13-45' is not a valid YAML timestamp; quote it if it is text"
    ]
    r = _recipe(tmp_path, MINIMAL + "train: {seed: 1" + "0" * 5000 + ", allow_tf32: !!bool maybe}\n")
    assert _errors(capsys, r, "--dry-run") == [
        f"recipe {r} line 3: a number of 5001 characters; no setting takes one that long"
    ]

    # a section given a value, a malformed key, a key under a value
    problems = _errors(capsys, _recipe(tmp_path, MINIMAL + "lora: [8]\n"), "train=3", "a..b=1", "=1", "model.x",
                       "data.identifier.x=1", "--dry-run")
    assert problems == [
        "override 'a..b=1': bad key 'a..b'; keys are dotted names like train.max_steps",
        "override '=1': bad key ''; keys are dotted names like train.max_steps",
        "override 'model.x': expected key=value, e.g. train.max_steps=800",
        "data.identifier: is a value, not a section (override 'data.identifier.x=1')",
        "lora: must be a section of keys (like lora.rank), got [8]",
        "train: must be a section of keys (like train.output_dir), got 3",
    ]
    # very long strings are refused where they would break something, and shown cut short
    long = "x" * 300_000
    r = _recipe(tmp_path, MINIMAL + 'train: {resume: "a\\0b"}\n')
    problems = _errors(capsys, r, f"train.output_dir=/{long}", f"data.identifier={long}", "--dry-run")
    assert problems[0].startswith(f"data.identifier: string should have at most 200 characters (got '{'x' * 37}...")
    assert problems[1].startswith("train.output_dir: a path too long for the file system (at most 4096 bytes")
    assert problems[2] == "train.resume: contains a NUL character (\\0); remove it (got 'a\\x00b')"
    assert len(problems) == 3
    # an empty section (`prior:`) takes overrides
    cfg = load_config(_recipe(tmp_path, MINIMAL + "prior:\n"), ["prior.class_prompt=a dog"])
    assert cfg.prior.class_prompt == "a dog"


def test_values_that_read_as_something_else(tmp_path, monkeypatch):
    """Found by probing: `true` read as 1, an empty path read as the working folder, `~` kept literally."""
    base = ["model.pretrained=m", "data.instance_dir=d", "data.identifier=sks"]
    with pytest.raises(ConfigError, match="train.max_steps: expected a number, got a true/false value"):
        load_config(None, [*base, "train.max_steps=true"])
    with pytest.raises(ConfigError, match="data.instance_dir: is empty; give a path"):
        load_config(None, [*base, "data.instance_dir=''"])
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, [*base, "train.output_dir=~/runs/x"]).train.output_dir == str(tmp_path / "runs/x")
