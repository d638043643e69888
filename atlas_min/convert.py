"""Convert public data layouts into atlas_min's JSONL schema (the one atlas_min.data.load_jsonl reads).

Usage:
    python -m atlas_min.convert conversations IN.json[l] OUT.jsonl [--image-root DIR] [--task NAME]
    python -m atlas_min.convert choice IN.json[l] OUT.jsonl [--image-root DIR] [--task NAME]
    python -m atlas_min.convert harness IN.{json,jsonl,csv,parquet} OUT.jsonl [--image-root DIR] [--task NAME]
    python -m atlas_min.convert vinteraction IN [IN ...] OUT.jsonl [--image-dir DIR] [--seed N]
        [--answer-format boxed|tag] [--task NAME] [--tokenizer DIR] [--polish MODEL_PATH [--polish-batch B]
        [--polish-temperature T]]

IN is `.jsonl` (one object a line; errors say `IN:LINE`), `.json` (a list; errors say `IN[INDEX]`, from 0),
`.csv` (a header row, then one record a row; errors say `IN:LINE`) or `.parquet` (errors say `IN[INDEX]`;
needs pandas and pyarrow, which atlas_min does not install: `pip install pandas pyarrow`).
Every record converts or the run stops, OUT unwritten, with one line such as
`error: data.jsonl:17: field 'conversations': no assistant turn` and exit code 2. Nothing is skipped.

conversations (SFT data, writes `response`). Turns in `conversations` ({"from": "human"|"gpt"|"system",
"value"}, LLaVA) or `messages` ({"role": "user"|"assistant"|"system", "content": str}, ms-swift and
LLaMA-Factory); images in `images`, `image` or `image_path` (a path or a list; none is fine).
- question: the first user turn without its `<image>` placeholders. Their count must equal the number of
  images, or be 0 (then the images go first, as ATLAS's released eval code does when a prompt has none;
  our chat format puts all images before the question anyway).
- response: the first assistant turn after it, verbatim (functional tokens such as `<|Zoom|>` included).
- answer: the `answer` field if there is one (the data set's gold answer wins), else the response's last
  `<answer>…</answer>`; a `\\boxed{…}` (braces balanced) is unwrapped in either or used alone. No answer
  at all is an error, since RL and eval need one.
- Only the first user/assistant exchange is kept: later turns of a multi-turn record and system turns
  (the config supplies the system prompt) are dropped.

choice (RL/eval data, benchmarks laid out like V*, BLINK, WeMath). `question`; options in `options` or
`choices` (a list, or a dict letter→text) or in fields `A`, `B`, ...; `answer` as `B`, `(B)`, `B.` or the
text of exactly one option; images in `images`, `image`, `image_path` or `image_1`, `image_2`, ... (at least
one). question = the question, then one line `(A) text` per option; answer = the letter.

harness (eval data in the layout of ATLAS's own eval harness, ZiyuGuo99/ATLAS@4b09aef: one file per
benchmark, read by prompts_dataset.py:40-58 and experience_maker.py:1271-1314). `qid` -> id; `question`
(options written inline) kept as is, except that `<image>` placeholders are removed: the harness swaps
each for the image (and adds one `<image>\n` in front when there is none), while our prompt puts every
image before the question, so their count must be 0 or the number of images; `image` or `image_path` (a
path or a list; in a .csv cell a list is a JSON list string; none is fine) -> images; `gt_answer`, else
`answer` (what the harness reads from .parquet) -> answer, a `\boxed{…}` around it unwrapped as the
harness's judge does (judge_results.py:73). task = --task, else IN's file stem (the benchmark's name).

All: id = `id`/`qid`/`question_id`, else `STEM-INDEX`; task (conversations, choice) = --task, else
`category`/`task`/`subject`, else IN's file stem.

Image paths. A relative path in IN starts at --image-root (default: IN's folder); the file must exist.
OUT stores it relative to OUT's folder, and because our loader refuses image paths that leave the data
folder, every image must lie inside OUT's folder (after resolving symbolic links, as the loader does):
write OUT next to the images or in a folder above them. Nothing is copied.

vinteraction (SFT data, ATLAS-178K's recipe, paper §2.2 "Stage 1"). ATLAS-178K is not released
(github.com/ZiyuGuo99/ATLAS: "under company review"); its sources are. IN is a parquet file of
We-Math/V-Interaction-400K or V-Perception-40K from the Hub, or a folder of them (needs pyarrow:
`pip install -e '.[parquet]'`); rows are read a batch at a time, errors say `IN[ROW]`, from 0.
- V-Interaction row (id, question, image {bytes, path}, CoT_with_code, answer, ...): each code block of
  CoT_with_code and its sandbox output become a transition sentence and the block's functional tokens
  (OPERATIONS, the one table of rules; `trajectory`). The code is parsed, never run. A row whose code
  does not parse, draws nothing the table maps, or failed in the sandbox, a row without code or final
  answer, and a row whose final answer differs from its `answer` are dropped and counted (DROPS says why).
- V-Perception row (id, question, image, answer: no CoT_with_code column): the answer alone is the reply.
- Both: question without its `<image>` placeholder; answer from `answer` (a \boxed{} unwrapped); the
  reply's final answer written as --answer-format asks; task = --task, else v_interaction / v_perception;
  the image written once per distinct content to --image-dir (default: OUT-STEM_images beside OUT) and
  checked as every image is when data loads. --polish rewrites each trajectory with a local instruction
  model and keeps a rewrite only if its functional tokens, their order and its answer are unchanged.
- Mixing: name both data sets (or their folders); OUT holds every kept row of both in an order shuffled
  by --seed. OUT-STEM.summary.json (also printed) counts rows, drops, tokens per operation and the
  functional tokens' share of the trajectories' length, beside the paper's 4.8 of 203.7 (2.4%, §2.3).
- Bad input (a missing column, field or image, an image that does not load) stops the run with one line
  and exit code 2; OUT, its images and its summary are then not written.
"""
import argparse
import ast
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import warnings
from itertools import accumulate
from pathlib import Path

