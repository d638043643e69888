"""The composite GRPO reward (docs/method.md, "Reward"):

    R = w_acc·R_acc + w_ft·R_ft + w_fmt·R_fmt − w_len·P_len − w_over·P_over

R_acc reads the final answer as ATLAS's own eval harness does (the last `\\boxed{…}`, see extract_answer)
and compares it with the gold answer by an ordered pipeline of small, named rules: the checks that the
harness's LLM judge applies (same option letter, equivalent values), restricted to what a rule can decide.
Meaning-level judgement ("the left one" vs "the one on the left") is left to atlas_min.judge.

Everything here is a pure function of strings and numbers. Model output is hostile input: it is never
eval'd, exec'd or sympified, numbers are parsed by hand with a length cap, every scan is linear, and the
few regexes either cannot backtrack or run on strings capped at a few dozen characters. No function raises
on any string.

    compute_reward("<|Line|> the left one is longer. <answer>(B)</answer>", "B", cfg)["total"]
"""
import re
from fractions import Fraction

from atlas_min.tokens import FUNCTIONAL_TOKENS

# Longer "numbers" are not parsed as numbers (they can still match as exact strings): this keeps a
# 100,000-digit answer from costing big-integer time, and Python's int() refuses > 4300 digits anyway.
MAX_NUMBER_CHARS = 64
MAX_QUANTITY_CHARS = MAX_NUMBER_CHARS + 32  # a number and its unit; the unit regex runs only below this

_DIGITS = frozenset("0123456789")  # not str.isdigit(): it accepts "²", which int() then rejects
_FRAC_COMMANDS = ("\\frac", "\\dfrac", "\\tfrac")
_LATEX_SPECIAL = re.compile(r"[\\{}]")


# --- R_acc, step 1: find the final answer ------------------------------------------------------

def extract_answer(completion, answer_format):
    """The final answer in `completion`, stripped, or None when there is none.

    "tag": the content of the last complete `<answer>…</answer>` pair.
    "boxed": the content of the LAST `\\boxed{` in the text, up to the brace that closes it (nested braces
    are fine: `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`). If that last box never closes, or holds only
    whitespace, there is no answer, even when an earlier box was complete: a reply cut off after
    `… \\boxed{B} … \\boxed{` scores 0. This is the rule of ATLAS's eval harness
    (ZiyuGuo99/ATLAS@4b09aef judge_results.py:29-43 takes the last `\\boxed{` and matches braces; :79-81
    scores a missing, unclosed or empty box 0 without asking the judge).
    """
    if answer_format == "tag":
        end = completion.rfind("</answer>")
        start = completion.rfind("<answer>", 0, max(end, 0))
        return completion[start + len("<answer>"):end].strip() if end >= 0 and start >= 0 else None
    if answer_format == "boxed":
        start = completion.rfind("\\boxed{")
        box = _argument(completion[start + len("\\boxed"):]) if start >= 0 else None  # one scan to its close
        return (box[0] or None) if box else None
    raise ValueError(f"answer_format must be 'tag' or 'boxed', not {answer_format!r}")


# --- R_acc, step 2: normalise both answers (one ordered pipeline, one function per rule) ------------
#
# Each rule removes one way of writing the same answer differently. They run in the order of
# NORMALISATION_RULES on both the prediction and the gold answer (docs/method.md, "Reward").

_TEXT_COMMANDS = ("\\text{", "\\textbf{", "\\textit{", "\\textrm{", "\\mathrm{", "\\mathbf{", "\\mbox{", "\\boxed{")


def unwrap_text_commands(text):
    """`\\text{B}` -> `B`; also \\textbf, \\textit, \\textrm, \\mathrm, \\mathbf, \\mbox and \\boxed, nested
    or not (`\\text{\\textbf{B}}` -> `B`): they only typeset the answer. The harness unboxes a boxed gold
    answer too (judge_results.py:73). One left-to-right pass with a stack of open braces."""
    out, stack, copied = [], [], 0  # stack: one entry per open "{": True when its "}" must be dropped
    for m in _LATEX_SPECIAL.finditer(text):
        i = m.start()
        if i < copied:  # inside a command name already consumed
            continue
        out.append(text[copied:i])
        copied = i + 1
        c = text[i]
        command = next((cmd for cmd in _TEXT_COMMANDS if text.startswith(cmd, i)), None)  # only at a backslash
        if command:
            stack.append(True)
            copied = i + len(command)
        elif c == "{":
            stack.append(False)
            out.append(c)
        elif c == "\\" or not (stack and stack.pop()):  # a "}" closing a wrapper is dropped, any other is kept
            out.append(c)
    out.append(text[copied:])
    return "".join(out)


