"""tinyllm's tuning after supervised training: preference pairs (DPO, IPO, conservative DPO and
SimPO, --objective dpo) and reinforcement learning from a reward function (GRPO, --objective grpo).

train_tinyllm.py declares the two objectives (OBJECTIVES "dpo" and "grpo") and imports this module
when a run asks for one. Both reuse what the card has: the training step, LoRA, chat templates
(through tinyllm_data.py) and batched sampling with the KV cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import math
import numbers
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinyllm_data import ROLES, content_text, plain_content, render_chat
from train_tinyllm import (
    GPT,
    GREEDY_BELOW,
    OBJECTIVES,
    PRETRAINED,
    Config,
    Dist,
    Run,
    SampleSettings,
    TextTokenizer,
    TinyLLMError,
    autocast,
    chat_template_of,
    check_known_chars,
    check_same_data,
    first_line,
    generate,
    is_val_document,
    print0,
    require,
    resolve_data_path,
    sha256_hex,
)

# ----------------------------------------------------------------------------------------------
# Records: JSON Lines (or Parquet) files, each record with its line number
# ----------------------------------------------------------------------------------------------


def records_of(spec: str, flag: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of the files `spec` names (as --data_path takes them), where
    being its file and line (or Parquet row); a line that is not a JSON object is a TinyLLMError
    naming the file and the line."""
    for path in resolve_data_path(spec, flag):
        if path.suffix == ".parquet":
            table = require("pyarrow.parquet", f"reading {path.name}", "pyarrow").read_table(path)
            for i, record in enumerate(table.to_pylist(), 1):
                yield f"{path.name} row {i}", record
            continue
        if path.suffix not in (".jsonl", ".json"):
            raise TinyLLMError(
                f"{flag} {path}: --objective reads records from JSON Lines (.jsonl, .json) or Parquet, "
                f"not {path.suffix or 'a file without a suffix'}"
            )
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TinyLLMError(
                        f"{flag} {path.name} line {i} is not JSON ({e.msg}); fix or remove it"
                    ) from None
                if not isinstance(record, dict):
                    raise TinyLLMError(
                        f"{flag} {path.name} line {i} is not a JSON object; each line holds one record"
                    ) from None
                yield f"{path.name} line {i}", record


def split_records(cfg: Config) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Train and val records: --val_data's, else --val_fraction of --data_path's chosen by a hash of
    each record (at least one each way)."""
    train = list(records_of(cfg.data_path, "--data_path"))
    val = list(records_of(cfg.val_data, "--val_data")) if cfg.val_data else []
    if not train or (cfg.val_data and not val):
        flag, spec = ("--val_data", cfg.val_data) if train else ("--data_path", cfg.data_path)
        raise TinyLLMError(f"{flag} {spec} holds no records")
    if val:
        return {"train": train, "val": val}
    if len(train) < 2:
        raise TinyLLMError(f"--data_path {cfg.data_path} holds one record; give at least two (or --val_data)")
    held = [is_val_document(json.dumps(r, sort_keys=True), cfg.val_fraction) for _, r in train]
    if not any(held):
        held[-1] = True
    if all(held):
        held[0] = False
    return {"train": [r for r, h in zip(train, held) if not h], "val": [r for r, h in zip(train, held) if h]}


def checked_data(cfg: Config, ckpt: dict[str, Any] | None, splits: dict[str, Any]) -> str:
    """The hash of both splits' content, which a resume checks against its checkpoint's."""
    data = sha256_hex(splits["train"].sha256, splits["val"].sha256)
    if ckpt:
        check_same_data(cfg, ckpt, data)
    return data


def messages_of(value: Any, where: str) -> list[dict[str, str]]:
    """A list of {"role", "content"} messages (OpenAI's layout; ShareGPT's from/value too), or a
    TinyLLMError saying what is wrong with it."""
    if not isinstance(value, list) or not value:
        raise TinyLLMError(f"{where} is not a list of messages")
    out = []
    for m in value:
        role = m.get("role", m.get("from")) if isinstance(m, dict) else None
        text = m.get("content", m.get("value")) if isinstance(m, dict) else None
        try:
            text = content_text(text)
        except ValueError as e:
            raise TinyLLMError(f"{where}: {e}") from None
        if role not in ROLES or not isinstance(text, str):
            raise TinyLLMError(f"{where}: a message without a known role (system, user, assistant) and text")
        out.append({"role": ROLES[role], "content": plain_content(text)})
    return out


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def hh_messages(text: str) -> list[dict[str, str]]:
    """Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as messages (a chat model reads
    them through its template)."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[parts[i]], "content": parts[i + 1].strip()}
        for i in range(1, len(parts) - 1, 2)
        if parts[i + 1].strip() or roles[parts[i]] == "user"
    ]