from PIL import Image

from atlas_min.data import inspect_image
from atlas_min.judge import JudgeError, chat_text, generate, load_judge
from atlas_min.rewards import LETTERS, answers_equivalent, extract_answer
from atlas_min.tokens import FUNCTIONAL_TOKENS

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
ID_KEYS, TASK_KEYS = ("id", "qid", "question_id"), ("category", "task", "subject")


class ConvertError(ValueError):
    """A record that cannot be mapped; the message names IN's file, line (or index) and field."""


def fail(where, field, message):
    raise ConvertError(f"{where}: field '{field}': {message}")


def _json(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _csv_rows(path, text):
    """[(where, record)] of a CSV text with a header row; `where` is the line a record starts on."""
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows, start = [], 2  # line 1 is the header
    try:
        for rec in reader:
            rows.append((f"{path}:{start}", rec))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ConvertError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    for where, rec in rows:
        if None in rec:  # csv puts the cells beyond the header under the key None
            raise ConvertError(f"{where}: more cells than the header has columns")
    return rows


def _parquet_rows(path):
    """[(where, record)] of a parquet file, read with pandas + pyarrow if they are installed."""
    try:
        import pandas
        import pyarrow  # noqa: F401  (pandas' parquet engine; imported here to name it in the error)
    except ImportError:
        raise ConvertError(f"{path}: reading .parquet needs pandas and pyarrow, which atlas_min does not "
                           "install: pip install pandas pyarrow") from None
    try:
        records = pandas.read_parquet(path).to_dict(orient="records")
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: not a readable parquet file ({e})") from None

    def plain(value):  # numpy arrays (list columns) -> lists, NaN/None cells -> None
        value = value.tolist() if hasattr(value, "tolist") else value
        return None if isinstance(value, float) and value != value else value
    return [(f"{path}[{i}]", {k: plain(v) for k, v in rec.items()}) for i, rec in enumerate(records)]


def read_records(path):
    """[(where, record)] of a .jsonl (one object a line), .json (a list of objects), .csv (a header row,
    then one record a row) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such input file")
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".csv":
        return _csv_rows(path, text)
    if path.suffix == ".jsonl":
        rows = [(f"{path}:{n}", _json(line, f"{path}:{n}"))
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        data = _json(text, str(path))
        if not isinstance(data, list):
            raise ConvertError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        rows = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    else:
        raise ConvertError(f"{path}: expected a .json, .jsonl, .csv or .parquet file")
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise ConvertError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rows


def meta(rec, index, stem, task, id_keys=ID_KEYS, task_keys=TASK_KEYS):
    """id (the first `id_keys` field, else STEM-INDEX) and task (--task, else the first `task_keys` field,
    else STEM)."""
    rid = next((rec[k] for k in id_keys if rec.get(k) not in (None, "")), f"{stem}-{index}")
    task = task or next((rec[k] for k in task_keys if isinstance(rec.get(k), str) and rec[k].strip()), stem)
    return str(rid), task


def image_fields(rec, where):
    """[(field, path)] from `images`, `image` or `image_path` (a path or a list), else `image_1`, `image_2`, ..."""
    key = next((k for k in ("images", "image", "image_path") if rec.get(k) not in (None, "")), None)
    if key is None:
        pairs = [(f"image_{i}", rec[f"image_{i}"]) for i in range(1, 27) if rec.get(f"image_{i}") not in (None, "")]
    elif isinstance(rec[key], list):
        pairs = [(f"{key}[{k}]", path) for k, path in enumerate(rec[key])]
    else:
        pairs = [(key, rec[key])]
    for field, path in pairs:
        if not isinstance(path, str):
            fail(where, field, f"expected an image path (str), got {type(path).__name__}")
    return pairs


def relocate(pairs, where, image_root, out_dir):
    """Image paths relative to OUT's folder; each file must exist and lie inside that folder."""
    paths = []
    for field, path in pairs:
        full = (Path(image_root) / path).resolve()  # an absolute `path` stays as it is
        if not full.is_file():
            fail(where, field, f"image {full} not found")
        rel = os.path.relpath(full, out_dir)
        if rel.split(os.sep)[0] == os.pardir:
            fail(where, field, f"image {full} lies outside OUT's folder {out_dir}, and atlas_min's loader refuses "
                               "image paths that leave the data folder: write OUT next to (or above) the images")
        paths.append(Path(rel).as_posix())
    return paths


def scalar(value, field, where):
    """A non-empty string or number, as a stripped string."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        fail(where, field, f"expected a non-empty string or number, got {value!r:.80}")
    return str(value).strip()


def final_answer(text):
    """The last <answer>…</answer> (a \\boxed{…} inside it unwrapped), else the last \\boxed{…}, else None:
    the rewards' own extraction, so training data and rewards read answers the same way."""
    tagged = extract_answer(text, "tag")
    boxed = extract_answer(tagged if tagged is not None else text, "boxed")
    return boxed if boxed is not None else tagged


def strip_placeholders(question, n_images, where, field):
    """`question` without its `<image>` placeholders (and the newline after each); their count must be 0
    or `n_images`, since our prompt puts every image before the question."""
    if question.count("<image>") not in (0, n_images):
        fail(where, field, f"{question.count('<image>')} <image> placeholders for {n_images} images")
    return re.sub(r"<image>\n?", "", question).strip()


def convert_conversation(rec, where):
    """question / answer / response / images of one `conversations` (LLaVA) or `messages` record."""
    key = next((k for k in ("messages", "conversations") if k in rec), None)
    if key is None or not isinstance(rec[key], list):
        raise ConvertError(f"{where}: expected a list of turns in field 'messages' or 'conversations'")
    turns = []
    for i, turn in enumerate(rec[key]):
        turn = turn if isinstance(turn, dict) else {}
        role, text = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLES or not isinstance(text, str):
            fail(where, f"{key}[{i}]", 'expected {"role": "user"|"assistant"|"system", "content": str} '
                                       'or {"from": "human"|"gpt"|"system", "value": str}')
        turns.append((ROLES[role], text))
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    replies = [i for i, (role, _) in enumerate(turns) if role == "assistant" and users and i > users[0]]
    if not users or not replies:
        fail(where, key, "no user turn" if not users else "no assistant turn")
    images, response = image_fields(rec, where), turns[replies[0]][1].strip()
    question = strip_placeholders(turns[users[0]][1], len(images), where, f"{key}[{users[0]}]")
    if rec.get("answer") is not None:  # the data set's gold answer wins over the text of the response
        gold = scalar(rec["answer"], "answer", where)
        answer = final_answer(gold) or gold
    else:
        answer = final_answer(response)
        if answer is None:
            fail(where, f"{key}[{replies[0]}]", "no <answer>…</answer> or \\boxed{…} in the assistant turn and "
                                                "no 'answer' field (RL and eval need an answer)")
    for field, value in ((f"{key}[{users[0]}]", question), (f"{key}[{replies[0]}]", response), ("answer", answer)):
        if not value:
            fail(where, field, "empty")
    return {"images": images, "question": question, "answer": answer, "response": response}


def options_of(rec, where):
    """{letter: text} from `options`/`choices` (a list, or a dict letter→text), else from fields A, B, ..."""
    key = next((k for k in ("options", "choices") if k in rec), "A")
    raw = rec[key] if key != "A" else {L: rec[L] for L in LETTERS if rec.get(L) not in (None, "")}
    raw = dict(zip(LETTERS, raw)) if isinstance(raw, list) and len(raw) <= len(LETTERS) else raw
    if not isinstance(raw, dict) or len(raw) < 2:
        fail(where, key, "expected 2 to 26 options: a list, a dict letter→text, or fields A, B, ...")
    options = {}
    for k, text in raw.items():
        letter = str(k).strip("() .").upper()
        if len(letter) != 1 or letter not in LETTERS:
            fail(where, key, f"option key {k!r} is not a letter A-Z")
        # the text without its own "(A)" or "A.": no doubled "(A) (A) ..."
        options[letter] = re.sub(rf"^\({letter}\)\s*|^{letter}[.:)]\s+", "", scalar(text, key, where))
    return dict(sorted(options.items()))


def letter_of(answer, options):
    """The letter of an answer given as `B`, `(B)`, `B.` or as the text of exactly one option; else None."""
    if (m := re.fullmatch(r"\(?([A-Z])\)?[.:]?", answer)) and m[1] in options:
        return m[1]
    hits = [letter for letter, text in options.items() if text.casefold() == answer.casefold()]
    return hits[0] if len(hits) == 1 else None


def convert_choice(rec, where):
    """question (options appended as lines `(A) …`) / answer (a letter) / images of one benchmark record."""
    question = scalar(rec.get("question"), "question", where)
    options = options_of(rec, where)
    answer = scalar(rec.get("answer"), "answer", where)
    letter = letter_of(answer, options)
    if letter is None:
        fail(where, "answer", f"{answer!r} is neither an option letter ({', '.join(options)}) "
                              "nor the text of exactly one option")
    images = image_fields(rec, where)
    if not images:
        raise ConvertError(f"{where}: no image (fields 'images', 'image', 'image_path' or 'image_1', ...)")
    lines = [question] + [f"({letter}) {text}" for letter, text in options.items()]
    return {"images": images, "question": "\n".join(lines), "answer": letter}


def convert_harness(rec, where):
    """question (options inline, `<image>` placeholders removed) / answer / images of one record of ATLAS's
    eval-harness layout: qid, question, image or image_path, gt_answer (or answer)."""
    for key in ("image", "image_path"):
        value = rec.get(key)
        if isinstance(value, str) and value.strip().startswith("["):  # a list written into a CSV cell
            value = _json(value, f"{where}: field '{key}'")
        if isinstance(value, list):  # the harness skips empty entries of a list (prompts_dataset.py:49)
            value = [path for path in value if path not in (None, "")]
        rec = dict(rec, **{key: value})
    images = image_fields({k: rec.get(k) for k in ("image", "image_path")}, where)
    question = strip_placeholders(scalar(rec.get("question"), "question", where), len(images), where, "question")
    field = "answer" if rec.get("gt_answer") in (None, "") and rec.get("answer") not in (None, "") else "gt_answer"
    gold = scalar(rec.get(field), field, where)
    answer = extract_answer(gold, "boxed") or gold
    if not question:
        fail(where, "question", "empty once its <image> placeholders are removed")
    return {"images": images, "question": question, "answer": answer}


CONVERTERS = {"conversations": convert_conversation, "choice": convert_choice, "harness": convert_harness}


def refuse_output_on_input(out_path, inputs):
    """ConvertError if OUT (or its summary beside it) is one of `inputs` or lies inside an input folder, by
    resolved path (symbolic links followed): the output would replace an input, or land among the files read."""
    out = Path(out_path).resolve()
    written = [out, out.with_name(f"{out.stem}.summary.json")]
    for given in filter(None, inputs):
        source = Path(given).resolve()
        if source in written:
            raise ConvertError(f"OUT {out_path} is the input file {given}: writing it would replace the data it converts")
        if source.is_dir() and out.is_relative_to(source):
            raise ConvertError(f"OUT {out_path} lies inside the input folder {given}: its files would join the data "
                               "it converts; write OUT elsewhere")


def convert_file(kind, in_path, out_path, image_root=None, task=None):
    """Convert IN to OUT (kind: a key of CONVERTERS); OUT is written only if every record converts."""
    in_path, out_path = Path(in_path), Path(out_path)
    root = Path(image_root) if image_root else in_path.parent
    if not root.is_dir():
        raise ConvertError(f"--image-root {root}: no such folder")
    refuse_output_on_input(out_path, [in_path])
    out_dir = out_path.parent.resolve()
    examples = []
    for index, (where, rec) in enumerate(read_records(in_path)):
        ex = CONVERTERS[kind](rec, where)
        # The harness keys records by qid, and keeps one file per benchmark: one task per file.
        keys = {"id_keys": ("qid",), "task_keys": ()} if kind == "harness" else {}
        rid, ex_task = meta(rec, index, in_path.stem, task, **keys)
        images = relocate(ex.pop("images"), where, root, out_dir)
        examples.append({"id": rid, "images": images, **ex, "task": ex_task})
    if not examples:
        raise ConvertError(f"{in_path}: holds no records, nothing to convert")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")  # written, then renamed: a crash leaves no half file
    tmp.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples), encoding="utf-8")
    tmp.replace(out_path)
    return examples


