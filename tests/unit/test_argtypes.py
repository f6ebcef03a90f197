"""The commands' shared argparse checks: a bad value is refused with a message naming it."""

from __future__ import annotations

import argparse
from pathlib import Path

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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "--metrics-port", "70000"], "argument --metrics-port: '70000' is not a TCP"),
        (["worker", "--metrics-port", "-1"], "argument --metrics-port: '-1' is not a TCP port"),
        (["token", "bad tenant"], "argument tenant: invalid tenant id 'bad tenant'"),
        (["token", "x", "--ttl", "-5"], "argument --ttl: must be 1-315360000, got -5"),
        (["token", "x", "--ttl", "0"], "argument --ttl: must be 1-315360000, got 0"),
        (["token", "x", "--ttl", "soon"], "argument --ttl: 'soon' is not an integer"),
    ],
)
def test_a_bad_argument_of_worker_or_token_exits_2_naming_it(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused by argparse before the command runs (no settings read, no store reached)."""
    from metering.cli import main

    monkeypatch.setenv("METERING_DATA_DIR", str(tmp_path))  # were it run: no secret made here
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_worker_and_token_still_take_their_good_arguments() -> None:
    from metering.cli import build_parser
    from metering.commands.up import MAX_TOKEN_TTL

    parser = build_parser()
    assert parser.parse_args(["worker", "--metrics-port", "0"]).metrics_port == 0
    assert parser.parse_args(["worker", "--metrics-port", "65535"]).metrics_port == 65535
    assert parser.parse_args(["worker"]).metrics_port is None  # WORKER_METRICS_PORT then
    args = parser.parse_args(["token", "acme:eu-1", "--ttl", str(MAX_TOKEN_TTL)])
    assert (args.tenant, args.ttl) == ("acme:eu-1", MAX_TOKEN_TTL)
    assert parser.parse_args(["token", "acme"]).ttl == 3600
