"""One frozen dataclass holds every knob; named presets; `field=value` overrides from the command line.

    cfg = get_config("toy", ["seed=3", "max_steps=50"])

Presets: `micro` (tests: a forward in milliseconds), `toy` (the CPU demo, minutes), `qwen2_5_vl_7b`
(the paper's model on one node of 8 GPUs: Qwen2.5-VL-7B's architecture; weights from `model_path`).
"""
import math
from dataclasses import asdict, dataclass, fields, replace


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
    # Architecture details the small presets leave at these defaults and the 7B preset sets to Qwen's:
    vocab_rows: int = 0  # embedding rows; 0: len(tokenizer). Qwen pads its matrix (152,064 rows)
    tie_embeddings: bool = True  # lm_head shares the input embedding (Qwen2.5-VL-7B: untied)
    rope_theta: float = 10000.0
    mrope_section: str = ""  # "t,h,w" split of each head's rotary half-dim; "": half to t, a quarter each to h, w
    rms_norm_eps: float = 1e-5
    max_positions: int = 4096
    vision_fullatt_every: int = 0  # every k-th vision block attends globally (k-1, 2k-1, ...); 0: only the last
    vision_tokens_per_second: int = 4  # video time scale of the 3-D positions (unused for images)
    image_size: int = 56  # toy images are image_size x image_size pixels
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112

    # --- data: empty paths mean "use the toy generator" ---
    train_data: str = ""
    eval_data: str = ""
    skip_bad_examples: bool = False  # drop examples whose image is unreadable (else list them and stop)
    toy_train_size: int = 64
    toy_eval_size: int = 20
    toy_no_token_share: float = 0.1  # share of SFT replies without a functional token (perception data)
    toy_tasks: str = "shape,line,arrow,zoom,text"
    toy_teacher_slip: float = 0.0  # share of train replies where the SFT teacher misreads (toy.TEACHER_SLIPS)
    toy_token_slip: float = 0.0  # share of train replies where the teacher's token is wrong (toy.TOKEN_SLIPS)
    toy_reply: str = "short"  # puzzle replies: "short" (12 generated tokens) or "long" (~38, varied; toy.reply)

    # --- shared by both trainers ---
    max_steps: int = 0  # > 0 overrides sft_steps / rl_steps for whichever script runs
    save_every: int = 0  # 0: only the final checkpoint
    # the run folder's final model: "bfloat16" makes it a sixth of a resumable checkpoint (no AdamW state)
    # and writes the resumable state to checkpoints/step_N as well; "float32": the run folder is both
    final_dtype: str = "float32"
    save_on_interrupt: bool = True  # Ctrl-C / SIGTERM: finish the step, save it (resumable), then stop
    keep_checkpoints: int = 0  # > 0: delete all but the newest this many under RUN/checkpoints
    log_every: int = 1  # a progress line (and in RL a sample of completions) every log_every steps; metrics: every step
    # Where else each metrics line goes (the JSONL stays the record): "wandb" or "tensorboard" (atlas_min.tracking;
    # pip install -e '.[wandb]' or '.[tensorboard]'), for a run watched from elsewhere; "none": the JSONL only.
    log_to: str = "none"
    # How long a rank waits in a collective before the run fails. torch's default for gloo, 30 min: rank 0 reads a
    # 7B checkpoint (33 GB), and stitches a save's 33 GB of weights, while the others wait. Tests shorten it to catch
    # a stalled rank.
    collective_timeout_s: float = 1800.0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    activation_checkpointing: bool = False
    # FSDP2's sharding group (dist.shard). 0: every rank shards with every other (plain FSDP; one node). K: shard
    # within groups of K ranks and replicate across the groups (HSDP). With K = GPUs per node the all-gathers and
    # reduce-scatters of every micro-batch stay on a node's NVLink; across nodes only each rank's all-reduce of its
    # gradient shard travels, once per optimizer step (dist.sync_replicas; plan --nodes prints the bytes). The
    # same sums, in another order. Trainers refuse a K that does not divide the processes; eval falls back to 0.
    fsdp_shard_size: int = 0
    # The dtype of the gradients' reduce-scatter / all-reduce on CUDA (FSDP2's MixedPrecisionPolicy.reduce_dtype).
    # float32: each rank's bf16-computed gradient is summed exactly over ranks. bfloat16 halves those bytes (plan),
    # at the cost of rounding every rank's gradient to 8 mantissa bits before the sum: with RL's tiny, noisy
    # per-token gradients the rounding is of the order of the signal, so it is an option, not the default.
    grad_reduce_dtype: str = "float32"
    # A run stops (exit 2) after this many steps in a row whose loss or gradient norm is not finite, and never
    # saves such a step. One is survivable: its update is skipped (optim.clipped_step), a lost batch. Three in a
    # row mean the weights or AdamW's moments themselves are broken (every batch overflows): going on only burns
    # compute, and the last checkpoint saved is then the last one from a finite step (optim.count_nonfinite).
    max_nonfinite_steps: int = 3
    # Log-probs of given tokens (SFT's loss, RL's log π) `logprob_chunk` positions of a row at a time, 0: all at
    # once (model.token_logprobs). At once keeps a float32 log-softmax of all the logits for backward: with
    # Qwen's 152,064-row vocabulary, 14 bytes per entry, 17.5 GB of an RL micro-batch at 7B; chunked, the logits
    # and their gradient only (6 bytes, bf16: the slice logits[:, :-1] adds a padded copy of the gradient; `plan
    # --rehearse` measured it). Off in the small presets: their logits are a few MB, and the Python loop over
    # pieces made the toy's update 1-4% slower on a CPU (0.51 against 0.50 s, min of 15).
    logprob_chunk: int = 0
    # Every random draw derives from (seed, step, row) through these strides, so a resumed run and any
    # number of processes draw the same. They are primes larger than any count they multiply past (epochs,
    # steps, rows per step), so distinct (seed, epoch) or (seed, step, row) never share a generator seed.
    epoch_seed_stride: int = 100_003  # the shuffle of epoch e uses seed * stride + e (data.stream_indices)
    step_seed_stride: int = 1_000_003  # a sampled row's seed: (seed * step_stride + step) * row_stride + row
    row_seed_stride: int = 65_537
    rl_seed_offset: int = 7919  # RL's prompt stream is SFT's shuffle under seed + offset: not SFT's order again
    # An RL run's own draws (prompt order, samples) come from seed + rl_seed * epoch_seed_stride: RL seeds
    # vary from one SFT checkpoint while `seed` (which also fixes the toy data and its eval split) stays.
    rl_seed: int = 0
    # An SFT run's own draws (a random init's weights, the batch order) come from seed + sft_seed * epoch_seed_stride:
    # a second SFT checkpoint on the same toy data (anchor_study's variant).
    sft_seed: int = 0

    # --- stage 1, SFT ---
    sft_steps: int = 4
    sft_lr: float = 2e-3
    sft_warmup: int = 1
    batch_size: int = 8  # global batch in examples, the same on any number of processes
    micro_batch_size: int = 4  # per forward; gradient accumulation covers the rest
    # AdamW's betas. SFT: (0.9, 0.95), the usual pair for transformer pre-training and fine-tuning (GPT-3,
    # LLaMA); a shorter second-moment memory copes with the loss's fast early fall.
    sft_beta1: float = 0.9
    sft_beta2: float = 0.95

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
    # RL: (0.9, 0.99), ours (the paper gives none; verl's GRPO default is (0.9, 0.999) with a constant lr,
    # OpenRLHF's (0.9, 0.95)): policy-gradient steps are noisy, so the second moment averages over ~100
    # updates instead of SFT's ~20. Both stages: linear warm-up, then cosine decay to 0 (optim.lr_at).
    rl_beta1: float = 0.9
    rl_beta2: float = 0.99

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
    eval_min_pixels: int = 0  # > 0: the eval's image bounds (else min_pixels / max_pixels)
    eval_max_pixels: int = 0
    eval_batch_size: int = 16
    # Validation during RL: every eval_every steps (0: never) and at step 0, greedy accuracy, format, functional and
    # right-token rates on the first eval_examples of the eval split, as val/... keys of metrics_rl.jsonl. Off in the
    # micro preset: it is the tests' model, whose RL steps take 0.1 s, and every RL test would pay for it.
    eval_every: int = 0
    eval_examples: int = 20
    system_prompt: str = "Answer the question about the image. Put the final answer in <answer></answer>."
    question_suffix: str = ""  # appended to every question (the 7B eval protocol appends its \boxed{} instruction)
    image_separator: str = ""  # between the image block(s) and the question (ATLAS's harness: a newline)