# --- vinteraction: V-Interaction-400K (and V-Perception-40K) parquet -> functional-token trajectories ---------

ZOOM, LINE, SHAPE, ARROW, TEXT = FUNCTIONAL_TOKENS
CROP_SLICE = "img[y0:y1, x0:x1]"  # the name under which a 2-D slice of an image array is looked up

# Which drawing call becomes which functional token: the one table of rules, to read against the paper's
# Tab. 1 (five operations: region, auxiliary line, shape, arrow, text label; docs/method.md, "Functional
# tokens"), §2.1 ("bounding boxes, masks, cropping, and zooming" are all the region token, <|Zoom|>) and
# §2.2 step 1 (line drawing, text annotation, shape drawing, cropping). A call matches a row by the name it
# calls: `draw.line(...)`, `cv2.line(...)` and `line(...)` all call "line", so one name covers PIL's
# ImageDraw method, the cv2 function and matplotlib's function, method or patch class alike. A row with a
# condition matches only when it holds: "arrowprops", the call passes that keyword; "label", its text (first
# argument, or text=) is not a literal empty string; "region", what is resized is a crop, a 2-D slice or a
# name assigned one in the same block (resizing a whole image zooms nothing). A call matching two rows gives
# both tokens in table order: annotate('A', ..., arrowprops=...) is <|Arrow|> <|Text|>, annotate('', ...,
# arrowprops=...) (matplotlib's idiom for an arrow without a label) is <|Arrow|> alone.
OPERATIONS = (  # (token, condition, names called, what they draw: libraries)
    (ZOOM, None, {"crop", "getRectSubPix"}, "cut a region out: PIL, cv2"),
    (ZOOM, None, {CROP_SLICE}, "a region of an image array: numpy"),
    (ZOOM, "region", {"resize"}, "enlarge a region: PIL, cv2"),
    (ZOOM, None, {"xlim", "ylim", "set_xlim", "set_ylim"}, "narrow the view: matplotlib"),
    (ZOOM, None, {"rectangle", "rounded_rectangle", "Rectangle", "FancyBboxPatch"},
     "a bounding box: PIL, cv2, matplotlib"),
    (LINE, None, {"line", "polylines", "plot", "axhline", "axvline", "hlines", "vlines", "axline", "Line2D"},
     "a line or polyline: PIL, cv2, matplotlib"),
    (SHAPE, None, {"ellipse", "circle", "polygon", "regular_polygon", "arc", "chord", "pieslice", "point",
                   "fillPoly", "fillConvexPoly", "drawContours", "drawMarker", "scatter",
                   "Circle", "Ellipse", "Polygon", "RegularPolygon", "Wedge", "Arc"},
     "a circle, ellipse, polygon, arc or marker: PIL, cv2, matplotlib"),
    (ARROW, None, {"arrowedLine", "arrow", "Arrow", "FancyArrow", "FancyArrowPatch", "quiver"},
     "an arrow: cv2, matplotlib"),
    (ARROW, "arrowprops", {"annotate"}, "an annotation's arrow: matplotlib"),
    (TEXT, None, {"text", "multiline_text", "putText", "figtext"}, "a text label: PIL, cv2, matplotlib"),
    (TEXT, "label", {"annotate"}, "an annotation's text, unless empty (an arrow alone): matplotlib"),
)

