"""One frozen dataclass holds every knob; named presets; `field=value` overrides from the command line.

    cfg = get_config("toy", ["seed=3", "max_steps=50"])

Presets: `micro` (tests: a forward in milliseconds), `toy` (the CPU demo, minutes), `qwen2_5_vl_7b`
(the paper's model on one node of 8 GPUs; architecture read from `model_path`).
"""
import dataclasses
import sys
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    name: str = "micro"
    seed: int = 0

    # --- model: `model_path` empty means "build a random-init Qwen2.5-VL from the sizes below" ---
    model_path: str = ""
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 64
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    tokenizer_vocab: int = 600  # byte-level BPE trained on the toy corpus (random-init presets only)
    image_size: int = 56  # toy images are image_size x image_size pixels
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112

    # --- data: empty paths mean "use the toy generator" ---
    train_data: str = ""
    eval_data: str = ""
    toy_train_size: int = 64
    toy_eval_size: int = 20
    toy_no_token_share: float = 0.1  # share of SFT replies without a functional token (perception data)
    toy_tasks: str = "shape,line,arrow,zoom,text"

    # --- shared by both trainers ---
    max_steps: int = 0  # > 0 overrides sft_steps / rl_steps for whichever script runs
    save_every: int = 0  # 0: only the final checkpoint
    log_every: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    activation_checkpointing: bool = False

    # --- stage 1, SFT ---
    sft_steps: int = 4
    sft_lr: float = 2e-3
    sft_warmup: int = 1
    batch_size: int = 8  # global batch in examples, the same on any number of processes
    micro_batch_size: int = 4  # per forward; gradient accumulation covers the rest

    # --- stage 2, GRPO / LA-GRPO ---
    rl_steps: int = 2
    rl_lr: float = 1e-4
    rl_warmup: int = 0
    prompts_per_step: int = 2  # global, split over ranks
    group_size: int = 4  # G outputs per prompt
    rl_mini_batch: int = 8  # completions per update (global)
    ppo_epochs: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    clip_eps: float = 0.2
    kl_coef: float = 0.01  # beta
    anchor_coef: float = 0.5  # lambda; 0 is plain GRPO
    adv_eps: float = 1e-6

    # --- reward R = w_acc R_acc + w_ft R_ft + w_fmt R_fmt - w_len P_len - w_over P_over ---
    answer_format: str = "tag"  # "tag": <answer>...</answer>;  "boxed": \boxed{...}
    w_acc: float = 1.0
    w_ft: float = 0.5
    w_fmt: float = 0.2
    w_len: float = 0.2
    w_over: float = 0.2
    len_threshold: int = 48  # tokens before P_len starts
    len_buffer: int = 32  # P_len rises linearly over this many tokens ...
    len_max_penalty: float = 1.0  # ... up to this cap
    over_threshold: int = 3  # functional tokens before P_over starts
    over_slope: float = 0.25  # P_over per functional token beyond the threshold ...
    over_max_penalty: float = 1.0  # ... up to this cap

    # --- eval ---
    eval_max_new_tokens: int = 32
    eval_batch_size: int = 16
    system_prompt: str = "Answer the question about the image. Put the final answer in <answer></answer>."


PRESETS = {
    "micro": Config(),
    "toy": Config(
        name="toy",
        text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=256,
        vision_hidden=64, vision_depth=2, vision_heads=2, vision_intermediate=128,
        image_size=84, min_pixels=84 * 84, max_pixels=84 * 84,
        toy_train_size=4000, toy_eval_size=200,
        sft_steps=1000, sft_lr=2e-3, sft_warmup=50, batch_size=32, micro_batch_size=32,
        rl_steps=40, rl_lr=2e-5, prompts_per_step=8, group_size=8, rl_mini_batch=32,
        max_new_tokens=40, len_threshold=40, len_buffer=16,
        eval_max_new_tokens=40, eval_batch_size=50, save_every=200,
    ),
    # Architecture and vocabulary come from model_path's own config.json; these fields are the recipe.
    "qwen2_5_vl_7b": Config(
        name="qwen2_5_vl_7b",
        min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28,
        sft_steps=2000, sft_lr=1e-5, sft_warmup=100, batch_size=128, micro_batch_size=1,
        activation_checkpointing=True,
        rl_steps=500, rl_lr=1e-6, prompts_per_step=64, group_size=8, rl_mini_batch=64,
        max_new_tokens=1024, len_threshold=768, len_buffer=256, over_threshold=8,
        eval_max_new_tokens=8192, eval_batch_size=8, save_every=100,
    ),
}


class ConfigError(ValueError):
    pass


def _parse(field, text):
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[field.type]
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{field.name}={text!r}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{field.name}={text!r}: expected {kind.__name__}") from None


def get_config(name="micro", overrides=(), base=None):
    """The preset `name` (or `base`), with `field=value` overrides applied and type-checked."""
    if base is None:
        if name not in PRESETS:
            raise ConfigError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[name]
    by_name = {f.name: f for f in fields(Config)}
    changes = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} is not field=value")
        if key not in by_name:
            raise ConfigError(f"unknown config field {key!r} (see atlas_min/config.py)")
        changes[key] = _parse(by_name[key], value)
    return replace(base, **changes)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(d):
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


def die(message):
    """A one-line error for the user, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
