"""Labels beyond ASCII in grids and contact sheets: Pillow's own font holds ASCII only and drew every other
character (a prompt's 'café', a photo named été.jpg, a Japanese prompt) as the same empty box."""

import numpy as np
import pytest
from PIL import Image

from sdtune import grid
from sdtune.grid import drawable, make_grid


def _label_pixels(label: str) -> np.ndarray:
    cell = Image.new("RGB", (64, 64), "gray")
    return np.asarray(make_grid([[cell]], [label], ["seed 0"]))


def test_an_accented_label_is_not_drawn_as_the_missing_glyph_box():
    """Whatever fonts the system has: 'é' is drawn as é (a system font) or e, never as U+FFFF's box is."""
    assert not np.array_equal(_label_pixels("café"), _label_pixels("caf\uffff"))
    assert not np.array_equal(_label_pixels("é"), _label_pixels("\uffff"))


def test_what_no_font_holds_is_spelt_in_ascii(monkeypatch):
    monkeypatch.setattr(grid, "WIDE_FONTS", ())  # a system with no font but Pillow's own
    font, texts = drawable(["été à Paris", "日本の犬 sks", "dog_\udce9.jpg", "plain"], 14)
    assert texts == ["ete a Paris", "???? sks", "dog_?.jpg", "plain"]
    assert drawable(["plain"], 14)[1] == ["plain"]  # ASCII as it is


def test_a_system_font_is_used_for_what_it_holds():
    """With a font that holds é (DejaVu Sans on most Linux systems; skipped where none of WIDE_FONTS is), the
    label keeps it."""
    if not any(grid._font(name, 14) is not None for name in grid.WIDE_FONTS):
        pytest.skip("none of grid.WIDE_FONTS is installed here")
    font, (text,) = drawable(["été"], 14)
    assert text == "été" and font is not grid.load_font(14)