# The transition sentence before a block's tokens (§2.2 step 2, "a predefined transition template"), ours:
# an opener around one phrase per operation, each drawn from several, by the seed and the row id.
OPENERS = ("Let me {}.", "To see this better, I will {}.", "Next, I'll {}.", "It helps to {} here.")
PHRASES = {
    ZOOM: ("zoom in on the region that matters", "mark out the region in question",
           "take a closer look at that area"),
    LINE: ("draw an auxiliary line", "add a helper line through the key points", "connect the points with a line"),
    SHAPE: ("mark the figure with a shape", "outline the shape in question", "circle the element of interest"),
    ARROW: ("draw an arrow to show the direction", "point at the target with an arrow",
            "add an arrow between the parts"),
    TEXT: ("label the key points", "write the values onto the image", "annotate the figure with text"),
}
# Why a row is dropped, in the summary's order. A block that does not parse, maps to no operation, or
# failed in the sandbox drops its whole row, never the block alone: the reasoning after a block reads the
# block's output, so cutting the block out leaves reasoning about a result that is no longer there, and
# keeping its code as text would teach the model to write code where ATLAS writes a token. The paper
# filters too: it keeps 138K rows (§2.2 step 1) of the preview's 252K (V-Thinker README.md:41).
DROPS = ("no code block", "unparsable code", "code with no drawing operation", "code failed in the sandbox",
         "no final answer", "answer differs from the answer field")