PRESETS = {
    "micro": Config(),
    "toy": Config(
        name="toy", text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=256,
        vision_hidden=64, vision_depth=2, vision_heads=2, vision_intermediate=128,
        image_size=84, min_pixels=84 * 84, max_pixels=84 * 84, toy_train_size=4000, toy_eval_size=200,
        # The teacher misreads two answers in 60% of their train replies (toy.TEACHER_SLIPS): SFT copies
        # the slips, RL's reward judges against the truth. With 0, RL on this toy only sharpens sampling.
        toy_teacher_slip=0.6,
        sft_steps=300, sft_lr=2e-3, sft_warmup=30, batch_size=32, micro_batch_size=32,
        # lr 1e-4: 1e-5 did not move this 0.6M model in 150 steps; 3e-4 and 1e-3 learned, then collapsed;
        # 150 steps repaired part of the slips (+0.025 held-out), 300 steps most of them (+0.085).
        rl_steps=300, rl_lr=1e-4, rl_warmup=10, prompts_per_step=16, group_size=8, rl_mini_batch=64,
        max_new_tokens=40, len_threshold=40, len_buffer=16,
        eval_max_new_tokens=40, eval_batch_size=50, save_every=100, log_every=10,
        # the whole 200-example split (±0.03 is noise there; a smaller slice would be noisier than RL's effect),
        # 4 times in 300 steps: a greedy pass costs about one RL step's sampling
        eval_every=100, eval_examples=200,
    ),
    # Qwen2.5-VL-7B-Instruct's architecture (its config.json), so `python -m atlas_min.plan` can build it
    # on the meta device with nothing downloaded. Training loads the checkpoint at `model_path`, whose
    # own config.json wins; the sizes below must match it. Recipe values the paper does not give are
    # marked "ours" with the reason.
    "qwen2_5_vl_7b": Config(
        name="qwen2_5_vl_7b", text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
        vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420,
        vocab_rows=152064, tie_embeddings=False, rope_theta=1e6, mrope_section="16,24,24", rms_norm_eps=1e-6,
        max_positions=128000, vision_fullatt_every=8, vision_tokens_per_second=2,  # full attention: 7, 15, 23, 31
        # ours: Qwen's usual fine-tuning bounds, 256..1280 image tokens per image, for training;
        # eval uses ATLAS's harness bounds, 512·28²..5120·28² pixels
        min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28, eval_min_pixels=401_408, eval_max_pixels=4_014_080,
        # ATLAS's released eval harness (docs/eval_protocol.md, with its source lines): its system message,
        # a newline after the image block, its instruction after the question, \boxed{} answers read from the
        # last box. Training uses the same prompt, so the model learns the format it is judged in.
        answer_format="boxed", image_separator="\n",
        system_prompt="You are a helpful assistant. Please think step by step, and put your final answer "
                      "within \\boxed{}.",
        question_suffix="\n\nPlease think step by step, and put your final answer within \\boxed{}.",
        activation_checkpointing=True,  # as verl's 7B recipe; `plan` shows the budget without it
        logprob_chunk=256,  # 9.7 GB less per GPU in an RL update (`plan`); a piece's fp32 copies: 0.3 GB
        # SFT, ours: the usual full fine-tuning lr for a 7B VLM; 2000 × 128 ≈ 1.4 epochs of ATLAS-178K
        sft_steps=2000, sft_lr=1e-5, sft_warmup=100, batch_size=128, micro_batch_size=1,
        # RL: lr as verl's Qwen2.5-VL-7B GRPO recipe. G=8 (ours; verl uses 5): with a 0/1 accuracy reward,
        # more samples leave fewer groups with all-equal rewards (zero advantage). 64 prompts × 8 = 512
        # completions per step in 4 updates of 128, verl's ratio (512 prompts, mini-batches of 128).
        rl_steps=500, rl_lr=1e-6, prompts_per_step=64, group_size=8, rl_mini_batch=128,
        temperature=1.0, top_p=1.0,  # sample the policy itself: the PPO ratio starts at exactly 1
        clip_eps=0.2, kl_coef=0.01,  # PPO's and GRPO's usual ε; β as verl's recipe
        # λ, ours: L_anchor and L_GRPO are both means of the same clipped terms, so their gradients are on
        # one scale (not their values: docs/method.md, "LA-GRPO") and λ is the anchor's gradient relative
        # to GRPO's. At the paper's sparsity (4.8 functional of 203.7 tokens, 2.4%) and r = 1, λ = 0.5
        # weighs each functional token 1 + λ·203.7/4.8 ≈ 22× a text token, and gives functional positions
        # (0.024 + λ)/(1 + λ) ≈ 0.35 of Σ|∂L/∂log π| (the functional gradient share): GRPO's sequence-level
        # objective stays the larger part.
        anchor_coef=0.5,
        # Rewards, ours: a correct answer always outscores a wrong one (1 - 0.2 - 0.2 > 0.2); the token
        # bonus only ranks correct answers; format is mostly learned in SFT, so its weight is small.
        w_acc=1.0, w_ft=0.5, w_fmt=0.2, w_len=0.2, w_over=0.2,
        # The paper's responses average 203.7 tokens with 4.8 functional tokens: allow 1024 new tokens,
        # penalise length linearly from 768 to 1024, and functional tokens beyond 8 (1.7× the mean).
        max_new_tokens=1024, len_threshold=768, len_buffer=256, len_max_penalty=1.0,
        over_threshold=8, over_slope=0.25, over_max_penalty=1.0,
        # 2048: the harness's generation limit (experience_maker.py:1897-1900; its --generate_max_len 8192
        # only sizes vLLM's context window)
        eval_max_new_tokens=2048, eval_batch_size=8,
        # A resumable checkpoint is 99.5 GB (fp32 weights + AdamW m, v), ~166 s per save at 1 GB/s of storage
        # (`plan`: the shards, then rank 0 stitches the weights). Ours: an RL step (512 completions of up to 1,024
        # tokens) takes on the order of a minute, so 100 steps put ~1.5 h of work between saves, the save ~3% of it,
        # and a crash loses at most that. SFT steps take seconds: pass save_every=500 there (estimates, not timed).
        save_every=100, keep_checkpoints=2,
        # ours: 256 held-out examples, 32 per GPU (±0.03 at accuracy 0.5), decoded greedily to eval_max_new_tokens:
        # about one RL step's rollout (64 rows of 1,024 tokens per GPU), so every 50 steps it costs ~2% of the run
        # and shows a collapse within an hour or so. Needs eval_data (train_rl.py refuses the toy's split here).
        eval_every=50, eval_examples=256,
        final_dtype="bfloat16",  # the final model: 16.6 GB, as the download, and what eval and RL --init read
    ),
}
# The toy model on the decisive puzzles (toy.py): the frame picks the operation, the token is the
# decision, and the teacher writes <|Shape|> in 70% of the line puzzles' train replies, so greedy SFT
# picks the wrong token there. Calibrated on 2 cores: 112 px (a 4x4 grid of vision tokens: at 84 px
# the two lines shared a row of tokens and short-reply models stayed at chance on them); 400 SFT
# steps of 64 learn both operations (batch 32: hit or miss); 60 RL steps at lr 3e-5 let GRPO repair
# the slip (at 1e-4 the token stopped deciding the answer on shape puzzles). The toy's sizes otherwise.
PRESETS["toy_decisive"] = replace(
    PRESETS["toy"], name="toy_decisive", image_size=112, min_pixels=112 * 112, max_pixels=112 * 112,
    toy_tasks="puzzle_shape,puzzle_line", toy_no_token_share=0.0, toy_teacher_slip=0.0, toy_token_slip=0.7,
    toy_reply="long", sft_steps=400, batch_size=64, rl_steps=60, rl_lr=3e-5, max_new_tokens=48, len_threshold=48,
    eval_max_new_tokens=48, save_every=0, eval_every=0, eval_examples=20)


