"""An optional LLM judge: ask a local instruction model whether an extracted answer matches the gold one.

ATLAS's eval harness scores a reply 0 when its last `\\boxed{…}` is missing, unclosed or empty, and asks
an LLM judge about every other reply: Qwen/Qwen3-VL-235B-A22B-Instruct served by vLLM (judge.sh:6), sent
one user message that holds the question, the gold answer, the extracted answer and three rules (the same
option, an equivalent value, the same meaning), at temperature 0 and at most 50 new tokens
(judge_results.py:12-26, 78-100; all at ZiyuGuo99/ATLAS@4b09aef, see docs/eval_protocol.md). This module
does the same with any local causal LM that fits the machine: judge_prompt states those rules in our own
words, parse_verdict reads the reply, judge runs the model. The rule-based verdict of atlas_min.rewards
needs no model; this judge is for the meaning-level cases that rules cannot decide.

    judge("/models/Qwen2.5-7B-Instruct",
          [{"question": q, "gold": "B", "answer": "the right one"}])
"""
import json
import re
import string
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_TEMPLATE = """You grade a model's answer to a question against the reference answer.

Judge it by these rules:
- Multiple choice: the answer is right only if it picks the same option (letter) as the reference.
- Numbers, formulas, measurements: the answer is right if its value equals the reference's, in any notation.
- Free text: the answer is right if it means essentially the same thing as the reference.

Question: {question}
Reference answer: {gold}
Model's answer: {answer}

Reply with exactly one word: Correct or Incorrect."""

# Placeholders a template must hold, and the names the authors' own template file uses for two of them.
FIELDS = ("question", "gold", "answer")
ALIASES = {"gt": "gold", "pred": "answer"}


class JudgeError(ValueError):
    """A judge that cannot run: a folder that holds no model, a bad template or item; the message names it."""


class Verdicts(list):
    """The verdicts, one bool per item, as a list; also `replies` (the judge's raw text per item, None
    where it was not asked) and `unparsed` (how many replies held no verdict and so count as False)."""

    def __init__(self, verdicts, replies, unparsed):
        super().__init__(verdicts)
        self.replies, self.unparsed = replies, unparsed


def judge_prompt(question, gold, answer, template=None):
    """The judge's user message: `template` (default DEFAULT_TEMPLATE) with `{question}`, `{gold}` and
    `{answer}` filled in. A template is a Python format string, so literal braces are doubled, as in the
    authors' file; it may call gold and answer `{gt}` and `{pred}`, as that file does. A template missing a
    placeholder, or naming an unknown one, raises JudgeError."""
    template = DEFAULT_TEMPLATE if template is None else template
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise JudgeError(f"template: not a format string ({e}); write literal braces as {{{{ and }}}}") from None
    if unknown := sorted(name for name in names if name not in FIELDS and name not in ALIASES):
        raise JudgeError(f"template: unknown placeholder {{{unknown[0]}}}; "
                         "the placeholders are {question}, {gold} and {answer}")
    present = {ALIASES.get(name, name) for name in names}
    if missing := [field for field in FIELDS if field not in present]:
        raise JudgeError(f"template: no {{{missing[0]}}} placeholder "
                         "(a template needs {question}, {gold} and {answer})")
    values = {"question": question, "gold": gold, "answer": answer}
    return template.format(**values, **{alias: values[field] for alias, field in ALIASES.items()})


_JSON_VERDICT = re.compile(r'"?correctness"?\s*[:=]\s*"?([01])\b')  # the authors' {"Correctness": 1} replies
_WORD_VERDICT = re.compile(r"\b(not\s+)?(in)?correct\b")


def parse_verdict(text):
    """True for a reply that says "Correct", False for "Incorrect" (or "not correct"), None for neither.

    Case, punctuation, Markdown and leading whitespace do not matter ("**Correct.**", "  incorrect");
    the first verdict word counts, matched as a whole word, so "Incorrect" is never read as "correct" and
    "correctness" is no verdict. A JSON verdict in the authors' form, {"Correctness": 1} or 0, is read too.
    """
    if not isinstance(text, str):
        return None
    text = text.lower()
    if m := _JSON_VERDICT.search(text):
        return m[1] == "1"
    m = _WORD_VERDICT.search(text)
    return None if m is None else not (m[1] or m[2])


def _check_folder(path):
    """JudgeError, naming the folder, unless `path` looks like a saved model: config.json and a tokenizer."""
    if not path.is_dir():
        raise JudgeError(f"judge model {path}: no such folder")
    if not (path / "config.json").is_file():
        raise JudgeError(f"judge model {path}: not a model folder (no config.json)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise JudgeError(f"judge model {path}: no tokenizer (tokenizer.json)")  # transformers would build an empty one


def load_judge(path, device="cpu"):
    """(tokenizer, model) from a local folder, for `judge`; JudgeError names the folder (and the first line
    of the reason) when they cannot be loaded: no tokenizer, or not a causal LM (a vision-language model)."""
    path = Path(path)
    _check_folder(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: importing rewards needs no torch

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0][:300]
        raise JudgeError(f"judge model {path}: cannot load a causal LM and its tokenizer ({reason})") from None
    tokenizer.padding_side = "left"  # rows end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


def chat_text(tokenizer, prompt):
    """The model's input text: the prompt as one user message in the tokenizer's chat template (as the
    harness sends it: no system message), or the bare prompt for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def generate(model, tokenizer, texts, max_new_tokens, device, temperature=0.0):
    """Continuations of `texts`, decoded without special tokens: greedy at temperature 0 (as the harness
    judges), sampled above it (convert's optional polishing)."""
    import torch
    from transformers import GenerationConfig

    plain = not getattr(tokenizer, "chat_template", None)  # a chat template writes its own BOS, if any
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=plain).to(device)
    eos = model.generation_config.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id if eos is None else eos, **sampling)
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)  # the new tokens