# V-Thinker's layout (We-Math/V-Thinker@77a5ab8): data/prompt.txt:10-15 wraps code as <code>, a ```python
# fence, </code>; the sandbox's reply follows as <sandbox_output>…</sandbox_output> (eval/wemath/utils.py:
# 156 reads the block with this fence-optional pattern), and a failed run's reply says "Sandbox for <id>:"
# (eval/wemath/sandbox.py:685-723), which V-Thinker's own reward reads as a failed block (agent_rm.py:274).
_BLOCK = re.compile(r"(\s*)<code>(.*?)</code>(?:\s*<sandbox_output>(.*?)</sandbox_output>)?(\s*)", re.S)
_FENCE = re.compile(r"\s*```[\w+-]*[ \t]*\n?(.*?)\n?[ \t]*```\s*", re.S)
_FUNCTIONAL = re.compile("|".join(map(re.escape, FUNCTIONAL_TOKENS)))
KIND_COLUMNS = {"v_interaction": ("question", "image", "answer", "CoT_with_code"),
                "v_perception": ("question", "image", "answer")}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
# The paper's trajectories, for the summary: 4.8 functional tokens in 203.7 tokens on average (§2.3); their
# share computed, 0.0236 (the paper rounds it to 2.3%).
PAPER = {"functional_per_trajectory": 4.8, "length_per_trajectory": 203.7,
         "functional_token_share": round(4.8 / 203.7, 4)}


def _called(node):
    """The name a call calls: "line" for `a.b.line(...)` and for `line(...)`; None for other callees."""
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _is_crop_slice(node):
    """`img[y0:y1, x0:x1]`: a subscript whose first two indices are slices, each bounded. Both must be: a
    coordinate array is sliced `pts[:, :2]`, an image's channels `img[:, :, ::-1]`."""
    dims = node.slice.elts[:2] if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple) else []
    return len(dims) == 2 and all(isinstance(d, ast.Slice) and (d.lower or d.upper) for d in dims)


def _is_region(node, regions):
    if isinstance(node, ast.Name):
        return node.id in regions
    return _called(node) in ("crop", "getRectSubPix") if isinstance(node, ast.Call) else _is_crop_slice(node)


def block_tokens(code):
    """The functional tokens of one code block (§2.2 step 1: "we parse the original code"). The code is
    parsed with `ast`, never run: nothing in it is executed, imported or opened. Each call, and each
    read of a 2-D image slice, that OPERATIONS maps gives its token(s); they come in source order, each
    once per block, at its first use: a token names an operation, not a count of calls (a loop drawing
    ten lines is one call in the source anyway). Raises SyntaxError (or ValueError) for code that does
    not parse."""
    with warnings.catch_warnings():  # "\d" in the data's code warns at parse time: the data's, not ours
        warnings.simplefilter("ignore")
        nodes = list(ast.walk(ast.parse(textwrap.dedent(code))))
    regions = {target.id for n in nodes if isinstance(n, ast.Assign) and _is_region(n.value, ())
               for target in n.targets if isinstance(target, ast.Name)}
    hits = []
    for node in nodes:
        if isinstance(node, ast.Call):
            operands = [getattr(node.func, "value", None)] + node.args[:1]  # `x.resize(...)`, `cv2.resize(x)`
            label = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg in ("text", "s")), None)
            name, met = _called(node), {"arrowprops": any(k.arg == "arrowprops" for k in node.keywords),
                                        "label": not (label is None or isinstance(label, ast.Constant)
                                                      and not str(label.value).strip()),
                                        "region": any(_is_region(x, regions) for x in operands if x)}
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_crop_slice(node):
            name, met = CROP_SLICE, {}
        else:
            continue
        hits += [((node.lineno, node.col_offset), token) for token, condition, names, _ in OPERATIONS
                 if name in names and (condition is None or met[condition])]
    return list(dict.fromkeys(token for _, token in sorted(hits, key=lambda hit: hit[0])))


def transition(tokens, rng):
    """The sentence that replaces a code block, then its tokens: "Let me draw an auxiliary line and label
    the key points. <|Line|> <|Text|>"."""
    said = [rng.choice(PHRASES[token]) for token in tokens]
    said = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
    return rng.choice(OPENERS).format(said) + " " + " ".join(tokens)