FIELDS = {f.name: f for f in fields(Config)}


class ConfigError(ValueError):
    """A preset, field or value that does not exist or is out of its range; the message names it."""


# What `--resume RUN field=value` may change (run_folder), and why: how long the run goes, when it saves and
# logs, how a step fits in memory, eval.py's own settings. Every other field is fixed at the run's start: a
# resume that changes one is refused, since the run's record would then describe a run that never happened.
# A change is recorded in the trainer state with the step it took effect.
RESUME_MAY_CHANGE = {
    "max_steps sft_steps rl_steps": "the run's length; the cosine lr schedule is recomputed for it from then on",
    "save_every keep_checkpoints save_on_interrupt final_dtype": "when and how checkpoints are written",
    "log_every max_nonfinite_steps log_to collective_timeout_s": "what is printed and where, when a diverging or "
                                                                  "stalled run stops",
    "micro_batch_size activation_checkpointing": "memory only: the same global batch and loss (to float rounding)",
    "fsdp_shard_size": "how the ranks shard and replicate: the same sums in another order (a resume on another "
                       "process count may need another)",
    "eval_max_new_tokens eval_min_pixels eval_max_pixels eval_batch_size eval_every eval_examples":
        "eval settings: validation reads the weights, no update reads it",
}
MUTABLE = {name for names in RESUME_MAY_CHANGE for name in names.split()}
TOY_TASKS = ("shape", "line", "arrow", "zoom", "text", "puzzle_shape", "puzzle_line")  # toy.ANSWERS' families


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _parse(field, text):
    try:
        return _BOOLEANS[text.lower()] if field.type is bool else field.type(text)
    except (KeyError, ValueError):
        expected = "true or false" if field.type is bool else field.type.__name__
        raise ConfigError(f"{field.name}={text!r}: expected {expected}") from None


