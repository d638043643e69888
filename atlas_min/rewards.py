"""The composite GRPO reward of DESIGN.md, "Stage 2, GRPO":

    R = w_acc·R_acc + w_ft·R_ft + w_fmt·R_fmt − w_len·P_len − w_over·P_over

Everything here is a pure function of strings and numbers. Model output is hostile input: it is
never eval'd, exec'd or sympified, numbers are parsed by hand with a length cap, and the only
regex is a character class (linear, nothing to backtrack). No function raises on any string.

    compute_reward("<|Line|> the left one is longer. <answer>(B)</answer>", "B", cfg)["total"]
"""
import re
from fractions import Fraction

from atlas_min.tokens import FUNCTIONAL_TOKENS

# Longer "numbers" are not parsed as numbers (they can still match as exact strings): this keeps a
# 100,000-digit answer from costing big-integer time, and Python's int() refuses > 4300 digits anyway.
MAX_NUMBER_CHARS = 64
_DIGITS = frozenset("0123456789")  # not str.isdigit(): it accepts "²", which int() then rejects
_FRAC_COMMANDS = ("\\frac", "\\dfrac", "\\tfrac")
_BRACE = re.compile(r"[{}]")


# --- R_acc: find the final answer, then compare it with the gold one ---------------------------

def extract_answer(completion, answer_format):
    """The final answer in `completion`, stripped, or None when there is none.

    "tag": the content of the last complete `<answer>…</answer>` pair.
    "boxed": the content of the last-opened `\\boxed{…}` whose braces balance (nested braces are
    fine: `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`); one left-to-right scan with a stack.
    """
    if answer_format == "tag":
        end = completion.rfind("</answer>")
        start = completion.rfind("<answer>", 0, max(end, 0))
        if end < 0 or start < 0:
            return None
        return completion[start + len("<answer>"):end].strip()
    if answer_format == "boxed":
        if "\\boxed{" not in completion:  # a fast C scan spares the brace loop on box-free text
            return None
        stack = []  # one entry per open "{": where its content starts if it opened a \boxed, else -1
        best = None
        for m in _BRACE.finditer(completion):
            i = m.start()
            if completion[i] == "{":
                stack.append(i + 1 if completion.endswith("\\boxed", 0, i) else -1)
            elif stack:  # a "}" with nothing open is stray text; ignore it
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, i)
        return None if best is None else completion[best[0]:best[1]].strip()
    raise ValueError(f"answer_format must be 'tag' or 'boxed', not {answer_format!r}")


def _normalise(text):
    """Strip, drop the surrounding `$…$` / `$$…$$` delimiters, collapse whitespace runs."""
    text = text.strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$")
    return " ".join(text.split())


def _choice_letter(text):
    """`B`, `(B)`, `B.` or `B)` -> "B" (case-insensitive); anything else -> None."""
    if len(text) == 3 and text[0] == "(" and text[2] == ")":
        text = text[1]
    elif len(text) == 2 and text[1] in ".)":
        text = text[0]
    if len(text) == 1 and text.isascii() and text.isalpha():
        return text.upper()
    return None


def _decimal(text):
    """`-3`, `+2`, `0.5`, `.5`, `5.`, `1,000`, `1,234.5` -> an exact Fraction; anything else -> None.

    Built from the digit strings, never from float or Fraction(str) (which accepts `1e9`, `1_0`).
    """
    negative = text[:1] == "-"
    if text[:1] in ("-", "+"):
        text = text[1:]
    whole, _, frac = text.partition(".")
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


def _braced(text):
    """`{a}rest` -> ("a", "rest"); None unless `text` opens with a brace group without nested braces."""
    text = text.lstrip()
    close = text.find("}")
    if text[:1] != "{" or close < 0 or "{" in text[1:close]:
        return None
    return text[1:close].strip(), text[close + 1:]