def trajectory(cot, rid, seed):
    """(response, None), or (None, the DROPS reason): `cot` with each code block and its sandbox output
    replaced by a transition sentence and the block's functional tokens (§2.2 step 2). The reasoning
    around the blocks and the final answer are kept as written. Block k of row `rid` draws its phrasing
    from random.Random(f"{seed}/{rid}/{k}"), so a conversion is the same on every run."""
    parts, pos, k = [], 0, 0
    for m in _BLOCK.finditer(cot):
        lead, code, output, trail = m.groups()
        if output is not None and "sandbox for" in output.lower():
            return None, "code failed in the sandbox"
        fenced = _FENCE.fullmatch(code)
        try:
            tokens = block_tokens(fenced[1] if fenced else code)
        except (SyntaxError, ValueError, RecursionError):
            return None, "unparsable code"
        if not tokens:
            return None, "code with no drawing operation"
        space = ["\n" if "\n" in ws else " " for ws in (lead, trail)]
        parts += [cot[pos:m.start()], space[0], transition(tokens, random.Random(f"{seed}/{rid}/{k}")), space[1]]
        pos, k = m.end(), k + 1
    text = ("".join(parts) + cot[pos:]).strip()
    if re.search(r"</?(code|sandbox_output)>", text):  # an unclosed block, or an output without its code
        return None, "unparsable code"
    return (text, None) if k else (None, "no code block")


def with_answer_format(text, answer_format):
    """`text` with its final answer (the last <answer>…</answer>, V-Thinker's format: scripts/plugin/
    agent_rm.py:229, 246) written as `answer_format` ("tag" or "boxed") asks, so SFT teaches the format
    the trainer's prompt asks for and its reward reads; the answer itself is kept. None when `text` holds
    no answer."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    if end < 0 or start < 0:
        return text if extract_answer(text, answer_format) else None
    inner = final_answer(text[start:end + len("</answer>")])  # a \boxed{} inside the tag unwrapped
    if not inner:
        return None
    wrapped = f"<answer>{inner}</answer>" if answer_format == "tag" else f"\\boxed{{{inner}}}"
    return text[:start] + wrapped + text[end + len("</answer>"):]


def export_image(value, where, folder, written):
    """The file name of an embedded image ({bytes, path}, as the Hub stores an `image` feature), written
    to `folder` under the hash of its bytes (an image several rows share is written once) and checked as
    data.check_images checks every image. `written` maps hashes to the names written so far."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes) or not data:
        fail(where, "image", f"expected embedded image bytes ({{bytes, path}}), got {str(value)[:80]}")
    digest = hashlib.sha256(data).hexdigest()[:24]
    if digest not in written:
        try:
            with Image.open(io.BytesIO(data)) as im:
                kind = im.format or "img"
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            fail(where, "image", f"embedded image cannot be read ({type(e).__name__}: {e})")
        path = folder / f"{digest}.{EXTENSIONS.get(kind, kind.lower())}"
        path.write_bytes(data)
        if problem := inspect_image(path)[0]:
            fail(where, "image", f"embedded image {problem}")
        written[digest] = path.name
    return written[digest]


def convert_vrow(rec, where, kind, rid, seed, answer_format):
    """(question, answer, response) of one row, or the DROPS reason. A V-Perception row (no code) answers
    with its answer alone, in `answer_format`; a V-Interaction row's response is its trajectory."""
    question = strip_placeholders(scalar(rec.get("question"), "question", where), 1, where, "question")
    if not question:
        fail(where, "question", "empty once its <image> placeholders are removed")
    gold = scalar(rec.get("answer"), "answer", where)
    gold = final_answer(gold) or gold
    if kind == "v_perception":
        return question, gold, with_answer_format(f"<answer>{gold}</answer>", answer_format)
    cot = rec.get("CoT_with_code")
    if cot is not None and not isinstance(cot, str):
        fail(where, "CoT_with_code", f"expected a string, got {type(cot).__name__}")
    response, reason = trajectory(cot or "", rid, seed)
    if reason:
        return reason
    response = with_answer_format(response, answer_format)
    if response is None:
        return "no final answer"
    if not answers_equivalent(extract_answer(response, answer_format), gold, question=question):
        return "answer differs from the answer field"
    return question, gold, response


POLISH_PROMPT = """Rewrite the reasoning below so that it reads naturally, as one person thinking aloud. Keep its \
meaning, its steps and its final answer. Keep every functional token ({tokens}) exactly as written and in \
the same order, and add none. Reply with the rewritten reasoning only.

{response}"""


def polish(model, tokenizer, responses, answer_format, temperature=0.0, device="cpu"):
    """(replies, how many were rejected): each templated response rewritten by a local instruction model
    (§2.2 step 2 polishes with Gemini-2.5-Pro "while preserving ... functional-token order"). A rewrite is
    taken only if it holds the same functional tokens in the same order and the same final answer; else
    the templated response is kept. At most twice the longest response's tokens, plus 32, are generated."""
    longest = max(len(ids) for ids in tokenizer(responses, add_special_tokens=False)["input_ids"])
    texts = [chat_text(tokenizer, POLISH_PROMPT.format(tokens=", ".join(FUNCTIONAL_TOKENS), response=r))
             for r in responses]
    replies = generate(model, tokenizer, texts, 2 * longest + 32, device, temperature)
    kept = []
    for template, reply in zip(responses, replies):
        reply = (reply or "").strip()
        same = (_FUNCTIONAL.findall(reply) == _FUNCTIONAL.findall(template)
                and extract_answer(reply, answer_format) == extract_answer(template, answer_format))
        kept.append(reply if reply and same else template)
    return kept, sum(k is template for k, template in zip(kept, responses))


