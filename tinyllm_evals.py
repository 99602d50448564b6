"""tinyllm's standard benchmarks: multiple-choice and cloze tasks (HellaSwag, ARC, PIQA,
Winogrande, LAMBADA, MMLU, and a plain layout for anything else) read from local files in the
layouts their public datasets have, formatted and scored as lm-evaluation-harness's stock tasks
are: the same prompt text, the same choices, the same log-likelihood rules.

train_tinyllm.py declares what this module implements (TASK_FORMATS, evaluate_tasks for
--eval_tasks) and imports it the first time a task is asked for.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from train_tinyllm import (
    GPT,
    TASK_FORMATS,
    KVCache,
    TextTokenizer,
    TinyLLMError,
    autocast,
    cache_dtype,
    first_line,
    print0,
    require,
    resolve_data_path,
)

# ----------------------------------------------------------------------------------------------
# Items: what one record of a task asks, as text (lm-evaluation-harness's doc_to_text,
# doc_to_choice, doc_to_target)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One question: the log-likelihood of each continuation after its context (one shared
    context, or one per choice as Winogrande has), and which one is right. `choices` are what
    acc_norm divides by (their length in characters), without the space before them."""
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choices: tuple[str, ...]

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs, one per choice."""
        contexts = self.contexts * len(self.continuations) if len(self.contexts) == 1 else self.contexts
        continuations = self.continuations * len(contexts) if len(self.continuations) == 1 \
            else self.continuations
        return list(zip(contexts, continuations))


def multiple_choice(context: str, choices: list[Any], gold: Any) -> Item:
    """The common rule: the context, one space, each choice (lm-eval's target_delimiter)."""
    choices = [text(c, "a choice") for c in choices]
    if len(choices) < 2:
        raise ValueError(f"{len(choices)} choice(s); a question needs at least two")
    gold = index(gold, len(choices))
    return Item((context,), tuple(" " + c for c in choices), gold, tuple(choices))


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    return value


def index(value: Any, n: int) -> int:
    """An answer given as a number (or its digits) counting from 0, checked against n choices."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise ValueError(f"answer {value!r} is not one of the {n} choices (0 to {n - 1})")
    return value


def hellaswag_clean(s: str) -> str:
    """lm-eval's hellaswag preprocess: WikiHow's bracketed artifacts out, double spaces single."""
    s = s.strip().replace(" [title]", ". ")
    s = re.sub(r"\[.*?\]", "", s)
    return s.replace("  ", " ")


def hellaswag(doc: dict[str, Any]) -> Item:
    if "ctx_a" in doc:
        ctx = text(doc["ctx_a"], "ctx_a") + " " + text(doc.get("ctx_b", ""), "ctx_b").capitalize()
    else:
        ctx = text(doc["ctx"], "ctx")
    label = text(doc.get("activity_label", ""), "activity_label")
    query = hellaswag_clean(f"{label}: {ctx}" if "activity_label" in doc else ctx)
    endings = [hellaswag_clean(text(e, "an ending")) for e in doc["endings"]]
    return multiple_choice(query, endings, doc["label"])


def arc(doc: dict[str, Any]) -> Item:
    choices = doc["choices"]
    if not isinstance(choices, dict):
        raise ValueError("choices is not an object with text and label lists")
    labels = list(choices["label"])
    if doc["answerKey"] not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    return multiple_choice(f"Question: {text(doc['question'], 'question')}\nAnswer:", list(choices["text"]),
                           labels.index(doc["answerKey"]))


def piqa(doc: dict[str, Any]) -> Item:
    return multiple_choice(f"Question: {text(doc['goal'], 'goal')}\nAnswer:", [doc["sol1"], doc["sol2"]],
                           doc["label"])


def winogrande(doc: dict[str, Any]) -> Item:
    """Each option fills the blank; what is scored is the rest of the sentence after it."""
    sentence = text(doc["sentence"], "sentence")
    if "_" not in sentence:
        raise ValueError("the sentence has no blank (_)")
    cut = sentence.index("_")
    options = [text(doc["option1"], "option1"), text(doc["option2"], "option2")]
    answer = str(doc["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"answer {doc['answer']!r} is not 1 or 2")
    rest = sentence[cut + 1:].strip()
    return Item(tuple(sentence[:cut] + o for o in options), (" " + rest,), int(answer) - 1, (rest,))


def lambada(doc: dict[str, Any]) -> Item:
    """The passage without its last word, and that word (the split on single spaces is lm-eval's)."""
    words = text(doc["text"], "text").split(" ")
    if len(words) < 2 or not words[-1]:
        raise ValueError("the text has no last word after a space")
    return Item((" ".join(words[:-1]),), (" " + words[-1],), 0, (words[-1],))


MMLU_LETTERS = "ABCD"


def mmlu(doc: dict[str, Any]) -> Item:
    """The question, its four choices lettered, "Answer:"; the choices scored are the letters.
    The subject's description line leads, as lm-eval's per-subject tasks have it."""
    choices = [text(c, "a choice") for c in doc["choices"]]
    if len(choices) != 4:
        raise ValueError(f"{len(choices)} choices; MMLU has four")
    answer = doc["answer"]
    if isinstance(answer, str) and answer in MMLU_LETTERS:
        answer = MMLU_LETTERS.index(answer)
    subject = doc.get("subject")
    described = (f"The following are multiple choice questions (with answers) about "
                 f"{text(subject, 'subject').replace('_', ' ')}.\n\n") if subject else ""
    lettered = "".join(f"\n{letter}. {c}" for letter, c in zip(MMLU_LETTERS, choices))
    return multiple_choice(f"{described}{text(doc['question'], 'question').strip()}{lettered}\nAnswer:",
                           list(MMLU_LETTERS), answer)


def plain(doc: dict[str, Any]) -> Item:
    return multiple_choice(text(doc["context"], "context"), list(doc["choices"]), doc["gold"])


@dataclass(frozen=True)
class TaskFormat:
    """A layout: the fields that tell it apart, how a record becomes an Item (as the stock
    lm-evaluation-harness task of its name), and what is reported (acc, acc_norm, perplexity)."""
    fields: tuple[str, ...]
    item: Callable[[dict[str, Any]], Item]
    metrics: tuple[str, ...]


FORMATS = {  # the order auto-detection tries them in: the more specific layouts first
    "hellaswag": TaskFormat(("endings", "label"), hellaswag, ("acc", "acc_norm")),
    "arc": TaskFormat(("question", "choices", "answerKey"), arc, ("acc", "acc_norm")),
    "piqa": TaskFormat(("goal", "sol1", "sol2", "label"), piqa, ("acc", "acc_norm")),
    "winogrande": TaskFormat(("sentence", "option1", "option2", "answer"), winogrande, ("acc",)),
    "mmlu": TaskFormat(("question", "choices", "answer"), mmlu, ("acc",)),
    "plain": TaskFormat(("context", "choices", "gold"), plain, ("acc", "acc_norm")),
    "lambada": TaskFormat(("text",), lambada, ("acc", "perplexity")),
}
for _name, _format in FORMATS.items():
    TASK_FORMATS.implement(_name, _format)


def detect_format(doc: dict[str, Any], path: Path) -> str:
    found = next((name for name, f in FORMATS.items() if all(k in doc for k in f.fields)), None)
    if found is None:
        layouts = "; ".join(f"{name}: {', '.join(f.fields)}" for name, f in FORMATS.items())
        raise TinyLLMError(f"--eval_tasks {path}: its first record has the fields {sorted(doc)}, which "
                           f"match no task layout ({layouts}); convert it to one, or --task_format to "
                           f"force one")
    return found


# ----------------------------------------------------------------------------------------------
# Task files: JSON Lines (or a JSON list) and Parquet, every record accounted for
# ----------------------------------------------------------------------------------------------

TASK_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Task:
    name: str
    path: Path
    format: str
    items: list[Item]
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line or row, why)


def task_files(spec: str) -> list[Path]:
    """--eval_tasks: files, folders (their task files), globs, comma-separated, as --data_path."""
    files = resolve_data_path(spec, "--eval_tasks")
    if any(f.suffix in TASK_SUFFIXES for f in files):  # a folder: its task files
        files = [f for f in files if f.suffix in TASK_SUFFIXES or f.suffix not in (".txt", ".md")]
    for f in files:
        if not f.is_file():
            raise TinyLLMError(f"--eval_tasks {f} does not exist; check the path")
        if f.suffix not in TASK_SUFFIXES:
            raise TinyLLMError(f"--eval_tasks {f} is not a task file: give JSON Lines (.jsonl, .json) or "
                               f"Parquet (.parquet) in a dataset's layout")
    return files


def records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number from 1, record) for every record; a line that is not JSON comes as its
    error text, to be counted, not dropped."""
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", f"reading {path.name}", "pyarrow")
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's own errors for a damaged or foreign file
            raise TinyLLMError(f"--eval_tasks {path} cannot be read as Parquet ({first_line(e)})") from None
        yield from enumerate(rows, 1)
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            head = f.read(1 << 16).lstrip()
        except UnicodeDecodeError as e:
            raise TinyLLMError(f"--eval_tasks {path} is not UTF-8 text ({e.reason}); save it as "
                               f"UTF-8") from None
        f.seek(0)
        if head.startswith("["):  # one JSON list
            try:
                yield from enumerate(json.load(f), 1)
            except ValueError as e:
                raise TinyLLMError(f"--eval_tasks {path} is not valid JSON ({first_line(e)})") from None
            return
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as e:
                    yield number, f"not JSON ({first_line(e)})"


def load_task(path: Path, forced: str, tok: TextTokenizer, limit: int = 0) -> Task:
    """The task in one file: its layout (found from the first record's fields, or forced), and
    its first `limit` items (all for 0); a record that does not fit the layout, or holds
    characters the tokenizer cannot encode, is counted with its line and why."""
    task = Task(path.stem, path, "", [])
    for number, doc in records(path):
        if limit and len(task.items) >= limit:
            break
        if not isinstance(doc, dict):
            task.malformed.append((number, doc if isinstance(doc, str) else "not an object"))
            continue
        if not task.format:
            task.format = forced if forced != "auto" else detect_format(doc, path)
        try:
            item = FORMATS[task.format].item(doc)
        except KeyError as e:
            task.malformed.append((number, f"no field {e}"))
            continue
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            task.malformed.append((number, first_line(e)))
            continue
        unknown = tok.unknown_chars("".join(item.contexts + item.continuations))
        if unknown:
            shown = "".join(unknown[:10])
            task.malformed.append((number, f"characters the tokenizer cannot encode: {shown!r}"))
            continue
        task.items.append(item)
    if not task.items:
        why = f"; {describe_malformed(task)}" if task.malformed else ""
        raise TinyLLMError(f"--eval_tasks {path} has no items to score{why}")
    return task


def describe_malformed(task: Task, shown: int = 5) -> str:
    where = "row" if task.path.suffix == ".parquet" else "line"
    listed = ", ".join(f"{where} {n} ({why})" for n, why in task.malformed[:shown])
    more = f", and {len(task.malformed) - shown} more" if len(task.malformed) > shown else ""
    return f"{len(task.malformed)} record(s) not scored: {listed}{more}"


# ----------------------------------------------------------------------------------------------
# Scoring: the log-likelihood of each continuation, every context run once
# ----------------------------------------------------------------------------------------------

@dataclass
class Group:
    """Continuations that follow the same tokens: one item's choices after its shared context,
    or one request alone (a context of its own, or one cut to fit the window)."""
    prefix: list[int]
    continuations: list[list[int]]
    where: list[int]  # each continuation's place in the flat list of requests

    @property
    def length(self) -> int:
        return len(self.prefix) + max(map(len, self.continuations))


def encode_pair(tok: TextTokenizer, context: str, continuation: str, start: list[int]
                ) -> tuple[list[int], list[int]]:
    """lm-eval's tokens for a request: whitespace ending the context moves to the continuation,
    whose tokens are the whole text's past the context's own; an empty context is `start`."""
    if not context:
        return start, tok.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode_batch([context + continuation, context])
    return ctx, whole[len(ctx):]


def request_groups(tok: TextTokenizer, items: list[Item], window: int, start: list[int],
                   render: Callable[[str], str] | None = None) -> tuple[list[Group], int]:
    """The requests of every item, grouped by the tokens they follow, and their count. What
    does not fit the window is cut from the left as lm-eval cuts it: the last window + 1 tokens
    of context and continuation, the model fed all but the last. `render` (--task_chat) makes
    each context a conversation up to the reply, which the continuation starts."""
    groups: list[Group] = []
    n = 0
    for item in items:
        first = n  # an item's choices share their context's group; items never do
        for context, continuation in item.requests():
            if render is not None:
                context, continuation = render(context), continuation.lstrip(" ")
            ctx, cont = encode_pair(tok, context, continuation, start)
            cont = cont[-window:] or start  # lm-eval scores no more than a window either
            if len(ctx) + len(cont) > window + 1:
                ctx = (ctx + cont)[-(window + 1):][:-len(cont)] or start
                groups.append(Group(ctx, [cont], [n]))
            elif groups and groups[-1].prefix == ctx and groups[-1].where[0] >= first:
                groups[-1].continuations.append(cont)
                groups[-1].where.append(n)
            else:
                groups.append(Group(ctx, [cont], [n]))
            n += 1
    return groups, n


TOKENS_PER_BATCH = 1 << 13  # positions fed at once (contexts, then continuations)
LOGITS_PER_CHUNK = 1 << 25  # floats of continuation logits held at once (128 MB)


def batches(groups: list[Group]) -> Iterator[list[Group]]:
    """Groups, longest first (each batch pads little), in batches of about TOKENS_PER_BATCH."""
    batch: list[Group] = []
    rows = 0  # the batch's contexts and continuations
    for g in sorted(groups, key=lambda g: -g.length):
        if batch and (rows + 1 + len(g.continuations)) * batch[0].length > TOKENS_PER_BATCH:
            yield batch
            batch, rows = [], 0
        batch.append(g)
        rows += 1 + len(g.continuations)
    if batch:
        yield batch


@torch.no_grad()
def loglikelihoods(model: GPT, groups: list[Group], n: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[list[float], list[bool]]:
    """Each request's log-likelihood (the sum over its continuation's tokens) and whether each of
    those tokens is the most likely one (greedy), in the requests' order."""
    lls, greedy = [0.0] * n, [True] * n
    rank, world = ranks()
    for batch in batches(groups[rank::world]):  # under torchrun, each rank its share
        score_batch(model, batch, lls, greedy, device, dtype)
    if world > 1:  # every rank gets every score: the others' are zeros here, and add up
        import torch.distributed as dist
        both = torch.tensor([lls, [float(not g) for g in greedy]], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        lls, greedy = both[0].tolist(), [m == 0 for m in both[1].tolist()]
    return lls, greedy


def ranks() -> tuple[int, int]:
    """This process's rank and the number of processes, in a torchrun job's process group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def score_batch(model: GPT, batch: list[Group], lls: list[float], greedy: list[bool],
                device: torch.device, dtype: torch.dtype) -> None:
    """The batch's contexts in one forward pass into a KV cache (rows padded at their ends, each
    row's own length read back), then every continuation from a copy of its context's row."""
    attn = model.blocks[0].attn
    weights = next(model.parameters()).dtype
    longest = max(len(g.prefix) for g in batch) + max(len(c) for g in batch for c in g.continuations)
    cache = KVCache(model.cfg.n_layer, len(batch), attn.n_kv_head, min(longest, model.cfg.block_size),
                    attn.head_dim, device, cache_dtype(weights, device))  # room for any row's padding
    lengths = torch.tensor([len(g.prefix) for g in batch], device=device)
    ids = padded([g.prefix for g in batch], device)  # (B, P)
    with autocast(device, dtype):
        x = model.trunk(ids, cache)  # (B, P, C); padding sits after each row's end, unseen
        last = x[torch.arange(len(batch), device=device), lengths - 1]  # (B, C)
        first = F.log_softmax(model.head(last), -1)  # (B, V): one row per context
    rows = sorted(((b, j) for b, g in enumerate(batch) for j in range(len(g.continuations))),
                  key=lambda bj: -len(batch[bj[0]].continuations[bj[1]]))  # runs of rows pad little
    conts = [batch[b].continuations[j] for b, j in rows]
    where = [batch[b].where[j] for b, j in rows]
    row_of = torch.tensor([b for b, _ in rows], device=device)
    heads = torch.tensor([c[0] for c in conts], device=device)
    head_ll = first[row_of, heads].tolist()  # one copy to the host, not one per row
    head_greedy = (first[row_of].argmax(-1) == heads).tolist()
    for r, w in enumerate(where):
        lls[w], greedy[w] = head_ll[r], head_greedy[r]
    rest = max(map(len, conts)) - 1
    if rest == 0:
        return
    more = cache.copy_rows(row_of, lengths[row_of])  # each row continues its context's text
    prefixes = [len(batch[b].prefix) for b, _ in rows]
    for lo, hi in row_chunks(prefixes, [len(c) - 1 for c in conts], model.cfg.block_size, model.vocab_size):
        inp = padded([c[:-1] for c in conts[lo:hi]], device)  # (R, rest)
        targets = padded([c[1:] for c in conts[lo:hi]], device, fill=-1)
        counted = targets >= 0  # (R, rest): padding has no target
        with autocast(device, dtype):
            hidden = model.trunk(inp, more.rows(lo, hi))[counted]  # (N, C): the positions that count
            logits = model.head(hidden)  # (N, V)
        wanted = targets[counted]
        # log-softmax at the targets alone: their logits less the log of each position's total
        picked = logits.gather(-1, wanted.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        row = counted.nonzero()[:, 0]  # each position's row
        sums = torch.zeros(hi - lo, device=device).index_add_(0, row, picked)
        missed = torch.zeros(hi - lo, device=device).index_add_(0, row, (logits.argmax(-1) != wanted).float())
        for w, total, best in zip(where[lo:hi], sums.tolist(), (missed == 0).tolist()):
            lls[w] += total
            greedy[w] &= best


def row_chunks(prefixes: list[int], rests: list[int], window: int, vocab: int) -> Iterator[tuple[int, int]]:
    """Runs of rows fed together: padded to the longest in the run, no row's padding may reach
    past the window (positions have no table there), nor its logits past LOGITS_PER_CHUNK."""
    lo, top, width = 0, 0, 1
    for i, (p, r) in enumerate(zip(prefixes, rests)):
        wider, higher = max(width, r), max(top, p)
        if i > lo and (higher + wider > window or (i - lo + 1) * wider * vocab > LOGITS_PER_CHUNK):
            yield lo, i
            lo, wider, higher = i, max(r, 1), p
        top, width = higher, wider
    yield lo, len(prefixes)


def padded(rows: list[list[int]], device: torch.device, fill: int = 0) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------
# Metrics, as lm-eval reports them: acc, acc_norm, perplexity, and the standard error of a mean
# ----------------------------------------------------------------------------------------------

def task_metrics(task: Task, lls: list[float], greedy: list[bool]) -> dict[str, float]:
    """acc: the choice of highest log-likelihood is the gold one (the first of equals);
    acc_norm: the same, each divided by its choice's length in characters; LAMBADA: acc is the
    greedy continuation being the word, perplexity exp(-mean log-likelihood)."""
    acc, acc_norm, chance, item_lls = [], [], [], []
    k = 0
    for item in task.items:
        n = len(item.requests())
        scores = lls[k:k + n]
        if task.format == "lambada":
            acc.append(float(greedy[k]))
            item_lls.append(scores[0])
        else:
            acc.append(float(argmax(scores) == item.gold))
            if len(item.choices) == n:
                acc_norm.append(float(argmax([s / max(len(c), 1) for s, c in zip(scores, item.choices)])
                                      == item.gold))
            chance.append(1 / n)
        k += n
    out = {"items": len(task.items), "acc": mean(acc), "acc_stderr": stderr(acc)}
    if "acc_norm" in FORMATS[task.format].metrics:
        out.update(acc_norm=mean(acc_norm), acc_norm_stderr=stderr(acc_norm))
    if task.format == "lambada":
        out["perplexity"] = math.exp(-mean(item_lls))
    else:
        out["chance"] = mean(chance)
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def stderr(xs: list[float]) -> float:
    """The standard error of the mean, with the sample's standard deviation (n - 1), as lm-eval."""
    if len(xs) < 2:
        return math.nan
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


# ----------------------------------------------------------------------------------------------
# --eval_tasks: every task file scored, for --eval_only and at each evaluation in training
# ----------------------------------------------------------------------------------------------

LOADED: dict[tuple[Any, ...], list[Task]] = {}  # read once per process: training evaluates often


def tasks_for(spec: str, forced: str, tok: TextTokenizer, limit: int) -> list[Task]:
    key = (spec, forced, tok.to_str(), limit)
    if key not in LOADED:
        tasks = [load_task(path, forced, tok, limit) for path in task_files(spec)]
        names = [t.name for t in tasks]
        for t in tasks:  # two files of one name: told apart by their folders
            if names.count(t.name) > 1:
                t.name = f"{t.path.parent.name}/{t.name}"
        LOADED[key] = tasks
    return LOADED[key]


def evaluate_tasks(model: GPT, tok: TextTokenizer, spec: str, forced: str, limit: int, device: torch.device,
                   dtype: torch.dtype, say: bool = True, render: Callable[[str], str] | None = None
                   ) -> dict[str, dict[str, float]]:
    """Every task of --eval_tasks scored on the model: {task: {metric: value}}, each line printed
    when `say`, with the records that could not be scored; `render`: as conversations."""
    start_ids = [tok.eot_id] if tok.eot_id is not None else tok.start_ids()
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks_for(spec, forced, tok, limit):
            start = time.perf_counter()
            groups, n = request_groups(tok, task.items, model.cfg.block_size, start_ids, render)
            lls, greedy = loglikelihoods(model, groups, n, device, dtype)
            results[task.name] = task_metrics(task, lls, greedy)
            results[task.name]["seconds"] = time.perf_counter() - start
            if say:
                print0(task_line(task, results[task.name]))
    finally:
        model.train(was_training)
    return results


def task_line(task: Task, r: dict[str, float]) -> str:
    figures = [f"{name} {100 * r[name]:.2f}% ± {100 * r[name + '_stderr']:.2f}"
               for name in ("acc", "acc_norm") if name in r]
    if "perplexity" in r:
        figures.append(f"perplexity {r['perplexity']:.2f}")
    if "chance" in r:
        figures.append(f"chance {100 * r['chance']:.2f}%")
    skipped = f"\n  {describe_malformed(task)}" if task.malformed else ""
    return (f"{task.name} ({task.format}, {r['items']:,} items, {r['seconds']:.1f} s): "
            f"{' | '.join(figures)}{skipped}")
