"""Exceptions from libraries become one readable line, whatever they carry."""

from sdtune.errors import error_summary, first_line


def test_an_exception_without_a_message_still_gives_one_line():
    # diffusers' kohya FLUX reader raises a bare AssertionError for a file of other widths: the message that
    # quoted it used to crash with IndexError ("a bug in sdtune") instead of saying so
    assert first_line(AssertionError()) == "AssertionError" and error_summary(AssertionError()) == "AssertionError"
    assert error_summary(ValueError("bad shape\nmore detail")) == "ValueError: bad shape"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10
    assert first_line(RuntimeError("\n  \nsecond")) == "second"
    assert error_summary(KeyError("")) == "KeyError: ''"
