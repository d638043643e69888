"""The composite reward of DESIGN.md, "Stage 2, GRPO", as a specification.

Every expected value below was worked out by hand from the equations, not copied from the code.
"""
import time

import pytest

from atlas_min.config import get_config
from atlas_min.rewards import (
    answers_equivalent,
    compute_reward,
    count_functional_tokens,
    extract_answer,
    format_reward,
    length_penalty,
    overuse_penalty,
)

MICRO = get_config("micro")


# --- R_acc: equivalence ---------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gold", [
    ("left", "left"),
    ("  Left  ", "left"),  # surrounding whitespace and letter case do not matter
    ("two   red\tsquares", "two red squares"),  # whitespace runs collapse
    ("0.5", "1/2"),  # fraction and decimal forms of one half are equivalent
    (".5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "0.50"),
    ("\\tfrac{2}{4}", "1/2"),
    ("$\\frac{1}{2}$", "0.5"),  # surrounding $...$ is ignored
    ("$$3$$", "3"),
    ("-3", "-3.0"),
    ("+2", "2"),
    ("-\\frac{3}{4}", "-0.75"),  # a sign in front of \frac applies to it
    ("\\frac{-3}{4}", "-0.75"),
    ("1,000", "1000"),  # thousands commas are optional
    ("1,234.5", "2469/2"),
    ("7", "7."),
    ("3 / 4", "0.75"),
    ("B", "(B)"),  # a choice letter equals the same letter in any of its forms
    ("B.", "B)"),
    ("(b)", "B"),
    ("C", "c"),
])
def test_equivalent_answers(pred, gold):
    assert answers_equivalent(pred, gold)
    assert answers_equivalent(gold, pred)  # the relation is symmetric


@pytest.mark.parametrize("pred, gold", [
    ("0.333", "1/3"),  # numbers compare exactly, never as rounded floats
    ("0.3333333333333333", "1/3"),
    ("1/2", "2"),
    ("-3", "3"),
    ("B", "C"),  # different choice letters
    ("(B)", "B 4"),  # a letter with more text after it is not a choice letter
    ("B", "2"),
    ("1,5", "1.5"),  # a comma is only a thousands separator, not a decimal point
    ("1,0000", "10000"),
    ("1e3", "1000"),  # no scientific notation
    ("10**3", "1000"),  # no arithmetic
    ("1_000", "1000"),  # no Python digit separators
    ("²", "2"),  # only ASCII digits are digits
    ("1/0", "0"),  # a zero denominator is not a number
    ("\\frac{1}{2", "0.5"),  # unclosed \frac
    ("\\sqrt{4}", "2"),  # only fractions are understood, no other LaTeX
    ("", ""),  # an empty answer is never correct
    ("   ", "3"),
    ("left", "right"),
])
def test_non_equivalent_answers(pred, gold):
    assert not answers_equivalent(pred, gold)
    assert not answers_equivalent(gold, pred)


def test_missing_prediction_is_not_equivalent():
    assert not answers_equivalent(None, "3")


# --- R_acc: extraction ----------------------------------------------------------------------------

def test_tag_extraction_takes_the_last_complete_answer():
    assert extract_answer("<answer>1</answer> no wait <answer> 2 </answer>", "tag") == "2"
    assert extract_answer("<answer>1</answer> then <answer>2", "tag") == "1"  # the unclosed one does not count
    assert extract_answer("the answer is 2", "tag") is None
    assert extract_answer("</answer>2<answer>", "tag") is None


def test_boxed_extraction_takes_the_last_boxed_and_allows_nested_braces():
    assert extract_answer("so \\boxed{1}, no: \\boxed{\\frac{1}{2}}.", "boxed") == "\\frac{1}{2}"
    assert extract_answer("$\\boxed{ {a}{b} }$", "boxed") == "{a}{b}"


def test_boxed_extraction_with_unbalanced_braces_gives_none():
    assert extract_answer("\\boxed{\\frac{1}{2}", "boxed") is None
    assert extract_answer("\\boxed{", "boxed") is None
    assert extract_answer("no box {here}", "boxed") is None
    assert extract_answer("\\boxed{1} then \\boxed{2", "boxed") == "1"  # the last *balanced* one


def test_unknown_answer_format_is_a_config_error():
    with pytest.raises(ValueError):
        extract_answer("<answer>1</answer>", "json")


# --- R_fmt ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("<|Line|> the left one. <answer>A</answer>", 1.0),
    ("<answer>A</answer>\n  ", 1.0),  # trailing whitespace is fine
    ("<answer>A</answer> done", 0.0),  # text after the answer
    ("<answer>A</answer><answer>B</answer>", 0.0),  # two answers
    ("<answer> </answer>", 0.0),  # blank answer
    ("A</answer>", 0.0),  # no opening tag
    ("the answer is A", 0.0),
])
def test_tag_format_needs_exactly_one_nonblank_answer_at_the_end(completion, expected):
    assert format_reward(completion, "tag") == expected


@pytest.mark.parametrize("completion, expected", [
    ("thus $\\boxed{\\frac{1}{2}}$.", 1.0),
    ("\\boxed{ }", 0.0),
    ("\\boxed{3", 0.0),
    ("3", 0.0),
])
def test_boxed_format_needs_a_balanced_nonblank_box(completion, expected):
    assert format_reward(completion, "boxed") == expected


# --- R_ft -----------------------------------------------------------------------------------------

