"""The five functional tokens (docs/method.md, "Functional tokens") and how they enter the vocabulary.

Each is an ordinary token, produced by next-token prediction: nothing is executed, no image drawn.
Adding them = tokenizer entry + embedding rows (+ lm_head rows when untied) + an initialisation.

Initialisation rule: a new row is the mean of the rows that existed before (input and output
matrices separately). With a tied head, the new token's logit is then exactly the mean of the old
tokens' logits, so it neither dominates sampling nor starts unreachable. The mean row is shorter
than a typical row: for random rows much shorter (independent rows cancel, ~1/sqrt(n)), for a trained
model it lies inside the cloud (tutorial 01 prints both norms). A random row of the usual std would do
for a random-init model, but for a trained 7B model it would sit far from everything it has learned.
"""
import torch
from tokenizers import AddedToken

FUNCTIONAL_TOKENS = ["<|Zoom|>", "<|Line|>", "<|Shape|>", "<|Arrow|>", "<|Text|>"]

# Tokens the sampler must never emit: a completion holding one breaks the next forward (TRL #3847).
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def add_functional_tokens(model, tokenizer):
    """Add FUNCTIONAL_TOKENS to `tokenizer` and `model`; idempotent; returns their ids in order.

    The embedding matrix grows only when an id falls outside it and never shrinks: Qwen2.5-VL-7B has
    152,064 rows for ~151,665 tokens, so the new ids fit in its spare rows and no resize happens.
    Rows are initialised only when the token is new to the tokenizer, so calling twice changes nothing.
    """
    new = [t for t in FUNCTIONAL_TOKENS if t not in tokenizer.get_vocab()]
    # special=False: they decode like words (skip_special_tokens keeps them); normalized=False: never split.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
    ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in FUNCTIONAL_TOKENS)
    if not new:
        return ids

    n_old = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= n_old:  # grow, never shrink; mean_resizing=False: we set the rows ourselves
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    new_ids = tokenizer.convert_tokens_to_ids(new)
    n_base = min(n_old, min(new_ids))  # rows that hold real tokens before this call
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight is not matrices[0]:  # untied head (7B): its own rows
            matrices.append(out.weight)
        for w in matrices:
            w[new_ids] = w[:n_base].mean(0, keepdim=True).to(w.dtype)
    model.config.get_text_config().vocab_size = model.get_input_embeddings().weight.shape[0]
    return ids


def functional_in(token_ids, functional_ids):
    """The functional tokens among `token_ids` (a list of ids), as strings, in order; n_F is its length.

    Counted by id, as `functional_mask` marks the anchor's positions: the decoded text cannot tell a
    functional token from the same characters spelled out of ordinary tokens."""
    names = dict(zip(functional_ids, FUNCTIONAL_TOKENS))
    return [names[t] for t in token_ids if t in names]


def functional_mask(token_ids, functional_ids):
    """Bool mask, same shape as `token_ids`, True where the token is functional."""
    return torch.isin(token_ids, torch.as_tensor(functional_ids, device=token_ids.device))
