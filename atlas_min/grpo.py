"""GRPO and LA-GRPO losses: pure functions over tensors (docs/method.md, "Stage 2: GRPO", "LA-GRPO").

Shapes: N outputs in groups of G (N = prompts x G), B outputs in a batch, T generated positions.
`logp`, `old_logp`, `ref_logp` are log-probabilities of the *sampled* tokens under pi_theta,
pi_old and pi_ref, each (B, T). `mask` marks generated (non-padding) positions and
`functional_mask` the positions holding a functional token (a subset of `mask`), both bool (B, T).

    A        = group_advantages(rewards, G)                     # (N,)
    loss, st = grpo_loss(logp, old_logp, ref_logp, A, mask, fmask,
                         clip_eps=0.2, kl_coef=0.01, anchor_coef=1.0)
"""
import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """A_i = (R_i - mean_j R_j) / (std_j R_j + eps), std unbiased (Bessel), j over i's group.

    `rewards` is (N,) with each group's G outputs contiguous; returns (N,) in rewards' float dtype
    (the default dtype for integer rewards). A constant group gives exactly 0 (its outputs carry no
    preference): the rule is applied as written, not left to the arithmetic, because in float32 the
    mean of eight 1.7s is off by one rounding step, the std comes out ~1e-7 instead of 0, and the
    formula would give every output +0.106 (docs/method.md, "Advantages"). The rest is computed in
    float64. With group_size == 1 the unbiased std is undefined (0/0) and a lone output has nothing
    to be compared with: every advantage is 0 (train_rl.py refuses G = 1 for that reason).
    """
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (N,) with N divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    groups = rewards.to(torch.float64).view(-1, group_size)  # (P, G)
    if group_size == 1:
        return torch.zeros(rewards.shape, dtype=dtype, device=rewards.device)
    mean = groups.mean(dim=1, keepdim=True)  # (P, 1)
    std = groups.std(dim=1, unbiased=True, keepdim=True)  # (P, 1)
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)  # (P, 1)
    A = torch.where(constant, 0.0, (groups - mean) / (std + eps))  # (P, G)
    return A.view(-1).to(dtype)  # (N,)


