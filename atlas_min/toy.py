"""The toy world: synthetic task families that a ~0.6M-parameter model learns in CPU-minutes.

    train_jsonl, eval_jsonl = ensure_toy_data(cfg)     # cached under $ATLAS_MIN_CACHE
    image, question, answer, params = draw_example("line", random.Random(0), 84)
    text = reply(params, "<|Shape|>", random.Random(0), "long")   # a puzzle's reply after any token

`cfg.toy_tasks` picks families of two kinds:

- the classic five, one per functional token. Each question names its operation ("Which line is
  longer ...?"), so the question fixes the token and the token decides nothing.
- the decisive puzzles, `puzzle_shape` and `puzzle_line`. One question for all ("Solve the puzzle in
  the picture."); every picture holds the operands of both operations, and the colour of a thick
  frame says which one the puzzle asks for. The reply's functional token comes before any text that
  names the operation, and what follows carries out the operation that token names: another token,
  another answer. That is the setting of the paper's claim, tokens that are sparse (4.8 of 203.7
  generated tokens) and decide the visual operation (arXiv 2605.15198 §2.3).

Every family is sized for the toy model: shapes are bold and filled, digits are big seven-segment
strokes (font-independent; PIL's default font is tiny), the arrow is mostly head. All images are
drawn on the image processor's mean colour, which normalises to ~0: on white the random-init vision
tower's output collapsed to a constant. Within a family the question is fixed and the answer is
uniform, so a model that ignores the image scores exactly the family's CHANCE.
"""
import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

VERSION = 2  # bump when drawing or text changes, so cached data sets are regenerated
BACKGROUND = (123, 117, 104)  # Qwen2-VL image mean * 255
RED, BLUE, WHITE, YELLOW, CYAN = (230, 40, 40), (40, 80, 230), (245, 245, 245), (240, 210, 40), (40, 220, 240)
MAGENTA, GREEN = (220, 60, 220), (60, 200, 80)  # puzzle frames only: no operand has these colours

TASK_TOKENS = {"shape": "<|Shape|>", "line": "<|Line|>", "arrow": "<|Arrow|>", "zoom": "<|Zoom|>",
               "text": "<|Text|>"}
# The decisive puzzles: each family's usual token, the one the teacher writes for it.
PUZZLE_TOKENS = {"puzzle_shape": "<|Shape|>", "puzzle_line": "<|Line|>"}
PUZZLE_QUESTION = "Solve the puzzle in the picture."
# One fixed question per family, so the question says nothing about the answer.
QUESTIONS = {"shape": "How many red shapes are there?",
             "line": "Which line is longer, A (yellow, top) or B (cyan, bottom)?",
             "arrow": "Does the arrow point left or right?", "zoom": "What digit is inside the yellow box?",
             "text": "What is the sum of the two numbers?",
             "puzzle_shape": PUZZLE_QUESTION, "puzzle_line": PUZZLE_QUESTION}
# A puzzle's answer spaces never overlap (a count against a line letter), so the operation that the
# frame does not ask for can never give the right answer by accident.
ANSWERS = {"shape": ["1", "2", "3"], "line": ["A", "B"], "arrow": ["left", "right"],
           "zoom": ["1", "2", "3", "4"], "text": ["2", "3", "4"],
           "puzzle_shape": ["1", "2", "3"], "puzzle_line": ["A", "B"]}
CHANCE = {task: 1 / len(answers) for task, answers in ANSWERS.items()}
# Short on purpose: RL samples these on CPU, every token costs.
LEAD_INS = {"shape": "Let me mark the red shapes.", "line": "Let me compare the lines.",
            "arrow": "Let me trace the arrow.", "zoom": "Let me zoom into the box.",
            "text": "Let me read the numbers."}
PLAIN_LEAD_IN = "I can see it directly."  # the no-functional-token (perception) replies

