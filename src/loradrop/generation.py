"""Generation from a test-time ensemble: the members' next-token probabilities averaged at every step, one token
chosen and fed to every member, all members sharing one batched KV cache; per-token and per-sequence uncertainty.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from .ensemble import _accepts, _check_n, _model_device, _uncertainty, eval_mode
from .members import split_members
from .model import get_active_controller
from .uncertainty import SEQUENCE_SCORES, GenerationOutput, sequence_scores


def _check_sampling(temperature: Any, top_p: Any) -> None:
    """One ValueError naming the value (a NaN temperature made every probability NaN, and token 0 was picked)."""
    real = [isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (temperature, top_p)]
    if not real[0] or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not real[1] or not 0 < top_p <= 1:  # NaN fails the comparison
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


@torch.no_grad()
def ensemble_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    n: int,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    abstain_threshold: float | None = None,
    abstain_score: str = "mutual_information",
) -> GenerationOutput:
    """Generate from the ensemble: at every step average the n members' next-token probabilities, choose one token
    (greedy or sampled) and feed it to every member. All members share one batched KV cache (n * B rows).

    Prompts may be left-padded (pass `attention_mask`). Finished rows (after `eos_token_id`; None reads it from the
    model's generation config, ``[]`` never stops early) are padded with `pad_token_id`. Every sequence gets a score,
    `abstain_score` ("mutual_information": mean token MI, or "max_entropy"); with `abstain_threshold` the
    sequences scoring above it are `flagged` (the caller abstains or asks for review; generation is unchanged).
    """
    if abstain_score not in SEQUENCE_SCORES:
        raise ValueError(f"abstain_score must be one of {list(SEQUENCE_SCORES)}, got {abstain_score!r}")
    if abstain_threshold is not None and not (isinstance(abstain_threshold, numbers.Real)
                                              and math.isfinite(abstain_threshold)):
        raise ValueError(f"abstain_threshold must be None or a finite number, got {abstain_threshold!r}")
    _check_n(n, None)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    _check_sampling(temperature, top_p)
    controller = get_active_controller(model, "ensemble_generate")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, seq) tensor of prompt token ids")
    config = getattr(model, "config", None)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long).flatten()
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0
    device = _model_device(model)
    input_ids = input_ids.to(device)
    eos = eos.to(device)
    batch = input_ids.shape[0]
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device).long()
    key = controller.ensemble_key(seed)
    chosen, chosen_p, ents, mis, valid = [], [], [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Only the last position's logits are read: ask the model for just those where it can (saves an
    # (n * B, prompt, vocab) tensor in the prefill).
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with eval_mode(model), controller.ensemble(key, n, 0):
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    **last_only)
        for step in range(max_new_tokens):
            logits = split_members(out.logits[:, -1, :].float(), n)  # (n, B, V)
            member_probs = (logits / temperature).softmax(-1)
            probs, total, expected, mi = _uncertainty(member_probs)
            next_tok = _sample(probs, top_p, generator) if do_sample else probs.argmax(-1)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad_token_id), next_tok)
            valid.append(~finished)
            chosen.append(next_tok)
            chosen_p.append(probs.gather(1, next_tok[:, None]).squeeze(1))
            ents.append(total)
            mis.append(mi)
            if step == max_new_tokens - 1:  # the last token is chosen: no forward for a token never used
                break
            if eos.numel():
                finished = finished | torch.isin(next_tok, eos)
                if bool(finished.all()):  # the only host sync of the loop, and only when there is an eos to see
                    break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(input_ids=next_tok[:, None], attention_mask=mask, position_ids=position_ids,
                        past_key_values=out.past_key_values, use_cache=True)
    new_tokens, token_mask, ents, mis = (torch.stack(x, dim=1) for x in (chosen, valid, ents, mis))
    scores = sequence_scores(ents, mis, token_mask)
    score = scores[abstain_score]
    return GenerationOutput(sequences=torch.cat([input_ids, new_tokens], dim=1), new_tokens=new_tokens,
                            token_probs=torch.stack(chosen_p, 1), entropy=ents, mutual_information=mis, n=n,
                            token_mask=token_mask, sequence_mutual_information=scores["mutual_information"],
                            sequence_max_entropy=scores["max_entropy"], sequence_score=score,
                            flagged=None if abstain_threshold is None else score > abstain_threshold)


def _sample(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        cumulative = sorted_p.cumsum(-1)
        drop = cumulative - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