def parquet_files(inputs):
    """[(path, kind, ParquetFile)] of every input (a .parquet file, or a folder searched for them), each
    file's kind read from its columns: with CoT_with_code V-Interaction, without it V-Perception."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvertError("vinteraction reads parquet with pyarrow, which is not installed: "
                           "pip install -e '.[parquet]'") from None
    opened, unique = [], {}
    for given in map(Path, inputs):
        found = sorted(given.rglob("*.parquet")) if given.is_dir() else [given] if given.is_file() else []
        if not found:
            raise ConvertError(f"{given}: no such parquet file, or a folder without one")
        for path in found:
            unique.setdefault(path.resolve(), path)  # a file named twice (itself, and in its folder) is read once
    for path in unique.values():
        try:
            handle = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ConvertError(f"{path}: not a readable parquet file ({e})") from None
        names = handle.schema_arrow.names
        kind = "v_interaction" if "CoT_with_code" in names else "v_perception"
        if missing := [c for c in KIND_COLUMNS[kind] if c not in names]:
            raise ConvertError(f"{path}: no column '{missing[0]}' (a V-Interaction row has question, image, "
                               "answer and CoT_with_code; a V-Perception row question, image and answer)")
        opened.append((path, kind, handle))
    return opened


def _rows(path, handle, kind, batch_rows):
    """(index, record) of a parquet file's rows, read `batch_rows` at a time and only the columns used
    (not edited_image, tool_code, ...); a damaged file is a ConvertError."""
    columns = [c for c in ("id", *KIND_COLUMNS[kind]) if c in handle.schema_arrow.names]
    batches, index = handle.iter_batches(batch_size=batch_rows, columns=columns), 0
    while True:
        try:
            batch = next(batches, None)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ConvertError(f"{path}[{index}]: not a readable parquet row group ({e})") from None
        if batch is None:
            return
        for rec in batch.to_pylist():
            yield index, rec
            index += 1


def _shuffle_lines(src, dst, seed):
    """`src`'s lines in the order random.Random(seed) shuffles them, written to `dst`, one line in memory."""
    with open(src, "rb") as f:  # where each line starts: the sum of the lengths of the lines before it
        offsets = list(accumulate((len(line) for line in f), initial=0))[:-1]
    random.Random(seed).shuffle(offsets)
    with open(src, "rb") as f, open(dst, "wb") as g:
        for at in offsets:
            f.seek(at)
            g.write(f.readline())


def _length_counter(tokenizer_path):
    """Token counts of texts by a local tokenizer (the functional tokens added, one token each), else
    words (whitespace-separated; a functional token is one); and the unit's name."""
    if not tokenizer_path:
        return lambda texts: [len(_FUNCTIONAL.sub(r" \g<0> ", t).split()) for t in texts], "words"
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConvertError(f"--tokenizer {tokenizer_path}: cannot load a tokenizer ({e})") from None
    tok.add_tokens([AddedToken(t, normalized=False) for t in FUNCTIONAL_TOKENS if t not in tok.get_vocab()])
    return lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]], \
        f"tokens of {tokenizer_path}"