# The SFT teacher's systematic misreadings, family: (true answer, what the teacher writes), each
# made with probability cfg.toy_teacher_slip in train replies. Real SFT traces (ATLAS-178K is built
# by a pipeline) carry such errors; imitation copies them, and RL's verifiable reward, which judges
# against the true `answer`, can undo them. With slip 0 SFT is right everywhere and, on this toy,
# RL only sharpens sampling without raising greedy accuracy (README, "The toy result").
TEACHER_SLIPS = {"zoom": ("4", "1"), "text": ("4", "3")}


def response(task, answer, with_token=True):
    lead = f"{LEAD_INS[task]} {TASK_TOKENS[task]}" if with_token else PLAIN_LEAD_IN
    return f"{lead} <answer>{answer}</answer>"


# --- drawing ----------------------------------------------------------------------------------------

# Seven-segment strokes a..g (top, top-right, bottom-right, bottom, bottom-left, top-left, middle).
SEGMENTS = {1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc"}


def _digit(draw, digit, x, y, w, h, t, fill):
    """A seven-segment `digit` in the box (x, y, w, h) with stroke width t."""
    m = y + (h - t) // 2  # top of the middle stroke
    rects = {"a": (x, y, x + w, y + t), "g": (x, m, x + w, m + t), "d": (x, y + h - t, x + w, y + h),
             "f": (x, y, x + t, m + t), "b": (x + w - t, y, x + w, m + t),
             "e": (x, m, x + t, y + h), "c": (x + w - t, m, x + w, y + h)}
    for seg in SEGMENTS[digit]:
        draw.rectangle(rects[seg], fill=fill)


def _shape(draw, s, rng, answer):
    # A 3x3 grid of cells, one shape per cell: at 84 px a cell is one merged vision token (28 px),
    # so counting red cells is what the tower sees most directly.
    cell = s // 3
    return {"items": _shapes(draw, rng, int(answer), cell, range(9), (cell * 3 // 10, cell * 2 // 5))}


def _shapes(draw, rng, n_red, cell, cells, radius, margin=0, columns=3):
    """`n_red` red and 0-3 blue shapes, bold and filled, each in its own cell (of side `cell`) among `cells` of
    a grid `columns` wide, with a radius in the range `radius`, `margin` px clear of the cell's edges.
    Returns them sorted: (cell, kind: o circle / s square / v triangle, colour, dx, dy, radius)."""
    items = []
    for i, c in enumerate(rng.sample(cells, n_red + rng.randint(0, 3))):  # random order: red cells are random ones
        r = rng.randint(*radius)
        slack = max(0, cell // 2 - r - 1 - margin)
        dx, dy = rng.randint(-slack, slack), rng.randint(-slack, slack)
        items.append((c, rng.choice("osv"), "red" if i < n_red else "blue", dx, dy, r))
    for c, kind, colour, dx, dy, r in sorted(items):  # cell c sits in column c % columns, row c // columns
        cx, cy = (c % columns) * cell + cell // 2 + dx, (c // columns) * cell + cell // 2 + dy
        fill = RED if colour == "red" else BLUE
        if kind == "o":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif kind == "s":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx, cy + r)], fill=fill)
    return sorted(items)


def _line(draw, s, rng, answer):
    # Lengths differ by at least 1.5x; A is always the yellow top line, B the cyan bottom one.
    long_, short = rng.randint(s * 6 // 10, s * 9 // 10), rng.randint(s * 2 // 10, s * 4 // 10)
    lengths = (long_, short) if answer == "A" else (short, long_)
    t, params = max(3, s // 12), {"lines": []}
    for (lo, hi), length, colour in zip(((15, 40), (60, 85)), lengths, (YELLOW, CYAN)):
        y, x = rng.randint(s * lo // 100, s * hi // 100), rng.randint(2, s - 2 - length)
        draw.rectangle((x, y - t // 2, x + length, y - t // 2 + t), fill=colour)
        params["lines"].append((x, y, length))
    return params


def _arrow(draw, s, rng, answer):
    # Mostly head: a big triangle on one side, a short thick shaft on the other. Thin arrows stayed
    # at chance for minutes in calibration; here "which side holds more white" already answers it.
    length, head = rng.randint(s * 7 // 10, s * 9 // 10), rng.randint(s * 35 // 100, s * 45 // 100)
    half, t = rng.randint(s * 22 // 100, s * 30 // 100), rng.randint(s // 8, s // 6)
    x0, y = rng.randint(2, s - 2 - length), rng.randint(half + 2, s - half - 3)
    tail, tip = (x0, x0 + length) if answer == "right" else (x0 + length, x0)
    base = tip - head if answer == "right" else tip + head  # where the head meets the shaft
    draw.rectangle((min(tail, base), y - t // 2, max(tail, base), y + t // 2), fill=WHITE)
    draw.polygon([(base, y - half), (base, y + half), (tip, y)], fill=WHITE)
    return {"x0": x0, "y": y, "length": length, "head": head, "half": half, "t": t}


def _zoom(draw, s, rng, answer):
    # A yellow box anywhere, a big white digit filling it: reading it means finding the box first.
    b = rng.randint(s // 2, s * 6 // 10)
    bx, by = rng.randint(1, s - b - 2), rng.randint(1, s - b - 2)
    h, w, t = b * 7 // 10, b * 45 // 100, max(3, s // 14)
    draw.rectangle((bx, by, bx + b, by + b), outline=YELLOW, width=max(2, s // 28))
    _digit(draw, int(answer), bx + (b - w) // 2, by + (b - h) // 2, w, h, t, WHITE)
    return {"box": (bx, by, b)}


def _text(draw, s, rng, answer):
    # The sum is uniform over 2..4, then the digits are chosen to make it: uniform digits would
    # make "3" twice as likely as the others and let a blind model beat chance.
    a = {"2": 1, "4": 2}.get(answer) or rng.choice((1, 2))
    digits, params = (a, int(answer) - a), {"digits": []}
    t, h = max(3, s // 14), rng.randint(s * 45 // 100, s * 55 // 100)
    w, c, arm, p = h // 2, s // 2, max(3, s // 16), max(2, s // 28)
    # Left digit ends, right digit starts, a clear gap away from the plus sign between them.
    for d, (lo, hi) in zip(digits, ((1, c - arm - 3 - w), (c + arm + 3, s - 2 - w))):
        x, y = rng.randint(lo, hi), (s - h) // 2 + rng.randint(-s // 6, s // 6)
        _digit(draw, d, x, y, w, h, t, WHITE)
        params["digits"].append((d, x, y, h))
    draw.rectangle((c - arm, c - p // 2, c + arm, c - p // 2 + p - 1), fill=YELLOW)  # the plus sign
    draw.rectangle((c - p // 2, c - arm, c - p // 2 + p - 1, c + arm), fill=YELLOW)
    return params


FRAMES = {"puzzle_shape": MAGENTA, "puzzle_line": GREEN}  # the cue: the frame's colour names the family


def _puzzle(draw, s, rng, answer, family):
    # Laid out on a 4x4 grid of cells, each one merged vision token at 112 px (28 px): line A in the
    # top row, line B in the bottom row (in one shared row of tokens at 84 px, a model that learned
    # the classic lines stayed at chance on them), 1-3 red and 0-3 blue shapes in the eight cells
    # between, a frame around everything. Both operands are always there; the one the frame does not
    # ask about gets a uniform answer of its own, so it tells nothing.
    f, t, cell = max(3, s // 24), max(3, s // 16), s // 4  # frame width, line thickness, cell side
    asks_shape = PUZZLE_TOKENS[family] == "<|Shape|>"
    n_red = int(answer if asks_shape else rng.choice(ANSWERS["puzzle_shape"]))
    longer = rng.choice(ANSWERS["puzzle_line"]) if asks_shape else answer
    long_, short = rng.randint(s * 55 // 100, s * 80 // 100), rng.randint(s * 15 // 100, s * 35 // 100)
    lengths = (long_, short) if longer == "A" else (short, long_)  # at least 1.5x apart, as in `_line`
    lines = []
    top, bottom = (cell * 4 // 10, cell * 6 // 10), (s - cell * 6 // 10, s - cell * 4 // 10)
    for (lo, hi), length, colour in zip((top, bottom), lengths, (YELLOW, CYAN)):
        y, x = rng.randint(lo, hi), rng.randint(f + 2, s - f - 2 - length)
        draw.rectangle((x, y - t // 2, x + length, y - t // 2 + t - 1), fill=colour)
        lines.append((x, y, length))
    # cells 4-11: the two middle rows; smaller than the classic shapes: they must clear the frame
    items = _shapes(draw, rng, n_red, cell, range(4, 12), (cell // 4, cell // 3), margin=f, columns=4)
    draw.rectangle((0, 0, s - 1, s - 1), outline=FRAMES[family], width=f)
    return {"lines": lines, "items": items}


DRAW = {"shape": _shape, "line": _line, "arrow": _arrow, "zoom": _zoom, "text": _text,
        **{family: partial(_puzzle, family=family) for family in PUZZLE_TOKENS}}


def draw_example(task, rng, image_size, answer=None):
    """One example of `task`: (PIL image, question, answer, params). All randomness comes from `rng`."""
    answer = answer or rng.choice(ANSWERS[task])  # uniform: a blind guess is at CHANCE[task]
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    params = DRAW[task](ImageDraw.Draw(image), image_size, rng, answer)
    return image, QUESTIONS[task], answer, {"task": task, "answer": answer, **params}


# --- the puzzles' replies: lead-in, the token (the decision), the steps of its operation, answer --------

NO_OPERAND = "none"  # the answer after a token whose operand is not in the picture: always wrong
REPLY_LENGTHS = ("short", "long")
# "short": 12 generated tokens (the stop token included), the functional token 1 in 12 (8.3%). "long":
# 34-41 (37.5 on average), the token at most 3%, as in ATLAS's replies (2.4%). Long replies draw
# each sentence from several phrasings, so the text around the token varies as natural language does.
SHORT_LEAD = "Look."
LEAD_SLOTS = (  # two sentences that never say which operation comes next
    ("Let me study the picture.", "First I look at everything.", "I take a careful look first.",
     "Let me scan the whole image."),
    ("The frame colour sets the task.", "Its frame says what to do.", "The border picks the puzzle.",
     "I check which task the frame asks."),
)
NOTHING_THERE = ("The picture has none.", "There is nothing like that here.", "I cannot find one.",
                 "None is drawn.")
STEP_SLOTS = {  # per token: how it goes about its operation, then the result {x}
    "<|Shape|>": (("I count the red shapes, not the blue.", "Only the red shapes count here.",
                   "I keep the red shapes and skip blue.", "I count just the red ones."),
                  ("The red count is {x}.", "I find {x} of them.", "That makes {x} in all.",
                   "So there are {x}.")),
    "<|Line|>": (("I compare line A with line B.", "I measure top line A and bottom line B.",
                  "I set yellow A against cyan B.", "I see how far each line reaches."),
                 ("Line {x} is longer.", "{x} is the longer one.", "The longer line is {x}.",
                  "So {x} reaches further.")),
    # A puzzle has no box, arrow or numbers: these tokens look, find nothing and answer NO_OPERAND.
    "<|Zoom|>": (("I look for a box to zoom into.",), NOTHING_THERE),
    "<|Arrow|>": (("I look for an arrow and its tip.",), NOTHING_THERE),
    "<|Text|>": (("I look for numbers to read and add.",), NOTHING_THERE),
}
# The SFT teacher's systematic wrong decision, family: the token it writes instead, in a share
# cfg.toy_token_slip of that family's train replies; it then carries out that token's operation, so
# the answer is wrong. Above 50% it is what greedy decoding copies, and what RL's reward can undo.
TOKEN_SLIPS = {"puzzle_line": "<|Shape|>"}


def operate(params, token):
    """The result of `token`'s operation on the puzzle scene `params` (as `draw_example` returns them)."""
    if token == "<|Shape|>":
        return str(sum(colour == "red" for _, _, colour, *_ in params["items"]))
    if token == "<|Line|>":
        (_, _, a), (_, _, b) = params["lines"]
        return "A" if a > b else "B"
    if token in TASK_TOKENS.values():
        return NO_OPERAND
    raise ValueError(f"{token!r} is not a functional token")


def _compose(token, result, lead, steps):
    return f"{' '.join(lead)} {token} {' '.join(s.format(x=result) for s in steps)} <answer>{result}</answer>"


def reply(params, token, rng, length):
    """A puzzle reply whose functional token is `token`: lead-in, `token`, the steps of the operation it
    names, and <answer> with that operation's result on the scene `params` (NO_OPERAND when the scene
    has nothing for it), whatever the puzzle asks. `length` is "short" or "long"; long phrasings come
    from `rng`, lead-in first, so equal rng states give equal lead-ins for any token.
    """
    result = operate(params, token)
    if length == "short":
        return f"{SHORT_LEAD} {token} <answer>{result}</answer>"
    if length != "long":
        raise ValueError(f"toy_reply={length!r}: choose from {', '.join(REPLY_LENGTHS)}")
    return _compose(token, result, [rng.choice(s) for s in LEAD_SLOTS], [rng.choice(s) for s in STEP_SLOTS[token]])


# --- data sets --------------------------------------------------------------------------------------

def _tasks(cfg):
    return [t.strip() for t in cfg.toy_tasks.split(",") if t.strip()]  # config.check: known families only


def _stamp(cfg):
    """Everything the generated files depend on; equal stamps mean identical data sets."""
    toy_fields = ("train_size", "eval_size", "no_token_share", "teacher_slip", "token_slip", "reply")  # cfg.toy_*
    return {"version": VERSION, "seed": cfg.seed, "image_size": cfg.image_size, "tasks": _tasks(cfg),
            **{name: getattr(cfg, f"toy_{name}") for name in toy_fields}}


def _write_split(folder, split, size, cfg, taken):
    """Write `split`.jsonl and its images; skip any example whose params are in `taken`, add the rest."""
    # Separate streams: images do not change when toy_no_token_share changes.
    stream = f"atlas_min.toy/{cfg.seed}/{split}"  # str seeds hash the same in every process
    rng, text_rng, slip_rng = random.Random(stream), random.Random(stream + "/text"), random.Random(stream + "/slip")
    tasks = _tasks(cfg)
    decks = {task: [] for task in tasks}
    with open(folder / f"{split}.jsonl", "w") as f:
        for i in range(size):
            task = tasks[i % len(tasks)]  # round robin: every family equally represented
            if not decks[task]:  # each answer once per round, in random order: exactly balanced splits
                decks[task] = rng.sample(ANSWERS[task], len(ANSWERS[task]))
            answer = decks[task].pop()
            for _ in range(1000):
                image, question, answer, params = draw_example(task, rng, cfg.image_size, answer)
                signature = json.dumps(params, sort_keys=True)
                if signature not in taken:
                    break
            else:
                raise RuntimeError(f"toy {split}: no new {task} example in 1000 draws; image_size too small?")
            taken.add(signature)
            ex_id = f"{split}-{i:06d}-{task}"
            image.save(folder / "images" / f"{ex_id}.png")
            with_token = text_rng.random() >= cfg.toy_no_token_share
            if task in PUZZLE_TOKENS:  # always a token, it is the decision (toy_no_token_share: classics)
                slipped = split == "train" and task in TOKEN_SLIPS and slip_rng.random() < cfg.toy_token_slip
                text = reply(params, TOKEN_SLIPS[task] if slipped else PUZZLE_TOKENS[task], text_rng, cfg.toy_reply)
            else:  # the reply may claim a misread; `answer` stays the truth that rewards and eval use
                true, misread = TEACHER_SLIPS.get(task, (None, None))
                slipped = split == "train" and answer == true and slip_rng.random() < cfg.toy_teacher_slip
                text = response(task, misread if slipped else answer, with_token)
            # a puzzle's row adds "token", the one the frame calls for: the truth behind the right-token rate
            row = {"id": ex_id, "images": [f"images/{ex_id}.png"], "question": question, "answer": answer,
                   "response": text, "task": task, **({"token": PUZZLE_TOKENS[task]} if task in PUZZLE_TOKENS else {})}
            f.write(json.dumps(row) + "\n")


def _is_complete(folder, stamp):
    try:
        return json.loads((folder / "stamp.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def write_toy_data(folder, cfg):
    """Write folder/{train,eval}.jsonl and folder/images/; a no-op when folder already holds this cfg's data.

    Built in a temporary sibling folder and renamed into place, with stamp.json written last, so a
    killed run never leaves a half data set under `folder`, and concurrent ranks cannot clash.
    """
    folder, stamp = Path(folder), _stamp(cfg)
    paths = (folder / "train.jsonl", folder / "eval.jsonl")
    if _is_complete(folder, stamp):
        return paths
    if folder.exists() and any(folder.iterdir()) and not (folder / "stamp.json").exists():
        raise FileExistsError(f"{folder} holds files that are not a toy data set; not replacing them")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "images").mkdir()
        taken = set()
        _write_split(tmp, "train", cfg.toy_train_size, cfg, taken)
        _write_split(tmp, "eval", cfg.toy_eval_size, cfg, taken)  # never an example that train has
        (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1))
        if folder.exists() and not _is_complete(folder, stamp):  # stale (other parameters): move it aside
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; fine if it wrote the same data
            if not _is_complete(folder, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def toy_data_dir(cfg):
    """$ATLAS_MIN_CACHE (default ~/.cache/atlas_min)/toy-<hash of the stamp>."""
    root = Path(os.environ.get("ATLAS_MIN_CACHE") or Path.home() / ".cache" / "atlas_min")
    digest = hashlib.sha256(json.dumps(_stamp(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"toy-{digest}"


def ensure_toy_data(cfg):
    return write_toy_data(toy_data_dir(cfg), cfg)


def corpus(cfg):
    """Every text the toy world can write for `cfg`: trains the tokenizer. The classic families' texts
    always, whatever cfg.toy_tasks; the puzzles' texts, both lengths, only when cfg.toy_tasks has a
    puzzle: the classic presets keep their tokenizer, and short and long puzzle runs share one."""
    texts = [cfg.system_prompt]
    for task in TASK_TOKENS:
        texts.append(QUESTIONS[task])
        for answer in ANSWERS[task]:
            texts += [answer, response(task, answer, True), response(task, answer, False)]
    if any(task in PUZZLE_TOKENS for task in _tasks(cfg)):  # every puzzle reply, all phrasings: a few thousand
        texts += [PUZZLE_QUESTION, NO_OPERAND, *ANSWERS["puzzle_shape"], *ANSWERS["puzzle_line"]]
        results = {"<|Shape|>": ANSWERS["puzzle_shape"], "<|Line|>": ANSWERS["puzzle_line"]}
        for token, slots in STEP_SLOTS.items():
            for result in results.get(token, [NO_OPERAND]):
                texts.append(f"{SHORT_LEAD} {token} <answer>{result}</answer>")
                texts += [_compose(token, result, lead, steps)
                          for lead in itertools.product(*LEAD_SLOTS) for steps in itertools.product(*slots)]
    return texts
