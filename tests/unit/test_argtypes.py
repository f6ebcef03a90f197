"""The commands' shared argparse checks: a bad value is refused with a message naming it."""

from __future__ import annotations

import argparse

import pytest

from metering.commands.argtypes import positive, positive_int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must be > 0, got 0"),
        ("-3", "must be > 0, got -3"),
        ("2.5", "'2.5' is not an integer"),
        ("ten", "'ten' is not an integer"),
        ("", "'' is not an integer"),
    ],
)
def test_positive_int_refuses_what_is_not_a_whole_number_above_zero(
    text: str, message: str
) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_int(text)


def test_positive_int_takes_whole_numbers_of_any_size() -> None:
    assert positive_int("7") == 7
    big = "1" + "0" * 400  # no float conversion on the way: no OverflowError
    assert positive_int(big) == int(big)


@pytest.mark.parametrize("text", ["0", "-1.5", "nan", "inf", "-inf", "1e999"])
def test_positive_float_refuses_zero_negatives_and_non_finite(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"must be > 0, got {text}"):
        positive(float)(text)


def test_a_flag_with_a_bad_value_exits_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="metering")
    parser.add_argument("--seconds", type=positive_int)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--seconds", "0"])
    assert exited.value.code == 2
    assert "--seconds: must be > 0, got 0" in capsys.readouterr().err