def drop_markup(text):
    """`**B**` -> `B`, `$\\frac{1}{2}$` -> `\\frac{1}{2}`, `\\$5` -> `5`: Markdown bold and TeX math
    delimiters (or a dollar sign) carry no value. `**` goes only when it comes in pairs, as bold does:
    `10**3` keeps its power sign (and is then no number at all)."""
    if text.count("**") % 2 == 0:
        text = text.replace("**", "")
    return text.replace("\\$", "").replace("$", "")


def unicode_minus(text):
    """`−3` (U+2212, what typeset text and some tokenizers produce) -> `-3`."""
    return text.replace("\u2212", "-")


def latex_spacing(text):
    """`5\\,cm` -> `5 cm`, `1{,}000` -> `1,000`: TeX spacing commands are spaces, and `{,}` is TeX's way
    of writing a thousands comma without the space after it."""
    for command in ("\\,", "\\;", "\\:", "\\ "):
        text = text.replace(command, " ")
    return text.replace("\\!", "").replace("{,}", ",")


def collapse_whitespace(text):
    """Strip, and turn every run of whitespace into one space."""
    return " ".join(text.split())


_ANSWER_PREFIXES = ("the final answer is", "the correct answer is", "the answer is", "final answer",
                    "answer", "the correct option is", "option")


def drop_answer_prefix(text):
    """`The answer is B` -> `B`, `Answer: 5` -> `5`, `Option (B)` -> `(B)`: a leading phrase that announces
    the answer (case-insensitive, one of _ANSWER_PREFIXES, a ":" after it allowed). The phrase must end at
    a word boundary, so `Options` or `answered` stay whole."""
    for prefix in _ANSWER_PREFIXES:
        rest = text[len(prefix):]
        if text[:len(prefix)].lower() == prefix and not (rest[:1].isalnum() or rest[:1] == "_"):
            return rest.lstrip().removeprefix(":").lstrip() or text
    return text


def drop_trailing_period(text):
    """`yes.` -> `yes`, `5.` -> `5`: one sentence-final period (an ellipsis `...` is kept)."""
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text


def drop_variable(text):
    """`x = 5` -> `5`, `\\angle ABC = 30^\\circ` -> `30^\\circ`: the value after the last `=`, when a short
    name (at most 32 characters) stands before it; `<=`, `>=`, `!=`, `==` are not assignments."""
    name, eq, value = text.rpartition("=")
    if not eq or not name.strip() or not value.strip() or len(name) > 32 or name[-1] in "<>!=":
        return text
    return value.strip()


NORMALISATION_RULES = (unwrap_text_commands, drop_markup, unicode_minus, latex_spacing, collapse_whitespace,
                       drop_answer_prefix, drop_trailing_period, drop_variable)


def normalise_answer(text):
    """`text` after every rule of NORMALISATION_RULES, in order."""
    for rule in NORMALISATION_RULES:
        text = rule(text)
    return text


# --- R_acc, step 3: numbers and quantities ---------------------------------------------------------
#
# A number is compared by its exact value, never as a rounded float. So that roots compare exactly
# too, a value v is kept as its sign and its square: (sign(v), v²) is one-to-one on real numbers, and
# a·√b has the square a²·b, a fraction. Thus 2√3 = √12, √4 = 2, and 0.333 ≠ 1/3.

def _signed_square(q):
    return (q > 0) - (q < 0), q * q


def _decimal(text):
    """`-3`, `+2`, `0.5`, `.5`, `5.`, `1,000`, `1,234.5` -> an exact Fraction; anything else -> None.

    Built from the digit strings, never from float or Fraction(str) (which accepts `1e9`, `1_0`).
    """
    negative = text[:1] == "-"
    whole, _, frac = (text[1:] if text[:1] in ("-", "+") else text).partition(".")
    if not whole and not frac:
        return None
    if "," in whole:  # thousands separators, only in well-formed groups: "1,000" yes, "1,5" no
        groups = whole.split(",")
        if not 1 <= len(groups[0]) <= 3 or any(len(g) != 3 for g in groups[1:]):
            return None
        whole = "".join(groups)
    if not all(c in _DIGITS for c in whole + frac):
        return None
    value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    return -value if negative else value