def constant_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(P,) bool: the groups whose G rewards are all equal, i.e. the groups that carry no signal."""
    groups = rewards.view(-1, group_size)  # (P, G)
    return groups.amax(dim=1) == groups.amin(dim=1)


# exp(20) = 4.9e8 is finite in float32 and bfloat16 (their range ends near exp(88)); a token whose
# probability moved by more than that factor since it was sampled is far outside any trust region, and
# the clipped surrogate sends it no gradient anyway when A > 0. Without the bound one log-prob of -inf
# (or junk at a padding position) makes r = inf and the loss NaN. verl uses the same bound
# (verl/trainer/ppo/core_algos.py, compute_policy_loss: clamp(log_prob - old_log_prob, -20, 20)).
LOG_RATIO_BOUND = 20.0


def log_ratio(logp: Tensor, other_logp: Tensor) -> Tensor:
    """log pi_theta - log pi_other, clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] before any exp. (B, T)"""
    return (logp - other_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float) -> Tensor:
    """l_{i,t} = -min(r * A_i, clip(r, 1-eps, 1+eps) * A_i), r = exp(log pi_theta - log pi_old).

    Per-token loss (B, T); `advantages` (B,) is shared by all tokens of its output. The log-ratio is
    clamped to +-LOG_RATIO_BOUND before `exp` (docs/method.md, "Numerical guards").
    """
    r = torch.exp(log_ratio(logp, old_logp))  # (B, T)
    A = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1)
    return -torch.minimum(r * A, torch.clamp(r, 1 - clip_eps, 1 + clip_eps) * A)  # (B, T)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """D_{i,t} = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1   (k3 estimator).

    Non-negative, 0 iff the two log-probs are equal; its mean under pi_theta is KL(pi_theta || pi_ref).
    The difference is clamped to +-LOG_RATIO_BOUND before `exp`, so D stays finite (<= e^20 - 21). verl
    also caps D at 10 ("low_var_kl"); we do not: that cap removes the KL's pull exactly where the
    reference is >= 14x likelier than the policy, the tokens the penalty exists for.
    """
    delta = -log_ratio(logp, ref_logp)  # (B, T): log pi_ref - log pi_theta
    return torch.expm1(delta) - delta  # (B, T): expm1, so a small delta cannot round below 0 (exp(d) - 1 can)


def _seq_mean_token_mean(x: Tensor, mask: Tensor, n_rows: int | None = None) -> Tensor:
    """mean_i [ (1/|m_i|) sum_{t in m_i} x_{i,t} ] over the rows i with |m_i| > 0.

    A row with an empty mask gets weight 0 (no 0/0 NaN); with no non-empty row at all the result
    is a 0 that still belongs to x's graph, so `.backward()` works. `n_rows`, when given, replaces
    the count of non-empty rows: the count over the whole batch when this is one slice of it.
    """
    n_tok = mask.sum(dim=1)  # (B,)
    row_mean = torch.where(mask, x, 0.0).sum(dim=1) / n_tok.clamp(min=1)  # (B,)
    if n_rows is None:
        n_rows = (n_tok > 0).sum()
    return row_mean.sum() / max(int(n_rows), 1)  # empty rows contribute 0 to the sum and 0 to the count


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
              mask: Tensor, functional_mask: Tensor, *, clip_eps: float, kl_coef: float,
              anchor_coef: float, num_outputs: int | None = None,
              num_anchor_outputs: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """L_LA-GRPO = L_GRPO + lambda * L_anchor   (lambda = anchor_coef; lambda = 0 is plain GRPO).

    L_GRPO   = mean_i [ (1/|o_i|) sum_{t in o_i} (l_{i,t} + beta * D_{i,t}) ]   (beta = kl_coef)
    L_anchor = mean_{i in I_F} [ (1/|F_i|) sum_{t in F_i} l_{i,t} ]          (0 when I_F is empty)

    "mean_i" runs over the rows of this batch whose mask is non-empty (an empty row has weight 0).
    When the batch is one slice of a larger one (micro-batches, ranks), pass the whole batch's
    counts as `num_outputs` (non-empty rows) and `num_anchor_outputs` (|I_F|): the slices' losses
    then add up to the whole batch's loss.
    `ref_logp` may be None only when kl_coef == 0. Returns the scalar loss and python-float stats:
    clip_frac (share of generated tokens where the clipped branch changed the value), kl (token
    mean of D), pg_loss (the l part of L_GRPO), anchor (L_anchor), functional_token_share
    (functional / generated positions), ratio_mean (token mean of r), loss.
    """
    mask = mask.bool()
    fmask = functional_mask.bool() & mask  # (B, T)
    ell = clipped_surrogate(logp, old_logp, advantages, clip_eps)  # (B, T)

    if ref_logp is None and kl_coef != 0:
        raise ValueError("ref_logp is None but kl_coef != 0: the KL term needs the reference log-probs")
    D = None if ref_logp is None else kl_k3(logp, ref_logp)  # (B, T)
    per_token = ell if (D is None or kl_coef == 0) else ell + kl_coef * D  # (B, T)

    L_grpo = _seq_mean_token_mean(per_token, mask, num_outputs)
    L_anchor = _seq_mean_token_mean(ell, fmask, num_anchor_outputs)
    loss = L_grpo + anchor_coef * L_anchor

    with torch.no_grad():
        n_gen = max(int(mask.sum()), 1)
        r = torch.exp(log_ratio(logp, old_logp))  # (B, T)
        A = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1)
        clipped = ((A > 0) & (r > 1 + clip_eps)) | ((A < 0) & (r < 1 - clip_eps))  # (B, T)
        stats = {
            "loss": float(loss),
            "pg_loss": float(_seq_mean_token_mean(ell, mask)),
            "anchor": float(L_anchor),
            "kl": 0.0 if D is None else float(torch.where(mask, D, 0.0).sum()) / n_gen,
            "clip_frac": float((clipped & mask).sum()) / n_gen,
            "ratio_mean": float(torch.where(mask, r, 0.0).sum()) / n_gen,
            "functional_token_share": float(fmask.sum()) / n_gen,
        }
    return loss, stats


def functional_grad_share(*args, **kwargs) -> float:
    """`functional_grad_mass`'s share: sum_{t in F} |g_t| / sum_t |g_t| (0.0 if sum |g| is 0)."""
    functional, total = functional_grad_mass(*args, **kwargs)
    return functional / total if total > 0 else 0.0


def functional_grad_mass(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
                         mask: Tensor, functional_mask: Tensor, *, clip_eps: float, kl_coef: float,
                         anchor_coef: float, num_outputs: int | None = None,
                         num_anchor_outputs: int | None = None) -> tuple[float, float]:
    """Gradient-dilution diagnostic (docs/method.md, "LA-GRPO"): (sum_{t in F} |g_t|, sum_t |g_t|), g = dloss/dlogp.

    The share of the policy-gradient "mass" that reaches functional-token positions. With
    anchor_coef = 0 and ratios near 1, every token of output i gets |g| = |A_i| / (B |o_i|), so the
    share is roughly the functional token share (2.4% in the paper); the anchor adds
    lambda |A_i| / (|I_F| |F_i|) at functional positions only and lifts it. Computed on a detached
    copy of `logp`, so the model's graph and .grad are never touched. `num_outputs` / `num_anchor_outputs` as in
    `grpo_loss` (the counts of the whole batch): then the slices' masses add up to the whole batch's.
    """
    x = logp.detach().clone().requires_grad_(True)  # (B, T)
    ref = None if ref_logp is None else ref_logp.detach()
    loss, _ = grpo_loss(x, old_logp.detach(), ref, advantages.detach(), mask, functional_mask,
                        clip_eps=clip_eps, kl_coef=kl_coef, anchor_coef=anchor_coef,
                        num_outputs=num_outputs, num_anchor_outputs=num_anchor_outputs)
    (g,) = torch.autograd.grad(loss, x)  # (B, T)
    fmask = functional_mask.bool() & mask.bool()
    return float(g.abs()[fmask].sum()), float(g.abs().sum())