def convert_vinteraction(inputs, out_path, *, image_dir=None, seed=0, answer_format="boxed", task=None,
                         tokenizer=None, polish_model=None, polish_batch=8, polish_temperature=0.0,
                         device="cpu", batch_rows=64):
    """ATLAS-178K's recipe (§2.2 step 1-3) on V-Interaction-400K (and V-Perception-40K) parquet: rows read
    `batch_rows` at a time (pyarrow's iter_batches: a 600 MB part is never in memory whole), images written
    to `image_dir` (default: OUT's folder/OUT-STEM_images, inside OUT's folder), each V-Interaction row's
    code blocks turned into functional tokens (`trajectory`), optionally polished (`polish`). OUT holds
    the kept rows of all inputs in the order random.Random(seed) shuffles them (the mix: all of both, as
    the paper concatenates V-Perception-40K; the trainers reshuffle every epoch anyway). Returns the
    summary, also written to OUT-STEM.summary.json. Bad input raises ConvertError and leaves OUT, its
    images and summary unwritten."""
    refuse_output_on_input(out_path, [*inputs, tokenizer, polish_model])
    files = parquet_files(inputs)
    out_path = Path(out_path)
    out_dir = out_path.parent.resolve()
    image_dir = (Path(image_dir) if image_dir else out_path.parent / f"{out_path.stem}_images").resolve()
    if not image_dir.is_relative_to(out_dir):
        raise ConvertError(f"--image-dir {image_dir} lies outside OUT's folder {out_dir}, and atlas_min's loader "
                           "refuses image paths that leave the data folder")
    if polish_batch < 1 or not polish_temperature >= 0:
        raise ConvertError(f"--polish-batch {polish_batch} must be >= 1 and --polish-temperature "
                           f"{polish_temperature} >= 0")
    count, unit = _length_counter(tokenizer)
    if polish_model:
        polish_tokenizer, polish_lm = load_judge(polish_model, device)
        if polish_temperature > 0:  # sampled rewrites: the same on every run with the same seed
            import torch
            torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_dir))
    stats = {"rows_read": 0, "kept": 0, "kept_by_kind": dict.fromkeys(KIND_COLUMNS, 0),
             "dropped": dict.fromkeys(DROPS, 0), "functional_tokens": dict.fromkeys(FUNCTIONAL_TOKENS, 0),
             "polished": 0, "polish_rejected": 0}
    totals, written, pending = [0, 0, 0], {}, []
    try:
        (work / "images").mkdir()
        with open(work / "rows.jsonl", "w", encoding="utf-8") as rows:
            def flush():  # polish the trajectories (perception replies are bare answers), count, write
                templated = [ex for kind, ex in pending if kind == "v_interaction"]
                if polish_model and templated:
                    texts, rejected = polish(polish_lm, polish_tokenizer, [ex["response"] for ex in templated],
                                             answer_format, polish_temperature, device)
                    stats["polished"] += len(texts) - rejected
                    stats["polish_rejected"] += rejected
                    for ex, text in zip(templated, texts):
                        ex["response"] = text
                for (kind, ex), n in zip(pending, count([ex["response"] for _, ex in pending])):
                    found = _FUNCTIONAL.findall(ex["response"])
                    for token in found:
                        stats["functional_tokens"][token] += 1
                    if kind == "v_interaction":  # trajectories, functional tokens, all their tokens
                        totals[:] = totals[0] + 1, totals[1] + len(found), totals[2] + n
                    rows.write(json.dumps(ex, ensure_ascii=False) + "\n")
                pending.clear()

            for path, kind, handle in files:
                for index, rec in _rows(path, handle, kind, batch_rows):
                    where = f"{path}[{index}]"
                    rid, ex_task = meta(rec, index, path.stem, task or kind, id_keys=("id",), task_keys=())
                    stats["rows_read"] += 1
                    result = convert_vrow(rec, where, kind, rid, seed, answer_format)
                    if isinstance(result, str):  # a dropped row's image is never read
                        stats["dropped"][result] += 1
                        continue
                    name = export_image(rec.get("image"), where, work / "images", written)
                    image = Path(os.path.relpath(image_dir / name, out_dir)).as_posix()
                    question, answer, response = result
                    pending.append((kind, {"id": rid, "images": [image], "question": question, "answer": answer,
                                           "response": response, "task": ex_task}))
                    stats["kept"] += 1
                    stats["kept_by_kind"][kind] += 1
                    if not polish_model or len(pending) >= polish_batch:
                        flush()
            flush()
        _shuffle_lines(work / "rows.jsonl", work / "out.jsonl", seed)
        n, n_f, n_all = totals
        stats.update(images=len(written), trajectories=n, length_unit=unit,
                     functional_per_trajectory=round(n_f / max(1, n), 2),
                     length_per_trajectory=round(n_all / max(1, n), 1),
                     functional_token_share=round(n_f / max(1, n_all), 4), paper=PAPER)
        (work / "summary.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        image_dir.mkdir(parents=True, exist_ok=True)
        for image in (work / "images").iterdir():
            os.replace(image, image_dir / image.name)
        os.replace(work / "out.jsonl", out_path)
        os.replace(work / "summary.json", out_path.with_name(f"{out_path.stem}.summary.json"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m atlas_min.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="kind", required=True)
    for kind in CONVERTERS:
        command = commands.add_parser(kind)
        command.add_argument("input", help="IN.json (a list), .jsonl (one object a line), .csv or .parquet")
        command.add_argument("output", help="OUT.jsonl; its folder must contain the images")
        command.add_argument("--image-root", help="folder that relative image paths in IN start from (default: IN's)")
        command.add_argument("--task", help="task of every example (default: IN's stem; conversations and "
                                            "choice first try the fields category/task/subject)")
    vi = commands.add_parser("vinteraction", help="V-Interaction-400K / V-Perception-40K parquet -> SFT data")
    vi.add_argument("inputs", nargs="+", metavar="IN", help="parquet files or folders of them, mixed as given")
    vi.add_argument("output", metavar="OUT", help="OUT.jsonl")
    vi.add_argument("--image-dir", help="where the images go, inside OUT's folder (default: OUT-STEM_images)")
    vi.add_argument("--seed", type=int, default=0, help="transition phrasings and OUT's order (default 0)")
    vi.add_argument("--answer-format", choices=("boxed", "tag"), default="boxed",
                    help="final answers as \\boxed{} (the 7B preset's, default) or <answer></answer>")
    vi.add_argument("--task", help="task of every example (default: v_interaction / v_perception)")
    vi.add_argument("--tokenizer", metavar="DIR", help="count the summary's lengths in this tokenizer's tokens")
    vi.add_argument("--polish", metavar="MODEL_PATH", help="a local instruction model that rewrites each reply")
    vi.add_argument("--polish-batch", type=int, default=8, help="replies per generate call (default 8)")
    vi.add_argument("--polish-temperature", type=float, default=0.0, help="0 (default): greedy")
    args = parser.parse_args(argv)
    try:
        if args.kind != "vinteraction":
            examples = convert_file(args.kind, args.input, args.output, args.image_root, args.task)
            print(f"wrote {len(examples)} examples to {args.output}")
            return 0
        device = "cpu"
        if args.polish:
            import torch

            from atlas_min.cli import quiet_libraries
            quiet_libraries()  # no per-tensor "Loading weights" bar, as in eval.py
            device = "cuda" if torch.cuda.is_available() else "cpu"
        summary = convert_vinteraction(args.inputs, args.output, image_dir=args.image_dir, seed=args.seed,
                                       answer_format=args.answer_format, task=args.task, tokenizer=args.tokenizer,
                                       polish_model=args.polish, polish_batch=args.polish_batch,
                                       polish_temperature=args.polish_temperature, device=device)
    except (ConvertError, JudgeError, OSError) as e:
        print(f"error: {e}".replace("\n", "\\n"), file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    out = Path(args.output)
    print(f"wrote {summary['kept']} examples to {out} (summary: {out.with_name(out.stem + '.summary.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
