"""Convert public data layouts into atlas_min's JSONL schema (the one atlas_min.data.load_jsonl reads).

Usage:
    python -m atlas_min.convert conversations IN.json[l] OUT.jsonl [--image-root DIR] [--task NAME]
    python -m atlas_min.convert choice IN.json[l] OUT.jsonl [--image-root DIR] [--task NAME]
    python -m atlas_min.convert harness IN.{json,jsonl,csv,parquet} OUT.jsonl [--image-root DIR] [--task NAME]

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

What was assumed (public material as of 2026): ATLAS-178K is not released (github.com/ZiyuGuo99/ATLAS:
"under company review"). Its source, We-Math/V-Interaction-400K (and V-Perception-40K) on the Hub, is
parquet with embedded images and flat fields (id, question, image, answer, CoT_with_code, ...): no turns
and no functional tokens, so export images to files first. Its authors train with ms-swift, whose
`messages` + `images` records are handled above.
"""
import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

from atlas_min.rewards import extract_answer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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
    images, question, response = image_fields(rec, where), turns[users[0]][1], turns[replies[0]][1].strip()
    question = strip_placeholders(question, len(images), where, f"{key}[{users[0]}]")
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
        text = scalar(text, key, where)
        options[letter] = re.sub(rf"^\({letter}\)\s*|^{letter}[.:)]\s+", "", text)  # no doubled "(A) (A) ..."
    return dict(sorted(options.items()))


def letter_of(answer, options):
    """The letter of an answer given as `B`, `(B)`, `B.` or as the text of exactly one option; else None."""
    m = re.fullmatch(r"\(?([A-Z])\)?[.:]?", answer)
    if m and m[1] in options:
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
    question = scalar(rec.get("question"), "question", where)
    question = strip_placeholders(question, len(images), where, "question")
    absent = (None, "")
    field = "answer" if rec.get("gt_answer") in absent and rec.get("answer") not in absent else "gt_answer"
    gold = scalar(rec.get(field), field, where)
    answer = extract_answer(gold, "boxed") or gold
    if not question:
        fail(where, "question", "empty once its <image> placeholders are removed")
    return {"images": images, "question": question, "answer": answer}


CONVERTERS = {"conversations": convert_conversation, "choice": convert_choice, "harness": convert_harness}


def convert_file(kind, in_path, out_path, image_root=None, task=None):
    """Convert IN to OUT (kind: a key of CONVERTERS); OUT is written only if every record converts."""
    in_path, out_path = Path(in_path), Path(out_path)
    root = Path(image_root) if image_root else in_path.parent
    if not root.is_dir():
        raise ConvertError(f"--image-root {root}: no such folder")
    if out_path.resolve() == in_path.resolve():
        raise ConvertError(f"{out_path} is the input file: writing it would replace the data it converts")
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
    args = parser.parse_args(argv)
    try:
        examples = convert_file(args.kind, args.input, args.output, args.image_root, args.task)
    except (ConvertError, OSError) as e:
        print(f"error: {e}".replace("\n", "\\n"), file=sys.stderr)
        return 2
    print(f"wrote {len(examples)} examples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