def ask_url(url, prompts, model=None, *, max_new_tokens=50, timeout_s=300, retries=3, parallel=8):
    """The replies of an OpenAI-compatible chat-completions endpoint (what `vllm serve` exposes) to `prompts`:
    POST URL/v1/chat/completions (URL: the server's root, as http://host:8000), each prompt one user message
    (as `chat_text` gives it to a local model), temperature 0, at most `max_new_tokens`, "model": `model` when
    given (vLLM's default: the one model it serves). `parallel` requests at a time (the server batches them);
    one that fails or times out is tried again `retries` times, 1, 2, 4 s apart, then JudgeError names the URL."""
    endpoint = url.rstrip("/") + "/v1/chat/completions"

    def ask(prompt):
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_new_tokens}
        request = urllib.request.Request(endpoint, json.dumps(body | ({"model": model} if model else {})).encode(),
                                         {"Content-Type": "application/json"})
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                    return json.loads(reply.read())["choices"][0]["message"]["content"]
            except Exception as e:  # any failure of the request (http.client's too) or of the reply's shape
                if attempt == retries:
                    raise JudgeError(f"judge {endpoint}: no reply after {retries + 1} tries ({e})") from None
                time.sleep(2 ** attempt)

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(ask, prompts))


def probe_url(url, model=None, timeout_s=60):
    """JudgeError naming the URL unless a server answers GET URL/v1/models (the model list an OpenAI-compatible
    server such as vLLM serves) within `timeout_s`, and, when it lists its models, lists `model` if given.
    eval.py asks it before the decode, so a dead or silent server costs a minute at most, not the decode, and a
    dead one with nothing to ask later is an error, never an accuracy of 0. Any HTTP status counts as an
    answer (a server without that list still judges); no chat request is spent."""
    endpoint = url.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout_s) as reply:
            served = [m.get("id") for m in json.loads(reply.read()).get("data", [])]
    except (urllib.error.HTTPError, ValueError, AttributeError, TypeError):  # an HTTP error or no model list: an answer
        return
    except Exception as e:  # refused, unreachable, timed out (socket and http.client errors alike)
        raise JudgeError(f"judge {url}: no answer to GET {endpoint} within {timeout_s} s ({e})") from None
    if model and served and model not in served:
        raise JudgeError(f"judge {url} serves {', '.join(map(str, served))}, not --judge-model {model}")


def judge(model_path, items, *, template=None, max_new_tokens=50, batch_size=8, device="cpu", url_model=None):
    """Verdicts (a list of bools, one per item) of the local model in `model_path` (or a (tokenizer, model)
    pair from `load_judge`, or the URL of a served one: `ask_url`, with `url_model` its "model") on `items`,
    each a mapping with "question", "gold" and "answer" (the extracted answer, or None when there is none).

    An item whose answer is None or blank is False without asking the model, as the harness scores a
    missing box 0 (judge_results.py:79-81). Every other item is asked with judge_prompt, greedily, at
    most `max_new_tokens` new tokens (the harness: 50), `batch_size` prompts at a time; a reply with no
    verdict is False and counted in the result's `unparsed`. The model is loaded only if some item is
    asked, but the folder and the template are checked first.
    """
    items = list(items)
    prompts = []
    for k, item in enumerate(items):
        for field in FIELDS:
            if not hasattr(item, "get") or field not in item:
                raise JudgeError(f"items[{k}]: no field '{field}' (an item holds question, gold and answer)")
        asked = isinstance(item["answer"], str) and bool(item["answer"].strip())
        prompts.append(judge_prompt(item["question"], item["gold"], item["answer"], template) if asked else None)
    served = str(model_path).startswith(("http://", "https://"))
    loaded = model_path if isinstance(model_path, tuple) else None
    if not loaded and not served:
        _check_folder(Path(model_path))
    asked = [k for k, prompt in enumerate(prompts) if prompt is not None]
    answers = []  # the replies to the asked items, in order
    if asked and served:
        answers = ask_url(model_path, [prompts[k] for k in asked], url_model, max_new_tokens=max_new_tokens)
    elif asked:
        tokenizer, model = loaded or load_judge(model_path, device)
        for start in range(0, len(asked), batch_size):
            texts = [chat_text(tokenizer, prompts[k]) for k in asked[start:start + batch_size]]
            answers += generate(model, tokenizer, texts, max_new_tokens, device)
    reply_of = dict(zip(asked, answers))
    replies = [reply_of.get(k) for k in range(len(items))]
    parsed = [parse_verdict(reply) for reply in replies]  # None for an item not asked
    return Verdicts([bool(v) for v in parsed], replies, unparsed=sum(parsed[k] is None for k in asked))
