"""TextStream: detokenized deltas cut at stop strings, never sending half of one."""

from __future__ import annotations

from router.text import TextStream
from tests.unit.router.router_testkit import FakeTokenizer

TOK = FakeTokenizer()  # one token per character


def run(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    s = TextStream(TOK, stop)
    out = []
    for t in TOK.encode(text):
        out.append(s.add(t))
        if s.stopped:
            break
    out.append(s.flush())
    return out, s.stopped


def test_without_stop_strings_every_character_goes_out_at_once():
    out, stopped = run("hello", ())
    assert out == ["h", "e", "l", "l", "o", ""] and not stopped


def test_text_is_cut_before_the_first_stop_string_and_a_partial_match_is_held_back():
    out, stopped = run("say hello world", ("lo w", "xyz"))
    assert "".join(out) == "say hel" and stopped
    assert out[:8] == ["s", "a", "y", " ", "h", "e", "", "l"]  # each "l" waits for the next: it may begin "lo w"


def test_a_partial_match_that_does_not_complete_is_sent_when_the_next_token_settles_it():
    out, stopped = run("lot lo", ("lo w",))
    assert "".join(out) == "lot lo" and not stopped  # the trailing "lo" goes out at the end
    assert out[2] == "lot"  # held "lo" released together with "t"


def test_the_earliest_of_several_stop_strings_wins():
    out, stopped = run("abcdef", ("de", "bc"))
    assert "".join(out) == "a" and stopped