def get_config(name="micro", overrides=(), base=None):
    """The preset `name` (or `base`), with `field=value` overrides applied and type-checked."""
    if base is None:
        if name not in PRESETS:
            raise ConfigError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[name]
    changes = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} is not field=value")
        if key not in FIELDS:
            raise ConfigError(f"unknown config field {key!r} (see atlas_min/config.py)")
        changes[key] = _parse(FIELDS[key], value)
    return check(replace(base, **changes))


# Allowed ranges, checked before any work (`check`). Everything not named here is free (strings, flags).
POSITIVE = ("text_hidden text_layers text_heads text_kv_heads text_intermediate vision_hidden vision_depth "
            "vision_heads vision_intermediate tokenizer_vocab max_positions image_size min_pixels max_pixels "
            "toy_train_size toy_eval_size log_every sft_steps batch_size micro_batch_size rl_steps prompts_per_step "
            "group_size rl_mini_batch ppo_epochs max_new_tokens eval_max_new_tokens eval_batch_size eval_examples "
            "collective_timeout_s epoch_seed_stride step_seed_stride row_seed_stride sft_lr rl_lr grad_clip clip_eps "
            "rope_theta rms_norm_eps max_nonfinite_steps").split()
NON_NEGATIVE = ("fsdp_shard_size logprob_chunk seed rl_seed rl_seed_offset vocab_rows vision_fullatt_every vision_tokens_per_second "
                "sft_seed max_steps save_every eval_every keep_checkpoints sft_warmup rl_warmup len_threshold len_buffer "
                "over_threshold eval_min_pixels eval_max_pixels weight_decay temperature kl_coef anchor_coef adv_eps "
                "w_acc w_ft w_fmt w_len w_over len_max_penalty over_slope over_max_penalty").split()
