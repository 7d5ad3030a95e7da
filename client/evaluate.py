"""Held-out evaluation and generation with (or without) the personal adapter."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from lorafleet.client.adapter import adapter_disabled
from lorafleet.client.data import TokenBlocks
from lorafleet.client.runtime import Precision, autocast_context, resolve_device
from lorafleet.protocols.errors import DataError, SpecError


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    blocks: TokenBlocks,
    *,
    batch_size: int = 8,
    precision: Precision = "fp32",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """Mean next-token cross-entropy over every labelled token in ``blocks``.

    Batches are weighted by their token counts, so the result does not depend on the
    batch size or on how the last block was padded. With ``progress`` a bar appears on
    stderr once the evaluation has taken a second (a short one shows nothing).
    """
    if len(blocks) == 0 or blocks.num_tokens == 0:
        raise DataError("evaluation: no held-out tokens; add more text")
    dev = device if isinstance(device, torch.device) else resolve_device(device or "auto")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        batches: Iterable[TokenBlocks] = blocks.batches(batch_size, shuffle=False)
        if progress:
            total_batches = -(-len(blocks) // batch_size)
            batches = tqdm(batches, total=total_batches, desc="evaluating", unit="batch", delay=1.0)
        for batch in batches:
            n = int((batch.labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            with autocast_context(precision, dev):
                out = model(
                    input_ids=batch.input_ids.to(dev),
                    attention_mask=batch.attention_mask.to(dev),
                    labels=batch.labels.to(dev),
                )
            total += float(out.loss.float()) * n
            count += n
    finally:
        model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    """exp(loss), guarded against overflow for very bad models."""
    return math.exp(min(loss, 80.0))


def check_sampling(*, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Refuse sampling settings that no backend can honour, before a model is loaded."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise SpecError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or not 0 <= temperature < math.inf:
        raise SpecError(f"generate: temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise SpecError(f"generate: top_p must be in (0, 1], got {top_p!r}")


@torch.no_grad()
def prompt_text(tokenizer: Any, prompt: str, *, chat: bool, max_new_tokens: int) -> str:
    """The text a generation starts from, checked; every backend encodes it the same way.

    With ``chat=True`` the prompt is wrapped in the tokenizer's chat template as a user
    turn (which already holds the special tokens, so encode it with
    ``add_special_tokens=not chat``).
    """
    if not prompt:
        raise SpecError("generate: the prompt is empty")
    if max_new_tokens < 1:
        raise SpecError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if chat and getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return prompt


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    use_adapter: bool = True,
    chat: bool = True,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Reply to ``prompt``; greedy unless ``temperature > 0`` (then nucleus ``top_p``).

    With ``chat=True`` the prompt is wrapped in the tokenizer's chat template as a user
    turn, which is how instruction-tuned bases such as SmolLM2-Instruct expect it.
    """
    check_sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    text = prompt_text(tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }
    sampling = temperature > 0
    if sampling:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    run = cast(Any, model).generate  # every causal LM and PeftModel has one
    # Sampling draws from torch's global RNG; seed a forked copy so the caller's stays put.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sampling:
            torch.manual_seed(seed)
        try:
            if use_adapter:
                out = run(**enc, **kwargs)
            else:
                with adapter_disabled(model):
                    out = run(**enc, **kwargs)
        finally:
            model.train(was_training)
    new_tokens = out[0, enc["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()