def _argument(text):
    """A TeX argument at the start of `text` -> (content, rest): a brace group (nesting allowed) or one
    character (`\\frac12` is `\\frac{1}{2}`); None when there is none. One linear scan."""
    text = text.lstrip()
    if text[:1] != "{":
        return (text[0], text[1:]) if text and text[0] not in "}\\" else None
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[1:i].strip(), text[i + 1:]
    return None


def _root(text):
    """`2\\sqrt{3}`, `\\sqrt3`, `-0.5√2`, `√12` -> the signed square of coefficient·√radicand;
    else None."""
    mark = next((m for m in ("\\sqrt", "√") if m in text), None)
    if mark is None:
        return None
    coef_text, _, radicand_text = text.partition(mark)
    coef_text = coef_text.strip()
    coef = Fraction(-1 if coef_text == "-" else 1) if coef_text in ("", "+", "-") else _decimal(coef_text)
    if mark == "\\sqrt":
        arg = _argument(radicand_text)
        if arg is None or arg[1].strip():
            return None
        radicand_text = arg[0]
    radicand = _decimal(radicand_text.strip())
    if coef is None or radicand is None or radicand < 0:
        return None
    sign, square = _signed_square(coef)
    return (sign if radicand else 0), square * radicand


def _term(text):
    """A decimal or a root, as a signed square; None for anything else."""
    text = text.strip()
    q = _decimal(text)
    return _signed_square(q) if q is not None else _root(text)


def _divide(num, den):
    return None if num is None or den is None or den[0] == 0 else (num[0] * den[0], num[1] / den[1])