SHARES = "toy_no_token_share toy_teacher_slip toy_token_slip".split()
BETAS = "sft_beta1 sft_beta2 rl_beta1 rl_beta2".split()
# (fields, test, the range the message names), in this order: a field in two tables must pass both
RANGES = [(POSITIVE, lambda v: v > 0, "> 0"), (NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
          (SHARES, lambda v: 0 <= v <= 1, "in [0, 1]"), (BETAS, lambda v: 0 <= v < 1, "in [0, 1)"),
          (["top_p"], lambda v: 0 < v <= 1, "in (0, 1]"),
          # A_i compares an output with its group: a lone output's advantage is 0, RL would do nothing
          (["group_size"], lambda v: v >= 2, ">= 2 (GRPO compares each output with the others of its group)")]
CHOICES = {"answer_format": ("tag", "boxed"), "final_dtype": ("float32", "bfloat16"), "toy_reply": ("short", "long"),
           "log_to": ("none", "wandb", "tensorboard"), "grad_reduce_dtype": ("float32", "bfloat16")}


def check(cfg):
    """`cfg`, if every field is in its allowed range; else ConfigError naming the field, value and range."""
    def bad(name, allowed):
        return ConfigError(f"{name}={getattr(cfg, name)!r}: must be {allowed}")
    for names, ok, allowed in RANGES:
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and ok(value)):
                raise bad(name, allowed if math.isfinite(value) else "a finite number")
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise bad(name, "one of " + ", ".join(options))
    tasks = [t.strip() for t in cfg.toy_tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - set(TOY_TASKS):
        raise bad("toy_tasks", "a comma-separated list of " + ", ".join(TOY_TASKS))
    # Shapes a Qwen2.5-VL can have: whole heads, an even text head (rotary halves), a vision head in quarters
    # (2-D rotary), whole query groups per kv head, and an mrope split t,h,w of the text head's rotary half
    text_head = cfg.text_hidden / cfg.text_heads
    if text_head % 2 or cfg.text_heads % cfg.text_kv_heads:
        raise bad("text_heads", f"a multiple of text_kv_heads={cfg.text_kv_heads} that divides text_hidden="
                                f"{cfg.text_hidden} into even head sizes")
    if (cfg.vision_hidden / cfg.vision_heads) % 4:
        raise bad("vision_heads", f"a divisor of vision_hidden={cfg.vision_hidden} into head sizes divisible by 4")
    section = cfg.mrope_section.split(",") if cfg.mrope_section else None
    if section and (len(section) != 3 or not all(s.strip().isdigit() for s in section)
                    or sum(map(int, section)) != text_head / 2):
        raise bad("mrope_section", f"three counts t,h,w summing to half the text head size ({text_head / 2:g})")
    if cfg.min_pixels > cfg.max_pixels:
        raise bad("min_pixels", f"<= max_pixels={cfg.max_pixels}")
    if bool(cfg.eval_min_pixels) != bool(cfg.eval_max_pixels):  # the eval's bounds replace both training bounds
        raise bad("eval_max_pixels" if cfg.eval_min_pixels else "eval_min_pixels",
                  f"set with {'eval_min_pixels' if cfg.eval_min_pixels else 'eval_max_pixels'} (both 0: the training bounds)")
    if cfg.eval_min_pixels > cfg.eval_max_pixels:
        raise bad("eval_min_pixels", f"<= eval_max_pixels={cfg.eval_max_pixels}")
    if cfg.rl_mini_batch % cfg.group_size or (cfg.prompts_per_step * cfg.group_size) % cfg.rl_mini_batch:
        raise bad("rl_mini_batch", f"a multiple of group_size={cfg.group_size} that divides prompts_per_step x "
                                   f"group_size={cfg.prompts_per_step * cfg.group_size} (updates hold whole groups)")
    return cfg


def check_world(cfg, world, stage):
    """ConfigError unless `world` processes can split `stage`'s global batches: SFT's batch_size examples,
    RL's prompts_per_step prompts and rl_mini_batch completions, whole groups on each rank."""
    if cfg.fsdp_shard_size and world % cfg.fsdp_shard_size:
        raise ConfigError(f"fsdp_shard_size={cfg.fsdp_shard_size} must divide the {world} processes (groups of "
                          "ranks that shard, replicated across the groups)")
    if stage == "sft" and cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    if stage == "rl" and (cfg.prompts_per_step % world or cfg.rl_mini_batch % (cfg.group_size * world)):
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} and rl_mini_batch/G={cfg.rl_mini_batch}/"
                          f"{cfg.group_size} must divide by the {world} processes")


to_dict = asdict


def from_dict(d):
    return Config(**{k: v for k, v in d.items() if k in FIELDS})