def common_prefix(a: list[Any], b: list[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cut_to_context(
    prompt: list[int], replies: list[list[int]], context: int
) -> tuple[list[int], list[list[int]], bool]:
    """Prompt and replies cut to fit `context` tokens together: the prompt from its start (at least
    one token kept, which the first reply token is predicted from), then a reply too long even so
    from its end. Returns them and whether anything was cut."""
    longest = max(len(r) for r in replies)
    if len(prompt) + longest <= context:
        return prompt, replies, False
    keep = max(1, context - longest) if prompt else 0
    prompt = prompt[len(prompt) - keep :]
    return prompt, [r[: context - len(prompt)] for r in replies], True


# ----------------------------------------------------------------------------------------------
# Preference pairs (--objective dpo): layouts, tokens, batches
# ----------------------------------------------------------------------------------------------


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class PairSplit:
    """One split of preference pairs, tokenized: what a run's splits hold for --objective dpo."""

    pairs: list[Pair]
    start_ids: list[int]
    sha256: str
    cut: int = 0  # pairs cut to fit the context
    cut_responses: int = 0  # of which a response, too, was cut at its end

    def __len__(self) -> int:
        return len(self.pairs)


def pair_texts(record: dict[str, Any], where: str, chat: bool) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a record in any of the layouts people have: strings with a
    prompt (TRL's standard layout); message lists with a prompt list (TRL's conversational one);
    message lists alone, whose shared leading turns are the prompt (UltraFeedback binarized, which
    also has a string prompt, the same as its first user turn); strings alone, the prompt ending at
    the last "\\n\\nAssistant:" they share (Anthropic HH). Strings are messages for a chat model."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise TinyLLMError(
                f"{where} has no {key!r}: a preference pair needs a chosen and a rejected "
                f"response (and a prompt, or one inside them)"
            )
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = (
            messages_of(chosen, f"{where} 'chosen'"),
            messages_of(rejected, f"{where} 'rejected'"),
        )
        if isinstance(prompt, list):
            return messages_of(prompt, f"{where} 'prompt'"), chosen, rejected
        n = common_prefix(chosen, rejected)
        while n and chosen[n - 1]["role"] != "user":
            n -= 1
        if n == 0 and isinstance(prompt, str):  # a string prompt before responses given as messages
            return [{"role": "user", "content": prompt}], chosen, rejected
        if n == 0 or n == len(chosen) or n == len(rejected):
            raise TinyLLMError(
                f"{where}: 'chosen' and 'rejected' share no prompt turns ending with the user's; "
                f"give a 'prompt' list, or messages that start with the same user turn"
            )
        return chosen[:n], chosen[n:], rejected[n:]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise TinyLLMError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    if prompt is None:  # Anthropic HH: the prompt is the dialogue up to the last assistant turn they share
        n = common_prefix(chosen, rejected)
        cut = chosen.rfind("\n\nAssistant:", 0, n)
        if cut < 0:
            raise TinyLLMError(
                f"{where} has no 'prompt', and 'chosen' and 'rejected' share no "
                f"'\\n\\nAssistant:' turn to take it from; add a 'prompt' field"
            )
        cut += len("\n\nAssistant:")
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        if chat:
            return (
                hh_messages(prompt),
                [{"role": "assistant", "content": chosen.strip()}],
                [{"role": "assistant", "content": rejected.strip()}],
            )
        return prompt, chosen, rejected
    if not isinstance(prompt, str):
        raise TinyLLMError(f"{where}: 'prompt' must be a string or a message list")
    if chat:
        return (
            [{"role": "user", "content": prompt}],
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
    return prompt, chosen, rejected


def pair_ids(
    tok: TextTokenizer, template: str, prompt: Any, chosen: Any, rejected: Any, where: str
) -> tuple[list[int], list[int], list[int]]:
    """Token ids as TRL's DPOTrainer makes them: the prompt, prompt + chosen and prompt + rejected
    tokenized whole (text ends with end-of-text; messages rendered through the chat template, the
    prompt with its generation prompt), each response starting where its tokens leave the prompt's."""
    if isinstance(prompt, list):
        if not all(any(m["content"].strip() for m in r) for r in (chosen, rejected)):
            raise TinyLLMError(f"{where}: a response is empty; give each pair two non-empty responses")
        if not template:
            raise TinyLLMError(
                f"{where} holds messages, but this model has no chat template; train or start "
                f"from a chat model, or give the pairs as strings"
            )
        try:
            texts = [
                render_chat(template, prompt, generation_prompt=True),
                render_chat(template, prompt + chosen),
                render_chat(template, prompt + rejected),
            ]
        except ValueError as e:
            raise TinyLLMError(f"{where}: {e}") from None
    else:
        if tok.eot is None:
            raise TinyLLMError("this tokenizer has no end-of-text token to end a response with")
        if not chosen.strip() or not rejected.strip():
            raise TinyLLMError(f"{where}: a response is empty; give each pair two non-empty responses")
        texts = [
            prompt,
            prompt + chosen + (tok.eot if not chosen.endswith(tok.eot) else ""),
            prompt + rejected + (tok.eot if not rejected.endswith(tok.eot) else ""),
        ]
    for text in texts:
        check_known_chars(tok, text, where)
    p, pc, pr = (tok.encode(t) for t in texts)
    if pc == pr:
        raise TinyLLMError(f"{where}: 'chosen' and 'rejected' are the same, a pair that prefers nothing; "
                           f"fix or remove it")
    n = min(common_prefix(p, pc), common_prefix(p, pr))
    if n == len(pc) or n == len(pr):
        raise TinyLLMError(f"{where}: a response is empty; give each pair two non-empty responses")
    # an empty prompt: the responses follow what an empty prompt starts from (end-of-text), so that
    # their first token is predicted too
    start = tok.start_ids() if n == 0 else []
    return start + p[:n], pc[n:], pr[n:]


def pair_inputs(
    cfg: Config, ckpt: dict[str, Any] | None, dist: Dist, tokenizer: str | None
) -> tuple[TextTokenizer, dict[str, PairSplit], str]:
    """Objective.inputs of dpo: the tokenizer of the model being tuned, and its pairs."""
    tok = TextTokenizer.from_str(ckpt["tokenizer"] if ckpt else tokenizer)
    template = chat_template_of(cfg, tok)  # "" for a model that is no chat model
    splits = {}
    for name, records in split_records(cfg).items():
        pairs, cut, cut_responses, h = [], 0, 0, hashlib.sha256()
        for where, record in records:
            prompt, chosen, rejected = pair_ids(
                tok, template, *pair_texts(record, where, bool(template)), where
            )
            longest = max(len(chosen), len(rejected))
            prompt, (chosen, rejected), was_cut = cut_to_context(prompt, [chosen, rejected], cfg.block_size)
            cut += was_cut
            cut_responses += longest > max(len(chosen), len(rejected))
            pairs.append(Pair(prompt, chosen, rejected))
            h.update(json.dumps([prompt, chosen, rejected]).encode())
        splits[name] = PairSplit(pairs, tok.start_ids(), h.hexdigest(), cut, cut_responses)
    cut, cut_responses = sum(s.cut for s in splits.values()), sum(s.cut_responses for s in splits.values())
    print0(
        f"data: {len(splits['train']):,} train and {len(splits['val']):,} val preference pairs"
        f"{' (rendered through the chat template)' if template else ''}"
        + (
            f"; {cut:,} longer than the context ({cfg.block_size} tokens) had their prompts cut from the "
            f"start" + (f" ({cut_responses:,} also a response at its end)" if cut_responses else "")
            if cut
            else ""
        )
    )
    return tok, splits, checked_data(cfg, ckpt, splits)


def padded_length(longest: int, context: int) -> int:
    """Rows are padded to a power of two (at least 16, at most the context), so that a compiled
    model (--compile, static shapes) sees a few shapes, not one per batch."""
    return min(context, max(16, 1 << (longest - 1).bit_length()))


def pair_batch(pairs: list[Pair], context: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows prompt + chosen for every pair, then prompt + rejected (2B, T), padded at their ends,
    and a mask of the response tokens."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    return padded_rows(rows, starts, context, device)


def padded_rows(
    rows: list[list[int]], starts: list[int], context: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded with 0 at their ends, and the (B, T) mask of each row's tokens from its
    start on (what the loss counts)."""
    T = padded_length(max(map(len, rows)), context)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, start : len(row)] = 1
    return ids.to(device), mask.to(device)


def token_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) log-probabilities of ids[:, 1:] under the model, zero where mask[:, 1:] is 0."""
    logits = model(ids)[0][:, :-1].float()  # (B, T - 1, V)
    picked = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask[:, 1:]


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The model with its LoRA adapters switched off (each adapted layer's scale at 0): the base
    model it started from, with no second copy held."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def reference_logps(run: Run, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) log-probabilities under the reference: the frozen copy, or with LoRA the model with
    its adapters off; in eval mode either way (dropout would make the reference drift)."""
    with torch.no_grad():
        if run.reference is not None:
            return token_logps(run.reference, ids, mask)
        was_training = run.model.training
        run.model.eval()
        try:
            with adapters_off(run.model):
                return token_logps(run.model, ids, mask)
        finally:
            run.model.train(was_training)


def preference_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    cfg: Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of --dpo_loss from the responses' summed log-probabilities (B,), and the
    implicit rewards of chosen and rejected (as TRL logs them). sigmoid: DPO, with label smoothing
    conservative DPO; ipo: the squared distance of the per-token log-ratio margin from 1 / (2 beta);
    simpo: the per-token log-probability margin less gamma / beta, through the sigmoid, no reference."""
    beta, smooth = cfg.dpo_beta, cfg.dpo_label_smoothing
    if cfg.dpo_loss == "simpo":
        chosen_score, rejected_score = chosen / chosen_len, rejected / rejected_len
        margin = chosen_score - rejected_score - cfg.simpo_gamma / beta
    else:
        chosen_score, rejected_score = chosen - ref_chosen, rejected - ref_rejected
        margin = chosen_score - rejected_score
    if cfg.dpo_loss == "ipo":
        losses = ((chosen_score / chosen_len - rejected_score / rejected_len) - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - smooth) * F.logsigmoid(beta * margin) - smooth * F.logsigmoid(-beta * margin)
    return losses, beta * chosen_score.detach(), beta * rejected_score.detach()


def pair_figures(
    run: Run, model: torch.nn.Module, pairs: list[Pair], split: str, index: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean --dpo_loss of these pairs through `model` (its graph kept) and TRL's figures:
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies. `index` gives the
    pairs' rows in the precomputed reference table of `split`."""
    cfg = run.cfg
    ids, mask = pair_batch(pairs, cfg.block_size, run.device)
    logps = token_logps(model, ids, mask).sum(-1)  # (2B,)
    lengths = mask[:, 1:].sum(-1).clamp(min=1)
    ref = None
    if cfg.dpo_loss != "simpo":
        ref = (
            run.kept["ref_logps"][split][index].to(run.device).T.flatten()
            if index is not None
            else reference_logps(run, ids, mask).sum(-1)
        )
    B = len(pairs)
    losses, chosen, rejected = preference_losses(
        logps[:B],
        logps[B:],
        *(ref.split(B) if ref is not None else (None, None)),
        lengths[:B],
        lengths[B:],
        cfg,
    )
    return losses.mean(), {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def picks(run: Run, count: int, size: int) -> list[int]:
    """Random indices for this rank's share of a global batch of `size` per rank (as get_batch
    draws windows: every rank draws the whole batch, each keeps its slice)."""
    drawn = torch.randint(count, (run.dist.world_size * size,), generator=run.batch_gen)
    return drawn[run.dist.rank * size : (run.dist.rank + 1) * size].tolist()


def pair_loss(run: Run, batch: int, context: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective.loss of dpo: --batch_size random pairs of the train split."""
    chosen = picks(run, len(run.splits["train"]), batch)
    pairs = [run.splits["train"].pairs[i] for i in chosen]
    index = torch.tensor(chosen) if "ref_logps" in run.kept else None
    return pair_figures(run, run.train_model, pairs, "train", index)


def pair_evaluation(
    run: Run, model: GPT, splits: tuple[str, ...] = ("train", "val")
) -> tuple[float, dict[str, float], str]:
    """Objective.evaluate of dpo: the loss and rewards of the first eval_iters x batch_size pairs of
    each split, in order (the same pairs every time)."""
    cfg, record = run.cfg, {}
    was_training = model.training
    model.eval()
    for name in splits:
        pairs = run.splits[name].pairs[: cfg.eval_iters * cfg.batch_size]
        sums: dict[str, float] = {}
        with torch.no_grad(), autocast(run.device, run.dtype):
            for i in range(0, len(pairs), cfg.batch_size):
                chunk = pairs[i : i + cfg.batch_size]
                index = torch.arange(i, i + len(chunk)) if "ref_logps" in run.kept else None
                loss, figures = pair_figures(run, model, chunk, name, index)
                for key, value in {"loss": loss, **figures}.items():
                    sums[key] = sums.get(key, 0.0) + value.item() * len(chunk)
        record |= {f"{name}_{key}": value / len(pairs) for key, value in sums.items()}
    model.train(was_training)
    text = " | ".join(f"{name} loss {record[f'{name}_loss']:.4f}" for name in splits)
    if "val_rewards/accuracies" in record:
        text += (
            f" | val rewards/accuracies {100 * record['val_rewards/accuracies']:.1f}% | val "
            f"rewards/margins {record['val_rewards/margins']:.3f}"
        )
    return record["val_loss"], record, text


def pair_prepare(run: Run, source: Any) -> None:
    """Objective.prepare of dpo: the reference, and the precomputed table of its log-probabilities."""
    cfg = run.cfg
    print0(
        f"dpo: --dpo_loss {cfg.dpo_loss}, beta {cfg.dpo_beta:g}"
        + (f", label smoothing {cfg.dpo_label_smoothing:g}" if cfg.dpo_label_smoothing else "")
        + (f", gamma {cfg.simpo_gamma:g}" if cfg.dpo_loss == "simpo" else "")
    )
    if not cfg.dpo_precompute_ref:  # a table a resume brings is not this run's reference any more
        run.kept.pop("ref_logps", None), run.kept.pop("ref_logps_data", None)
    if cfg.dpo_loss == "simpo":
        print0("reference: none (SimPO scores each response by its own log-probabilities per token)")
        return
    fresh = run.state.step == 0
    if cfg.dpo_precompute_ref:
        if "ref_logps" in run.kept:
            if run.kept.get("ref_logps_data") != run.data_sha256:  # --allow_data_change: other pairs
                raise TinyLLMError(
                    "the pairs changed since the reference's log-probabilities were computed, and they "
                    "were computed from the starting weights, which this run no longer holds; train "
                    "in a new --out_dir from --init_from"
                )
            return print0(
                "reference: log-probabilities of every pair, computed before the first step "
                "(from the checkpoint)"
            )
        if not fresh:
            raise TinyLLMError(
                "this run was started without --dpo_precompute_ref, so its reference's "
                "log-probabilities were never computed; resume without the flag"
            )
        return precompute_reference(run)
    keep_reference(run, source, fresh)


def keep_reference(run: Run, source: Any, fresh: bool) -> None:
    """The reference beside the tuned model: with LoRA the same model, adapters off; else a frozen
    copy of the starting weights (the model itself at step 0, the --init_from source on a resume)."""
    if run.cfg.lora_rank:
        return print0("reference: the model with its LoRA adapters switched off (no copy held)")
    if fresh:
        run.reference = copy.deepcopy(run.model)
    else:
        run.reference = PRETRAINED[""].model(run.cfg, source, run.device, run.model.vocab_size)
    run.reference.requires_grad_(False).eval()
    size = sum(p.numel() * p.element_size() for p in run.reference.parameters())
    print0(
        f"reference: a frozen copy of the starting weights ({size / 2**20:,.1f} MB; --lora_rank or "
        f"--dpo_precompute_ref hold none)"
    )


def precompute_reference(run: Run) -> None:
    """The reference's summed log-probabilities of chosen and rejected for every pair of both
    splits, at the starting weights, kept in run.kept (and so in every checkpoint)."""
    cfg, started = run.cfg, time.time()
    total = sum(len(s) for s in run.splits.values())
    print0(f"reference: computing the log-probabilities of {total:,} pairs once, before the first step...")
    table = {}
    run.model.eval()
    with torch.no_grad(), autocast(run.device, run.dtype):
        for name, split in run.splits.items():
            rows = []
            for i in range(0, len(split), cfg.batch_size):
                chunk = split.pairs[i : i + cfg.batch_size]
                ids, mask = pair_batch(chunk, cfg.block_size, run.device)
                rows.append(token_logps(run.model, ids, mask).sum(-1).view(2, -1).T.float().cpu())  # (B, 2)
            table[name] = torch.cat(rows)
    run.model.train()
    run.kept["ref_logps"], run.kept["ref_logps_data"] = table, run.data_sha256
    print0(f"reference: done in {time.time() - started:.1f}s; kept in the checkpoints")


def pair_checks(cfg: Config) -> list[tuple[bool, str]]:
    return [
        (cfg.dpo_beta <= 0, f"--dpo_beta must be positive, got {cfg.dpo_beta}"),
        (
            not 0 <= cfg.dpo_label_smoothing < 0.5,
            f"--dpo_label_smoothing must be in [0, 0.5), got {cfg.dpo_label_smoothing}",
        ),
        (
            cfg.dpo_loss == "ipo" and cfg.dpo_label_smoothing > 0,
            "--dpo_label_smoothing is for the sigmoid and simpo losses; IPO has none: drop it",
        ),
        (
            cfg.dpo_loss != "simpo" and cfg.simpo_gamma != Config.simpo_gamma,
            "--simpo_gamma is SimPO's margin; add --dpo_loss simpo or drop it",
        ),
        (
            cfg.dpo_loss == "simpo" and cfg.dpo_precompute_ref,
            "--dpo_precompute_ref: SimPO has no reference model; drop the flag",
        ),
    ]


OBJECTIVES.implement(
    "dpo",
    inputs=pair_inputs,
    prepare=pair_prepare,
    loss=pair_loss,
    evaluate=pair_evaluation,
    checks=pair_checks,
    unit="preference pairs",
    plot=("DPO loss (--dpo_loss)", ("loss", "val_loss", "ema_val_loss")),
    shown=("rewards/accuracies", "rewards/margins"),
    reference=lambda cfg: cfg.dpo_loss != "simpo" and not cfg.dpo_precompute_ref and not cfg.lora_rank,
)


# ----------------------------------------------------------------------------------------------
# GRPO (--objective grpo): prompts, a reward function, groups of sampled completions
# ----------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    text: str  # as the reward function gets it
    record: dict[str, Any]
    where: str  # file and line, for messages about it


@dataclass
class PromptSplit:
    """One split of GRPO's prompts, tokenized, and the reward function that scores completions."""

    prompts: list[Prompt]
    start_ids: list[int]
    sha256: str
    reward: Callable[..., Any]
    cut: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def load_reward(spec: str) -> Callable[..., Any]:
    """--reward FILE.py:FUNCTION, imported: a TinyLLMError naming what is wrong (no such file, an
    import that fails, no such function)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise TinyLLMError(f"--reward {spec!r}: give FILE.py:FUNCTION, like rewards.py:score")
    file = Path(path)
    if not file.is_file():
        raise TinyLLMError(f"--reward {spec}: there is no file {path}")
    module_name = f"tinyllm_reward_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    loader = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(loader)
    try:
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
    except BaseException as e:  # the user's own code: anything it raises is its own
        sys.modules.pop(module_name, None)
        raise TinyLLMError(
            f"--reward {spec}: {path} cannot be imported ({type(e).__name__}: {first_line(e)}); fix it"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TinyLLMError(f"--reward {spec}: {path} has no function {name}")
    return fn


def reward_of(fn: Callable[..., Any], prompt: Prompt, completion: str, spec: str) -> float:
    """The reward of one completion: a finite number, or a TinyLLMError naming the record and what
    the function returned (or raised)."""
    try:
        value = fn(prompt.text, completion, prompt.record)
    except (Exception, SystemExit) as e:  # the user's code; Ctrl-C still stops the run
        raise TinyLLMError(
            f"--reward {spec} raised {type(e).__name__} ({first_line(e)}) on the record at "
            f"{prompt.where}; fix the function"
        ) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite(value):
        raise TinyLLMError(
            f"--reward {spec} returned {str(value)[:40]!r} ({type(value).__name__}) for the record "
            f"at {prompt.where}; it must return a finite number"
        )
    return float(value)


def finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def prompt_of(record: dict[str, Any], where: str, template: str) -> tuple[str, str]:
    """(what the model is given, what the reward function is given as the prompt) of a record: its
    "prompt" (a chat model's user turn), or its conversation ending with the user's turn."""
    turns = record.get("messages", record.get("conversations", record.get("prompt")))
    if isinstance(turns, str):
        if not template:
            return turns, turns
        turns = [{"role": "user", "content": turns}]
    elif turns is None:
        raise TinyLLMError(f"{where} has no 'prompt' (or 'messages' whose last turn is the user's)")
    elif not isinstance(turns, list):
        raise TinyLLMError(f"{where}: the prompt is {type(turns).__name__}, not a string or a message list")
    messages = messages_of(turns, where)
    if messages[-1]["role"] != "user":
        raise TinyLLMError(
            f"{where}: the conversation's last turn is the {messages[-1]['role']}'s; a prompt "
            f"ends with the user's turn"
        )
    if not template:
        raise TinyLLMError(
            f"{where} holds messages, but this model has no chat template; train or start from "
            f"a chat model, or give 'prompt' as a string"
        )
    try:
        text = render_chat(template, messages, generation_prompt=True)
    except ValueError as e:
        raise TinyLLMError(f"{where}: {e}") from None
    return text, record["prompt"] if isinstance(record.get("prompt"), str) else messages[-1]["content"]


def prompt_inputs(
    cfg: Config, ckpt: dict[str, Any] | None, dist: Dist, tokenizer: str | None
) -> tuple[TextTokenizer, dict[str, PromptSplit], str]:
    """Objective.inputs of grpo: the tokenizer of the model being tuned, its prompts, and the
    reward function, imported here (before any run directory is touched)."""
    tok = TextTokenizer.from_str(ckpt["tokenizer"] if ckpt else tokenizer)
    template = chat_template_of(cfg, tok)  # "" for a model that is no chat model
    reward = load_reward(cfg.reward)
    room = cfg.block_size - min(cfg.grpo_completion_tokens, cfg.block_size // 2)  # for the prompt
    splits = {}
    for name, records in split_records(cfg).items():
        prompts, cut, h = [], 0, hashlib.sha256()
        for where, record in records:
            text, given = prompt_of(record, where, template)
            check_known_chars(tok, text, where)
            ids = tok.encode(text)
            if not ids:
                raise TinyLLMError(f"{where}: the prompt is empty")
            cut += len(ids) > room
            prompts.append(Prompt(ids[-room:], given, record, where))
            h.update(json.dumps([ids[-room:], record], sort_keys=True, default=str).encode())
        splits[name] = PromptSplit(prompts, tok.start_ids(), h.hexdigest(), reward, cut)
    # the function tried once before the run directory is touched: on the first prompt, an empty completion
    reward_of(reward, splits["train"].prompts[0], "", f"{cfg.reward} (tried on an empty completion first)")
    cut = sum(s.cut for s in splits.values())
    print0(
        f"data: {len(splits['train']):,} train and {len(splits['val']):,} val prompts"
        + (
            f"; {cut:,} longer than {room} tokens (the context less room for a completion) were cut "
            f"from the start"
            if cut
            else ""
        )
    )
    return tok, splits, checked_data(cfg, ckpt, splits)


@dataclass
class Rollout:
    """A sampled batch: rows prompt + completion (B, T), the completion mask, each row's advantage,
    the sampling policy's log-probabilities (set at its first step) and the reference's."""

    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor  # (B,)
    figures: dict[str, torch.Tensor]
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def completion_end(ids: list[int], stops: set[int]) -> int:
    """How many tokens a completion has: up to and including its first stop token."""
    return next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))


def sample_group(
    run: Run, model: GPT, prompt: Prompt, group: int, generator: torch.Generator | None = None
) -> tuple[list[list[int]], list[str], list[float]]:
    """`group` completions of one prompt, sampled as one batch with the KV cache (never a compiled
    step: the weights change); their tokens (each to its stop token), texts (without it) and
    rewards."""
    cfg, tok, split = run.cfg, run.tok, run.splits["train"]
    settings = SampleSettings.from_config(
        cfg, min(cfg.grpo_completion_tokens, cfg.block_size - len(prompt.ids))
    )
    settings.kv_cache, settings.compiled, settings.store = True, False, None
    idx = torch.tensor([prompt.ids] * group, device=run.device)
    with torch.no_grad():
        out = generate(model, idx, settings, generator, stop_ids=tok.end_ids)[:, len(prompt.ids) :].tolist()
    stops = set(tok.end_ids)
    completions = [row[: completion_end(row, stops)] for row in out]
    texts = [tok.decode([t for t in row if t not in stops]) for row in completions]
    return completions, texts, [reward_of(split.reward, prompt, text, cfg.reward) for text in texts]


def new_rollout(run: Run, batch: int) -> Rollout:
    """--batch_size / --grpo_group random train prompts, a group of completions each, rewarded;
    advantages are each reward less its group's mean, over its group's standard deviation."""
    cfg, split = run.cfg, run.splits["train"]
    rows, starts, rewards, advantages, spreads = [], [], [], [], []
    for i in picks(run, len(split), batch // cfg.grpo_group):
        prompt = split.prompts[i]
        completions, _, group_rewards = sample_group(run, run.model, prompt, cfg.grpo_group)
        r = torch.tensor(group_rewards)
        advantages.append((r - r.mean()) / (r.std() + 1e-4))
        rewards.append(r)
        spreads.append(r.std())
        rows += [prompt.ids + c for c in completions]
        starts += [len(prompt.ids)] * len(completions)
    ids, mask = padded_rows(rows, starts, cfg.block_size, run.device)
    lengths = mask.sum(-1)
    figures = {
        "reward": torch.cat(rewards).mean(),
        "reward_std": torch.stack(spreads).mean(),
        "zero_std_groups": (torch.stack(spreads) == 0).float().mean(),  # no signal: every advantage 0
        "completion_length": lengths.mean(),
    }
    rollout = Rollout(
        ids, mask, torch.cat(advantages).to(run.device), {k: v.to(run.device) for k, v in figures.items()}
    )
    if cfg.grpo_kl:
        rollout.ref = reference_logps(run, ids, mask)
    return rollout


def grpo_loss(run: Run, batch: int, context: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Objective.loss of grpo: the clipped policy-gradient loss over the completion tokens of a
    sampled batch (a new one every --grpo_iters steps), per completion averaged over its tokens,
    then over completions; plus --grpo_kl times the k3 estimate of the KL to the reference."""
    cfg = run.cfg
    rollouts = run.scratch.setdefault("rollouts", {})
    if run.state.step % cfg.grpo_iters == 0 or micro not in rollouts:
        rollouts[micro] = new_rollout(run, batch)
    r = rollouts[micro]
    logps = token_logps(run.train_model, r.ids, r.mask)  # (B, T - 1)
    if r.old is None:  # the policy that sampled is the one stepping now: the ratio is exactly 1
        r.old = logps.detach()
    mask = r.mask[:, 1:]
    ratio = torch.exp(logps - r.old)
    adv = r.advantages[:, None]
    clipped = ratio.clamp(1 - cfg.grpo_clip, 1 + cfg.grpo_clip)
    per_token = -torch.min(ratio * adv, clipped * adv)
    figures = dict(r.figures)
    if cfg.grpo_kl:
        gap = r.ref - logps
        kl = torch.exp(gap) - gap - 1
        per_token = per_token + cfg.grpo_kl * kl
        figures["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    was_clipped = ((ratio < 1 - cfg.grpo_clip) & (adv < 0)) | ((ratio > 1 + cfg.grpo_clip) & (adv > 0))
    figures["clip_ratio"] = ((was_clipped.float() * mask).sum() / mask.sum().clamp(min=1)).detach()
    return loss, figures


def grpo_evaluation(
    run: Run, model: GPT, splits: tuple[str, ...] = ("val",)
) -> tuple[float, dict[str, float], str]:
    """Objective.evaluate of grpo: the mean reward of one completion per val prompt (the first
    eval_iters x batch_size / grpo_group), sampled as training samples, from a fixed seed."""
    cfg, split = run.cfg, run.splits["val"]
    prompts = split.prompts[: cfg.eval_iters * max(1, cfg.batch_size // cfg.grpo_group)]
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed + 1)
    rewards, lengths = [], []
    with autocast(run.device, run.dtype):
        for prompt in prompts:
            completions, _, r = sample_group(run, model, prompt, 1, generator)
            rewards += r
            lengths.append(len(completions[0]))
    record = {"val_reward": sum(rewards) / len(rewards), "val_completion_length": sum(lengths) / len(lengths)}
    return (
        -record["val_reward"],
        record,
        (
            f"val reward {record['val_reward']:.4f} | val completion length "
            f"{record['val_completion_length']:.1f}"
        ),
    )


def grpo_prepare(run: Run, source: Any) -> None:
    cfg = run.cfg
    iters = (
        "the ratio is 1 at every step, so the clip does nothing"
        if cfg.grpo_iters == 1
        else f"{cfg.grpo_iters} steps per sampled batch, the ratio clipped to 1 +- {cfg.grpo_clip:g}"
    )
    shortest = min(len(p.ids) for p in run.splits["train"].prompts)
    most = min(cfg.grpo_completion_tokens, cfg.block_size - shortest)  # what the context leaves
    short = " (the context leaves no more)" if most < cfg.grpo_completion_tokens else ""
    print0(
        f"grpo: {cfg.batch_size // cfg.grpo_group} prompt(s) x {cfg.grpo_group} completions per micro-batch, "
        f"up to {most} tokens each{short} at temperature {cfg.temperature:g}; reward {cfg.reward}; {iters}"
    )
    if cfg.grpo_kl:
        keep_reference(run, source, run.state.step == 0)
    else:
        print0("reference: none (--grpo_kl 0)")


def grpo_checks(cfg: Config) -> list[tuple[bool, str]]:
    return [
        (
            not cfg.reward,
            "--objective grpo needs --reward FILE.py:FUNCTION, the function that scores each completion",
        ),
        (
            cfg.grpo_group < 2,
            f"--grpo_group must be at least 2 (advantages compare completions of one "
            f"prompt), got {cfg.grpo_group}",
        ),
        (
            cfg.batch_size % max(1, cfg.grpo_group) != 0,
            f"--batch_size {cfg.batch_size} counts completions and must be a multiple of --grpo_group "
            f"{cfg.grpo_group}",
        ),
        (cfg.grpo_completion_tokens < 1, "--grpo_completion_tokens must be at least 1"),
        (cfg.grpo_clip <= 0, f"--grpo_clip must be positive, got {cfg.grpo_clip}"),
        (cfg.grpo_iters < 1, "--grpo_iters must be at least 1"),
        (cfg.grpo_kl < 0, "--grpo_kl must be 0 (off) or positive"),
        (
            cfg.temperature < GREEDY_BELOW,
            "--objective grpo compares completions sampled for one prompt; at --temperature 0 they are all "
            "the same: give a temperature like 1",
        ),
    ]


OBJECTIVES.implement(
    "grpo",
    inputs=prompt_inputs,
    prepare=grpo_prepare,
    loss=grpo_loss,
    evaluate=grpo_evaluation,
    checks=grpo_checks,
    unit="completions",
    plot=("reward", ("reward", "val_reward", "ema_val_reward")),
    shown=("reward", "completion_length", "clip_ratio"),
    best=lambda score: f"val reward {-score:.4f}",
    reference=lambda cfg: cfg.grpo_kl > 0 and not cfg.lora_rank,
)