def number_value(text):
    """The exact value of a number written as a decimal, `a/b`, `\\frac{a}{b}` (`\\dfrac`, `\\tfrac`,
    `\\frac12`, a sign in front allowed) or a root (`2\\sqrt{3}`, `\\frac{\\sqrt{3}}{2}`), as the pair
    (sign, square); None for anything else, including scientific notation and arithmetic."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    sign, body = 1, text.strip()
    if body[:1] in ("-", "+") and body[1:].lstrip()[:1] in ("\\", "√"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:].lstrip()
    if command := next((c for c in _FRAC_COMMANDS if body.startswith(c)), None):
        first = _argument(body[len(command):])
        second = first and _argument(first[1])
        if not second or second[1].strip():
            return None
        value = _divide(_term(first[0]), _term(second[0]))
    elif body.count("/") == 1:
        value = _divide(*map(_term, body.split("/")))
    else:
        value = _term(body)
    return None if value is None else (sign * value[0], value[1])


_UNIT_MARKS = {"^{\\circ}": "°", "^\\circ": "°", "\\circ": "°", "\\degree": "°", "°": "°", "\\%": "%", "%": "%"}
_UNIT_NAMES = {"degree": "°", "degrees": "°", "deg": "°", "percent": "%"}
# A unit: a word of 2+ letters, or one of a few one-letter SI symbols (so that `2x` is not "2 of unit x"),
# then an optional power (^2, ^{3}, ², ³) and an optional "/word". Not after a letter or a backslash, so
# `2\pi` has no unit "pi". Only run on strings below MAX_QUANTITY_CHARS: backtracking stays bounded.
_POWER = r"(?:\^\{?[23]\}?|[²³])?"
_UNIT = re.compile(r"(?<![^\W\d_])(?<!\\)((?:[^\W\d_]{2,}|[mgsLhKNJWV])" + _POWER
                   + r"(?:\s*/\s*[^\W\d_]+" + _POWER + r")?)$")


def split_unit(text):
    """`5 cm` -> ("5", "cm"), `30^\\circ` / `30°` / `30 degrees` -> ("30", "°"), `50\\%` -> ("50", "%"),
    `5 cm^2` -> ("5", "cm^2"), `7` -> ("7", "")."""
    for mark, unit in _UNIT_MARKS.items():  # longest first where one ends another
        if text.endswith(mark):
            return text[:-len(mark)].rstrip(), unit
    m = _UNIT.search(text) if len(text) <= MAX_QUANTITY_CHARS else None
    if m is None or not m.start():
        return text, ""
    unit = m[1].replace(" ", "").replace("{", "").replace("}", "").replace("²", "^2").replace("³", "^3")
    return text[:m.start()].rstrip(), _UNIT_NAMES.get(unit.lower(), unit)


def same_quantity(pred, gold):
    """Both are numbers of the same exact value, and their units agree: equal, or missing on one side
    (`5 cm` = `5` = `5cm`, `30°` = `30`, `50%` = `50`), but `5 m` ≠ `5 cm`. A percentage is compared as
    the number written: `50%` ≠ `0.5`, because a question that asks for a percentage wants 50, and
    benchmarks that ask for a fraction write the gold as a fraction."""
    (p_text, p_unit), (g_text, g_unit) = split_unit(pred), split_unit(gold)
    if p_unit and g_unit and p_unit != g_unit:
        return False
    p_value = number_value(p_text)
    return p_value is not None and p_value == number_value(g_text)


# --- R_acc, step 4: choice letters and the options written in the question -------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# An option marker: `(B)` anywhere, or `B.` / `B:` / `B)` after a line start, space, `,` `;` or `:`
# and before a space. Alternatives of fixed shape: nothing to backtrack.
_OPTION_MARK = re.compile(r"\(([A-Z])\)|(?<![^\s,;:])([A-Z])([.:)])(?=\s)")


def parse_options(question):
    """{letter: option text} of the options written in `question`, in the styles benchmarks use:
    `(A) red (B) blue` (BLINK, V*), `A. red\\nB. blue`, `Options: A: red, B: blue`, `A) red`,
    `A. 5cm; B. 6cm` (WeMath). {} when there are none.

    The options are the longest run of markers of one style lettered A, B, C, … in order (ties: the
    later run, since options follow the question's text); each text runs to the next marker, the last
    one to the end of its line. Linear: one regex scan, one pass over its matches.
    """
    runs, open_runs = [], {}  # open_runs: style -> the run being extended
    for m in _OPTION_MARK.finditer(question or ""):
        letter, style = (m[1], "()") if m[1] else (m[2], m[3])
        run = open_runs.get(style)
        if letter == "A":
            open_runs[style] = run = []
            runs.append(run)
        elif not run or LETTERS.index(letter) != len(run):
            continue
        run.append((letter, m.start(), m.end()))
    # the longest run of two or more; reversed, so that a tie goes to the later run
    best = max([run for run in reversed(runs) if len(run) >= 2], key=len, default=[])
    options = {}
    for (letter, _, end), after in zip(best, best[1:] + [None]):
        stop = after[1] if after else (question + "\n").find("\n", end)  # the last: to the end of its line
        options[letter] = question[end:stop].strip().rstrip(",;").strip()
    return options


def choice_letter(text, letters, with_text=True):
    """The option letter `text` names, or None: `B`, `(B)`, `B.`, `B)`, `B:`, or (if `with_text`) one of
    these followed by the option's text (`(B) red`, `B. red`, `B) red`, `B: red`), in either case.
    Only letters in `letters` count."""
    if len(text) >= 3 and text[0] == "(" and text[2] == ")":
        letter, rest = text[1], text[3:]
    elif len(text) == 1 or (len(text) >= 2 and text[1] in ".):" and (len(text) == 2 or text[2].isspace())):
        letter, rest = text[0], text[2:]
    else:
        return None
    letter = letter.upper()  # may be two letters: "ß" -> "SS"
    return letter if len(letter) == 1 and letter in letters and (with_text or not rest.strip()) else None


# --- R_acc: the verdict ------------------------------------------------------------------------------

def _same_value(pred, gold):
    """Same words (case-insensitive) or the same quantity."""
    return pred.casefold() == gold.casefold() or same_quantity(pred, gold)


def answers_equivalent(pred, gold, *, question=""):
    """R_acc's test, after normalise_answer on both sides: the same words (case-insensitive), the same
    quantity (same_quantity), or the same choice. For choices, the first of the harness judge's rules
    (ZiyuGuo99/ATLAS@4b09aef judge_results.py:16) says that the chosen option is what counts: `B` = `(B)` =
    `b` = `B. red` = `Option B`, and with the options read from `question` a letter also equals its option's
    text (`red` = `(A)` when the question lists `(A) red`). A letter counts as a choice only when the
    question lists options or the gold answer is itself a letter, so a free-text answer "a" is just a
    word. An empty or missing prediction is wrong."""
    p, g = normalise_answer(pred or ""), normalise_answer(gold or "")
    if not p or not g:
        return False
    if _same_value(p, g):
        return True
    options = parse_options(question)
    letters = options.keys() if options else LETTERS
    # Without options, a gold answer with text after its letter ("A. Lincoln") is a name, not a choice.
    g_letter, p_letter = choice_letter(g, letters, with_text=bool(options)), choice_letter(p, letters)
    if g_letter is None and not options:
        return False  # no choice involved: words and quantities were compared above
    if g_letter is not None and p_letter is not None:
        return g_letter == p_letter
    if g_letter is not None and g_letter in options:
        return _same_value(p, normalise_answer(options[g_letter]))
    if p_letter is not None and p_letter in options:
        return _same_value(normalise_answer(options[p_letter]), g)
    return False


# --- R_ft, R_fmt ----------------------------------------------------------------------------------

def format_reward(completion, answer_format):
    """R_fmt ∈ {0, 1}. "tag": the stripped completion ends with `</answer>`, holds exactly one
    `<answer>` and one `</answer>`, and the answer is not blank. "boxed": extract_answer finds an
    answer: the last `\\boxed{` closes and is not blank (text may follow it, as in "$\\boxed{3}$.")."""
    text = completion.strip()
    if answer_format == "tag" and not (text.endswith("</answer>")
                                       and text.count("<answer>") == text.count("</answer>") == 1):
        return 0.0
    return 1.0 if extract_answer(completion, answer_format) else 0.0


# --- P_len, P_over --------------------------------------------------------------------------------

def length_penalty(num_tokens, cfg):
    """P_len = len_max_penalty · clamp((L − L0) / buffer, 0, 1), L0 = len_threshold,
    buffer = len_buffer (a buffer ≤ 0 makes it a step: the full penalty as soon as L > L0)."""
    excess = num_tokens - cfg.len_threshold
    if excess <= 0:
        return 0.0
    return cfg.len_max_penalty * (min(1.0, excess / cfg.len_buffer) if cfg.len_buffer > 0 else 1.0)


def overuse_penalty(n_functional, cfg):
    """P_over = min(over_max_penalty, over_slope · max(0, n_F − N0)), N0 = over_threshold."""
    excess = max(0, n_functional - cfg.over_threshold)
    return float(min(cfg.over_max_penalty, cfg.over_slope * excess))


# --- R ----------------------------------------------------------------------------------------------

def compute_reward(completion, answer, cfg, *, question="", num_tokens=None, functional=None):
    """Every component of R, plus n_functional and the weighted "total"; never raises on any string.

    `question` is the example's question: its written options let a reply name the option's text
    instead of its letter. `num_tokens` is the number of generated tokens, which the trainer passes.
    Without it, P_len measures `len(completion)` in characters instead, so set len_threshold/len_buffer
    accordingly. `functional` is the completion's functional tokens found by id (`decode_completion`),
    which the trainer and eval pass: n_F = len(functional), the count the anchor's mask sees. Without
    it (a hand-written string, whose ids nobody knows) n_F counts the five strings in the text. R_ft pays only for a functional token that came with a correct answer, so the policy
    cannot farm it by sprinkling tokens; P_over stops it from stuffing many.
    """
    pred = extract_answer(completion, cfg.answer_format)
    accuracy = 1.0 if answers_equivalent(pred, answer, question=question) else 0.0
    n_functional = len(functional) if functional is not None else sum(map(completion.count, FUNCTIONAL_TOKENS))
    functional = 1.0 if n_functional >= 1 and accuracy == 1.0 else 0.0
    fmt = format_reward(completion, cfg.answer_format)
    p_len = length_penalty(len(completion) if num_tokens is None else num_tokens, cfg)
    p_over = overuse_penalty(n_functional, cfg)
    total = cfg.w_acc * accuracy + cfg.w_ft * functional + cfg.w_fmt * fmt - cfg.w_len * p_len - cfg.w_over * p_over
    return {"accuracy": accuracy, "functional": functional, "format": fmt, "length_penalty": p_len,
            "overuse_penalty": p_over, "n_functional": float(n_functional), "total": float(total)}
