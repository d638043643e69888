"""The composite reward of docs/method.md, "Reward", as a specification.

Every expected value below was worked out by hand from the equations and from the rules of ATLAS's eval
harness (docs/eval_protocol.md), not copied from the code. No test is timed: the hostile inputs are sized
so that a quadratic scan would hang the run instead.
"""
import pytest

from atlas_min.config import get_config
from atlas_min.rewards import (
    answers_equivalent,
    compute_reward,
    extract_answer,
    format_reward,
    length_penalty,
    normalise_answer,
    overuse_penalty,
    parse_options,
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
    ("\\sqrt[3]{8}", "2"),  # only square roots are understood (\sqrt{4} = 2 is: see the roots test)
    ("\\log{100}", "2"),  # no other LaTeX
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
    assert extract_answer("<answer>1</answer> then <answer>2", "tag") == "1"  # an unclosed one does not count
    assert extract_answer("the answer is 2", "tag") is None
    assert extract_answer("</answer>2<answer>", "tag") is None


def test_boxed_extraction_takes_the_last_boxed_and_allows_nested_braces():
    assert extract_answer("so \\boxed{1}, no: \\boxed{\\frac{1}{2}}.", "boxed") == "\\frac{1}{2}"
    assert extract_answer("$\\boxed{ {a}{b} }$", "boxed") == "{a}{b}"


def test_boxed_extraction_with_unbalanced_braces_gives_none():
    assert extract_answer("\\boxed{\\frac{1}{2}", "boxed") is None
    assert extract_answer("\\boxed{", "boxed") is None
    assert extract_answer("no box {here}", "boxed") is None
    # The harness reads the last \boxed{ only (judge_results.py:33): an earlier complete box is no fallback.
    assert extract_answer("\\boxed{1} then \\boxed{2", "boxed") is None


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

def test_without_token_ids_n_functional_counts_every_occurrence_of_the_five_strings():
    text = "<|Zoom|><|Zoom|> x <|Line|><|Shape|><|Arrow|><|Text|> <|Circle|> <Zoom>"
    assert compute_reward(text, "x", MICRO)["n_functional"] == 6


def test_with_token_ids_n_functional_is_the_count_by_id_and_spelled_out_strings_count_0():
    # the reply's text shows two token strings, but its ids held one functional token (the other was
    # spelled out of ordinary tokens): n_F, R_ft and P_over follow the ids
    text = "<|Shape|> three <|Zoom|>. <answer>3</answer>"
    by_id = compute_reward(text, "3", MICRO, functional=["<|Shape|>"])
    spelled = compute_reward(text, "3", MICRO, functional=[])
    assert by_id["n_functional"] == 1.0 and by_id["functional"] == 1.0
    assert spelled["n_functional"] == 0.0 and spelled["functional"] == 0.0
    assert spelled["total"] == pytest.approx(by_id["total"] - MICRO.w_ft)


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
def test_hostile_strings_never_raise(text, answer_format):
    cfg = get_config("micro", [f"answer_format={answer_format}"])
    for completion, answer in [(text, "1"), (f"<answer>{text}</answer>", text), (f"\\boxed{{{text}}}", text)]:
        r = compute_reward(completion, answer, cfg, question=text)
        assert set(r) == {"accuracy", "functional", "format", "length_penalty",
                          "overuse_penalty", "n_functional", "total"}
    assert answers_equivalent(text, "\\frac{1}{2}", question=text) in (True, False)


# --- Extraction as ATLAS's harness does it (judge_results.py:29-43, 79-81) --------------------------

BOXED = get_config("micro", ["answer_format=boxed"])


def test_the_last_box_is_the_answer_even_when_an_earlier_box_differs():
    assert extract_answer("First guess \\boxed{A}. On reflection it is white: \\boxed{B}", "boxed") == "B"


def test_a_reply_cut_off_inside_its_last_box_scores_zero_even_after_a_complete_box():
    # A reply that hit the token limit while writing its second box: the harness finds no answer in it.
    r = compute_reward("The bag looks white, \\boxed{B}. Let me double-check the colour: \\boxed{", "B",
                       BOXED)
    assert (r["accuracy"], r["format"]) == (0.0, 0.0)


def test_an_empty_last_box_is_no_answer():
    assert extract_answer("\\boxed{B} ... \\boxed{  }", "boxed") is None
    assert compute_reward("so \\boxed{}", "B", BOXED)["accuracy"] == 0.0


def test_a_box_inside_the_last_box_is_read_from_the_innermost_box():
    # "\boxed{\boxed{3}}": the last "\boxed{" is the inner one, as in the harness.
    assert extract_answer("\\boxed{\\boxed{3}}", "boxed") == "3"


def test_boxed_format_reward_follows_the_extraction_rule():
    assert format_reward("\\boxed{B} then \\boxed{", "boxed") == 0.0
    assert format_reward("\\boxed{ } then \\boxed{B}.", "boxed") == 1.0


# --- Normalisation rules, one test each --------------------------------------------------------------

def test_text_commands_around_the_answer_are_dropped():
    assert answers_equivalent("\\text{B}", "B")
    assert answers_equivalent("\\textbf{white}", "white")
    assert answers_equivalent("\\text{\\textbf{yes}}", "yes")  # nested
    assert answers_equivalent("12\\mathrm{cm}", "12 cm")


def test_markdown_bold_and_dollar_signs_are_dropped():
    assert answers_equivalent("**B**", "B")
    assert answers_equivalent("$\\frac{3}{4}$", "0.75")
    assert answers_equivalent("\\$25", "25")


def test_markdown_bold_is_dropped_only_in_pairs():
    assert not answers_equivalent("10**3", "103")  # "**" here is a power sign, not bold


def test_a_unicode_minus_is_a_minus():
    assert answers_equivalent("\u22123", "-3")


def test_tex_spacing_is_a_space():
    assert answers_equivalent("5\\,cm", "5 cm")


def test_a_braced_tex_comma_is_a_thousands_comma():
    assert answers_equivalent("1{,}000", "1000")


def test_thousands_commas_are_optional():
    assert answers_equivalent("12,500", "12500")


def test_an_announcing_prefix_is_dropped():
    assert answers_equivalent("The answer is B", "B")
    assert answers_equivalent("Answer: 42", "42")
    assert answers_equivalent("Option (C)", "C")


def test_an_announcing_word_inside_a_longer_word_is_kept():
    assert not answers_equivalent("Optional", "al")


def test_a_trailing_period_is_dropped():
    assert answers_equivalent("yes.", "Yes")
    assert answers_equivalent("The answer is B.", "B")


def test_a_named_value_equals_the_value():
    assert answers_equivalent("x = 5", "5")
    assert answers_equivalent("\\angle ABC = 30^\\circ", "30")


def test_a_comparison_is_not_a_named_value():
    assert not answers_equivalent("x <= 5", "5")


def test_a_unit_after_a_number_may_be_omitted():
    assert answers_equivalent("5 cm", "5")
    assert answers_equivalent("5", "5cm")
    assert answers_equivalent("12 \\text{cm}^2", "12 cm²")


def test_different_units_are_different_answers():
    assert not answers_equivalent("5 m", "5 cm")


def test_a_letter_after_a_number_is_not_a_unit():
    assert not answers_equivalent("2x", "2")  # a product, not "2 of unit x"
    assert not answers_equivalent("2\\pi", "2")


def test_degree_marks_may_be_omitted():
    for written in ("30°", "30^\\circ", "30^{\\circ}", "30 degrees"):
        assert answers_equivalent(written, "30")


def test_a_percent_sign_may_be_omitted():
    assert answers_equivalent("50\\%", "50")
    assert answers_equivalent("50%", "50")


def test_a_percentage_does_not_equal_its_fraction():
    assert not answers_equivalent("0.5", "50%")


def test_fractions_in_any_notation_equal_their_decimal():
    for written in ("\\frac12", "\\frac{1}{2}", "\\dfrac{1}{2}", "1/2", "\\frac1{2}"):
        assert answers_equivalent(written, "0.5")


def test_roots_compare_by_exact_value():
    assert answers_equivalent("2\\sqrt{3}", "\\sqrt{12}")  # 2²·3 = 12
    assert answers_equivalent("√2", "\\sqrt2")
    assert answers_equivalent("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2")
    assert answers_equivalent("\\sqrt{4}", "2")
    assert not answers_equivalent("\\sqrt{2}", "1.414")  # a rounded root is another number
    assert not answers_equivalent("-\\sqrt{2}", "\\sqrt{2}")


# --- Choices -----------------------------------------------------------------------------------------

VSTAR_Q = "What is the color of the woman's bag?\n(A) black\n(B) white\n(C) red\n(D) blue"
WEMATH_Q = "As shown in the figure, the length of segment AB is ( ).\nA. 5cm; B. 6cm; C. 7cm; D. 8cm"
BLINK_Q = ("Which image shows the same object as the reference image?\nSelect from the following choices.\n"
           "(A) the left one\n(B) the right one")


@pytest.mark.parametrize("question, options", [
    (VSTAR_Q, {"A": "black", "B": "white", "C": "red", "D": "blue"}),
    (WEMATH_Q, {"A": "5cm", "B": "6cm", "C": "7cm", "D": "8cm"}),
    (BLINK_Q, {"A": "the left one", "B": "the right one"}),
    ("Which is longer? (A) the top line (B) the bottom line", {"A": "the top line", "B": "the bottom line"}),
    ("Which colour?\nA. red\nB. blue\nAnswer with the letter.", {"A": "red", "B": "blue"}),
    ("Which colour? Options: A: red, B: blue", {"A": "red", "B": "blue"}),
    ("Which colour?\nA) red\nB) blue", {"A": "red", "B": "blue"}),
    ("How many circles are there?", {}),
    ("Is it (A) or not?", {}),  # one marker is no list of options
])
def test_options_are_read_from_the_question_in_the_benchmarks_styles(question, options):
    assert parse_options(question) == options


def test_a_choice_letter_followed_by_its_text_is_that_letter():
    for written in ("B. white", "(B) white", "B) white", "B: white"):
        assert answers_equivalent(written, "B")


def test_an_option_text_equals_its_letter_given_the_question():
    assert answers_equivalent("white", "B", question=VSTAR_Q)
    assert answers_equivalent("B", "white", question=VSTAR_Q)
    assert not answers_equivalent("white", "B")  # without the question there is nothing to map


def test_an_option_value_equals_its_letter_up_to_its_unit():
    assert answers_equivalent("5 cm", "A", question=WEMATH_Q)


def test_a_letter_that_is_not_an_option_is_not_a_choice():
    assert not answers_equivalent("E", "B", question=VSTAR_Q)


def test_a_letter_is_a_choice_only_when_the_gold_is_a_letter_or_the_question_has_options():
    assert not answers_equivalent("A", "A. Lincoln")  # a name, not option A with text
    assert answers_equivalent("(a)", "A")  # the gold is a letter: the reply's letter may be lower case


def test_yes_and_no_ignore_case_and_a_trailing_period():
    assert answers_equivalent("Yes.", "yes")
    assert not answers_equivalent("No.", "yes")


def test_free_text_compares_words_not_meaning():
    assert answers_equivalent("The Left One", "the left one")
    assert not answers_equivalent("the one on the left", "the left one")  # that needs the LLM judge


def test_normalisation_rules_apply_in_order():
    assert normalise_answer("\\text{The answer is **x = 5**.}") == "5"


# --- Hostile inputs ------------------------------------------------------------------------------------
# Sized so that a quadratic scan (10¹⁰ steps or more) would hang the test run; a linear one finishes.

HOSTILE_ANSWERS = [
    "{" * 100_000 + "}" * 100_000,
    "\\text{" * 50_000 + "B" + "}" * 50_000,
    "9" * 1_000_000,
    "1/" * 200_000,
    "\\sqrt{" * 50_000,
    "\\frac" * 50_000,
    "=" * 100_000,
    "a" * 100_000 + "1",
    "**" * 100_000 + "*",
    "The answer is " * 20_000,
]


@pytest.mark.parametrize("text", HOSTILE_ANSWERS, ids=lambda t: repr(t[:12]))
def test_hostile_answers_are_judged_by_linear_scans(text):
    assert answers_equivalent(text, text[:50] + "x") in (True, False)
    assert compute_reward(f"\\boxed{{{text}}}", "B", BOXED, question=text)["accuracy"] in (0.0, 1.0)


def test_a_hostile_question_is_parsed_by_a_linear_scan():
    question = "(A) " * 50_000 + "A. B. " * 50_000  # 50,000 one-option runs, then 50,000 two-option runs
    assert parse_options(question) == {"A": "", "B": ""}  # the last of the longest runs, texts empty
    assert not answers_equivalent("A", "B", question=question)


def test_hostile_nested_text_commands_unwrap_to_their_content():
    depth = 50_000
    assert answers_equivalent("\\text{" * depth + "B" + "}" * depth, "B")


# --- The harness's verdict, case by case ---------------------------------------------------------------
# Expected values written by hand as ATLAS's judge (judge_results.py) would rule: no box, an unclosed or
# empty last box -> 0 unjudged; else the same option, an equivalent value or the same words -> 1.

ANGLE_Q = "As shown in the figure, AB ∥ CD and ∠1 = 60°. What is the measure of ∠2?"
AREA_Q = "What is the area of the rectangle shown in the figure?"
YESNO_Q = "Is the number of red cubes greater than the number of blue spheres?"
FREE_Q = "Which side of the image is the lamp on?"

HARNESS_CASES = [
    # V*: letters, option texts, LaTeX and Markdown wrappers
    ("The bag is white. \\boxed{B}", "B", VSTAR_Q, True),
    ("\\boxed{(B)}", "B", VSTAR_Q, True),
    ("\\boxed{(B) white}", "B", VSTAR_Q, True),
    ("\\boxed{B. white}", "(B)", VSTAR_Q, True),
    ("\\boxed{white}", "B", VSTAR_Q, True),
    ("\\boxed{White.}", "B", VSTAR_Q, True),
    ("\\boxed{\\text{B}}", "B", VSTAR_Q, True),
    ("\\boxed{Option B}", "B", VSTAR_Q, True),
    ("\\boxed{The answer is B.}", "B", VSTAR_Q, True),
    ("$\\boxed{**B**}$", "B", VSTAR_Q, True),
    ("\\boxed{C}", "B", VSTAR_Q, False),
    ("\\boxed{red}", "B", VSTAR_Q, False),
    ("\\boxed{E}", "B", VSTAR_Q, False),
    ("At first \\boxed{B}; no, it is dark: \\boxed{A}", "B", VSTAR_Q, False),
    ("It is white, \\boxed{B}. Let me zoom in once more to be sure: \\boxed{", "B", VSTAR_Q, False),
    ("\\boxed{}", "B", VSTAR_Q, False),
    ("The bag is white, so the answer is B.", "B", VSTAR_Q, False),
    # WeMath: options with units, separated by semicolons
    ("\\boxed{A}", "A", WEMATH_Q, True),
    ("\\boxed{5cm}", "A", WEMATH_Q, True),
    ("\\boxed{5 cm}", "A", WEMATH_Q, True),
    ("\\boxed{A. 5cm}", "A", WEMATH_Q, True),
    ("\\boxed{6cm}", "A", WEMATH_Q, False),
    ("\\boxed{B}", "A", WEMATH_Q, False),
    # BLINK: "(B)" gold, option texts
    ("\\boxed{(B) the right one}", "(B)", BLINK_Q, True),
    ("\\boxed{B}", "(B)", BLINK_Q, True),
    ("\\boxed{B)}", "(B)", BLINK_Q, True),
    ("\\boxed{the right one}", "(B)", BLINK_Q, True),
    ("\\boxed{(A)}", "(B)", BLINK_Q, False),
    # MathVista-like: numbers, units, fractions, percentages, angles, roots
    ("\\boxed{120^\\circ}", "120", ANGLE_Q, True),
    ("\\boxed{120°}", "120", ANGLE_Q, True),
    ("\\boxed{\\angle 2 = 120^{\\circ}}", "120", ANGLE_Q, True),
    ("\\boxed{60}", "120", ANGLE_Q, False),
    ("\\boxed{24 \\text{cm}^2}", "24", AREA_Q, True),
    ("\\boxed{24 m^2}", "24 cm^2", AREA_Q, False),
    ("\\boxed{\\frac{1}{2}}", "0.5", "", True),
    ("\\boxed{\\dfrac12}", "0.5", "", True),
    ("\\boxed{0.25}", "0.5", "", False),
    ("\\boxed{50\\%}", "50", "", True),
    ("\\boxed{1{,}000}", "1000", "", True),
    ("\\boxed{1,000}", "1000", "", True),
    ("\\boxed{\u22123}", "-3", "", True),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", "", True),
    ("\\boxed{\\sqrt{2}}", "√2", "", True),
    ("\\boxed{x = 7.}", "7", "", True),
    ("\\boxed{$7$}", "7", "", True),
    ("\\boxed{8}", "7", "", False),
    ("\\boxed{3}", "\\boxed{3}", "", True),  # the harness unboxes a boxed gold too
    # free text and yes/no
    ("\\boxed{Yes.}", "yes", YESNO_Q, True),
    ("\\boxed{no}", "Yes", YESNO_Q, False),
    ("\\boxed{\\text{left}}", "left", FREE_Q, True),
    ("\\boxed{Right}", "left", FREE_Q, False),
]


@pytest.mark.parametrize("completion, gold, question, expected", HARNESS_CASES)
def test_rule_based_verdict_equals_the_harness_verdict_on_benchmark_style_cases(completion, gold, question,
                                                                                 expected):
    r = compute_reward(completion, gold, BOXED, question=question)
    assert r["accuracy"] == (1.0 if expected else 0.0)