def test_count_functional_tokens_counts_every_occurrence_of_the_five():
    text = "<|Zoom|><|Zoom|> x <|Line|><|Shape|><|Arrow|><|Text|> <|Circle|> <Zoom>"
    assert count_functional_tokens(text) == 6


@pytest.mark.parametrize("completion, accuracy, functional", [
    ("<|Shape|> three. <answer>3</answer>", 1.0, 1.0),  # token and correct answer
    ("<|Shape|> four. <answer>4</answer>", 0.0, 0.0),  # token, wrong answer
    ("three. <answer>3</answer>", 1.0, 0.0),  # correct answer, no token
])
def test_functional_reward_needs_a_functional_token_and_a_correct_answer(completion, accuracy, functional):
    r = compute_reward(completion, "3", MICRO, num_tokens=5)
    assert r["accuracy"] == accuracy
    assert r["functional"] == functional


# --- P_len, P_over --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, expected", [
    (0, 0.0), (10, 0.0),  # zero up to the threshold (10) ...
    (15, 0.2), (20, 0.4), (25, 0.6),  # ... then 0.8 * (L - 10) / 20 ...
    (30, 0.8), (31, 0.8), (10_000, 0.8),  # ... capped at 0.8
])
def test_length_penalty_is_zero_up_to_the_threshold_linear_over_the_buffer_capped(num_tokens, expected):
    cfg = get_config("micro", ["len_threshold=10", "len_buffer=20", "len_max_penalty=0.8"])
    assert length_penalty(num_tokens, cfg) == pytest.approx(expected)


def test_length_penalty_with_no_buffer_is_a_step_to_the_cap():
    cfg = get_config("micro", ["len_threshold=10", "len_buffer=0", "len_max_penalty=0.8"])
    assert length_penalty(10, cfg) == 0.0
    assert length_penalty(11, cfg) == pytest.approx(0.8)


@pytest.mark.parametrize("n, expected", [
    (0, 0.0), (2, 0.0),  # zero up to the threshold (2) ...
    (3, 0.3), (4, 0.6), (5, 0.9),  # ... then 0.3 per token beyond it ...
    (6, 1.0), (50, 1.0),  # ... capped at 1.0
])
def test_overuse_penalty_is_zero_up_to_the_threshold_then_bounded_linear(n, expected):
    cfg = get_config("micro", ["over_threshold=2", "over_slope=0.3", "over_max_penalty=1.0"])
    assert overuse_penalty(n, cfg) == pytest.approx(expected)


# --- R --------------------------------------------------------------------------------------------

def test_total_is_the_weighted_sum_of_the_components():
    cfg = get_config("micro", [
        "w_acc=1.0", "w_ft=0.5", "w_fmt=0.25", "w_len=0.5", "w_over=2.0",
        "len_threshold=10", "len_buffer=20", "len_max_penalty=0.8",
        "over_threshold=1", "over_slope=0.1", "over_max_penalty=1.0",
    ])
    completion = "<|Zoom|> the digit <|Zoom|> is <|Text|> seven. <answer>7</answer>"
    r = compute_reward(completion, "7", cfg, num_tokens=20)
    # P_len = 0.8 * (20 - 10) / 20 = 0.4;  P_over = 0.1 * (3 - 1) = 0.2
    # total = 1.0*1 + 0.5*1 + 0.25*1 - 0.5*0.4 - 2.0*0.2 = 1.15
    assert r == pytest.approx({
        "accuracy": 1.0, "functional": 1.0, "format": 1.0, "length_penalty": 0.4,
        "overuse_penalty": 0.2, "n_functional": 3.0, "total": 1.15,
    })


def test_length_falls_back_to_characters_when_no_token_count_is_given():
    cfg = get_config("micro", ["len_threshold=10", "len_buffer=20", "len_max_penalty=1.0"])
    completion = "<answer>" + "x" * 12 + "</answer>"  # 8 + 12 + 9 = 29 characters
    assert compute_reward(completion, "y", cfg)["length_penalty"] == pytest.approx((29 - 10) / 20)


def test_boxed_answer_format_is_scored_from_the_box():
    cfg = get_config("micro", ["answer_format=boxed"])
    r = compute_reward("so the answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5", cfg, num_tokens=5)
    assert (r["accuracy"], r["format"]) == (1.0, 1.0)


HOSTILE = [
    "__import__('os').system('x')",
    "1e999999999",
    "10**10**10",
    "9" * 100_000,
    "{" * 100_000,
    "\\boxed{" * 50_000,
    "\\frac{",
    "\\frac{1}{0}",
    "\x00\x00<answer>\x00</answer>",
    "🙂🙂 <answer>🙂</answer>",
    "\ud800",  # a lone surrogate
    "$" * 100_000,
    "<answer>" * 50_000 + "</answer>" * 50_000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: repr(t[:20]))
@pytest.mark.parametrize("answer_format", ["tag", "boxed"])
def test_hostile_strings_are_judged_quickly_and_never_raise(text, answer_format):
    cfg = get_config("micro", [f"answer_format={answer_format}"])
    for completion, answer in [(text, "1"), (f"<answer>{text}</answer>", text), (f"\\boxed{{{text}}}", text)]:
        start = time.perf_counter()
        r = compute_reward(completion, answer, cfg)
        assert time.perf_counter() - start < 0.5
        assert set(r) == {"accuracy", "functional", "format", "length_penalty",
                          "overuse_penalty", "n_functional", "total"}
    start = time.perf_counter()
    assert answers_equivalent(text, "\\frac{1}{2}") in (True, False)
    assert time.perf_counter() - start < 0.5
