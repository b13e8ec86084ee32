"""The chat plugin's rules that need no gateway: run time limits (A18) and stop words (B1)."""

from __future__ import annotations

import pytest

from plugins.chat.config import ChatConfig
from plugins.chat.runs import run_limit_s
from plugins.chat.text import STOP_WORDS, is_stop_command

DEFAULTS = ChatConfig()


@pytest.mark.parametrize(
    ("timeout_ms", "limit_s"),
    [
        (None, 660.0),  # the default 600 s run plus 60 s grace
        (1_000, 120.0),  # never under two minutes
        (300_000, 360.0),  # the timeout plus the grace
        (0, 86_400.0),  # "no timeout" is the 24 h ceiling
        (7 * 86_400_000, 86_400.0),  # never over 24 h
        (86_400_000 - 60_000, 86_400.0),
    ],
)
def test_run_limits_follow_a18(timeout_ms: int | None, limit_s: float) -> None:
    assert run_limit_s(timeout_ms, DEFAULTS) == limit_s


def test_run_limits_follow_the_config() -> None:
    config = ChatConfig(
        default_timeout_ms=10_000, timeout_grace_ms=5_000, min_run_ms=1_000, max_run_ms=60_000
    )
    assert run_limit_s(None, config) == 15.0
    assert run_limit_s(0, config) == 60.0
    assert run_limit_s(100_000, config) == 60.0


@pytest.mark.parametrize("word", sorted(STOP_WORDS))
def test_every_stop_word_stops_in_any_case_and_padding(word: str) -> None:
    assert is_stop_command(word)
    assert is_stop_command(f"  {word.upper()}\n")


def test_the_stop_words_are_those_of_b1() -> None:
    assert {"/stop", "stop", "esc", "abort", "wait", "exit", "interrupt"} == STOP_WORDS


@pytest.mark.parametrize("text", ["stop it", "please stop", "stopwatch", "/stopped", "", "/ stop"])
def test_a_message_that_only_mentions_a_stop_word_is_a_message(text: str) -> None:
    assert not is_stop_command(text)