def _ratio(num, den):
    a, b = _decimal(num), _decimal(den)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _number(text):
    """An exact Fraction for a decimal, `a/b`, or `\\frac{a}{b}` (also `\\dfrac`, `\\tfrac`, with an
    optional sign in front); None for anything else, including scientific notation."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    sign, body = 1, text
    if body[:1] in ("-", "+") and body[1:].lstrip().startswith("\\"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:].lstrip()
    for command in _FRAC_COMMANDS:
        if body.startswith(command):
            first = _braced(body[len(command):])
            second = first and _braced(first[1])
            if not second or second[1].strip():
                return None
            value = _ratio(first[0], second[0])
            return None if value is None else sign * value
    if text.count("/") == 1:
        num, den = text.split("/")
        return _ratio(num.strip(), den.strip())
    return _decimal(text)


def answers_equivalent(pred, gold):
    """R_acc's test: exact match after whitespace normalisation (case-insensitive), or the same
    choice letter (`B` = `(B)` = `B.` = `B)` = `b`), or the same number, compared exactly
    (0.5 = .5 = 1/2 = \\frac{1}{2}, but 0.333 != 1/3). An empty or missing prediction is wrong."""
    if pred is None or gold is None:
        return False
    p, g = _normalise(pred), _normalise(gold)
    if not p or not g:
        return False
    if p.casefold() == g.casefold():
        return True
    p_letter, g_letter = _choice_letter(p), _choice_letter(g)
    if p_letter is not None or g_letter is not None:
        return p_letter == g_letter
    p_num = _number(p)
    return p_num is not None and p_num == _number(g)


# --- R_ft, R_fmt ----------------------------------------------------------------------------------

def count_functional_tokens(completion):
    """n_F: occurrences of the five functional-token strings (they cannot overlap one another)."""
    return sum(completion.count(token) for token in FUNCTIONAL_TOKENS)


def format_reward(completion, answer_format):
    """R_fmt ∈ {0, 1}. "tag": the stripped completion ends with `</answer>`, holds exactly one
    `<answer>` and one `</answer>`, and the answer is not blank. "boxed": some `\\boxed{…}` with
    balanced braces and non-blank content (text may follow it, as in "$\\boxed{3}$.")."""
    if answer_format == "tag":
        text = completion.strip()
        ok = (text.endswith("</answer>") and text.count("<answer>") == 1
              and text.count("</answer>") == 1 and bool(extract_answer(text, "tag")))
        return 1.0 if ok else 0.0
    return 1.0 if extract_answer(completion, answer_format) else 0.0


# --- P_len, P_over --------------------------------------------------------------------------------

def length_penalty(num_tokens, cfg):
    """P_len = len_max_penalty · clamp((L − L0) / buffer, 0, 1), L0 = len_threshold,
    buffer = len_buffer (a buffer ≤ 0 makes it a step: the full penalty as soon as L > L0)."""
    excess = num_tokens - cfg.len_threshold
    if excess <= 0:
        return 0.0
    if cfg.len_buffer <= 0:
        return float(cfg.len_max_penalty)
    return cfg.len_max_penalty * min(1.0, excess / cfg.len_buffer)


def overuse_penalty(n_functional, cfg):
    """P_over = min(over_max_penalty, over_slope · max(0, n_F − N0)), N0 = over_threshold."""
    excess = max(0, n_functional - cfg.over_threshold)
    return float(min(cfg.over_max_penalty, cfg.over_slope * excess))


# --- R ----------------------------------------------------------------------------------------------

def compute_reward(completion, answer, cfg, num_tokens=None):
    """Every component of R, plus n_functional and the weighted "total"; never raises on any string.

    `num_tokens` is the number of generated tokens, which the trainer passes. Without it, P_len
    measures `len(completion)` in characters instead, so set len_threshold/len_buffer accordingly.
    R_ft pays only for a functional token that came with a correct answer, so the policy cannot
    farm it by sprinkling tokens; P_over stops it from stuffing many.
    """
    accuracy = 1.0 if answers_equivalent(extract_answer(completion, cfg.answer_format), answer) else 0.0
    n_functional = count_functional_tokens(completion)
    functional = 1.0 if n_functional >= 1 and accuracy == 1.0 else 0.0
    fmt = format_reward(completion, cfg.answer_format)
    p_len = length_penalty(len(completion) if num_tokens is None else num_tokens, cfg)
    p_over = overuse_penalty(n_functional, cfg)
    total = (cfg.w_acc * accuracy + cfg.w_ft * functional + cfg.w_fmt * fmt
             - cfg.w_len * p_len - cfg.w_over * p_over)
    return {
        "accuracy": accuracy,
        "functional": functional,
        "format": fmt,
        "length_penalty": p_len,
        "overuse_penalty": p_over,
        "n_functional": float(n_functional),
        "total": float(total),
    }
