"""tinyllm: train, checkpoint and sample a small GPT-, Llama- or Qwen-style language model, in one file
(its tools for models and data from elsewhere live beside it).

Run it:
    python train_tinyllm.py                                   # tiny char model on a built-in corpus
    python train_tinyllm.py --data_path data/tiny_corpus.txt --out_dir out/my_model
    python train_tinyllm.py --config config/shakespeare_char.json --max_steps 500
    python train_tinyllm.py --generate_only --out_dir out/my_model --prompt "Once upon a time"
    python train_tinyllm.py --help                            # every option, grouped, with defaults

This file is the trainer, and it reads top to bottom:
    Config            the Config dataclass (flags, JSON keys, defaults, help) and the registries
                      whose keys are its choices
    Runtime           device, dtype, torchrun ranks, seeding, printing, atomic files
    Model             GPT, its norms, MLPs and positions (NORMS, MLPS, POSITIONS), attention with
                      the KV cache beside it; LoRA adapters
    Tokenizers        char-level and byte-level BPE (TOKENIZERS)
    Data              token files and random windows (get_batch); corpora, one reader per kind of
                      file (READERS); streaming tokenization
    Sampling          filters, cached and uncached decoding, streaming output
    Training parts    schedules (SCHEDULES), optimizers (OPTIMIZERS), EMA, measuring, checkpoints,
                      starting from a pretrained model, the run and its metrics
    train()           the run, its loop, one optimizer step, then their helpers
Then a ruler, and what uses a trained model; training never calls it:
    Using a trained model   generate, evaluate, benchmark, plot
    The invocation          flags and a JSON config into one checked Config: resolve()
    main()                  run the invocation's mode (MODES)
Beside it, each imported only when an invocation uses one of the entries declared here for it:
    tinyllm_data.py   JSON Lines and Parquet corpora, conversations and chat templates, tiktoken
    tinyllm_hub.py    transformers models in (--init_from) and every --export out, GGUF included
    tinyllm_serve.py  int8 weights, the decode step compiled ahead of time, --chat and --serve
    tinyllm_evals.py  benchmark files scored as lm-evaluation-harness scores them (--eval_tasks)
    tinyllm_tune.py   preference tuning (--objective dpo) and RL from a reward function (grpo)
Importing it does nothing; main() runs it.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import ctypes
import dataclasses
import difflib
import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

# ----------------------------------------------------------------------------------------------
# Config: one dataclass is the single source of truth for flags, JSON keys, defaults and help
# ----------------------------------------------------------------------------------------------

GROUPS = ("data and I/O", "model", "training", "generation", "evaluation, metrics and export")


class Registry(dict):
    """An extension point: a flag's values, each mapped to what implements it, so that the flag's
    choices are the keys and an entry added where its kind is defined (further down) is a new
    value of the flag, in --help, JSON configs and validation alike. An entry may be declared
    here and implemented in a sibling module (its `home`): its name is a choice whether or not
    the module is there, and the module, imported when the entry is first looked up, puts the
    implementation in its place (`implement`)."""

    def __init__(self, what: str, entries: dict[str, Any] | None = None):
        super().__init__(entries or {})
        self.what = what

    def __getitem__(self, name: str) -> Any:
        return self.entry(name)

    def entry(self, name: str, what: str = "") -> Any:
        """The entry `name`, its module imported first if need be (refused as `what` needs it)."""
        entry = super().__getitem__(name)
        if getattr(entry, "home", ""):
            what = what or f"{self.what} {name}".strip()
            sibling(entry.home, what)
            entry = super().__getitem__(name)
            if getattr(entry, "home", ""):  # a module from another version of tinyllm
                raise TinyLLMError(f"{what}: {entry.home}.py does not implement it; copy the {entry.home}.py "
                                   f"that came with this {Path(__file__).name}")
        return entry

    def implement(self, name: str, value: Any = None, **parts: Any) -> None:
        """The declared entry `name`, implemented: by `value`, or by the declaration with `parts`."""
        declared = super().__getitem__(name)
        self[name] = value if value is not None else dataclasses.replace(declared, home="", **parts)


@dataclass(frozen=True)
class Elsewhere:
    """A registry entry (a function or a class) that the sibling module `home` implements."""
    home: str


def sibling(module: str, what: str) -> Any:
    """The sibling module `module`, imported now (once) from this file's folder; TinyLLMError
    naming the file when it, or a module below it that it imports, is missing or broken."""
    if module in sys.modules:
        return sys.modules[module]
    folder, card = Path(__file__).resolve().parent, Path(__file__).name
    if not (folder / f"{module}.py").is_file():
        raise TinyLLMError(f"{what} needs {module}.py, which is not beside {card}; copy it there from "
                           f"tinyllm")
    if sys.path[:1] != [str(folder)]:  # its siblings before any module of the same name elsewhere
        sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module)
    except Exception as e:  # a file missing, cut short, edited, or from another version of tinyllm
        culprit = failing_sibling(e, module)
        if isinstance(e, ModuleNotFoundError) and e.name == culprit:
            raise TinyLLMError(f"{what} needs {module}.py and {culprit}.py, which is not beside {card}; copy "
                               f"it there from tinyllm") from None
        raise TinyLLMError(f"{what} needs {module}.py{f' and {culprit}.py' if culprit != module else ''}, "
                           f"which cannot be imported ({type(e).__name__}: {first_line(e)}); copy it again "
                           f"from tinyllm") from None


def failing_sibling(e: BaseException, module: str) -> str:
    """Which sibling an import of `module` failed in: the one a syntax error or a missing name is
    in, else the last sibling in the traceback, else `module` itself."""
    if isinstance(e, SyntaxError) and e.filename and Path(e.filename).stem.startswith("tinyllm_"):
        return Path(e.filename).stem
    if isinstance(e, ImportError) and (e.name or "").startswith("tinyllm_"):
        return e.name
    frames = [Path(f.filename).stem for f in traceback.extract_tb(e.__traceback__)]
    return next((stem for stem in reversed(frames) if stem.startswith("tinyllm_")), module)


PRESETS = Registry("--arch", {  # model fields that a preset sets
    "gpt2": {"norm": "layernorm", "mlp": "gelu", "pos_encoding": "learned", "bias": True,
             "tie_weights": True},
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "pos_encoding": "rope", "bias": False,
              "tie_weights": True},
})
TOKENIZERS = Registry("--tokenizer")  # trainers: (texts, config) -> TextTokenizer
NORMS = Registry("--norm")  # (width, config) -> layer
MLPS = Registry("--mlp")  # feed-forward blocks, each class declaring its hidden width
POSITIONS = Registry("--pos_encoding")  # position encodings
SCHEDULES = Registry("--lr_schedule")  # shape after warmup
OPTIMIZERS = Registry("--optimizer")  # (model, config, device) -> optimizers
QUANTIZERS = Registry("--quantize", {"none": lambda model: model, "int8": Elsewhere("tinyllm_serve")})


TASK_FORMATS = Registry("--task_format", dict.fromkeys(  # benchmark layouts, each a TaskFormat
    ("hellaswag", "arc", "piqa", "winogrande", "mmlu", "plain", "lambada"), Elsewhere("tinyllm_evals")))
EXPORTERS = Registry("--export", dict.fromkeys(  # formats, each an Exporter (its file, its writer)
    ("hf", "safetensors", "onnx", "torchscript", "tiktoken", "gguf"), Elsewhere("tinyllm_hub")))


@dataclass(frozen=True)
class Mode:
    """What an invocation does: the Config flag that asks for it ("" for training, the default),
    whether it starts from a checkpoint (--ckpt, else out_dir's best, else its latest), whether
    it decodes (and so takes --quantize and --compile_decode), what Ctrl-C before its end leaves
    behind, the function that runs it (None: its sibling module `home` implements it), the data
    flags it reads (the first one given, of those before the corpus's: --eval_data), and whether
    it prints samples (and so takes --num_samples)."""
    flag: str
    loads: bool
    decodes: bool
    interrupted: str
    run: Callable[[Resolved], Any] | None = None
    home: str = ""
    reads: tuple[str, ...] = ()
    samples: bool = False


CORPUS_FLAGS = ("data_path", "val_data")  # what training reads
MODES = Registry("--mode")  # filled in beside main(), once every mode's function is defined


@dataclass(frozen=True)
class Objective:
    """What a training step minimises (--objective). It brings its own data in place of the token
    files (`inputs`: the tokenizer, "train" and "val" splits, the hash of their content), readies
    the run after it is built (`prepare`: a reference model, say, from the --init_from source on
    a resume), gives one micro-batch's loss and the figures to log beside it (`loss`), and the
    evaluation (`evaluate`: its figures, the one ckpt_best.pt is chosen by, lower better, and the
    line to print). `flags` are the settings only it reads (a resume that changes one starts the
    best over, where they shape the figure the best is chosen by); `tunes`: it needs --init_from;
    `windows`: a micro-batch is --batch_size windows of the context (so tokens/s and MFU are
    known); `reference`: whether the run needs its starting weights beside the tuned ones (a
    resume then reads them from --init_from again); `checks`: its settings, as the other checks
    are; `shown`: the figures the progress line shows; `best`: how the chosen figure reads;
    `plot`: loss.png's axis and its train, val and EMA curves."""
    flags: tuple[str, ...] = ()
    tunes: bool = False
    windows: bool = False
    unit: str = ""  # what --batch_size counts, where it is not windows
    reference: Callable[[Config], bool] = lambda cfg: False
    shown: tuple[str, ...] = ()
    inputs: Callable[..., tuple[Any, dict[str, Any], str]] | None = None
    prepare: Callable[..., None] = lambda run, source: None
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    evaluate: Callable[..., tuple[float, dict[str, float], str]] | None = None
    checks: Callable[[Config], list[tuple[bool, str]]] = lambda cfg: []
    best: Callable[[float], str] = lambda score: f"val loss {score:.4f}"
    plot: tuple[str, tuple[str, ...]] = ("cross-entropy (nats/token)", ("loss", "val_loss", "ema_val_loss"))
    home: str = ""


LM_FLAGS = ("label_smoothing", "z_loss", "curriculum", "curriculum_start_block_size", "curriculum_steps",
            "data_format", "text_field", "chat_loss", "raw_text", "memmap_dataset")  # windows of corpora
DPO_FLAGS = ("dpo_beta", "dpo_loss", "dpo_label_smoothing", "simpo_gamma", "dpo_precompute_ref")
GRPO_FLAGS = ("reward", "grpo_group", "grpo_completion_tokens", "grpo_clip", "grpo_iters", "grpo_kl")
OBJECTIVES = Registry("--objective", {  # "lm" is filled in with the training parts
    "lm": None,
    "dpo": Objective(DPO_FLAGS, tunes=True, home="tinyllm_tune"),
    "grpo": Objective(GRPO_FLAGS, tunes=True, home="tinyllm_tune"),
})


@dataclass
class Resolved:
    """One invocation, resolved once: its mode, its config, and the checkpoint it starts from
    (loaded) for --resume, --generate_only, --eval_only and --export."""
    mode: str
    cfg: Config
    ckpt: dict[str, Any] | None = None
    ckpt_path: Path | None = None
    source: Source | None = None  # --init_from, for a new training run


def opt(default: Any, help: str, group: str, choices: tuple[Any, ...] | dict[str, Any] | None = None,
        arch: bool = False) -> Any:
    """A config field; `choices` are values, registries (their keys count) or both; `arch` marks
    fields that a checkpoint's weights depend on."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                            "arch": arch})


@dataclass
class Config:
    # data and I/O
    data_path: str = opt("", "Text to train on: UTF-8 .txt/.md files (also .gz, .bz2, .xz, .zst), "
                             "JSON Lines (.jsonl, compressed too) or Parquet; a file, a directory "
                             "(every such file in it), a glob, an http(s) URL (downloaded once into "
                             "data/), or several, comma-separated. Empty: data/tiny_corpus.txt if "
                             "it exists, else a sample corpus that ships with Python (pydoc_data).",
                         "data and I/O")
    out_dir: str = opt("out/tinyllm", "Run directory: checkpoints, tokenizer, configs, metrics.",
                       "data and I/O")
    cache_dir: str = opt("data/cache", "Where tokenizers and token files are cached, keyed by corpus "
                                       "and tokenizer, so a second run skips the work; also the "
                                       "compiled decode steps (decode_steps/, see --decode_cache_gb).",
                         "data and I/O")
    resume: bool = opt(False, "Continue training from out_dir/ckpt.pt (model, optimizer, step, RNG).",
                       "data and I/O")
    allow_data_change: bool = opt(False, "With --resume: continue although the training data changed "
                                         "since the checkpoint (its val loss is then measured on other "
                                         "text, so the best val loss starts over); without it such a "
                                         "resume is refused.", "data and I/O")
    overwrite: bool = opt(False, "Start a new run in an out_dir that already holds one (its "
                                 "checkpoints are replaced); without it such a run is refused.",
                          "data and I/O")
    text_field: str = opt("text", "The JSON Lines field or Parquet column that holds each document's "
                                  "text.", "data and I/O")
    data_format: str = opt("auto", "JSON Lines records: text (--text_field), or conversations to train a "
                                   "chat model on: messages (OpenAI: role/content), sharegpt "
                                   "(conversations: from/value), alpaca (instruction/input/output); auto "
                                   "tells them apart by their fields.", "data and I/O",
                           ("auto", "text", "messages", "sharegpt", "alpaca"))
    chat_template: str = opt("", "Jinja chat template that renders conversations; empty: the --init_from "
                                 "model's own, else ChatML with <|im_start|> and <|im_end|> as special "
                                 "tokens.", "data and I/O")
    chat_loss: str = opt("assistant", "On conversations, which tokens the loss covers: assistant (each "
                                      "reply and its end-of-turn token; system and user turns are "
                                      "context only) or all.", "data and I/O", ("assistant", "all"))
    val_data: str = opt("", "Validation text, in any form --data_path takes: used as the val split "
                            "instead of holding out --val_fraction of the training data.",
                        "data and I/O")
    raw_text: bool = opt(False, "Read corpus and --eval_data text byte for byte. By default a leading "
                                "UTF-8 byte-order mark is dropped and \\r\\n line ends become \\n, "
                                "so that neither becomes a token.", "data and I/O")
    memmap_dataset: bool = opt(False, "Read token files through numpy.memmap instead of loading "
                                      "them into RAM.", "data and I/O")
    tokenizer: str = opt("char", "char: one token per character of the corpus; bpe: byte-level BPE "
                                 "trained on the corpus.", "data and I/O", TOKENIZERS, arch=True)
    bpe_vocab_size: int = opt(2048, "Vocabulary size of the trained BPE tokenizer.", "data and I/O",
                              arch=True)
    tokenizer_path: str = opt("", "Use this tokenizer.json (any HuggingFace tokenizer file) instead "
                                  "of training one.", "data and I/O")
    val_fraction: float = opt(0.1, "Fraction held out for validation: whole documents chosen by hash "
                                    "when the corpus has 100 or more, else its tail.", "data and I/O")
    device: str = opt("auto", "auto picks cuda, then mps, then cpu; or name one (cpu, cuda, cuda:1, "
                              "mps).", "data and I/O")
    # model
    init_from: str = opt("", "Start from a pretrained model: a HuggingFace model directory as "
                             "downloaded (GPT-2, Llama family, Qwen3) or a tinyllm checkpoint or "
                             ".safetensors export. Its architecture and tokenizer are used; the "
                             "optimizer and schedule start fresh (unlike --resume).", "model")
    arch: str = opt("llama", "Preset of model fields; explicit flags override it. gpt2: layernorm, "
                             "gelu, learned positions, bias, tied. llama: rmsnorm, swiglu, rope, "
                             "no bias, tied.", "model", PRESETS)
    n_layer: int = opt(4, "Transformer blocks.", "model", arch=True)
    n_head: int = opt(4, "Query heads per attention layer.", "model", arch=True)
    n_kv_head: int = opt(0, "Key/value heads (grouped-query attention): 0 = n_head (MHA), 1 = MQA. "
                            "Must divide n_head.", "model", arch=True)
    n_embd: int = opt(128, "Model width; must be divisible by n_head unless head_dim is set.", "model",
                      arch=True)
    head_dim: int = opt(0, "Width of each attention head; 0 = n_embd / n_head. Qwen3 sets its own "
                           "(attention is then n_head x head_dim wide).", "model", arch=True)
    block_size: int = opt(128, "Context length in tokens.", "model", arch=True)
    dropout: float = opt(0.0, "Dropout on attention, residual and embedding outputs, in [0, 1).",
                         "model")
    bias: bool = opt(False, "Biases in linear layers and layer norms.", "model", arch=True)
    norm: str = opt("rmsnorm", "Normalization layer.", "model", NORMS, arch=True)
    norm_eps: float = opt(1e-5, "Epsilon of the normalization layers.", "model", arch=True)
    mlp: str = opt("swiglu", "Feed-forward block: gelu (exact), gelu_tanh (GPT-2's tanh "
                             "approximation), relu2 (ReLU squared) or swiglu.", "model", MLPS, arch=True)
    mlp_hidden: int = opt(0, "Feed-forward hidden size; 0 = 4*n_embd for gelu(_tanh) and relu2, about "
                             "8/3*n_embd (rounded up to a multiple of 32) for swiglu.", "model", arch=True)
    pos_encoding: str = opt("rope", "Position encoding: learned absolute embeddings or rotary.",
                            "model", POSITIONS, arch=True)
    rope_theta: float = opt(10000.0, "Base of the rotary frequencies.", "model", arch=True)
    qk_norm: bool = opt(False, "Normalize queries and keys per head before attention.", "model",
                        arch=True)
    logit_softcap: float = opt(0.0, "Soft-cap the output logits to (-cap, cap) by cap * tanh(logits / cap); "
                                    "0 = off.", "model", arch=True)
    zero_init_out_proj: bool = opt(False, "Start the output projections of attention and MLP at zero, "
                                          "so that each block starts as the identity (new runs only).",
                                   "model")
    unet_skips: bool = opt(False, "U-net skip connections: the first half of the blocks' outputs are "
                                  "added, each with a learned weight (starting at 1), to the inputs "
                                  "of the second half in reverse order (modded-nanogpt).", "model",
                           arch=True)
    sliding_window: int = opt(0, "Each token attends to at most this many tokens, itself included; "
                                 "0 = full causal attention.", "model", arch=True)
    parallel_block: bool = opt(False, "Attention and MLP read the same normalized input and are "
                                      "added together (GPT-J style).", "model", arch=True)
    tie_weights: bool = opt(True, "Share the token embedding with the output head.", "model",
                            arch=True)
    # training
    max_steps: int = opt(600, "Optimizer steps to train for.", "training")
    batch_size: int = opt(32, "Sequences per micro-batch.", "training")
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step.", "training")
    learning_rate: float = opt(2e-3, "Peak learning rate (AdamW).", "training")
    min_lr: float = opt(2e-4, "Learning rate at the end of the decay; when neither a flag, a config file "
                              "nor the checkpoint sets it, learning_rate / 10.", "training")
    warmup_steps: int = opt(50, "Linear warmup steps from 0 to learning_rate.", "training")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to 2-D weights only.", "training")
    beta1: float = opt(0.9, "AdamW beta1.", "training")
    beta2: float = opt(0.99, "AdamW beta2.", "training")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this; 0 = off.", "training")
    eval_interval: int = opt(200, "Evaluate, checkpoint and maybe save ckpt_best.pt every this many "
                                  "steps (and at the end).", "training")
    eval_iters: int = opt(20, "Batches per split for each evaluation.", "training")
    log_interval: int = opt(50, "Print the training loss every this many steps.", "training")
    sample_interval: int = opt(200, "Print a short sample every this many steps; 0 = only at the "
                                    "end.", "training")
    seed: int = opt(1337, "Seed for weights, batches, dropout and sampling.", "training")
    optimizer: str = opt("adamw", "adamw (torch AdamW, fused kernels on CPU and CUDA); adamw8bit "
                                  "(bitsandbytes, CPU or CUDA); lion (sign of interpolated momentum; "
                                  "use a learning rate 3-10x smaller and weight decay 3-10x larger "
                                  "than AdamW's); muon "
                                  "(torch Muon for 2-D hidden weights, AdamW for the rest).",
                         "training", OPTIMIZERS)
    lr_schedule: str = opt("cosine", "After linear warmup: cosine decay to min_lr; wsd (warmup-stable-"
                                     "decay): constant, then linear decay to min_lr over the last "
                                     "decay_fraction; constant.", "training", SCHEDULES)
    decay_fraction: float = opt(0.2, "Share of the run that the wsd schedule spends decaying.",
                                "training")
    time_budget_s: float = opt(0.0, "Stop training after this many seconds (then final eval, "
                                    "checkpoint, sample); the schedule is laid out over the budget so "
                                    "the run ends fully decayed. 0 = off (max_steps still caps).",
                               "training")
    stop_at_step: int = opt(0, "End this invocation after this step with a checkpoint, keeping the "
                               "schedule laid out for max_steps; --resume continues (for job time "
                               "limits). 0 = off.", "training")
    max_nonfinite: int = opt(20, "Stop after this many optimizer steps in a row whose loss or "
                                 "gradient norm was not finite (each such step is skipped).",
                             "training")
    label_smoothing: float = opt(0.0, "Label smoothing of the training loss (val loss is always plain "
                                      "cross-entropy).", "training")
    z_loss: float = opt(0.0, "Coefficient of log(Z)^2 added to the training loss; 0 = off.", "training")
    objective: str = opt("lm", "What training minimises: lm, next-token prediction (on conversations, of "
                               "the replies only); dpo, preference pairs (prompt, chosen, rejected; "
                               "--dpo_loss); grpo, the --reward of completions sampled in groups. dpo "
                               "and grpo tune the --init_from model, which is also their reference.",
                         "training", OBJECTIVES)
    dpo_beta: float = opt(0.1, "DPO's beta: how far the tuned model may move from the reference (with "
                               "--dpo_loss simpo, the scale of the length-normalised log-probabilities; "
                               "2 is usual there).", "training")
    dpo_loss: str = opt("sigmoid", "--objective dpo's loss: sigmoid (DPO), ipo (IPO: squared, per token), "
                                   "simpo (SimPO: log-probabilities per token and a margin --simpo_gamma, "
                                   "no reference model).", "training", ("sigmoid", "ipo", "simpo"))
    dpo_label_smoothing: float = opt(0.0, "Conservative DPO: the share of pairs taken to be mislabelled, in "
                                          "[0, 0.5) (sigmoid and simpo).", "training")
    simpo_gamma: float = opt(0.5, "SimPO's target margin between chosen and rejected (--dpo_loss simpo).",
                             "training")
    dpo_precompute_ref: bool = opt(False, "Compute the reference's log-probabilities of every pair once, "
                                          "before the first step (kept in the checkpoint), instead of a "
                                          "reference forward pass at every step (and, without LoRA, a frozen "
                                          "copy of the weights).", "training")
    reward: str = opt("", "--objective grpo's reward: FILE.py:FUNCTION, called as FUNCTION(prompt, "
                          "completion, record) for each sampled completion, returning a finite number. It "
                          "is your own code, run in this process.", "training")
    grpo_group: int = opt(8, "Completions sampled per prompt, as one batch with the KV cache (at "
                             "--temperature, --top_k, --top_p); advantages are the rewards normalised within "
                             "the group. --batch_size counts completions: a multiple of this.", "training")
    grpo_completion_tokens: int = opt(128, "Most tokens per sampled completion, fewer where the prompt "
                                           "leaves less of block_size; a prompt is cut from its start to "
                                           "leave at least this, or half the context.", "training")
    grpo_clip: float = opt(0.2, "PPO's clip of the probability ratio to [1 - c, 1 + c]. With --grpo_iters 1 "
                                "the ratio is 1 at every step and the clip does nothing.", "training")
    grpo_iters: int = opt(1, "Optimizer steps per sampled batch (later ones reuse its completions and "
                             "clip the ratio).", "training")
    grpo_kl: float = opt(0.0, "Weight of the KL penalty to the reference (the starting weights); 0 = none, "
                              "and no reference pass.", "training")
    amp: bool = opt(True, "Mixed precision autocast in the dtype chosen by --dtype.", "training")
    dtype: str = opt("auto", "auto: bfloat16 where the device has it natively (CUDA sm80+, CPUs with "
                             "AVX512-BF16/AMX), float16 with a GradScaler on older GPUs, else float32.",
                     "training", ("auto", "bfloat16", "float16", "float32"))
    compile: bool = opt(False, "torch.compile the training model (inductor; CPU and CUDA). Without the "
                               "compiler it needs (a C++ compiler on CPU, triton on GPUs): eager, said "
                               "in one line.", "training")
    ddp: bool = opt(False, "Run distributed; implied when launched by torchrun (RANK is set).",
                    "training")
    fsdp: bool = opt(False, "Under torchrun: shard weights, gradients and optimizer state over the ranks "
                            "(PyTorch FSDP2: each block, then the root) instead of DDP's whole copy on "
                            "each; checkpoints are then sharded too (torch.distributed.checkpoint: each "
                            "rank writes its own shard), and resume on any number of ranks, or none.",
                     "training")
    fsdp_reshard_after_forward: bool = opt(True, "With --fsdp: free each block's gathered weights after its "
                                                 "forward (least memory) instead of keeping them for the "
                                                 "backward (less communication).", "training")
    ema: bool = opt(False, "Keep an fp32 exponential moving average of the weights; evaluated beside "
                           "the live weights and used for sampling and ckpt_best.pt when better.",
                    "training")
    ema_decay: float = opt(0.999, "EMA decay per optimizer step (warmed up as (1+t)/(10+t)).",
                           "training")
    curriculum: bool = opt(False, "Grow the context from curriculum_start_block_size to block_size in "
                                  "power-of-two stages, keeping tokens per step about constant.",
                           "training")
    curriculum_start_block_size: int = opt(32, "First context length of the curriculum.", "training")
    curriculum_steps: int = opt(0, "Steps until the full block_size; 0 = a third of max_steps.",
                                "training")
    lora_rank: int = opt(0, "Fine-tune low-rank adapters of this rank on the frozen --init_from model "
                            "instead of every weight; 0 = off. Checkpoints then hold the adapters "
                            "only; samples, evaluation and exports use merged weights.", "training")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is (lora_alpha / lora_rank) B A.",
                            "training")
    lora_dropout: float = opt(0.0, "Dropout on the adapters' input (the base layer sees it whole).",
                              "training")
    lora_targets: str = opt("attn,mlp", "Layers that get adapters, comma-separated: attn (the qkv and "
                                        "output projections), mlp (every MLP projection).", "training")
    grad_checkpointing: bool = opt(False, "Recompute block activations in backward: same loss, less "
                                          "memory, about a third more compute.", "training")
    keep_freed_memory: bool = opt(True, "CPU on Linux (glibc): keep memory freed by one step for the "
                                         "next instead of returning it to the OS, which makes every step "
                                         "page-fault its activations back in (about a fifth of each step "
                                         "of a 10M-parameter fp32 model here). The process then holds "
                                         "its peak memory.",
                                  "training")
    # generation
    generate_only: bool = opt(False, "Load a checkpoint from out_dir and generate; no training.",
                              "generation")
    ckpt: str = opt("", "Checkpoint for --generate_only (default: out_dir/ckpt_best.pt, else "
                        "out_dir/ckpt.pt).", "generation")
    prompt: str = opt("", "Text to continue; empty starts from an end-of-text or newline token.",
                      "generation")
    max_new_tokens: int = opt(300, "Tokens to generate per sample (per reply with --chat; with --serve, "
                                                "the max_tokens of a request that gives none).", "generation")
    chat: bool = opt(False, "Talk to a trained model in the terminal: multi-turn, streamed, the KV "
                            "cache kept across turns; /reset, /system TEXT, /exit. Piped stdin: one "
                            "message a line, one reply a line.", "generation")
    system: str = opt("", "System prompt for --chat.", "generation")
    temperature: float = opt(0.8, "Softmax temperature; 0 (or below 1e-4) = greedy.", "generation")
    top_k: int = opt(0, "Sample only from the k most likely tokens; 0 = off.", "generation")
    top_p: float = opt(1.0, "Nucleus sampling: the smallest set of tokens whose probability reaches "
                            "top_p, in (0, 1]; 1 = off.", "generation")
    repetition_penalty: float = opt(1.0, "Penalize tokens already in the context (CTRL rule: divide "
                                         "positive logits, multiply negative ones); 1 = off.",
                                    "generation")
    num_samples: int = opt(1, "Samples to generate.", "generation")
    kv_cache: bool = opt(True, "Use the key/value cache while generating: faster. With --temperature 0 "
                               "and --dtype float32 it picks the same tokens as --no-kv_cache while "
                               "prompt and output fit in block_size (the two paths add in a different "
                               "order, so only logits tied to within float32 rounding could differ). "
                               "Past block_size the cache restarts from the last half block while the "
                               "uncached path keeps a full window; under sampling, or bf16/fp16 "
                               "weights, rounding can tip a near-tie either way.",
                         "generation")
    quantize: str = opt("none", "Weights for decoding (samples, --generate_only, --chat, --serve, "
                                "--benchmark) and --eval_only: none keeps the sampling dtype; int8 "
                                "stores every linear layer as int8 with one scale per output row "
                                "(weight-only: a quarter of fp32's bytes to read per token). "
                                "Checkpoints and exports keep full weights.", "generation", QUANTIZERS)
    compile_decode: bool = opt(True, "Compile the one-token decode step of a model whose weights stay "
                                     "(--generate_only, --chat, --serve; --benchmark times the compile "
                                     "apart): on CPU ahead of time with the weights built in (AOTInductor, "
                                     "a C++ compiler needed: without one, eager, said in one line), once per "
                                     "model, batch width and context, kept in cache_dir/decode_steps for "
                                     "later launches; on GPUs through torch.compile. Training's samples "
                                     "decode eagerly (their weights change). The cache's shapes are static, "
                                     "so advancing the position never recompiles; --serve steps all "
                                     "--serve_batch rows every time, one compile.", "generation")
    decode_cache_gb: float = opt(4.0, "Most disk the compiled decode steps in cache_dir/decode_steps may "
                                      "take (each holds its weights: about 270 MB for a 135M model in bf16); "
                                      "past it the least recently used go first. 0: compile at every "
                                      "launch, keep nothing.", "generation")
    clear_decode_cache: bool = opt(False, "Remove the compiled decode steps kept in cache_dir/decode_steps "
                                          "and exit.", "generation")
    serve: bool = opt(False, "Serve a trained model over HTTP until Ctrl-C: an OpenAI-compatible API "
                             "(/v1/models, /v1/completions, /v1/chat/completions, streamed or not) and "
                             "a chat page at /. Concurrent requests are decoded together, up to "
                             "--serve_batch at once; more wait in a queue. --max_new_tokens is the "
                             "max_tokens of a request that gives none; a request may ask for more, and "
                             "a reply ends where the context (block_size) does.", "generation")
    host: str = opt("127.0.0.1", "Address --serve listens on; 0.0.0.0 opens it to the network.",
                    "generation")
    port: int = opt(8000, "Port --serve listens on; 0 picks a free one (the address is printed).",
                    "generation")
    api_key: str = opt("", "With --serve: require the header 'Authorization: Bearer KEY' on /v1/ "
                           "requests.", "generation")
    serve_batch: int = opt(8, "With --serve: the most requests (choices) decoded together; each holds "
                              "a KV cache of block_size positions.", "generation")
    # evaluation, metrics and export
    eval_only: bool = opt(False, "Report loss, perplexity, bits per byte and next-token accuracy of "
                                 "a checkpoint (on --eval_data, else the run's val split), or with "
                                 "--eval_tasks its benchmark scores (and the loss too where "
                                 "--eval_data is given); no training.", "evaluation, metrics and export")
    eval_data: str = opt("", "UTF-8 text file for --eval_only.", "evaluation, metrics and export")
    eval_tasks: str = opt("", "Benchmarks, scored as lm-evaluation-harness scores its stock tasks: "
                              "task files (JSON Lines or Parquet in a dataset's layout: HellaSwag, "
                              "ARC, PIQA, Winogrande, LAMBADA, MMLU, or context/choices/gold), "
                              "folders and globs, comma-separated; with --eval_only, and at each "
                              "evaluation in training (metrics.jsonl, the eval line, loss.png).",
                          "evaluation, metrics and export")
    task_format: str = opt("auto", "The layout of the --eval_tasks files: auto finds it from the "
                                   "first record's fields.", "evaluation, metrics and export",
                           ("auto", TASK_FORMATS))
    eval_tasks_limit: int = opt(0, "Score only the first N items of each --eval_tasks file (0: all).",
                                "evaluation, metrics and export")
    task_chat: bool = opt(False, "Score --eval_tasks as conversations (a chat model only): each context "
                                 "the user's message through the chat template, each choice the "
                                 "start of the reply. By default a task is plain text, as "
                                 "lm-evaluation-harness's stock tasks give it.",
                          "evaluation, metrics and export")
    benchmark: bool = opt(False, "Time the configured model here (training tokens/s and MFU, peak "
                                 "memory, generation tokens/s with and without the KV cache); "
                                 "writes nothing.", "evaluation, metrics and export")
    plot: bool = opt(False, "Draw out_dir/loss.png from out_dir/metrics.jsonl and exit (training "
                            "draws it at its end anyway when matplotlib is installed).",
                     "evaluation, metrics and export")
    peak_flops: float = opt(0.0, "Peak FLOP/s of the device for MFU; 0 = from a table of GPUs, or "
                                 "a short matmul measurement on CPUs (cached).",
                            "evaluation, metrics and export")
    tensorboard: bool = opt(False, "Also log metrics to TensorBoard in out_dir/tensorboard.",
                            "evaluation, metrics and export")
    wandb: bool = opt(False, "Also log metrics to Weights & Biases.", "evaluation, metrics and export")
    wandb_project: str = opt("tinyllm", "Weights & Biases project name.",
                             "evaluation, metrics and export")
    export: str = opt("none", "Export a checkpoint (--ckpt, else out_dir's best) and exit: hf "
                              "(transformers directory), safetensors, onnx, torchscript, tiktoken "
                              "(BPE tokenizers), gguf (llama.cpp, Ollama, LM Studio).",
                      "evaluation, metrics and export",
                      ("none", EXPORTERS))
    export_dir: str = opt("", "Where --export writes; default out_dir/export-FORMAT.",
                          "evaluation, metrics and export")
    gguf_type: str = opt("f16", "Weights of --export gguf: f32, f16, or q8_0 (8 bits in blocks of 32, "
                                "about half the size of f16).", "evaluation, metrics and export",
                         ("f32", "f16", "q8_0"))


# Keys that say what to do in this invocation, and where; they never carry over from a
# checkpoint's config (a model trained on a GPU must sample on a laptop).
RUN_KEYS = ("device", "resume", "allow_data_change", "overwrite", "generate_only", "chat", "ckpt",
            "clear_decode_cache",
            "stop_at_step", "eval_only", "eval_data", "benchmark", "plot", "export", "export_dir",
            "gguf_type", "serve", "host", "port", "api_key", "serve_batch", "eval_tasks", "task_format",
            "eval_tasks_limit", "task_chat", "fsdp", "fsdp_reshard_after_forward")


SERVE_KEYS = ("host", "port", "api_key", "serve_batch")  # settings of --serve alone
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
ARCH_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["arch"])


class TinyLLMError(Exception):
    """A problem with the user's input: main() prints its one-line message and exits with 2."""


class TrainingStopped(Exception):
    """Training ended early on purpose (a signal, or too many non-finite steps), after saving
    what could be saved; main() prints the message and exits with `status`."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# Runtime: device, dtype, torchrun ranks, seeding, printing, atomic files
# ----------------------------------------------------------------------------------------------

def is_valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    return name.startswith("cuda:") and name[5:].isdigit()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """Resolve --device; auto prefers cuda, then mps, then cpu. Under torchrun each process
    takes the GPU of its local rank."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TinyLLMError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TinyLLMError("--device mps: MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def require(module: str, what: str, install: str | None = None) -> Any:
    """Import an optional library when a feature needs it, or stop with one line that says how
    to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TinyLLMError(f"{what} needs {module.split('.')[0]}: pip install "
                           f"{install or module.split('.')[0]}") from None


def first_line(e: BaseException) -> str:
    """An exception's first line, kept short for a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # AVX512-BF16 or AMX tiles; elsewhere bf16 is emulated and slow
        return any(getattr(torch.cpu, f, lambda: False)() for f in
                   ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def pick_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The autocast dtype: --dtype, or for auto the fastest exact-enough one the device has."""
    if not cfg.amp or cfg.dtype == "float32":
        return torch.float32
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if has_native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def keep_freed_memory(cfg: Config, device: torch.device) -> bool:
    """--keep_freed_memory: make glibc serve every allocation from its heap and never shrink it.
    By default blocks over 32 MB (a CPU step's activations) are unmapped when freed, and the
    next step pays a page fault per 4 KB to map them again: seconds of kernel time per step of a
    10M model (README: Performance). Returns whether it took effect (not on GPUs, nor without glibc)."""
    if not cfg.keep_freed_memory or device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def release_freed_memory() -> None:
    """Hand memory that glibc keeps after a large native job (BPE training, encoding) back to
    the system, so that the stages after it do not start from that job's high-water mark."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> Dist | None:
        """This process's place as torchrun describes it (RANK, LOCAL_RANK, WORLD_SIZE), or None
        when torchrun did not start it: the one place the rank is read."""
        env = os.environ
        if "RANK" not in env:
            return None
        return cls(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))


SINGLE_PROCESS = Dist()


def init_distributed(cfg: Config) -> Dist:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR...): nccl on CUDA, gloo on CPU; single-node and multi-node alike."""
    place = Dist.from_environment()
    if place is None:
        if cfg.ddp or cfg.fsdp:
            flag = "--fsdp" if cfg.fsdp else "--ddp"
            raise TinyLLMError(f"{flag} needs torchrun to start the processes: torchrun --standalone "
                               f"--nproc_per_node=N train_tinyllm.py ...")
        return SINGLE_PROCESS
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(place.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return place


def is_rank0() -> bool:
    place = Dist.from_environment()
    return place is None or place.rank == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on the main process only, flushed so that logs stream through pipes."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Every global RNG state as plain data that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it into place, so that a
    crash or a full disk never leaves a half-written file where the old one was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with contextlib.suppress(OSError):  # some filesystems (vfat) refuse chmod: then as it is
            os.chmod(tmp, 0o666 & ~current_umask())  # as open() would make it (some writers use 0600)
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)  # name the file the user knows, not the temporary one
        raise
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def sha256_hex(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Model: one GPT class; norms, MLPs and position encodings come from registries; the KV cache beside attention
# ----------------------------------------------------------------------------------------------

def head_size(cfg: Config) -> int:
    """Width of one attention head."""
    return cfg.head_dim or cfg.n_embd // max(cfg.n_head, 1)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its weight in the input's dtype: under bf16 autocast the queries and keys
    that --qk_norm normalizes come out of their linear layer in bf16, and torch's fused kernel
    refuses an fp32 weight beside them (a warning on the user's screen, then its unfused path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


NORMS.update({
    "layernorm": lambda dim, cfg: nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias),
    "rmsnorm": lambda dim, cfg: RMSNorm(dim, eps=cfg.norm_eps),
})


def mlp_hidden_size(cfg: Config) -> int:
    """--mlp_hidden, else the width the MLP class declares for the model width."""
    return cfg.mlp_hidden or MLPS[cfg.mlp].hidden_size(cfg.n_embd)


class GeluMLP(nn.Module):
    approximate = "none"  # exact erf GELU

    @staticmethod
    def hidden_size(width: int) -> int:
        return 4 * width

    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, mlp_hidden_size(cfg), bias=cfg.bias)
        self.out_proj = nn.Linear(mlp_hidden_size(cfg), cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.fc(x), approximate=self.approximate))


class TanhGeluMLP(GeluMLP):
    """GELU by its tanh approximation: what GPT-2 was trained with (transformers' gelu_new)."""
    approximate = "tanh"


class ReLU2MLP(GeluMLP):
    """ReLU squared (So et al., Primer, 2021; modded-nanogpt's MLP): GELU's layout, a cheaper and
    sparser activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.relu(self.fc(x)).square())


class SwiGLUMLP(nn.Module):
    @staticmethod
    def hidden_size(width: int) -> int:  # the parameters of a 4x GELU MLP, rounded up to a multiple of 32
        return 32 * math.ceil(8 * width / 3 / 32)

    def __init__(self, cfg: Config):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.out_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.silu(self.gate(x)) * self.up(x))


MLPS.update({"gelu": GeluMLP, "gelu_tanh": TanhGeluMLP, "relu2": ReLU2MLP, "swiglu": SwiGLUMLP})


class LearnedPositions(nn.Module):
    """Absolute position embeddings added to the token embeddings (GPT-2)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)

    def embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return x + self.wpe(pos if pos is not None else torch.arange(x.size(1), device=x.device))

    def rotate(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return x


class RotaryPositions(nn.Module):
    """Rotary embeddings in the rotate-half layout (the two halves of each head pair up), the
    layout HuggingFace Llama uses, so exported q/k weights need no permutation."""

    def __init__(self, cfg: Config):
        super().__init__()
        head_dim = head_size(cfg)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(cfg.block_size).float(), inv_freq)  # (T, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return x

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryPositions:
        """Move with the model but stay float32: angles in bf16 would blur positions."""
        super()._apply(fn, recurse)
        self.cos, self.sin = self.cos.float(), self.sin.float()
        return self

    def rotate(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, H, D) at positions pos (B, T), or 0..T-1 when pos is None."""
        T, half = x.size(1), x.size(-1) // 2
        cos = (self.cos[pos] if pos is not None else self.cos[:T]).unsqueeze(-2)  # (B or 1, T, 1, D/2)
        sin = (self.sin[pos] if pos is not None else self.sin[:T]).unsqueeze(-2)
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


POSITIONS.update({"learned": LearnedPositions, "rope": RotaryPositions})


def attention_mask(T: int, window: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (T, T) mask of T queries against themselves, True = may attend; None when plain
    causal attention (is_causal) is exact."""
    if window == 0:
        return None
    q = torch.arange(T, device=device).unsqueeze(1)
    k = torch.arange(T, device=device).unsqueeze(0)
    return (k <= q) & (k > q - window)  # the window counts the current token


class KVCache:
    """Preallocated keys and values of every layer for the n_kv_head heads. `pos`, where the
    next tokens go, is kept twice: an int for the host and a tensor for the model, which reads
    only the tensor, so that a compiled decode step sees the same shapes and no Python number
    change as the position advances (it would recompile for every new one). The tensor holds a
    position per row: rows of a served batch are at different places in their own texts.
    Attention reads the first `reach` slots (see `written`), and a mask hides the slots among
    them that are not written yet."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_kv_head, length, head_dim)
        # a tensor per layer: an update in place then touches its own layer only, also compiled
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.slots = torch.arange(length, device=device)
        self.pos, self.pos_t = 0, torch.zeros(batch, dtype=torch.long, device=device)
        # where update() writes: (row, head) index grids that broadcast against positions (B, 1, T)
        self.row_ids = torch.arange(batch, device=device).view(batch, 1, 1)
        self.head_ids = torch.arange(n_kv_head, device=device).view(1, n_kv_head, 1)
        self.reach: int | torch.SymInt = length  # set by each forward pass (GPT.trunk)

    @property
    def capacity(self) -> int:
        return self.k[0].size(2)

    @property
    def batch(self) -> int:
        return self.k[0].size(0)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's memory: what it
        writes, and where it moves their positions, lands here."""
        view = copy.copy(self)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.pos_t, view.row_ids = self.pos_t[start:stop], self.row_ids[:stop - start]
        return view

    def copy_rows(self, index: torch.Tensor, pos: torch.Tensor) -> KVCache:
        """A new cache of the rows `index` (B2,) (a row may come several times), each at its
        position in `pos` (B2,): every copy goes on from its row's text on its own (a benchmark's
        choices after their shared context)."""
        out = copy.copy(self)
        out.k, out.v = [k[index] for k in self.k], [v[index] for v in self.v]
        out.pos_t, out.row_ids = pos.clone(), torch.arange(len(index), device=index.device).view(-1, 1, 1)
        return out

    def seek(self, pos: int) -> None:
        """Go to `pos`: what follows is written from there (and what was there is forgotten)."""
        self.pos = pos
        self.pos_t.fill_(pos)

    def advance(self, T: int) -> None:
        self.pos += T
        self.pos_t += T

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the next T tokens of each row."""
        return self.pos_t.unsqueeze(1) + self.slots[:T]

    def written(self, T: int) -> int | torch.SymInt:
        """How many slots attention reads for the next T tokens: up to the furthest row's last
        one, not the whole cache (early in a 2,048-token context, a few dozen slots instead of
        2,048), where that is cheap to know: eager on CPU, and in the decode step compiled ahead
        of time, as a size its code takes from the positions as it runs. A GPU would wait for
        the positions, and torch.compile would recompile for each count: there, every slot."""
        if torch.compiler.is_exporting():
            last = self.pos_t.max().item()
            torch._check(last >= 0)
            torch._check(last + T <= self.capacity)
            return last + T
        if torch.compiler.is_compiling() or self.pos_t.device.type != "cpu":
            return self.capacity
        return min(int(self.pos_t.max()) + T, self.capacity)

    def mask(self, pos: torch.Tensor, window: int) -> torch.Tensor:
        """(B, 1, T, reach) boolean mask, True = may attend, for queries at pos (B, T)."""
        pos = pos.unsqueeze(-1)  # (B, T, 1) against the slots (reach,)
        slots = self.slots.narrow(0, 0, self.reach)
        allowed = slots <= pos
        if window:
            allowed &= slots > pos - window  # the window counts the current token
        return allowed.unsqueeze(1)  # the same for every head

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at positions pos (B, T); return the layer's first `reach` slots."""
        # row b's tokens at its own positions. An indexed write, not scatter_: the compiler
        # writes that in place, where it copied the whole layer twice for a scatter_.
        where = (self.row_ids, self.head_ids, pos.unsqueeze(1))  # broadcast to (B, H_kv, T)
        self.k[layer].index_put_(where, k.to(self.k[layer].dtype))
        self.v[layer].index_put_(where, v.to(self.v[layer].dtype))
        return self.k[layer].narrow(2, 0, self.reach), self.v[layer].narrow(2, 0, self.reach)


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query and multi-query attention in one path: query head h reads
    key/value head h // (n_head / n_kv_head)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = head_size(cfg)
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=cfg.bias)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        self.qkv_sizes = [self.n_head * self.head_dim] + 2 * [self.n_kv_head * self.head_dim]  # q, k, v rows
        self.q_norm = NORMS[cfg.norm](self.head_dim, cfg) if cfg.qk_norm else nn.Identity()
        self.k_norm = NORMS[cfg.norm](self.head_dim, cfg) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: nn.Module, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        q = positions.rotate(self.q_norm(q.view(B, T, H, D)), pos)
        k = positions.rotate(self.k_norm(k.view(B, T, H_kv, D)), pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, H_kv, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v, pos)  # (B, H_kv, reach, D), in the cache's dtype
            q = q.to(k.dtype)
        if cache is not None and T == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
            y = attend_one_query(q, k, v, mask)
        else:
            with attention_kernels(q):
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None,
                    dropout_p=self.dropout if self.training else 0.0, enable_gqa=H != H_kv)
        y = y.transpose(1, 2).reshape(B, T, H * D).to(x.dtype)  # (B, T, H*D); H*D = C unless head_dim is set
        return self.resid_dropout(self.out_proj(y))


def attention_kernels(q: torch.Tensor) -> contextlib.AbstractContextManager:
    """Which of torch's attention kernels may run: any, except where training on a CPU in bf16
    with up to 128 queries, where the plain one (products and a softmax) is kept: there torch's
    flash kernel takes 2-5x as long for its backward pass (README: Performance)."""
    on_cpu = q.device.type == "cpu"
    dtype = torch.get_autocast_dtype("cpu") if on_cpu and torch.is_autocast_enabled("cpu") else q.dtype
    if on_cpu and dtype == torch.bfloat16 and q.size(-2) <= 128 and q.requires_grad:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row over the cache, written out for the compiler: q (B, H, 1, D),
    k and v (B, H_kv, reach, D), mask (B, 1, 1, reach) -> (B, H, 1, D). The compiled decode
    step fuses it into one loop over the cache; SDPA is a separate call there, and for one query
    its fixed cost is larger than the work. Eager decoding keeps SDPA, and so do GPUs (where the
    cache is in half precision, which SDPA accumulates in fp32 and this would not)."""
    B, H, _, D = q.shape
    H_kv = k.size(1)
    q = q.view(B, H_kv, H // H_kv, 1, D)  # the query heads that share each key/value head
    scores = (q * k.unsqueeze(2)).sum(-1) / math.sqrt(D)  # (B, H_kv, H/H_kv, capacity)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2).view(B, H, 1, D)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm_1 = NORMS[cfg.norm](cfg.n_embd, cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = nn.Identity() if cfg.parallel_block else NORMS[cfg.norm](cfg.n_embd, cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x: torch.Tensor, positions: nn.Module, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, positions, mask, cache, layer, pos)
        # A parallel block feeds the MLP the same normalized input as attention.
        return x + self.mlp(h if self.parallel else self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.positions = POSITIONS[cfg.pos_encoding](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # --unet_skips: block i's output reaches block L-1-i's input, scaled by skip_weights[i], i < L // 2
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips else None
        self.norm_f = NORMS[cfg.norm](cfg.n_embd, cfg)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.grad_checkpointing = False  # a runtime choice, not part of the architecture
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") and cfg.zero_init_out_proj:  # each block the identity
                nn.init.zeros_(p)
            elif name.endswith("out_proj.weight"):  # residual projections: keep the stream's variance
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        attn = self.blocks[0].attn
        return KVCache(self.cfg.n_layer, batch, attn.n_kv_head, self.cfg.block_size, attn.head_dim,
                       device, dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                label_smoothing: float = 0.0, z_loss: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T or 1, V) and the loss vs targets: plain mean
        cross-entropy unless label smoothing or z-loss are asked for (training only). With a
        cache, idx follows what it holds, and it advances past idx."""
        x = self.trunk(idx, cache)
        if cache is not None:
            cache.advance(idx.size(1))
        if targets is None:
            return self.head(x[:, -1:] if last_only else x, fp32=False), None
        logits = self.head(x)  # (B, T, V); the loss in fp32 even under autocast
        # the mean over the targets that count (IGNORE marks the rest): a batch with none gives 0
        learned = (targets != IGNORE).float()
        count = learned.sum().clamp(min=1)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=label_smoothing,
                               ignore_index=IGNORE, reduction="sum") / count
        if z_loss:
            loss = loss + z_loss * (torch.logsumexp(logits, dim=-1).pow(2) * learned).sum() / count
        return logits, loss

    def trunk(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """idx (B, T) -> the last block's output (B, T, C); reads the cache's position, never moves it."""
        T = idx.size(1)
        pos = cache.positions(T) if cache is not None else None
        if cache is not None:
            cache.reach = cache.written(T)
        x = self.drop(self.positions.embed(self.wte(idx), pos))  # (B, T, C)
        mask = cache.mask(pos, self.cfg.sliding_window) if cache is not None \
            else attention_mask(T, self.cfg.sliding_window, idx.device)
        skips: list[torch.Tensor] = []  # --unet_skips: the first half's outputs, for the second half
        halves = len(self.skip_weights) if self.skip_weights is not None else 0
        for layer, block in enumerate(self.blocks):
            twin = len(self.blocks) - 1 - layer
            if twin < halves:  # a block of the second half: its twin's output joins its input
                x = x + self.skip_weights[twin] * skips.pop()
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, self.positions, mask, cache, layer, pos,
                                                      use_reentrant=False)
            else:
                x = block(x, self.positions, mask, cache, layer, pos)
            if layer < halves:
                skips.append(x)
        return x

    def step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """float32 logits (B, V) after idx (B, T) at the cache's position, which stays: the decode
        step that generation compiles (the caller advances the cache)."""
        return self.head(self.trunk(idx, cache)[:, -1])

    def head(self, x: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """The last block's output (..., C) -> logits (..., V), in float32 unless not `fp32` (then
        in the output layer's dtype): final norm, output layer, and the soft cap where
        --logit_softcap sets one (it bounds what the head can say)."""
        logits = self.lm_head(self.norm_f(x))
        logits = logits.float() if fp32 else logits
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits


# ---- LoRA's adapters, as training sees them (tinyllm_hub.py makes them: --lora_rank) -------

LORA_TARGETS = {"attn": ("attn.qkv", "attn.out_proj"),  # --lora_targets: names of block layers
                "mlp": ("mlp.fc", "mlp.gate", "mlp.up", "mlp.out_proj")}


def lora_target_set(targets: str) -> set[str]:
    """--lora_targets as a set: 'mlp, attn' is 'attn,mlp'."""
    return {t.strip() for t in targets.split(",")}


def has_lora(model: nn.Module) -> bool:
    """Whether the model carries LoRA adapters (parameters lora_A and lora_B) on a frozen base."""
    return any(".lora_" in name for name, _ in model.named_parameters())


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of a tensor: all of it, or under --fsdp its shard (a DTensor's)."""
    return t.to_local() if hasattr(t, "to_local") else t


def saved_weights(model: GPT) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: every weight, or with LoRA the adapters only (the
    base is referenced by --init_from and its fingerprint)."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if ".lora_" in k} if has_lora(model) else state


def load_weights(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """The inverse of saved_weights."""
    expected = saved_weights(model).keys()
    if has_lora(model) and state.keys() != expected:
        raise TinyLLMError(f"the checkpoint's adapters ({len(state)} tensors) do not fit this model's "
                           f"{len(expected)}; use the --lora_rank and --lora_targets it was trained with")
    try:
        model.load_state_dict(state, strict=not has_lora(model))
    except RuntimeError as e:
        raise TinyLLMError(f"the checkpoint's weights do not fit the model its config describes "
                           f"({first_line(e)}); the checkpoint is damaged or was edited") from None


# ----------------------------------------------------------------------------------------------
# Tokenizers: char-level and byte-level BPE, both as HuggingFace `tokenizers` objects
# ----------------------------------------------------------------------------------------------

EOT = "<|endoftext|>"


# Special tokens that end a text, in order of preference: ours and GPT-2's, Llama 3's, the
# SentencePiece family's (Llama 2, TinyLlama), Gemma's. Imported tokenizers bring one of them.
END_OF_TEXT = (EOT, "<|end_of_text|>", "</s>", "<eos>")
# Special tokens that end a turn of a chat: ChatML's, Llama 3's, Gemma's.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


class TextTokenizer:
    """A HuggingFace tokenizer plus what training and sampling need to know about it."""

    def __init__(self, hf: Any):
        self.hf = hf
        model = json.loads(hf.to_str())["model"]  # ours: WordLevel whose vocabulary has no unknown token
        self.kind = "char" if model["type"] == "WordLevel" and model.get("unk_token") not in model["vocab"] \
            else "other"
        self.vocab = hf.get_vocab(with_added_tokens=True)
        special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        self.special = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True)))) \
            if special else None  # matched whole by the tokenizer, never character by character
        self.vocab_special = {t: self.vocab[t] for t in special}
        self.eot = next((t for t in END_OF_TEXT if t in special), None)  # between documents
        self.eot_id = hf.token_to_id(self.eot) if self.eot else None
        # the one rule for what ends a reply, in every mode and every export: end-of-text, or a
        # chat's end of turn where the tokenizer has one (llama.cpp stops at both too)
        self.end_ids = [i for i in (self.eot_id, *map(self.vocab_special.get, END_OF_TURN)) if i is not None]

    @classmethod
    def from_str(cls, text: str) -> TextTokenizer:
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def to_str(self) -> str:
        return self.hf.to_str()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def unknown_chars(self, text: str) -> list[str]:
        """Characters a char-level vocabulary cannot encode (none for byte-level BPE)."""
        if self.kind != "char":
            return []
        return sorted(set(self.special.sub("", text) if self.special else text) - self.vocab.keys())

    def start_ids(self) -> list[int]:
        """What an empty prompt starts from when the checkpoint does not say (older ones; see
        start_ids_for): end-of-text, else a newline, else token 0."""
        if self.eot_id is not None:
            return [self.eot_id]
        return [self.vocab["\n"]] if "\n" in self.vocab else [0]


def train_char_tokenizer(texts: str | Iterator[str]) -> TextTokenizer:
    """One token per distinct character (a WordLevel model over single-character pieces), plus
    <|endoftext|> as the special token that separates documents."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars: set[str] = set()
    for text in [texts] if isinstance(texts, str) else texts:
        chars.update(text)
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    hf = Tokenizer(models.WordLevel(vocab, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([EOT])
    return TextTokenizer(hf)


def train_bpe_tokenizer(chunks: Iterator[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), with <|endoftext|> as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    in_background(lambda: hf.train_from_iterator(chunks, trainer=trainer))
    return TextTokenizer(hf)


class NativeWorkInterrupted(KeyboardInterrupt):
    """Ctrl-C while native code (BPE training) ran in a worker: the process must leave without
    Python's teardown, which would abort in that library's threads; main() sees to it."""


def in_background(work: Callable[[], Any]) -> Any:
    """Run `work` in a worker thread while this one waits: a long call into native code (BPE
    training) only notices Ctrl-C when it returns, but this thread takes it at once. Its
    exception, if any, is raised here; an interrupt as NativeWorkInterrupted."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as e:  # handed to the waiting thread
            result["error"] = e
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        raise NativeWorkInterrupted from None
    if isinstance(result.get("error"), KeyboardInterrupt):
        raise NativeWorkInterrupted from None
    if "error" in result:
        raise result["error"]
    return result.get("value")


TOKENIZERS.update({
    "char": lambda texts, cfg: train_char_tokenizer(texts),
    "bpe": lambda texts, cfg: train_bpe_tokenizer(texts, cfg.bpe_vocab_size),
})


def load_tokenizer_file(path: str) -> TextTokenizer:
    try:
        return TextTokenizer.from_str(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinyLLMError(f"--tokenizer_path {path} does not exist; give a tokenizer.json file or "
                           f"leave it empty to train one") from None
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise TinyLLMError(f"--tokenizer_path {path} is not a HuggingFace tokenizer.json ({e}); "
                           f"give a tokenizer.json file or leave it empty to train one") from None


ENCODERS = Registry("fast encoding", {"tiktoken": Elsewhere("tinyllm_data")})  # tok -> encoder, or None


def fast_batch_encoder(tok: TextTokenizer) -> Callable[[list[str]], list[list[int]]]:
    """The fastest exact batch encoder for `tok`: tiktoken run on our own ranks where tiktoken is
    installed and can express the tokenizer (our byte-level BPE), with the same ids and several
    times the speed (README: Performance); else HF's. Texts must hold no special tokens
    (document pieces never do)."""
    if tok.kind == "char":
        return tok.encode_batch
    if importlib.util.find_spec("tiktoken") is None:
        print0("data: encoding with the tokenizers library; pip install tiktoken to encode the same "
               "ids about five times faster")
        return tok.encode_batch
    try:
        fast = ENCODERS.entry("tiktoken", "the fast tiktoken encoder")
    except TinyLLMError as e:
        print0(f"data: encoding with the tokenizers library, since {e}")
        return tok.encode_batch
    return fast(tok) or tok.encode_batch


# ----------------------------------------------------------------------------------------------
# Data: the token files and random windows training reads, and where they come from
# ----------------------------------------------------------------------------------------------

@dataclass
class TokenSplit:
    """One split's token file; in RAM, or opened as a fresh memmap per batch (a long-lived
    memmap that is fancy-indexed lets resident memory grow)."""
    path: Path
    dtype: np.dtype
    memmap: bool
    array: np.ndarray | None = None
    tokens_per_byte: float = 0.0  # for bits per byte; known for the val split
    start_ids: list[int] = field(default_factory=list)  # what samples start from; the train split's
    sha256: str = ""  # of the token file: what a resume compares
    mask_path: Path | None = None  # conversations: 1 per token to learn (assistant replies), else 0
    mask_array: np.ndarray | None = None
    starts: np.ndarray | None = None  # conversations: where each begins; windows start there

    def __post_init__(self) -> None:
        if not self.memmap:
            self.array = np.fromfile(self.path, dtype=self.dtype)
            if self.mask_path is not None:
                self.mask_array = np.fromfile(self.mask_path, dtype=np.uint8)

    def tokens(self) -> np.ndarray:
        return self.array if self.array is not None else np.memmap(self.path, self.dtype, mode="r")

    def mask(self) -> np.ndarray | None:
        """Which tokens are learned (None: all of them)."""
        if self.mask_path is None:
            return None
        return self.mask_array if self.mask_array is not None else \
            np.memmap(self.mask_path, np.uint8, mode="r")

    def __len__(self) -> int:
        return self.path.stat().st_size // np.dtype(self.dtype).itemsize


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def start_ids_for(tok: TextTokenizer, split: TokenSplit) -> list[int]:
    """What an empty prompt starts from: a token the model saw text follow in training. The
    end-of-text token where the data has it (between documents), else a newline where it has
    one, else the data's first token (a one-document corpus never shows end-of-text)."""
    newline = tok.encode("\n") if not tok.unknown_chars("\n") else []
    candidates = ([[tok.eot_id]] if tok.eot_id is not None else []) + ([newline] if len(newline) == 1 else [])
    for ids in candidates:
        if any(np.any(chunk == ids[0]) for chunk in token_chunks(split.path, split.dtype)):
            return ids
    return [int(next(token_chunks(split.path, split.dtype))[0])]


def token_chunks(path: Path, dtype: np.dtype, start: int = 0, stop: int | None = None,
                 size: int = 1 << 22) -> Iterator[np.ndarray]:
    """Tokens start..stop of a token file, `size` at a time, read rather than mapped: pages of a
    memmap that is read through count in the resident memory of the process until it is
    closed, so a scan of a 3 GB token file would look like 3 GB of memory."""
    itemsize = np.dtype(dtype).itemsize
    stop = path.stat().st_size // itemsize if stop is None else stop
    with open(path, "rb") as f:
        f.seek(start * itemsize)
        for i in range(start, stop, size):
            yield np.fromfile(f, dtype, count=min(size, stop - i))


IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index)


def get_batch(split: TokenSplit, batch_size: int, block_size: int, generator: torch.Generator,
              device: torch.device, dist: Dist = SINGLE_PROCESS) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens: inputs, and targets shifted by one. Every rank
    draws the whole global batch from the same generator and keeps its own slice, so ranks see
    different data and N ranks see exactly what one process with N times the batch would."""
    if split.starts is not None:  # each window opens a conversation, so every reply has its prompt
        fit = split.starts[:np.searchsorted(split.starts, len(split) - block_size)]
        picks = torch.randint(len(fit), (dist.world_size * batch_size,), generator=generator)
        starts = torch.from_numpy(fit[picks.numpy()])
    else:
        starts = torch.randint(len(split) - block_size, (dist.world_size * batch_size,), generator=generator)
    starts = starts[dist.rank * batch_size:(dist.rank + 1) * batch_size].tolist()
    data, mask = split.tokens(), split.mask()
    rows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each
    if mask is not None:  # conversations: only the replies are targets; the rest is ignored by the loss
        learn = torch.from_numpy(np.stack([mask[i + 1:i + block_size + 1] for i in starts]).astype(bool))
        y = y.masked_fill(~learn, IGNORE)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare_inputs(cfg: Config, ckpt: dict[str, Any] | None, dist: Dist = SINGLE_PROCESS,
                   tokenizer: str | None = None) -> tuple[TextTokenizer, dict[str, TokenSplit], str]:
    """Tokenizer (the checkpoint's, else `tokenizer` (an --init_from model's), else trained),
    token files and the hash of their content. Rank 0 builds the cache first; the other ranks
    then read it. Resuming on other data is refused here."""
    if dist.rank != 0:
        torch.distributed.barrier()
    corpus, val_corpus = load_corpus(cfg), load_val_corpus(cfg)
    if val_corpus is not None and val_corpus.chat != corpus.chat:
        kinds = ("conversations", "plain text") if corpus.chat else ("plain text", "conversations")
        raise TinyLLMError(f"--data_path holds {kinds[0]} but --val_data {cfg.val_data} {kinds[1]}; give "
                           f"--val_data of the same kind")
    known = ckpt["tokenizer"] if ckpt else tokenizer
    tok = TextTokenizer.from_str(known) if known else build_tokenizer(cfg, corpus)
    if tokenizer and not ckpt and corpus.chat and not cfg.chat_template and \
            not set(CHATML_TOKENS) <= tok.vocab_special.keys():  # a source without a chat format
        if cfg.lora_rank:
            raise TinyLLMError(f"--init_from {cfg.init_from} has no chat template, so ChatML's markers "
                               f"become new tokens, whose embeddings LoRA cannot train; fine-tune fully, or "
                               f"start from a model with a chat template")
        tok.hf.add_special_tokens([t for t in CHATML_TOKENS if t not in tok.vocab_special])
        tok = TextTokenizer(tok.hf)
        print0(f"tokenizer: added {', '.join(CHATML_TOKENS)} for ChatML ({tok.vocab_size} tokens); the "
               f"model's embedding grows to hold them")
    splits = prepare_data(cfg, corpus, tok, val_corpus)
    data = sha256_hex(splits["train"].sha256, splits["val"].sha256)
    if ckpt:
        check_same_data(cfg, ckpt, data)
    if dist.rank == 0 and dist.enabled:
        torch.distributed.barrier()
    return tok, splits, data


TOKEN_CACHE_FORMAT = 6  # bump when the layout of the token cache changes: old entries are ignored


def prepare_data(cfg: Config, corpus: Corpus, tok: TextTokenizer, val_corpus: Corpus | None = None
                 ) -> dict[str, TokenSplit]:
    """Train/val token files for this corpus and tokenizer (and the --val_data corpus, which is
    then the whole val split), made once and then reused."""
    held_out = f"val_data={val_corpus.fingerprint}" if val_corpus else repr(cfg.val_fraction)
    key = sha256_hex(str(TOKEN_CACHE_FORMAT), corpus.fingerprint, tok.to_str(), held_out)[:20]
    folder = Path(cfg.cache_dir) / f"tokens-{key}"
    if (folder / "meta.json").exists():
        print0(f"data: reusing token files in {folder}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        meta = encode_corpus(corpus, tok, folder, cfg.val_fraction, val_corpus)
        write_text_atomic(folder / "meta.json", json.dumps(meta))  # written last: marks complete
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    masked = meta.get("mask") and cfg.chat_loss == "assistant"
    splits = {name: TokenSplit(folder / f"{name}.bin", dtype, cfg.memmap_dataset,
                               mask_path=folder / f"{name}.mask" if masked else None)
              for name in ("train", "val")}
    splits["val"].tokens_per_byte = meta["val_tokens"] / max(1, meta["val_bytes"])
    for name, split in splits.items():
        if len(split) < cfg.block_size + 1:
            raise TinyLLMError(
                f"the {name} split has {len(split)} tokens but needs at least block_size + 1 = "
                f"{cfg.block_size + 1}; use a larger corpus, a smaller --block_size or a different "
                f"--val_fraction")
    if "start_ids" not in meta or "sha256" not in meta:  # found once per token cache, then kept
        meta["start_ids"] = start_ids_for(tok, splits["train"])
        meta["sha256"] = {name: file_sha256(split.path) for name, split in splits.items()}
        write_text_atomic(folder / "meta.json", json.dumps(meta))
    splits["train"].start_ids = meta["start_ids"]
    for name, split in splits.items():
        split.sha256 = meta["sha256"][name]
    if masked:
        for split in splits.values():
            split.starts = conversation_starts(split, tok)
        lengths = np.diff(np.append(splits["train"].starts, len(splits["train"])))
        if (lengths > cfg.block_size + 1).any():
            print0(f"data: {(lengths > cfg.block_size + 1).sum():,} of {len(lengths):,} conversations are "
                   f"longer than the context ({cfg.block_size} tokens) and are cut there")
    print0(f"data: {len(splits['train']):,} train and {len(splits['val']):,} val tokens")
    return splits


def conversation_starts(split: TokenSplit, tok: TextTokenizer) -> np.ndarray:
    """Where each conversation of a split begins: at 0 and after every end-of-text token (the
    token files hold it only between conversations). Those that leave no room for one target
    are dropped."""
    ends, offset = [], 0
    for chunk in token_chunks(split.path, split.dtype):
        ends.append(np.flatnonzero(chunk == tok.eot_id) + offset + 1)
        offset += len(chunk)
    starts = np.concatenate([[0], *ends]).astype(np.int64)
    return starts[starts < len(split) - 1]


# ---- Corpora: files, directories, globs and URLs; one reader per kind of file (READERS) ----

DEFAULT_CORPUS = "data/tiny_corpus.txt"
READ_SIZE = 1 << 22  # corpus files are read 4 MB at a time, never whole
NUL = b"\x00"  # never part of a multi-byte UTF-8 character: a text file has none
MIN_DOCS_FOR_DOC_SPLIT = 100  # fewer documents than this: the val split is the tail instead


@dataclass
class Corpus:
    """Where the training text comes from: files read in pieces (each file a document, further
    split at <|endoftext|> markers), or the built-in sample text held in memory."""
    name: str
    files: list[Path]
    fingerprint: str
    text: str = ""  # the built-in corpus only
    documents: int = 1
    n_bytes: int = 0  # of text, once decompressed
    chat: bool = False  # conversations, rendered with REPLY_START/REPLY_END around the replies
    settings: ReadSettings = field(default_factory=lambda: ReadSettings())  # defined below: looked up late

    def sources(self) -> Iterator[tuple[str, Iterator[str]]]:
        """(document key prefix, decoded blocks) per file, or the built-in text as one source.
        The prefix is the file's place in the corpus (its path below the folder that holds them
        all) without its format's ending: the same documents get the same keys, and so the same
        train/val split, wherever the corpus lives and whatever its file format."""
        if not self.files:
            yield "builtin", iter([self.text])
        folders = [p.resolve().parent for p in self.files]
        root = Path(os.path.commonpath(folders)) if folders else Path()
        for path, folder in zip(self.files, folders):
            place = (folder / path.name).relative_to(root)
            yield without_format_suffix(place).replace(os.sep, "/"), blocks_of(path, self.settings)


def load_corpus(cfg: Config, spec: str | None = None, flag: str = "--data_path") -> Corpus:
    """The corpus of --data_path (or of `spec`, such as --val_data), scanned and checked."""
    settings = ReadSettings(flag, cfg.text_field, cfg.raw_text, data_format=cfg.data_format,
                            template=cfg.chat_template)
    spec = cfg.data_path if spec is None else spec
    spec = spec or (DEFAULT_CORPUS if Path(DEFAULT_CORPUS).exists() else "")
    if not spec:
        corpus = builtin_corpus()
        print0(f"data: no --data_path and no {DEFAULT_CORPUS}: training on {corpus.name}, "
               f"{corpus.n_bytes / 1e6:.2f} MB; pass --data_path your.txt to train on your own text")
        return corpus
    files = resolve_data_path(spec, flag)
    if not files:
        raise TinyLLMError(f"{flag} {spec!r} names no files; give a file, directory, glob or URL")
    settings.kinds |= {"text" for p in files if reader_of(p, flag).yields == "text"}  # readers first
    documents, n_bytes = scan_files(files, settings)
    if len(settings.kinds) > 1:
        raise TinyLLMError(f"{flag} {spec} mixes conversations and plain text; train on one kind (a chat "
                           f"model learns only its replies), or set --data_format")
    chat = "conversations" in settings.kinds
    if not chat and cfg.data_format in CHAT_LAYOUTS:
        raise TinyLLMError(f"--data_format {cfg.data_format} is for conversations, but {settings.flag} "
                           f"{spec} holds plain text; drop the flag or point it at conversations (JSON "
                           f"Lines)")
    if not chat and cfg.chat_template and flag == "--data_path":
        print0("data: plain text, which the chat template renders none of; it stays the model's format "
               "for --chat, --serve and exports")
    name = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    print0(f"data: {name}, {n_bytes / 1e6:.2f} MB, {documents:,} {'conversation' if chat else 'document'}(s)")
    fingerprint = sha256_hex(*map(file_fingerprint, files), f"raw_text={cfg.raw_text}",
                             f"text_field={cfg.text_field}", f"data_format={cfg.data_format}",
                             f"template={settings.template or CHATML}" if chat else "")
    return Corpus(name, files, fingerprint, documents=documents, n_bytes=n_bytes, settings=settings,
                  chat=chat)


def load_val_corpus(cfg: Config) -> Corpus | None:
    return load_corpus(cfg, cfg.val_data, "--val_data") if cfg.val_data else None


def builtin_corpus() -> Corpus:
    """Python's own documentation topics (stdlib pydoc_data): ~0.46 MB of English prose and code
    that every Python install has, so the default run never needs the network."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"
    return Corpus("pydoc_data (Python's built-in documentation topics)", [], sha256_hex(text), text,
                  n_bytes=len(text.encode("utf-8")))


def resolve_data_path(spec: str, flag: str = "--data_path", fetch: bool = True) -> list[Path]:
    """--data_path: files, directories (their .txt and .md files, sorted), globs and http(s)
    URLs, comma-separated, in the order given. Without `fetch`, a URL is the file it would be
    downloaded to, and nothing is downloaded."""
    files: list[Path] = []
    for item in data_items(spec):
        if item.startswith(("http://", "https://")):
            found = [download(item, flag) if fetch else Path("data") / download_name(item)]
        elif any(ch in item for ch in "*?["):
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not found:
                raise TinyLLMError(f"{flag} {item} matches no files; check the pattern")
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if reader_for(p) and p.is_file())
            if not found:
                known = [sfx for r in READERS.values() for sfx in r.suffixes
                         if not sfx.endswith(COMPRESSIONS)]
                names = " or ".join(filter(None, [", ".join(known[:-1]), known[-1]]))
                raise TinyLLMError(f"{flag} {item} is a directory with no {names} files (compressed "
                                   f"ones count too); point {flag} at your text files")
        elif "," in spec and not Path(item).exists():
            raise TinyLLMError(f"{flag} {item} does not exist ({flag} takes several paths separated by "
                               f"commas; a name that holds a comma is taken whole when it exists); check "
                               f"each path")
        else:
            found = [Path(item)]
        files += [f for f in found if f not in files]
    return files


def data_items(spec: str) -> list[str]:
    """The comma-separated items of a data flag; commas that belong to an existing file or
    directory name (the longest such run of parts) do not separate."""
    parts, items, i = spec.split(","), [], 0
    while i < len(parts):
        whole = (j for j in range(len(parts), i + 1, -1) if Path(",".join(parts[i:j]).strip()).exists())
        j = next(whole, i + 1)
        items.append(",".join(parts[i:j]).strip())
        i = j
    return [item for item in items if item]


def download(url: str, flag: str = "--data_path", folder: Path = Path("data")) -> Path:
    """Fetch a URL once into data/ (atomically, with a progress bar) and reuse it afterwards."""
    import urllib.error
    import urllib.parse
    import urllib.request
    name = download_name(url)
    dest = folder / name
    if dest.is_file():
        print0(f"data: reusing {dest} (downloaded from {url})")
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            bar = byte_bar(total, f"downloading {name}")
            atomic_write(dest, lambda p: copy_stream(response, p, bar))
            bar.close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else \
            getattr(e, "reason", None) or e
        raise TinyLLMError(f"{flag} {url} could not be downloaded ({reason}); check the URL and "
                           f"the network, or download the file into data/ yourself") from None
    print0(f"data: downloaded {url} to {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return dest


def download_name(url: str) -> str:
    """The file a URL is downloaded to in data/: its own name, else one made from the URL."""
    import urllib.parse
    return Path(urllib.parse.urlparse(url).path).name or f"download-{sha256_hex(url)[:12]}.txt"


def copy_stream(source: Any, path: Path, bar: Any) -> None:
    with open(path, "wb") as f:
        while chunk := source.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))


def file_fingerprint(p: Path) -> str:
    """Size, mtime and a hash of the first and last MB: cheap for a 2 GB file, and changes
    whenever the file does in practice."""
    st = p.stat()
    return sha256_hex(str(p.resolve()), str(st.st_size), str(st.st_mtime_ns), *head_and_tail(p, st.st_size))


def head_and_tail(p: Path, size: int) -> tuple[bytes, bytes]:
    """The first and last MB of a file of `size` bytes (what the fingerprints hash)."""
    with open(p, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        return head, f.read(1 << 20)


def scan_files(files: list[Path], settings: ReadSettings) -> tuple[int, int]:
    """One pass over the files before any work: every check (UTF-8, binary, empty, a corrupt
    archive, records without text) happens here, records a reader skipped are reported, and
    the documents and bytes of text are counted. Returns (documents, bytes)."""
    documents = n_bytes = 0
    for p in files:
        check_text_file(p, settings.flag)
    packed = any(p.name.endswith(COMPRESSIONS) for p in files)  # then the text's size is unknown: no ETA
    bar = byte_bar(0 if packed else sum(p.stat().st_size for p in files), "scanning")
    keep = len(EOT) - 1  # the end of a block may hold the start of a marker
    for p in files:
        carry, has_text, open_text = "", False, False  # open_text: the current document has text
        start = documents
        for block in blocks_of(p, settings):
            *closed, carry = (carry + block).split(EOT)
            for part in closed:  # documents a marker ends; empty ones are no documents
                documents += open_text or bool(part.strip())
                open_text = False
            open_text = open_text or bool(carry[:-keep].strip())
            carry = carry[-keep:]
            has_text = has_text or bool(block.strip())
            size = len(block.encode("utf-8"))
            n_bytes += size
            bar.update(size)
        if not has_text:
            raise TinyLLMError(f"{settings.flag} {p} is empty; give it some text to train on")
        if str(p) in settings.skipped:
            print0(f"data: {settings.skipped[str(p)]}")
        documents += open_text or bool(carry.strip())
        if documents == start:  # text, but only <|endoftext|> markers and whitespace: no document
            raise TinyLLMError(f"{settings.flag} {p} holds no document, only <|endoftext|> markers and "
                               f"whitespace; give it some text to train on")
    bar.close()
    return documents, n_bytes


def check_text_file(p: Path, flag: str) -> None:
    if not p.exists():
        forms = "a UTF-8 text file, a directory, a glob or a URL" if flag == "--data_path" else \
            "a UTF-8 text file"
        raise TinyLLMError(f"{flag} {p} does not exist; point {flag} at {forms}")
    if p.is_dir():
        raise TinyLLMError(f"{flag} {p} is a directory; point {flag} at a UTF-8 text file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise TinyLLMError(f"{flag} {p} cannot be read ({e.strerror}); check its permissions") from None


@dataclass
class ReadSettings:
    """What a reader needs besides the file: the flag that named it (for messages), the field
    or column with the text, whether to keep the bytes as they are; and where it leaves the
    one-line summary of records it skipped, for the scan to report."""
    flag: str = "--data_path"
    text_field: str = "text"
    raw_text: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # path -> "skipped 3 of 10 lines of ..."
    data_format: str = "auto"
    template: str = ""  # renders conversations; empty: CHATML
    specials: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token for templates
    kinds: set[str] = field(default_factory=set)  # "text" and/or "conversations": what was read


@dataclass(frozen=True)
class Reader:
    """A kind of corpus file: the name endings a directory listing picks up, a function that
    yields a file's text in blocks, documents separated by <|endoftext|> (each file is a
    document of its own, further split at the markers in it), and what its documents are:
    "text", or "records" (JSON Lines: text or conversations, as each record's fields say, noted
    in ReadSettings.kinds). `home`: the sibling module that implements `blocks`."""
    suffixes: tuple[str, ...]
    blocks: Callable[[Path, ReadSettings], Iterator[str]] | None
    yields: str = "text"
    home: str = ""


COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # read through a decompressor, streamed


def raw_blocks(path: Path, flag: str) -> Iterator[bytes]:
    """A file's bytes in blocks of READ_SIZE; a compressed one's (COMPRESSIONS) decompressed on
    the fly by its entry in DECOMPRESSORS."""
    kind = next((c for c in COMPRESSIONS if path.name.endswith(c)), "")
    if kind:
        yield from DECOMPRESSORS.entry(kind, f"{flag} {path}")(path, flag)
        return
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            yield block


DECOMPRESSORS = Registry("", dict.fromkeys(COMPRESSIONS, Elsewhere("tinyllm_data")))  # (path, flag) -> bytes


def read_blocks(path: Path, settings: ReadSettings | None = None) -> Iterator[str]:
    """A UTF-8 file (compressed or not) as decoded blocks of about READ_SIZE bytes; a decoding
    error or a NUL byte (a binary file) is a TinyLLMError naming the byte offset."""
    flag = (settings or ReadSettings()).flag
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    blocks = raw_blocks(path, flag)
    while True:
        raw = next(blocks, b"")
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise TinyLLMError(f"{flag} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                               f"offset {offset + e.start}); convert it to UTF-8 or pick a text "
                               f"file") from None
        if "\x00" in text:
            at = offset + raw.find(NUL)
            raise TinyLLMError(f"{flag} {path} looks binary (it contains a NUL byte at offset {at}); "
                               f"point {flag} at a text file")
        if text:
            yield text
        if not raw:
            return
        offset += len(raw)


def compressed(*suffixes: str) -> tuple[str, ...]:
    return tuple(suffix + c for suffix in suffixes for c in ("", *COMPRESSIONS))


READERS = Registry("a corpus file", {
    "text": Reader(compressed(".txt", ".md"), read_blocks),
    "jsonl": Reader(compressed(".jsonl"), None, "records", "tinyllm_data"),
    "parquet": Reader((".parquet",), None, "text", "tinyllm_data"),
})


def without_format_suffix(path: Path) -> str:
    """The path without the ending its reader matched: data/stories.jsonl.gz -> data/stories."""
    reader = reader_for(path)
    ending = max((sfx for sfx in reader.suffixes if path.name.endswith(sfx)), key=len) if reader else ""
    return str(path)[:len(str(path)) - len(ending)] if ending else str(path)


def reader_for(path: Path) -> Reader | None:
    """The reader whose longest suffix ends the file's name (a name that is only the suffix,
    a dotfile, is no match), or None."""
    matches = [(len(sfx), r) for r in READERS.values() for sfx in r.suffixes
               if path.name.endswith(sfx) and len(path.name) > len(sfx)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def reader_of(path: Path, flag: str) -> Reader:
    """The reader of a corpus file (plain text where no reader claims its ending), its sibling
    module (and a compressed file's decompressor's) imported first; TinyLLMError naming the file
    when that is missing."""
    reader = reader_for(path) or READERS["text"]
    if reader.home:
        name = next(name for name, entry in READERS.items() if entry is reader)
        reader = READERS.entry(name, f"{flag} {path}")
    packed = next((c for c in COMPRESSIONS if path.name.endswith(c)), "")
    if packed:
        DECOMPRESSORS.entry(packed, f"{flag} {path}")
    return reader


def blocks_of(path: Path, settings: ReadSettings | None = None) -> Iterator[str]:
    """A corpus file's text blocks, read by the reader of its kind (a file named directly whose
    ending no reader claims is read as plain text), normalized unless --raw_text."""
    settings = settings or ReadSettings()
    blocks = reader_of(path, settings.flag).blocks(path, settings)
    return blocks if settings.raw_text else normalized(blocks)


def normalized(blocks: Iterator[str]) -> Iterator[str]:
    """Text as its author meant it: a leading byte-order mark dropped, \\r\\n line ends as \\n
    (a \\r that ends a block waits for the next one, which may start with \\n)."""
    held, first = "", True
    for block in blocks:
        text = held + block
        if first:
            text, first = text.removeprefix("\ufeff"), False
        held = "\r" if text.endswith("\r") else ""
        text = text[:-1] if held else text
        if text:
            yield text.replace("\r\n", "\n")
    if held:
        yield held


def read_text_file(path: str, settings: ReadSettings | None = None) -> str:
    """A whole (small) file of any kind as text, with the same checks and normalization as a
    corpus file (documents of JSON Lines or Parquet joined by <|endoftext|>)."""
    settings = settings or ReadSettings()
    check_text_file(Path(path), settings.flag)
    text = "".join(blocks_of(Path(path), settings))
    if not text.strip():
        raise TinyLLMError(f"{settings.flag} {path} is empty; give it some text")
    return text


# ---- Conversations: replies fenced in the rendered text, learned through a mask ------------

# A conversation is rendered to text with its template, and the spans the model learns (each
# assistant reply with its end-of-turn marker) are fenced by these two private-use characters;
# the token writer drops them and writes a loss mask beside the tokens.
REPLY_START, REPLY_END = "\ue000", "\ue001"


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_LAYOUTS = ("messages", "sharegpt", "alpaca")


def template_text(value: str) -> str:
    """--chat_template: a jinja template, or the path of a file holding one. Either must render
    `messages`: a file name taken for a template would render every conversation as its name."""
    path = Path(value)
    with contextlib.suppress(OSError):
        if len(value) < 4096 and "\n" not in value and path.is_file():
            value = path.read_text(encoding="utf-8")
    if "messages" not in value:
        raise TinyLLMError(f"--chat_template {value[:60]!r} renders no messages; give a jinja template (or "
                           f"the file of one) that loops over messages, like ChatML's")
    return value


def chat_template_of(cfg: Config, tok: TextTokenizer) -> str:
    """The template a model's conversations are rendered with: its own, or ChatML where its
    tokenizer has ChatML's markers; empty for a model that is no chat model."""
    return cfg.chat_template or (CHATML if CHATML_TOKENS[0] in tok.vocab_special else "")


def reply_runs(tok: TextTokenizer, text: str, in_reply: bool) -> tuple[list[tuple[str, bool]], bool]:
    """Fenced conversation text as (text, inside a reply) runs, special tokens each a run of its
    own, and whether it ends inside a reply (a reply may go on in the next piece)."""
    runs = []
    for part in re.split(f"([{REPLY_START}{REPLY_END}])", text):
        if part in (REPLY_START, REPLY_END):
            in_reply = part == REPLY_START
        elif part:
            pieces = tok.special.split(part) if tok.special else [part]
            found = tok.special.findall(part) if tok.special else []
            for i, plain in enumerate(pieces):
                runs += [(plain, in_reply)] if plain else []
                runs += [(found[i], in_reply)] if i < len(found) else []
    return runs, in_reply


# ---- Streaming tokenization: documents -> pieces -> tokenizer and token files --------------

# Places where byte-level pre-tokenization of the two parts equals that of the whole: after a
# newline, or before a space that starts a word, with no other whitespace around.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


NO_CUT_LIMIT = 1 << 18  # characters without a safe cut after which a piece is cut anyway


def safe_cut(text: str, limit: int) -> int:
    """The last safe cut at or before `limit` (0 when there is none)."""
    for lo in (max(0, limit - 4096), 0):  # look near the limit first: that is where cuts are
        cuts = [m.start() for m in SAFE_CUT.finditer(text, lo, min(len(text), limit + 2))
                if m.start() <= limit]
        if cuts:
            return cuts[-1]
    return 0


def next_safe_cut(text: str, start: int, end: int) -> int:
    """The first safe cut after `start` and before `end` (0 when there is none)."""
    m = SAFE_CUT.search(text, start + 1, end)
    return m.start() if m else 0


def text_chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Cut text into pieces of about `size` characters at safe cuts (see SAFE_CUT). Where none
    comes within NO_CUT_LIMIT characters (a run without whitespace) the piece is cut at `size`
    anyway: its tokens at that seam may differ from the whole text's, but no piece costs the
    tokenizer more than a bounded amount."""
    pieces = []
    while len(text) > size:
        limit = max(size, NO_CUT_LIMIT)
        cut = safe_cut(text, size) or next_safe_cut(text, size, limit) or \
            (size if len(text) > limit else len(text))
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + ([text] if text else [])


def document_pieces(corpus: Corpus, size: int = 1 << 16) -> Iterator[tuple[str, str, bool]]:
    """(document key, piece of text, whether the piece ends its document), streaming: each file
    is a document, split further at <|endoftext|> markers; pieces end at safe cuts, so encoding
    them one by one gives the tokens of the whole document. Keys are 'file:index'."""
    for source, blocks in corpus.sources():
        index, carry, started = 0, "", False
        for block in blocks:
            parts = (carry + block).split(EOT)
            for part in parts[:-1]:  # documents closed by a marker
                part = part.strip() if not started else part.rstrip()
                if part or started:
                    yield from ((f"{source}:{index}", p, False) for p in text_chunks(part, size))
                    yield f"{source}:{index}", "", True
                index, started = index + 1, False
            carry = parts[-1] if started else parts[-1].lstrip()
            cut = safe_cut(carry, len(carry) - len(EOT)) if len(carry) > 2 * size else 0
            cut = cut or (len(carry) - len(EOT) if len(carry) > max(size, NO_CUT_LIMIT) else 0)
            if cut:  # a long document: hand on what is complete, keep the rest (a marker may be starting)
                yield from ((f"{source}:{index}", p, False) for p in text_chunks(carry[:cut], size))
                carry, started = carry[cut:], True
        if carry.strip() or started:
            yield from ((f"{source}:{index}", p, False) for p in text_chunks(carry.rstrip(), size))
            yield f"{source}:{index}", "", True


LONG_RUN = re.compile(r"\S{1000,}")  # longer runs without whitespace are cut for BPE training


def training_texts(corpus: Corpus) -> Iterator[str]:
    """The corpus text without markers, for training a tokenizer, with every run of more than
    1,000 characters without whitespace cut into pieces: the BPE trainer takes such a run as
    one word, and a word of millions of characters costs it minutes per merge and gigabytes.
    Ordinary text has no such runs and passes whole. The pieces are about 64K characters: the
    trainer holds a few hundred of them at a time, so their size sets its memory."""
    unmarked = re.compile("|".join(map(re.escape, (REPLY_START, REPLY_END, *CHATML_TOKENS))))
    if corpus.chat:  # every role the template may name, whether the data has it or not
        yield "system\nuser\nassistant\n"
    for _, piece, _ in document_pieces(corpus, 1 << 16):
        piece = unmarked.sub("", piece) if corpus.chat else piece  # markers become special tokens
        start = 0
        for run in LONG_RUN.finditer(piece):
            for cut in range(run.start() + 1000, run.end(), 1000):
                yield piece[start:cut]
                start = cut
        if piece[start:]:
            yield piece[start:]


def build_tokenizer(cfg: Config, corpus: Corpus) -> TextTokenizer:
    """Load --tokenizer_path, or train the configured tokenizer on the corpus (cached)."""
    if cfg.tokenizer_path:
        return load_tokenizer_file(cfg.tokenizer_path)
    spec = f"{cfg.tokenizer}:{cfg.bpe_vocab_size if cfg.tokenizer == 'bpe' else 'eot'}:chat={corpus.chat}"
    cached = Path(cfg.cache_dir) / f"tokenizer-{sha256_hex(corpus.fingerprint, spec)[:20]}.json"
    if cached.exists():
        print0(f"tokenizer: reusing {cached}")
        return TextTokenizer.from_str(cached.read_text(encoding="utf-8"))
    t0 = time.time()
    texts = metered(training_texts(corpus), byte_bar(corpus.n_bytes, "tokenizer training"))
    tok = TOKENIZERS[cfg.tokenizer](texts, cfg)
    markers = [t for t in CHATML_TOKENS if t in (cfg.chat_template or CHATML)] if corpus.chat else []
    if markers:  # ChatML's role markers, in its template or in yours: one special token each
        tok.hf.add_special_tokens(markers)
        tok = TextTokenizer(tok.hf)
    release_freed_memory()
    print0(f"tokenizer: trained {cfg.tokenizer}, {tok.vocab_size} tokens, in {time.time() - t0:.1f}s")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, tok.to_str())
    return tok


def encode_corpus(corpus: Corpus, tok: TextTokenizer, folder: Path, val_fraction: float,
                  val_corpus: Corpus | None = None) -> dict[str, Any]:
    """Stream the corpus through the tokenizer into train/val token files in `folder`, in
    bounded memory. The val split is the --val_data corpus when there is one; else documents
    chosen by a hash of their keys when there are enough of them, else the tail. Returns the
    metadata of the split."""
    t0 = time.time()
    by_document = corpus.documents >= MIN_DOCS_FOR_DOC_SPLIT and val_corpus is None
    writer = TokenWriter(folder, tok, by_document, val_fraction, corpus.chat)
    n_bytes = corpus.n_bytes + (val_corpus.n_bytes if val_corpus else 0)
    bar = byte_bar(n_bytes, "tokenizing")
    try:
        for source, split in ((corpus, None), (val_corpus, "val")):
            for key, piece, ends in document_pieces(source) if source else ():
                done = writer.add(key, piece, ends, split)
                bar.update(done)
        writer.close()
    except OSError as e:  # a full disk or a vanished cache folder: name where it happened
        writer.abandon()
        raise TinyLLMError(f"could not write token files in {folder} ({e.strerror or e}); free disk "
                           f"space or point --cache_dir elsewhere") from None
    except BaseException:
        writer.abandon()
        raise
    bar.close()
    release_freed_memory()
    final = {split: folder / f"{split}.bin" for split in ("train", "val")}
    for split, tmp in writer.paths.items():
        os.replace(tmp, final[split])
    for split, tmp in writer.mask_paths.items():
        os.replace(tmp, folder / f"{split}.mask")
    tail = not by_document and val_corpus is None
    if tail:
        # conversations: the val split opens at a conversation, so no reply loses its prompt
        keep = conversation_cut(final["train"], writer.dtype, val_fraction, tok.eot_id) if corpus.chat \
            else None
        n = move_tail_to_val(final["train"], final["val"], val_fraction, writer.dtype, keep)
        if corpus.chat:
            move_tail_to_val(folder / "train.mask", folder / "val.mask", val_fraction, np.dtype(np.uint8), n)
    itemsize = writer.dtype.itemsize
    meta = {"corpus": corpus.name, "dtype": writer.dtype.name,
            "split": "--val_data" if val_corpus else "documents" if by_document else "tail",
            "train_tokens": final["train"].stat().st_size // itemsize,
            "val_tokens": final["val"].stat().st_size // itemsize,
            "val_bytes": decoded_bytes(final["val"], tok, writer.dtype) if tail else writer.val_bytes,
            "mask": corpus.chat}
    seconds = time.time() - t0
    print0(f"data: encoded {n_bytes / 1e6:.2f} MB into {meta['train_tokens'] + meta['val_tokens']:,} "
           f"tokens in {seconds:.1f}s ({n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s), split by "
           f"{meta['split']}")
    return meta


class TokenWriter:
    """Appends encoded documents to the train and val token files, with the end-of-text token
    between documents, encoding pieces in batches with the fastest exact encoder there is. For
    conversations it also writes a loss mask beside each token file: one byte per token, 1 for
    the tokens of assistant replies (fenced by REPLY_START/REPLY_END), which alone are learned."""

    def __init__(self, folder: Path, tok: TextTokenizer, by_document: bool, val_fraction: float,
                 chat: bool = False):
        self.tok, self.by_document, self.val_fraction = tok, by_document, val_fraction
        self.encode_batch = fast_batch_encoder(tok)
        self.dtype = token_dtype(tok.vocab_size)
        self.paths = {split: folder / f".{split}.bin.tmp{os.getpid()}" for split in ("train", "val")}
        self.mask_paths = {split: folder / f".{split}.mask.tmp{os.getpid()}" for split in ("train", "val")
                           if chat}
        self.files = {split: open(p, "wb") for split, p in self.paths.items()}
        self.masks = {split: open(p, "wb") for split, p in self.mask_paths.items()}
        self.in_reply = {"train": False, "val": False}
        self.started = {"train": False, "val": False}
        self.pending: list[tuple[str, str, bool]] = []
        self.pending_chars = 0
        self.val_bytes = 0

    def add(self, key: str, piece: str, ends: bool, split: str | None = None) -> int:
        """Queue a piece for `split`, else for the split its document falls in; returns the
        bytes encoded when the queue was flushed. A batch holds at most about a million
        characters: one encode_batch call (native code, deaf to Ctrl-C until it returns) then
        takes well under a second."""
        split = split or ("val" if self.by_document and is_val_document(key, self.val_fraction) else "train")
        self.pending.append((split, piece, ends))
        self.pending_chars += len(piece)
        return self.flush() if len(self.pending) >= 1 << 14 or self.pending_chars >= 1 << 20 else 0

    def flush(self) -> int:
        segments = [self.segments(split, piece, ends) for split, piece, ends in self.pending]
        texts = [text for parts in segments for text, _ in parts if text not in self.tok.vocab_special]
        for text in texts:
            check_known_chars(self.tok, text, "the corpus")
        encoded, n_bytes = iter(self.encode_batch(texts)), 0
        for (split, piece, ends), parts in zip(self.pending, segments):
            ids, learn = [], []
            for text, in_reply in parts:
                part = [self.tok.vocab_special[text]] if text in self.tok.vocab_special else next(encoded)
                ids += part
                learn += [in_reply] * len(part)
            between = self.files[split].tell() and self.tok.eot_id is not None
            if piece and not self.started[split] and between:
                ids, learn = [self.tok.eot_id, *ids], [False, *learn]  # between documents, not after the last
            self.started[split] = self.started[split] or bool(piece)
            self.files[split].write(np.asarray(ids, dtype=self.dtype).tobytes())
            if self.masks:
                self.masks[split].write(np.asarray(learn, dtype=np.uint8).tobytes())
            if ends:
                self.started[split] = False
            size = sum(len(text.encode("utf-8")) for text, _ in parts)
            self.val_bytes += size if split == "val" else 0
            n_bytes += size
        self.pending.clear()
        self.pending_chars = 0
        return n_bytes

    def segments(self, split: str, piece: str, ends: bool = False) -> list[tuple[str, bool]]:
        """A piece as (text, inside a reply) runs; the fences themselves are dropped, and the
        template's special tokens are runs of their own (the fast encoder encodes text only).
        Plain text is one run, never learned from by the mask (it has none)."""
        if not self.masks:
            return [(piece, False)]
        runs, self.in_reply[split] = reply_runs(self.tok, piece, self.in_reply[split])
        self.in_reply[split] = self.in_reply[split] and not ends  # a document's end closes its reply
        return runs

    def close(self) -> None:
        self.flush()
        for f in [*self.files.values(), *self.masks.values()]:
            f.close()

    def abandon(self) -> None:
        """Close and delete the partial files without encoding what is queued (an interrupt, a
        full disk: closing may fail to flush, which no longer matters)."""
        for f in [*self.files.values(), *self.masks.values()]:
            with contextlib.suppress(OSError):
                f.close()
        for p in [*self.paths.values(), *self.mask_paths.values()]:
            p.unlink(missing_ok=True)


def is_val_document(key: str, val_fraction: float) -> bool:
    """Deterministic, order-independent document split: a hash of the document's key."""
    return int(sha256_hex(key)[:8], 16) / 2**32 < val_fraction


def move_tail_to_val(train_file: Path, val_file: Path, fraction: float, dtype: np.dtype,
                     keep: int | None = None) -> int:
    """Without documents to split by: the last `fraction` of the tokens (or all after the first
    `keep`, for the mask beside them) become the val split, copied in bounded chunks, then cut
    off the train file. Returns how many stay in train."""
    n = train_file.stat().st_size // dtype.itemsize
    start = n - max(1, int(n * fraction)) if keep is None else keep
    with open(val_file, "wb") as f:
        for chunk in token_chunks(train_file, dtype, start, n):
            f.write(chunk.tobytes())
    os.truncate(train_file, start * dtype.itemsize)
    return start


def conversation_cut(train_file: Path, dtype: np.dtype, fraction: float, eot_id: int | None) -> int | None:
    """Where a tail split of conversations cuts: at the first conversation that starts inside
    the last `fraction` of the tokens (None: no such start, cut by count)."""
    n = train_file.stat().st_size // dtype.itemsize
    start = n - max(1, int(n * fraction))
    first = max(0, start - 1)  # an end-of-text just before the cut opens a conversation at it
    for chunk_start, chunk in zip(range(first, n, 1 << 22), token_chunks(train_file, dtype, first)):
        hits = np.flatnonzero(chunk == eot_id)
        if len(hits) and chunk_start + hits[0] + 1 < n:
            return int(chunk_start + hits[0] + 1)
    return None


def decoded_bytes(path: Path, tok: TextTokenizer, dtype: np.dtype) -> int:
    """UTF-8 bytes that a token file decodes to, decoded a million tokens at a time."""
    return sum(len(tok.decode(chunk.tolist()).encode("utf-8"))
               for chunk in token_chunks(path, dtype, size=1 << 20))


def byte_bar(total: int, what: str) -> Any:
    """A tqdm bar in MB/s on a terminal (rank 0), else a bar that shows nothing (`shows` False):
    the summary line says it all."""
    if not (sys.stdout.isatty() and is_rank0()):
        return NoBar()
    from tqdm import tqdm
    bar = tqdm(total=total or None, desc=what, unit="B", unit_scale=True, unit_divisor=1000)
    bar.shows = True
    return bar


class NoBar:
    shows = False

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def metered(pieces: Iterator[str], bar: Any) -> Iterator[str]:
    """The pieces, passed through and counted in bytes on `bar`."""
    for piece in pieces:
        bar.update(len(piece.encode("utf-8")))
        yield piece
    bar.close()


def check_known_chars(tok: TextTokenizer, text: str, name: str) -> None:
    """Refuse text the tokenizer cannot encode: bytes that are not UTF-8 (check_utf8), or for a
    char-level vocabulary, characters it does not have."""
    check_utf8(text, name)
    unknown = tok.unknown_chars(text)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:10])
        raise TinyLLMError(f"{name} has {len(unknown)} characters outside the char-level "
                           f"vocabulary of this tokenizer/checkpoint ({shown}); train a new model "
                           f"on this corpus (another --out_dir) or remove those characters")


def check_utf8(text: str, name: str) -> None:
    """Text from outside (a flag, stdin, a request) that held bytes that are not UTF-8 reaches
    Python as lone surrogates (a byte 0xff as U+DCFF), which no tokenizer can encode."""
    bad = SURROGATE.search(text)
    if bad:
        code = ord(bad.group())
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise TinyLLMError(f"{name} is not UTF-8 text ({what} at character {bad.start()}); give it as UTF-8")


SURROGATE = re.compile("[\ud800-\udfff]")


def encode_text(tok: TextTokenizer, text: str, name: str) -> np.ndarray:
    """A small text (an --eval_data file) to tokens."""
    check_known_chars(tok, text, name)
    ids = [i for piece in tok.encode_batch(text_chunks(text)) for i in piece]
    return np.asarray(ids, dtype=token_dtype(tok.vocab_size))


# ----------------------------------------------------------------------------------------------
# Sampling: filters, the next token, cached and uncached decoding, streaming to stdout
# ----------------------------------------------------------------------------------------------

GREEDY_BELOW = 1e-4  # a temperature below this picks the argmax, as 0 does: dividing by it overflows


@dataclass
class SampleSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    kv_cache: bool = True
    compiled: bool = False  # the decode step compiled (see decode_step): for a model whose weights stay
    store: StepStore | None = None  # where compiled steps are kept between launches

    @classmethod
    def from_config(cls, cfg: Config, max_new_tokens: int | None = None, compiled: bool = False
                    ) -> SampleSettings:
        return cls(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
                   cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.kv_cache,
                   compiled, step_store(cfg))


@dataclass(frozen=True)
class StepStore:
    """Where compiled decode steps are kept between launches (one file per model, batch width and
    context), and the most bytes they may take together."""
    folder: Path
    limit: int


def step_store(cfg: Config) -> StepStore | None:
    return StepStore(Path(cfg.cache_dir) / "decode_steps", int(cfg.decode_cache_gb * 1e9)) \
        if cfg.decode_cache_gb else None


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL rule for tokens already seen: positive logits are divided, negative ones multiplied,
    so that both become less likely (dividing a negative logit would raise it)."""
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def top_k_filter(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, most likely first, and their token ids, both (B, k):
    sampling among those alone is sampling from the top-k distribution, over far fewer tokens.
    Exactly k: tokens tied with the k-th are cut where torch.topk cuts them."""
    return torch.topk(logits, min(k, logits.size(-1)))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p; the most
    likely token always stays (p = 0 keeps it alone)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # mass before this token already reaches p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def choose_next(logits: torch.Tensor, history: torch.Tensor, settings: SampleSettings,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next tokens."""
    logits = logits.float()
    if settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, settings.repetition_penalty)
    if settings.temperature < GREEDY_BELOW:  # max's indices are argmax's (the first of equals), faster on CPU
        return logits.max(-1, keepdim=True).indices
    logits = logits / settings.temperature
    ids = None  # which token each column is, where top-k kept only some
    if settings.top_k:
        logits, ids = top_k_filter(logits, settings.top_k)
    if settings.top_p < 1.0:
        logits = top_p_filter(logits, settings.top_p)
    picked = sample_index(logits.softmax(-1), generator)
    return picked if ids is None else ids.gather(1, picked)


def sample_index(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) probabilities -> (B, 1) indices drawn from them, by inverse CDF: the first index whose
    cumulative mass passes a uniform draw. One random number per row; torch.multinomial takes
    far longer over a vocabulary on CPU. A token of probability 0 is never drawn: the draw stays
    strictly below the total, and the mass must rise at the index it lands on."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):  # NaN or inf logits: no token can be drawn
        raise RuntimeError("the model's next-token probabilities are not finite (NaN or inf logits)")
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # rounding must not reach the total
    return torch.searchsorted(cdf, u, right=True)


def next_logits_uncached(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The test oracle: a full forward pass over the last block_size tokens."""
    return model(idx[:, -model.cfg.block_size:], last_only=True)[0][:, -1]


def next_logits_cached(model: GPT, idx: torch.Tensor, cache: KVCache,
                       step: Callable[[torch.Tensor, KVCache], torch.Tensor] | None = None) -> torch.Tensor:
    """Feed only the token the cache has not seen. An empty cache is prefilled with the last
    block_size tokens; a full one restarts from the last half block, so that positions stay
    inside what the model was trained on, for learned and rotary positions alike."""
    if cache.pos == 0 or cache.pos == cache.capacity:
        keep = cache.capacity if cache.pos == 0 else cache.capacity // 2
        cache.seek(0)
        return feed(model, idx[:, -keep:], cache, step)
    return feed(model, idx[:, -1:], cache, step)


def feed(model: GPT, idx: torch.Tensor, cache: KVCache,
         step: Callable[[torch.Tensor, KVCache], torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (B, V) after idx (B, T) fed after what the cache holds, which then advances past
    it: a prompt in one forward pass (prefill), one token through the decode step."""
    if idx.size(1) > 1:
        return model(idx, cache=cache, last_only=True)[0][:, -1]
    # a fresh (B, 1) tensor: a column of a longer one has strides that a compiled step would
    # see change with every token (and recompile for)
    logits = (step or model.step)(idx.clone(memory_format=torch.contiguous_format), cache)
    cache.advance(1)
    return logits


@functools.cache
def compiled_step() -> Callable[[GPT, torch.Tensor, KVCache], torch.Tensor]:
    """GPT.step through torch.compile, made once: models of the same shapes share its graphs
    (their weights are the graph's inputs), and the cache's static shapes keep it at one graph
    per batch size and weight kind while the position advances."""
    return torch.compile(GPT.step, fullgraph=True, dynamic=False)


# the decode step compiled with the weights built in, for a model whose weights stay: class.of(model, store)
STEP_COMPILERS = Registry("--compile_decode", {"aot": Elsewhere("tinyllm_serve")})


def decode_compiles(cfg: Config, device: torch.device, frozen: bool) -> bool:
    """Whether decoding compiles its step: asked (--compile_decode, the default), with the KV cache,
    for a model whose weights stay (`frozen`: a compile costs more than training's samples
    would win back before the weights change), where the device has a compiler; where it has
    none, one line says so and decoding is eager."""
    if not (cfg.compile_decode and cfg.kv_cache and frozen):
        return False
    missing = compiler_missing(device)
    if missing:
        say_once(f"decoding eagerly: {missing}; --no-compile_decode skips looking")
    return not missing


@functools.cache
def compiler_missing(device: torch.device, what: str = "the decode step") -> str:
    """Why `what` cannot be compiled on the device, or "" when it can."""
    if device.type == "cpu":
        return "" if cpp_compiler() else (f"no C++ compiler was found to compile {what} (install "
                                          f"{default_cpp_compiler()}, or name one in CXX)")
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return "" if has_triton() else f"triton, which compiles {what} on GPUs, is not installed"
    return f"{what} is compiled on CPUs and CUDA GPUs, not on {device.type}"


def default_cpp_compiler() -> str:
    return "clang++" if sys.platform == "darwin" else "g++"


def cpp_compiler() -> str:
    """The path of the C++ compiler inductor calls (CXX, else its platform's default), or "" where
    there is none; found without importing the compiler (a second at start)."""
    return shutil.which(os.environ.get("CXX") or default_cpp_compiler()) or ""


def decode_step(model: GPT, compiled: bool, store: StepStore | None = None
                ) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """The one-token step: eager, or compiled for a model whose weights stay. On CPU it is compiled
    ahead of time with the weights built in and kept in `store` for later launches
    (STEP_COMPILERS; where that module is missing, through torch.compile at every launch); on
    GPUs through torch.compile (inductor keeps its own caches)."""
    if not compiled:
        return model.step
    if model.wte.weight.device.type == "cpu":
        try:
            return STEP_COMPILERS.entry("aot", "the decode step compiled once per model").of(model, store)
        except TinyLLMError as e:
            say_once(f"--compile_decode: compiling through torch.compile at every launch, since {e}")
    return functools.partial(compiled_step(), model)


@functools.cache
def say_once(line: str) -> None:
    print0(line, file=sys.stderr)


def prepare_step(step: Callable[[torch.Tensor, KVCache], torch.Tensor], cache: KVCache) -> None:
    """Compile an ahead-of-time step for the cache's batch size now, so that no reply or sample
    stops halfway to wait for it."""
    prepare = getattr(step, "prepare", None)
    if prepare is not None:
        prepare(cache)


def compile_count() -> int:
    """Decode steps compiled in this process: torch.compile's graphs (dynamo's counter) and the
    ahead-of-time libraries."""
    aot = dict.get(STEP_COMPILERS, "aot")
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] + getattr(aot, "made", 0)


def cache_dtype(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """On CPU the cache stays fp32 under bf16 weights: one query's attention over the cache is
    several times faster in fp32 there (README: Performance), and the cache is small next to the
    weights."""
    return torch.float32 if device.type == "cpu" else weights


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, settings: SampleSettings,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, stop_ids: list[int] | None = None
             ) -> torch.Tensor:
    """Continue idx (B, T) by up to settings.max_new_tokens tokens; on_token sees each new (B, 1)
    column. With stop_ids (the tokenizer's end_ids), a row that produces one is finished: it is
    padded with the first, and generation ends when every row is finished."""
    was_training = model.training
    model.eval()
    cache = model.new_cache(idx.size(0), idx.device, cache_dtype(model.wte.weight.dtype, idx.device)) \
        if settings.kv_cache else None
    step = decode_step(model, settings.compiled, settings.store)
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    stops = torch.tensor(stop_ids, device=idx.device) if stop_ids else None
    for _ in range(settings.max_new_tokens):
        logits = next_logits_cached(model, idx, cache, step) if cache else next_logits_uncached(model, idx)
        nxt = choose_next(logits, idx, settings, generator)
        if stops is not None:
            nxt = nxt.masked_fill(done, stop_ids[0])
            done |= torch.isin(nxt, stops)
        idx = torch.cat([idx, nxt], dim=1)
        if on_token is not None:
            on_token(nxt)
        if stops is not None and bool(done.all()):
            break
    model.train(was_training)
    return idx


def reply_text(tok: TextTokenizer, prompt: list[int], ids: list[int]) -> str:
    """The text of the generated ids, decoded after the prompt's last token so that the space a
    SentencePiece-style decoder (Llama 2, TinyLlama) drops at the start of a text stays."""
    before = prompt[-1:]
    return tok.decode(before + ids)[len(tok.decode(before)):]


class GrowingText:
    """reply_text of generated ids that only grow, without decoding all of them for every new
    token: the text up to the last complete character is kept, and only the ids after it are
    decoded again (after the id before them, as reply_text does). A text that ends inside a
    UTF-8 character ends in U+FFFD until the rest arrives."""

    def __init__(self, tok: TextTokenizer, prompt: list[int]):
        self.tok, self.before, self.text, self.done = tok, prompt[-1:], "", 0

    def of(self, ids: list[int]) -> str:
        tail = reply_text(self.tok, self.before, ids[self.done:])
        if tail.endswith("\ufffd"):  # decoded again with what follows
            return self.text + tail
        if len(ids) > self.done:
            self.text, self.before, self.done = self.text + tail, ids[-1:], len(ids)
        return self.text


class TextStreamer:
    """Prints a sample's text as its tokens arrive, after the prompt (see GrowingText); text that
    ends inside a UTF-8 character waits for the rest. What ends a reply (the tokenizer's end_ids)
    ends a sample; it is not printed."""

    def __init__(self, tok: TextTokenizer, prompt_ids: list[int] | None = None):
        self.tok, self.ids, self.printed = tok, [], 0
        self.text = GrowingText(tok, list(prompt_ids or []))

    def __call__(self, nxt: torch.Tensor) -> None:
        token = int(nxt[0, 0])
        if token in self.tok.end_ids:
            return
        self.ids.append(token)
        text = self.text.of(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def encode_prompt(tok: TextTokenizer, prompt: str, start_ids: list[int] | None = None) -> list[int]:
    """The prompt's tokens; an empty prompt starts from start_ids (see start_ids_for), or for
    checkpoints older than those, from the tokenizer's default."""
    check_utf8(prompt, "--prompt")
    unknown = tok.unknown_chars(prompt)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:10])
        raise TinyLLMError(f"--prompt has characters outside the char-level vocabulary: {shown}; "
                           f"remove them (the model never saw them in training)")
    return tok.encode(prompt) if prompt else (start_ids or tok.start_ids())


def sampling_dtype(cfg: Config, device: torch.device, compiled: bool, model: GPT | None = None
                   ) -> torch.dtype:
    """The weights' dtype for decoding, which reads every weight for every token. The compiled
    step: bf16 where the device has it natively (fp16 on CUDA), half of fp32's bytes, in kernels
    the compiler writes for them. Eager on CPU, torch's own one-row bf16 matmul can be slower than
    fp32 (on CPUs without AMX): the faster of the two for this model's shape, measured once
    (eager_decode_dtype). An explicit --dtype is kept; int8 weights multiply bf16 activations."""
    dtype = pick_dtype(cfg, device)
    if dtype == torch.float16 and device.type != "cuda":
        return torch.float32
    if (dtype == torch.bfloat16 and not compiled and device.type == "cpu" and cfg.dtype == "auto"
            and cfg.quantize == "none" and model is not None):
        return eager_decode_dtype(model, cfg.cache_dir)
    return dtype


def eager_decode_dtype(model: GPT, cache_dir: str) -> torch.dtype:
    """fp32 or bf16, whichever decodes this model's shape faster eagerly on this CPU: measured once
    per CPU, thread count and shape on a model of that shape (steps of the two interleaved, the
    best of each), then read from cache_dir, as the CPU's peak is."""
    arch = {key: getattr(model.cfg, key) for key in ARCH_KEYS}
    shape = (f"{model.num_params()} parameters|{model.cfg.n_layer}x{model.cfg.n_embd}|"
             f"vocab {model.vocab_size}|"
             f"{sha256_hex(json.dumps(arch, sort_keys=True, default=str))[:16]}")
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{shape}"
    name = measured_once(Path(cache_dir) / "decode_dtype.json", key,
                         lambda: "bfloat16" if faster_in_bf16(model) else "float32",
                         lambda value: value in ("float32", "bfloat16"))
    return getattr(torch, name)


@torch.no_grad()
def faster_in_bf16(model: GPT, steps: int = 6) -> bool:
    """Whether eager decode steps of a model of this one's shape run faster in bf16 than in fp32
    (random weights: speed does not depend on their values)."""
    best = {}
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            m = GPT(model.cfg, model.vocab_size)
        m = m.to_empty(device="cpu").to(dtype).eval()
        for t in (*m.parameters(), *m.buffers()):
            t.normal_(0, 0.02) if t.is_floating_point() else t.zero_()
        models[dtype] = (m, m.new_cache(1, torch.device("cpu"), cache_dtype(dtype, torch.device("cpu"))))
    idx = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(steps):
        for dtype, (m, cache) in models.items():
            start = time.perf_counter()
            m.step(idx, cache)
            best[dtype] = min(best.get(dtype, math.inf), time.perf_counter() - start)
            cache.advance(1)
    return best[torch.bfloat16] < best[torch.float32]


def sampling_copy(model: GPT, cfg: Config, device: torch.device, compiled: bool = False) -> GPT:
    """The model in the sampling dtype, quantized as --quantize asks: a copy when that differs
    from the model itself, so training never sees its weights rounded."""
    if any(hasattr(p, "full_tensor") for p in model.parameters()):  # --fsdp: sampled as it is, every
        return model  # rank in step, each gathering a block's weights as it goes (a copy would be whole)
    dtype = sampling_dtype(cfg, device, compiled, model)
    if has_lora(model):  # adapters folded in: one matmul per layer, as the exports have it
        # the frozen base is shared when its dtype is the sampling one, else copied once in that
        # dtype; merging makes new layers, so the live weights are never touched
        frozen = {id(p): p if p.dtype == dtype else nn.Parameter(p.detach().to(dtype), requires_grad=False)
                  for p in model.parameters() if not p.requires_grad}
        sampler = PRETRAINED[""].merge(copy.deepcopy(model, memo=frozen)).to(dtype)
    elif dtype == model.wte.weight.dtype and cfg.quantize == "none":
        return model
    else:  # each tensor copied once, straight into the dtype
        memo = {id(t): nn.Parameter(t.detach().to(dtype, copy=True), t.requires_grad) if t.is_floating_point()
                else t.clone() for t in model.parameters()}
        sampler = copy.deepcopy(model, memo=memo).to(dtype)
    return QUANTIZERS[cfg.quantize](sampler)


def print_samples(model: GPT, tok: TextTokenizer, cfg: Config, device: torch.device,
                  max_new_tokens: int | None = None, seed: int | None = None,
                  start_ids: list[int] | None = None, frozen: bool = False) -> None:
    """cfg.num_samples samples of cfg.prompt to stdout, decoded as one batch: the first streams
    as it is made, the others follow when the batch is done; same seed, same text. Runs on a
    copy in the sampling dtype, so training never sees its weights rounded. `frozen`: the
    weights stay for the rest of the process (see decode_step)."""
    prompt_ids = encode_prompt(tok, cfg.prompt, start_ids)
    compiled = decode_compiles(cfg, device, frozen)
    model = sampling_copy(model, cfg, device, compiled)
    generator = torch.Generator(device=device).manual_seed(cfg.seed if seed is None else seed)
    settings = SampleSettings.from_config(cfg, max_new_tokens, compiled)
    n = cfg.num_samples
    if compiled:
        prepare_step(decode_step(model, True, settings.store), model.new_cache(n, device, cache_dtype(
            model.wte.weight.dtype, device)))
    print0(f"--- sample 1/{n} ---\n{cfg.prompt}", end="")
    idx = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    out = generate(model, idx, settings, generator, TextStreamer(tok, prompt_ids) if is_rank0() else None,
                   stop_ids=tok.end_ids)
    print0()
    prompt_text = tok.decode(prompt_ids)
    for i in range(1, n):
        new = out[i, len(prompt_ids):].tolist()
        new = new[:next((j for j, t in enumerate(new) if t in tok.end_ids), len(new))]
        print0(f"--- sample {i + 1}/{n} ---\n{cfg.prompt}{tok.decode(prompt_ids + new)[len(prompt_text):]}")


# ----------------------------------------------------------------------------------------------
# Training parts: schedules, optimizers, EMA, measuring, checkpoints, the run
# ----------------------------------------------------------------------------------------------

# ---- Schedules and the context curriculum --------------------------------------------------

SCHEDULES.update({
    # progress in [0, 1] after warmup, decay_fraction -> share of the way from min_lr to the peak
    "cosine": lambda p, d: 0.5 * (1 + math.cos(math.pi * p)),
    "wsd": lambda p, d: 1.0 if p < 1 - d else (1 - p) / d,
    "constant": lambda p, d: 1.0,
})


def schedule_progress(step: int, elapsed: float, cfg: Config) -> float:
    """How far through the run we are: by steps, or by time when a budget is set, whichever
    is further along."""
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    by_time = elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0
    return min(1.0, max(0.0, by_steps, by_time))


def lr_at(step: int, cfg: Config, elapsed: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    share = SCHEDULES[cfg.lr_schedule](schedule_progress(step, elapsed, cfg), cfg.decay_fraction)
    return cfg.min_lr + (cfg.learning_rate - cfg.min_lr) * share


def context_at(step: int, cfg: Config) -> int:
    """Context length of this step: block_size, or a power-of-two curriculum stage."""
    if not cfg.curriculum:
        return cfg.block_size
    stages, t = [], cfg.curriculum_start_block_size
    while t < cfg.block_size:
        stages.append(t)
        t *= 2
    span = cfg.curriculum_steps or max(1, cfg.max_steps // 3)
    return cfg.block_size if step >= span else stages[step * len(stages) // span]


def batch_at(context: int, cfg: Config) -> int:
    """Sequences per micro-batch at this context length: tokens per step stay about constant."""
    return max(1, cfg.batch_size * cfg.block_size // context)


def tokens_per_step(cfg: Config, world_size: int = 1) -> int:
    """Tokens in one optimizer step, over every rank (at the full context length)."""
    return cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * world_size


# ---- Optimizers (OPTIMIZERS) and the EMA of the weights ------------------------------------

class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): step by the sign of an interpolation of momentum and gradient,
    with decoupled weight decay. Wants a 3-10x smaller learning rate than AdamW."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(momentum * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on 2-D weights only: never on norms and biases."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def trained_groups(model: GPT, cfg: Config) -> list[dict[str, Any]]:
    """What the optimizer updates: every weight (decay_groups), or with LoRA the adapters only,
    without weight decay (it would pull the update towards the base, not towards zero weights);
    frozen weights get no optimizer state at all."""
    if has_lora(model):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    return decay_groups(list(model.parameters()), cfg.weight_decay)


def adamw_over(groups: list[dict[str, Any]], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # one fused kernel per tensor: about twice as fast on CPU as torch's default (a loop of small
    # ops) and faster than foreach (README: Performance)
    fused = True if device.type in ("cuda", "cpu") else None
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def adamw(model: GPT, cfg: Config, device: torch.device) -> list[torch.optim.Optimizer]:
    return [adamw_over(trained_groups(model, cfg), cfg, device)]


def adamw8bit(model: GPT, cfg: Config, device: torch.device) -> list[torch.optim.Optimizer]:
    bnb = require("bitsandbytes", "--optimizer adamw8bit", "bitsandbytes (or pick --optimizer adamw)")
    return [bnb.optim.AdamW8bit(trained_groups(model, cfg), lr=cfg.learning_rate,
                                betas=(cfg.beta1, cfg.beta2))]


def lion(model: GPT, cfg: Config, device: torch.device) -> list[torch.optim.Optimizer]:
    return [Lion(trained_groups(model, cfg), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))]


def orthogonalize(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's Newton-Schulz iteration (the quintic torch.optim.Muon runs): g (A, B) -> about the
    nearest semi-orthogonal matrix, computed in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    x = x.T if g.size(0) > g.size(1) else x  # (short, long): the Gram matrix is the small one
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class Muon(torch.optim.Muon):
    """torch's Muon (its state, settings and checkpoints), with the orthogonalization in a dtype of
    our choosing: torch's runs it in bfloat16, which CPUs without native bf16 emulate at a tenth of
    fp32's speed, so that there Muon's step cost more than the model's (README: Performance)."""

    def __init__(self, params: list[torch.Tensor], ns_dtype: torch.dtype, **settings: Any):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        assert closure is None
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            self._init_group(group, params, [], [])
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in params:
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - lr * decay)
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))  # match_rms_adamw


def muon(model: GPT, cfg: Config, device: torch.device) -> list[torch.optim.Optimizer]:
    """Muon for the 2-D weights inside the blocks, AdamW for the embeddings, the output head,
    norms and biases (Muon accepts only matrices). The learning rate is scaled as Moonshot's
    "match_rms_adamw" does, which lets one learning rate serve both."""
    hidden = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    ns_dtype = torch.bfloat16 if has_native_bf16(device) else torch.float32
    return [Muon(hidden, ns_dtype, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                 adjust_lr_fn="match_rms_adamw"),
            adamw_over(decay_groups(rest, cfg.weight_decay), cfg, device)]


OPTIMIZERS.update({"adamw": adamw, "adamw8bit": adamw8bit, "lion": lion, "muon": muon})


def make_optimizers(model: GPT, cfg: Config, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers of --optimizer: one, or two when it splits the parameters (muon)."""
    return OPTIMIZERS[cfg.optimizer](model, cfg, device)


class EMA:
    """An fp32 shadow copy of the model, pulled towards the live weights after every optimizer
    step, in place (so it works whatever wraps the live model). Under --fsdp the copy is `twin`'s:
    a second model sharded as the live one is, each rank averaging its own shard."""

    def __init__(self, model: GPT, decay: float, twin: Callable[[GPT], GPT] | None = None):
        self.decay, self.updates = decay, 0
        if twin is not None:
            self.model = twin(model)
        else:
            frozen = {id(p): p for p in model.parameters() if not p.requires_grad}  # LoRA's base: shared
            self.model = copy.deepcopy(model, memo=frozen).float().eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: GPT) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # short runs average less
        pairs = [(mine, live) for mine, live in zip(self.model.parameters(), model.parameters())
                 if live.requires_grad]  # with LoRA, the adapters: the base is shared and frozen
        torch._foreach_lerp_([local_part(mine) for mine, _ in pairs],
                             [local_part(live).float() for _, live in pairs], 1 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"model": saved_weights(self.model), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.model.wte.weight, "to_local"):  # --fsdp: each rank takes its shard of the whole
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(
                full_state_dict=True, strict=not has_lora(self.model)))
        else:
            load_weights(self.model, state["model"])
        self.updates = state["updates"]


# ---- Measuring: FLOPs per token, device peaks, MFU, bits per byte, validation loss ---------

def perplexity(loss: float) -> float:
    """exp(loss), infinite past what a float holds (a model far from the data)."""
    return math.exp(loss) if loss < 709 else math.inf


def flops_per_token(model: GPT, context: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (2 forward, 4 backward), 4 per
    frozen one (LoRA's base: no weight gradient), the output head included and embedding lookups
    not, plus attention scores and mixing at 12 x layers x context x width (the count of the PaLM
    paper's appendix B), over the window if one is set."""
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    trained = sum(w.numel() for w in linears if w.requires_grad)
    frozen = sum(w.numel() for w in linears if not w.requires_grad)  # LoRA's base: no weight gradient
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    seen = min(context, model.cfg.sliding_window or context)
    width = model.cfg.n_head * head_size(model.cfg)  # of attention: n_embd unless head_dim is set
    return 6 * (trained + adapters) + 4 * frozen + 12 * model.cfg.n_layer * seen * width


# Dense peaks in TFLOP/s from vendor datasheets: (bf16/fp16 tensor cores, fp32 with TF32 where
# the GPU has it). Matched against torch.cuda.get_device_name(), first match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989, 495), ("H100 PCIe", 756, 378), ("H100 NVL", 835, 418), ("H100", 989, 495),
    ("A100", 312, 156), ("L40S", 362, 183), ("L4", 121, 60), ("A10G", 70, 35), ("A10", 125, 62.5),
    ("RTX 4090", 165, 82.6), ("RTX 4080", 97.5, 48.7), ("RTX 3090", 71, 35.6),
    ("RTX 3080", 59.5, 29.8), ("V100", 125, 15.7), ("T4", 65, 8.1),
)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    for key, half, single in GPU_PEAK_TFLOPS:
        if key in name:
            return 1e12 * (single if dtype == torch.float32 else half)
    return None


def measure_matmul_flops(dtype: torch.dtype, size: int = 1024, trials: int = 5,
                         seconds: float = 0.08) -> float:
    """FLOP/s of a square matmul on this CPU in `dtype`: the practical peak for MFU. The best
    of several short trials, so that a moment of contention does not lower the peak (and raise
    every MFU figure after it)."""
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG: runs must stay reproducible
    a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cpu_peak_flops(dtype: torch.dtype, cache_dir: str, again: bool = False) -> float:
    """Measured once per CPU model, thread count and dtype, then read from cache_dir; `again`
    measures anew and replaces the cached figure (one taken while the machine was busy)."""
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{dtype}|best-of-trials"
    return measured_once(Path(cache_dir) / "peak_flops.json", key, lambda: measure_matmul_flops(dtype),
                         lambda value: isinstance(value, (int, float)), again)


def measured_once(path: Path, key: str, measure: Callable[[], Any], valid: Callable[[Any], bool],
                  again: bool = False) -> Any:
    """The figure `key` of the JSON table at `path`, measured and written there (atomically) when
    it is missing, not `valid` (a damaged file) or asked for `again`."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if again or not valid(known.get(key)):
        known[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(known, indent=1))
        except OSError:
            pass  # a read-only cache only costs a measurement next time
    return known[key]


def peak_flops(cfg: Config, device: torch.device, dtype: torch.dtype) -> float | None:
    """--peak_flops, else the GPU table, else a CPU measurement; None when unknown (MFU not shown)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return cpu_peak_flops(dtype, cfg.cache_dir)
    return None


def model_flops_utilization(run: Run, flops: float) -> float | None:
    """flops (per second, per rank) over the device's peak. Above 100% the peak is wrong, say
    a CPU measured while it was busy: it is measured again (the cached figure replaced); if the
    figure is still impossible, or cannot be measured again, MFU is unknown from then on."""
    if not run.peak:
        return None
    if flops > run.peak and run.device.type == "cpu" and not run.cfg.peak_flops and not run.peak_checked:
        run.peak_checked, before = True, run.peak
        run.peak = cpu_peak_flops(run.dtype, run.cfg.cache_dir, again=True)
        print0(f"measuring: MFU was above 100% against the peak of {before / 1e12:.3g} TFLOP/s, measured "
               f"again: {run.peak / 1e12:.3g} TFLOP/s")
    if flops > run.peak:
        source = "--peak_flops" if run.cfg.peak_flops else "the peak"
        print0(f"measuring: {flops / 1e12:.3g} TFLOP/s is above {source} of {run.peak / 1e12:.3g} TFLOP/s, "
               f"so that peak is wrong; MFU is shown as unknown (give the device's peak with --peak_flops)")
        run.peak = None
        return None
    return flops / run.peak


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """Nats per token -> bits per UTF-8 byte: comparable across tokenizers and vocabularies."""
    return loss / math.log(2) * tokens_per_byte


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, TokenSplit], cfg: Config, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Plain cross-entropy over eval_iters batches per split, on the raw model (never a compiled
    one: no recompiles). The same fixed batches every time (its own generator), so evaluations
    compare like with like and never disturb the training RNG."""
    was_training = model.training
    model.eval()
    out = {}
    for name, split in splits.items():
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters, device=device)
        counts = torch.ones(cfg.eval_iters, device=device)  # targets per batch: all, without a mask
        for i in range(cfg.eval_iters):
            x, y = get_batch(split, cfg.batch_size, cfg.block_size, gen, device)
            with autocast(device, dtype):
                losses[i] = model(x, y)[1]
            if split.mask_path is not None:  # conversations: weigh each batch by its reply tokens
                counts[i] = (y != IGNORE).sum()
        out[name] = losses.mean().item() if split.mask_path is None else \
            ((losses * counts).sum() / counts.sum().clamp(min=1)).item()
    model.train(was_training)
    return out


# ---- Objectives (OBJECTIVES): what a step minimises, and how a run is evaluated --------------
# Next-token prediction is here; preference tuning and RL (dpo, grpo) are in tinyllm_tune.py.

def next_token_loss(run: Run, batch: int, context: int, micro: int) -> tuple[torch.Tensor, dict]:
    """One micro-batch of random windows of the train split: the mean cross-entropy of the
    targets that count (a conversation's replies), as `run.train_model` computes it."""
    x, y = get_batch(run.splits["train"], batch, context, run.batch_gen, run.device, run.dist)
    _, loss = run.train_model(x, y, label_smoothing=run.cfg.label_smoothing, z_loss=run.cfg.z_loss)
    return loss, {}


def next_token_evaluation(run: Run, model: GPT, splits: tuple[str, ...] = ("train", "val")
                          ) -> tuple[float, dict[str, float], str]:
    """Plain cross-entropy of each split (estimate_loss), perplexity and bits per byte of val."""
    losses = estimate_loss(model, {name: run.splits[name] for name in splits}, run.cfg, run.device, run.dtype)
    record = {f"{name}_loss": loss for name, loss in losses.items()}
    record |= {"val_ppl": perplexity(losses["val"]),
               "val_bpb": bits_per_byte(losses["val"], run.splits["val"].tokens_per_byte)}
    text = f"train loss {losses.get('train', float('nan')):.4f} | val loss {losses['val']:.4f} | val bpb " \
           f"{record['val_bpb']:.3f}"
    return losses["val"], record, text


OBJECTIVES["lm"] = Objective(LM_FLAGS, windows=True, inputs=prepare_inputs, loss=next_token_loss,
                             evaluate=next_token_evaluation)


# ---- Checkpoints (ckpt.pt) and the run directory -------------------------------------------

CKPT_FORMAT = 1
SAFETENSORS_FORMAT = "tinyllm-1"


CHECKPOINT_FILES = Registry("a checkpoint", {".safetensors": Elsewhere("tinyllm_hub")})  # besides ckpt.pt


def find_checkpoint(cfg: Config) -> Path:
    if cfg.ckpt:
        return Path(cfg.ckpt)
    out = Path(cfg.out_dir)
    best = out / "ckpt_best.pt"
    return best if best.exists() else out / "ckpt.pt"  # a file, or a folder of shards (--fsdp)


def checkpoint_to_use(cfg: Config, mode: str) -> Path | None:
    """What the mode starts from: out_dir/ckpt.pt to resume training; for a mode that loads one
    (Mode.loads) --ckpt, else out_dir's best, else its latest; None for a new run and the rest."""
    if mode == "train" and cfg.resume:
        path = Path(cfg.out_dir) / "ckpt.pt"
        if not path.exists():
            raise TinyLLMError(f"--resume: no checkpoint at {path}; train without --resume first, or "
                               f"point --out_dir at the run to continue")
        return path
    return find_checkpoint(cfg) if dict.get(MODES, mode).loads else None


def load_checkpoint(path: Path, mmap: bool = False, shards: bool = True) -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint can never run code while it is read. A
    .safetensors export (no pickle at all) loads too, for sampling and evaluation. With `mmap`,
    tensors are read from the file only when used (--init_from needs the weights, not the
    optimizer state). A sharded checkpoint's tensors are read here unless not `shards` (training
    reads them in Run.restore: under --fsdp each rank its own)."""
    if path.suffix == ".safetensors" and path.is_file():
        return CHECKPOINT_FILES.entry(".safetensors", f"the checkpoint {path}")(path)
    if path.is_dir() and (path / "state.pt").is_file():
        return load_sharded(path) if shards else {**load_sharded_state(path), "shards": path}
    if path.is_dir() and any(path.glob("*.distcp")):
        raise TinyLLMError(f"{path} holds shards but no state.pt: the sharded checkpoint is incomplete or "
                           f"damaged; use another checkpoint")
    if not path.is_file():
        raise TinyLLMError(f"no checkpoint at {path}; train first (or give --ckpt PATH / the right "
                           f"--out_dir)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))  # torch maps its own zip format only
    except Exception as e:
        if holds_code(e, path):
            raise TinyLLMError(f"{path} was refused: it holds Python objects, not only tensors and "
                               f"plain data, so it is no tinyllm checkpoint, and loading it unsafely "
                               f"could run code; use a checkpoint written by train_tinyllm.py") from None
        reason = "unreadable data" if isinstance(e, pickle.UnpicklingError) else first_line(e)
        raise TinyLLMError(f"{path} cannot be loaded as a tinyllm checkpoint ({reason}); it is "
                           f"corrupt, truncated or not ours: use another checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TinyLLMError(f"{path} is not a tinyllm checkpoint (format {CKPT_FORMAT}); use a "
                           f"checkpoint written by train_tinyllm.py")
    return ckpt


def load_sharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint (--fsdp) in one process, whole: its state.pt, and every rank's shards of
    the weights and optimizer state put together by torch.distributed.checkpoint (tensors by
    parameter name; Run.restore and model_from_checkpoint take them)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    ckpt = load_sharded_state(path)
    try:
        tensors: dict[str, Any] = {}  # filled as torch's dcp_to_torch_save fills it, without writing a copy
        _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise TinyLLMError(f"{path} cannot be loaded as a sharded tinyllm checkpoint ({dcp_failure(e)}); it "
                           f"is incomplete or damaged: use another checkpoint") from None
    ema = ckpt["ema"] and {"model": tensors["ema"], "updates": ckpt["ema"]["updates"]}
    return {**ckpt, "model": tensors["model"], "optimizer": tensors.get("optimizer"), "ema": ema,
            "sharded": True}


def dcp_failure(e: BaseException) -> str:
    """What went wrong in torch.distributed.checkpoint: the first rank's own error, not the wrapper's."""
    failures = getattr(e, "failures", None)  # rank -> (exception, its stack)
    if not failures:
        return first_line(e)
    failure = next(iter(failures.values()))
    return first_line(failure[0] if isinstance(failure, tuple) else failure)


def load_sharded_state(path: Path) -> dict[str, Any]:
    """A sharded checkpoint's state.pt: everything but the tensors."""
    try:
        ckpt = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise TinyLLMError(f"{path} cannot be loaded as a sharded tinyllm checkpoint ({first_line(e)}); it "
                           f"is incomplete or damaged: use another checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TinyLLMError(f"{path} is not a tinyllm checkpoint (format {CKPT_FORMAT})")
    return ckpt


def holds_code(e: Exception, path: Path) -> bool:
    """Whether torch's safe loader refused a pickle of Python objects (which a plain pickle load
    would run), rather than reading damaged bytes: it names the global it refused, or the file
    is a pickle stream (protocol 2 to 5) outside torch's zip format."""
    if not isinstance(e, pickle.UnpicklingError):
        return False
    if "GLOBAL " in str(e):  # "Unsupported global: GLOBAL print", "unsupported GLOBAL posix.system"
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def check_same_data(cfg: Config, ckpt: dict[str, Any], data: str) -> None:
    """--resume on other data than the checkpoint's (a file edited or appended to, another
    --data_path or --val_fraction; judged by the train and val tokens themselves, so a touched
    or copied corpus is the same data): the val split is other text, so best-val comparisons
    and exact resume no longer hold. Refused, unless --allow_data_change (checkpoints from
    before this check carry no hash: they resume as before)."""
    saved, path = ckpt.get("data_sha256"), Path(cfg.out_dir) / "ckpt.pt"
    if saved is None or saved == data:
        return
    if not cfg.allow_data_change and ckpt.get("token_format", 5) < 6:
        raise TinyLLMError(f"--resume: {path} was written by an older tinyllm, whose train/val split of "
                           f"documents depended on the corpus's folder (now on each document's place in "
                           f"the corpus), so val loss would be measured on other text; add "
                           f"--allow_data_change to continue (the best val loss starts over), or train in "
                           f"a new --out_dir")
    if not cfg.allow_data_change:
        raise TinyLLMError(f"--resume: the training data changed since {path} was written (its train "
                           f"or val tokens differ: a file edited or added to, another --data_path or "
                           f"--val_fraction), so val loss would be measured on other text; add "
                           f"--allow_data_change to continue on the new data (the best val loss starts "
                           f"over), or train in a new --out_dir")
    print0(f"warning: the training data changed since {path} was written; continuing on the new data "
           f"(--allow_data_change), and the best val loss starts over")


def check_compatible(cfg: Config, explicit: dict[str, Any], ckpt: dict[str, Any], path: Path,
                     resuming: bool) -> None:
    """Refuse settings that would not fit the checkpoint's weights, or, to resume training, its
    tokenizer (sampling, evaluation and export always use the checkpoint's own)."""
    for key in ARCH_KEYS:
        if key in ckpt["config"] and getattr(cfg, key) != ckpt["config"][key]:
            raise TinyLLMError(f"--{key} {getattr(cfg, key)!r} does not match the checkpoint "
                               f"{path} ({ckpt['config'][key]!r}); drop the flag, or use a new --out_dir "
                               f"to train a different model")
    def same(key: str, a: Any, b: Any) -> bool:
        return lora_target_set(a) == lora_target_set(b) if key == "lora_targets" else a == b
    for key in ("lora_rank", "lora_targets", "lora_alpha"):  # the adapters' shapes and scale
        if key in explicit and not same(key, explicit[key], ckpt["config"].get(key, FIELDS[key].default)):
            raise TinyLLMError(f"--{key} {explicit[key]!r} does not match the checkpoint {path} "
                               f"({ckpt['config'].get(key, FIELDS[key].default)!r}); drop the flag")
    lora = bool(ckpt["config"].get("lora_rank"))
    if "init_from" in explicit and not lora and explicit["init_from"] != ckpt["config"].get("init_from"):
        raise TinyLLMError(f"--init_from {explicit['init_from']} is not what {path} started from "
                           f"({ckpt['config'].get('init_from') or 'nothing'}) and the checkpoint holds every "
                           f"weight; drop the flag")
    if resuming and "optimizer" in explicit and explicit["optimizer"] != ckpt["config"].get("optimizer"):
        raise TinyLLMError(f"--optimizer {explicit['optimizer']} is not the optimizer of {path} "
                           f"({ckpt['config'].get('optimizer')}), whose state would not fit; drop the flag, "
                           f"or start a new run with --init_from {path} --optimizer {explicit['optimizer']}")
    if resuming and "tokenizer_path" in explicit and cfg.tokenizer_path and \
            load_tokenizer_file(cfg.tokenizer_path).to_str() != ckpt["tokenizer"]:
        raise TinyLLMError(f"--tokenizer_path {cfg.tokenizer_path} is not the tokenizer of {path}; "
                           f"drop the flag to keep the checkpoint's, or train anew in another --out_dir")


def check_out_dir(out_dir: str) -> Path:
    """--out_dir as a path, refused up front when a file stands in its place."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TinyLLMError(f"--out_dir {out_dir} is an existing file; pick a directory path")
    return out


def prepare_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyLLMError(f"--out_dir {out} cannot be created ({e.strerror}); pick a writable "
                           f"path") from None
    return out


def lock_out_dir(out: Path) -> Any:
    """Hold an exclusive lock on out_dir/.lock for the whole run, so that two runs never write
    the same checkpoints. The OS drops the lock when the process dies, even by kill -9."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded there
        return None
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise TinyLLMError(f"--out_dir {out} is in use by another run (pid {owner}); wait for it to "
                           f"finish or pick another --out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    for stale in out.glob(".*.tmp*"):  # left by a run killed mid-write (kill -9, power loss)
        if stale.is_file():
            stale.unlink(missing_ok=True)
    return handle


def refuse_existing_run(cfg: Config) -> None:
    """A new run never silently replaces the checkpoints of an earlier one."""
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if ckpt.exists() and not cfg.overwrite and is_rank0():
        raise TinyLLMError(f"--out_dir {cfg.out_dir} already holds a run ({ckpt}); add --resume to "
                           f"continue it, --overwrite to start over, or pick another --out_dir")


# ---- Starting from a pretrained model (--init_from): a tinyllm file, or a transformers one -------

@dataclass
class Source:
    """What --init_from starts from: its architecture as our config fields, the context it was
    trained for, its tokenizer, and where each of our parameters comes from. Tensors are read
    one at a time, when they are copied into the model."""
    path: Path
    family: str  # a model_type of tinyllm_hub.py's HF_FAMILIES, or "tinyllm"
    config: dict[str, Any]  # every ARCH_KEYS field but block_size
    context: int
    vocab_size: int
    tokenizer: str  # tokenizer.json
    tensors: dict[str, list[str]]  # our parameter -> source tensors stacked along its rows (q, k, v)
    read: Callable[[str], torch.Tensor]
    spec: Callable[[str], tuple[tuple[int, ...], torch.dtype]]  # shape and dtype, from the header
    names: set[str]  # every tensor the source holds
    transposed: frozenset[str] = frozenset()  # stored (in, out): GPT-2's Conv1D
    ignored: frozenset[str] = frozenset()  # buffers and duplicates that carry no weights of ours
    fingerprint: str = ""
    chat_template: str = ""  # from tokenizer_config.json: an Instruct model's own format


@dataclass(frozen=True)
class Pretrained:
    """Starting from a pretrained model, which tinyllm_hub.py implements (PRETRAINED): `resolve`
    the invocation of a new run from --init_from (the source read, its config under the flags,
    checked), `base` the model a LoRA checkpoint's adapters were trained on, `model` the model
    with a source's weights (on a device, with at least this many embedding rows), `adapt` LoRA
    adapters put on it (--lora_rank), and `merge` them folded into its weights."""
    resolve: Callable[[dict[str, Any], str], Resolved]
    base: Callable[[dict[str, Any], Path, str], Source]
    model: Callable[..., GPT]  # (cfg, source, device, vocab_size, prepare: run on the meta model)
    adapt: Callable[[GPT, Config], GPT]
    merge: Callable[[GPT], GPT]


PRETRAINED = Registry("--init_from", {"": Elsewhere("tinyllm_hub")})  # a tinyllm file or a transformers one


# ---- The run: progress, metrics, state, and the builder that training and --benchmark share ----

class Progress:
    """A live tqdm bar (step, loss, lr, tokens/s, MFU, ETA) when stdout is a terminal on rank 0;
    plain periodic log lines otherwise (CI, nohup, pipes)."""

    def __init__(self, total: int | None, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, line: str, postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        else:
            print0(line)

    def quiet(self) -> Any:
        """Context for other output (eval lines, samples) that must not tear the bar."""
        if self.bar is None:
            return contextlib.nullcontext()
        from tqdm import tqdm
        return tqdm.external_write_mode()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardSink:
    def __init__(self, out: Path, cfg: Config):
        require("tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out: Path, cfg: Config):
        self.wandb = require("wandb", "--wandb", "wandb (then wandb login)")
        self.run = self.wandb.init(project=cfg.wandb_project, dir=str(out), config=asdict(cfg),
                                   name=out.name, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """A run's records: kept in memory (train() returns them), appended to out_dir/metrics.jsonl
    on rank 0, and sent to TensorBoard and W&B when asked (each imported only then)."""

    def __init__(self, path: Path | None = None, sinks: list[Any] | None = None):
        self.path, self.sinks, self.history = path, sinks or [], []

    @classmethod
    def for_run(cls, cfg: Config, out: Path, rank: int) -> Metrics:
        if rank != 0:
            return cls()
        kinds = [(cfg.tensorboard, TensorBoardSink), (cfg.wandb, WandbSink)]
        return cls(out / "metrics.jsonl", [sink(out, cfg) for wanted, sink in kinds if wanted])

    def record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        for sink in self.sinks:
            sink.log(record)
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                print(f"warning: could not append to {self.path} ({e.strerror})", file=sys.stderr, flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


@dataclass
class RunState:
    """What the loop carries from step to step and a checkpoint restores."""
    step: int = 0
    best_val: float = float("inf")
    elapsed: float = 0.0  # seconds of training so far, across resumes
    overflow_skips: int = 0  # fp16 steps the GradScaler skipped
    nonfinite_skips: int = 0  # steps skipped for a non-finite loss or gradient norm
    skips_in_a_row: int = 0
    saved_step: int = -1  # step of the last checkpoint written
    best_step: int = -1  # step of the weights in ckpt_best.pt (-1: unknown, or none yet)
    grad_norm: torch.Tensor | None = None  # of the last step, kept on the device until logged


@dataclass(kw_only=True)
class Run:
    """Everything one training run holds. Two handles on the model: the raw `model` (state
    dicts, EMA, evaluation, sampling) and `train_model`, the one training steps through: the raw
    model compiled (--compile) and wrapped in DDP (torchrun) when asked, else the raw model."""
    cfg: Config
    dist: Dist
    device: torch.device
    dtype: torch.dtype
    out: Path
    tok: TextTokenizer
    splits: dict[str, TokenSplit]
    model: GPT
    train_model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    ema: EMA | None
    batch_gen: torch.Generator
    state: RunState = field(default_factory=RunState)
    metrics: Metrics = field(default_factory=Metrics)
    progress: Progress = field(default_factory=lambda: Progress(None, 0, enabled=False))
    peak: float | None = None  # device FLOP/s for MFU
    peak_checked: bool = False  # a CPU peak measured again after an MFU above 100%
    memory_kept: bool = False  # keep_freed_memory took effect
    compiled: bool = False  # --compile took effect (training_compiles)
    lock: Any = None  # out_dir's lock, held while training
    data_sha256: str = ""  # of the train and val tokens: a resume checks it
    source_fingerprint: str = ""  # of the --init_from files: a LoRA checkpoint needs the same base
    objective: Objective = field(default_factory=lambda: OBJECTIVES["lm"])
    figures: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's, summed since the log
    kept: dict[str, Any] = field(default_factory=dict)  # what the objective keeps in checkpoints
    scratch: dict[str, Any] = field(default_factory=dict)  # what it carries between steps, and does not
    reference: GPT | None = None  # the starting weights, frozen, for an objective that compares with them

    @property
    def sharded(self) -> bool:
        """--fsdp under torchrun: the model's weights are DTensors, each rank holding its shard."""
        return self.cfg.fsdp and self.dist.enabled

    def checkpoint(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain data that loads with weights_only=True."""
        return {"model": weights or saved_weights(self.model),
                "optimizer": [o.state_dict() for o in self.optimizers], **self.state_fields()}

    def state_fields(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights and the optimizer state."""
        return {"format": CKPT_FORMAT, "world_size": self.dist.world_size, "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "step": self.state.step, "best_val_loss": self.state.best_val,
                "elapsed_s": self.state.elapsed, "overflow_skips": self.state.overflow_skips,
                "nonfinite_skips": self.state.nonfinite_skips, "best_step": self.state.best_step,
                "config": asdict(self.cfg), "vocab_size": self.model.vocab_size,
                "tokenizer": self.tok.to_str(), "rng": rng_states(), "batch_rng": self.batch_gen.get_state(),
                "data_sha256": self.data_sha256, "token_format": TOKEN_CACHE_FORMAT,
                "start_ids": self.splits["train"].start_ids, "source_fingerprint": self.source_fingerprint,
                "objective_state": self.kept}

    def restore(self, ckpt: dict[str, Any]) -> None:
        if "shards" in ckpt and self.sharded:  # each rank reads its own shards, on any world size
            read_own_shards(self, ckpt["shards"], ckpt["ema"])
        else:
            if "shards" in ckpt:  # one process: every rank's shards, put together
                ckpt = load_sharded(ckpt["shards"])
            if self.sharded or ckpt.get("sharded"):  # by parameter name: any world size, sharded or not
                restore_by_name(self, ckpt)
            else:
                load_weights(self.model, ckpt["model"])
                for optimizer, saved in zip(self.optimizers, ckpt["optimizer"], strict=True):
                    optimizer.load_state_dict(saved)
            if self.ema is not None and ckpt["ema"] is not None:
                self.ema.load_state_dict(ckpt["ema"])
        self.scaler.load_state_dict(ckpt["scaler"])
        state = self.state
        state.step, state.best_val = ckpt["step"], ckpt["best_val_loss"]
        # kept by later versions of the format: older checkpoints start them at zero
        state.elapsed = ckpt.get("elapsed_s", 0.0)
        state.overflow_skips = ckpt.get("overflow_skips", 0)
        state.nonfinite_skips = ckpt.get("nonfinite_skips", 0)
        state.best_step = ckpt.get("best_step", -1)
        state.saved_step = state.step
        set_rng_states(ckpt["rng"])
        self.batch_gen.set_state(ckpt["batch_rng"])
        self.kept = ckpt.get("objective_state") or {}

    def close(self) -> None:
        """Let go of what the run holds open: the progress bar, metric sinks, out_dir's lock."""
        self.progress.close()
        self.metrics.close()
        if self.lock is not None:
            self.lock.close()


def restore_by_name(run: Run, ckpt: dict[str, Any]) -> None:
    """Weights and optimizer state from a checkpoint keyed by parameter name, into a model sharded
    over any number of ranks or none (torch.distributed.checkpoint's state_dict API): a sharded
    checkpoint's, or a whole one's, whose optimizer state (keyed by position) is named first."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    options = StateDictOptions(full_state_dict=True, strict=not has_lora(run.model))
    set_model_state_dict(run.model, ckpt["model"], options=options)
    saved = ckpt["optimizer"]  # none in a sharded checkpoint from before the first step, {} in a whole one
    if saved and (ckpt.get("sharded") or any(o["state"] for o in saved)):
        optimizer = saved if ckpt.get("sharded") else named_optimizer_state(run, saved)
        set_optimizer_state_dict(run.model, run.optimizers, optimizer, options=options)


def optimizer_state_of(run: Run) -> dict[str, Any] | None:
    """The optimizers' state by parameter name (each rank its shards under --fsdp), or None before
    the first step: torch would make it by taking a step at learning rate 0, which counts in Adam's
    bias correction, so the run would no longer be the one a DDP run takes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(run.model, run.optimizers) if any(o.state for o in run.optimizers) \
        else None


def read_own_shards(run: Run, path: Path, ema: dict[str, Any] | None) -> None:
    """--fsdp resuming a sharded checkpoint: each rank reads only its own shard of the weights, the
    optimizer state and the EMA (torch.distributed.checkpoint reshards one written on another
    number of ranks); no rank holds the whole model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    lora = has_lora(run.model)
    state = {"model": {k: v for k, v in get_model_state_dict(run.model).items() if ".lora_" in k or not lora}}
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if any(k.startswith("optimizer.") for k in saved):  # none before the first step
            state["optimizer"] = get_optimizer_state_dict(run.model, run.optimizers)
        if run.ema is not None and ema is not None:
            state["ema"] = saved_weights(run.ema.model)  # its own parameters: read in place
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise TinyLLMError(f"{path} cannot be loaded as a sharded tinyllm checkpoint ({dcp_failure(e)}); it "
                           f"is incomplete or damaged: use another checkpoint") from None
    set_model_state_dict(run.model, state["model"], options=StateDictOptions(strict=not lora))
    if "optimizer" in state:
        set_optimizer_state_dict(run.model, run.optimizers, state["optimizer"])
    if "ema" in state:
        run.ema.updates = ema["updates"]


def named_optimizer_state(run: Run, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole checkpoint's optimizer state (one optimizer, tensors by their place in its groups)
    keyed by parameter name, as the state_dict API takes it."""
    if len(saved) != 1:
        raise TinyLLMError(f"this checkpoint has {len(saved)} optimizers' state (--optimizer muon), which "
                           f"--fsdp cannot take; resume it without --fsdp")
    names = {id(p): n for n, p in run.model.named_parameters()}
    order = [names[id(p)] for group in run.optimizers[0].param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved[0]["param_groups"]]
    return {"state": {order[i]: v for i, v in saved[0]["state"].items()}, "param_groups": groups}


def new_run(cfg: Config, *, tok: TextTokenizer, splits: dict[str, TokenSplit], device: torch.device,
            out: Path, dist: Dist = SINGLE_PROCESS, ckpt: dict[str, Any] | None = None,
            source: Source | None = None) -> Run:
    """A run ready to step, for training and --benchmark alike: the model (the same initial
    weights on every rank, or the --init_from source's), its optimizers, GradScaler, EMA and
    batch generator, restored from `ckpt` when given, then wrapped for training (compiled, DDP)."""
    memory_kept = keep_freed_memory(cfg, device)  # glibc keeps freed memory for the next step
    dtype = pick_dtype(cfg, device)
    peak = peak_flops(cfg, device, dtype)  # on a CPU: measured once, then read from the cache
    seed_everything(cfg.seed)
    task_renderer(cfg, tok)  # --task_chat on a model with no chat template: refused before any step
    vocab_size = ckpt["vocab_size"] if ckpt else tok.vocab_size  # a source's may exceed its tokenizer's
    sharded = cfg.fsdp and dist.enabled

    def prepare(model: GPT) -> None:  # a source's on the meta device, so that --fsdp reads only shards
        if cfg.lora_rank:
            PRETRAINED[""].adapt(model, cfg)
        if sharded:  # before the optimizers: they step the shards
            shard_model(model, cfg, dtype)
    if source:
        model = PRETRAINED[""].model(cfg, source, device, tok.vocab_size, prepare)
    else:
        model = GPT(cfg, vocab_size).to(device)
        prepare(model)
    model.grad_checkpointing = cfg.grad_checkpointing
    run = Run(cfg=cfg, dist=dist, device=device, dtype=dtype, out=out, tok=tok, splits=splits,
              model=model, train_model=model, optimizers=make_optimizers(model, cfg, device),
              scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
              ema=EMA(model, cfg.ema_decay, (lambda m: sharded_twin(m, cfg, dtype)) if sharded else None)
              if cfg.ema else None,
              batch_gen=torch.Generator().manual_seed(cfg.seed), peak=peak, memory_kept=memory_kept,
              compiled=training_compiles(cfg, device), objective=OBJECTIVES[cfg.objective])
    if ckpt is not None:
        run.restore(ckpt)
    run.train_model = wrap_model(model, run.compiled, dist, device, cfg.fsdp)
    return run


def shard_model(model: GPT, cfg: Config, dtype: torch.dtype) -> None:
    """--fsdp: each block, then the root (embedding, final norm, head), sharded over the ranks in
    place (FSDP2's fully_shard): every weight becomes a DTensor of which each rank holds a slice,
    gathered for a block's forward and backward. Under autocast the gathered weights are in its
    dtype and gradients are averaged over the ranks in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    for module in [*model.blocks, model]:
        fully_shard(module, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    register_fsdp_forward_method(model, "step")  # the decode step gathers the root's weights as forward does


def sharded_twin(model: GPT, cfg: Config, dtype: torch.dtype) -> GPT:
    """--fsdp's EMA: a second model sharded as `model` is (built on the meta device: no rank holds
    more than its shard), starting from a copy of each rank's shard of the live weights."""
    with torch.device("meta"):
        twin = GPT(model.cfg, model.vocab_size)
    if has_lora(model):
        PRETRAINED[""].adapt(twin, cfg)
    shard_model(twin, cfg, dtype)
    twin.to_empty(device=local_part(model.wte.weight).device)
    with torch.no_grad():
        for mine, live in zip(twin.parameters(), model.parameters(), strict=True):
            local_part(mine).copy_(local_part(live))
        for mine, live in zip(twin.buffers(), model.buffers(), strict=True):
            mine.copy_(live)
    return twin.eval()


def training_compiles(cfg: Config, device: torch.device) -> bool:
    """Whether training steps run compiled: asked (--compile) and the device has a compiler; where
    it has none, one line says so and training is eager (a config that asks for it still runs)."""
    if not cfg.compile or device.type not in ("cpu", "cuda"):
        return cfg.compile
    missing = compiler_missing(device, "the training step")
    if missing:
        print0(f"training eagerly: {missing}", file=sys.stderr)
    return not missing


def wrap_model(model: GPT, compiled: bool, dist: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """The training handle: compiled (static shapes: one compile per curriculum stage), then
    DDP-wrapped (FSDP shards the raw model in place: no wrapper). Checkpoints, EMA, eval and
    sampling keep using the raw model."""
    wrapped: nn.Module = torch.compile(model, dynamic=False) if compiled else model
    if dist.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda"
                                          else None)
    return wrapped


class SignalCatcher:
    """Turns SIGINT (Ctrl-C) and SIGTERM (schedulers, kill) into a flag the loop checks after
    each step, so that the run stops at a step boundary with a checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum, self.previous = 0, {}

    def __enter__(self) -> SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._catch) for signum in self.SIGNALS}
        return self

    def _catch(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------
# train(): the run, its loop and one optimizer step, then their helpers in the order they are called
# ----------------------------------------------------------------------------------------------

def train(r: Resolved) -> list[dict[str, Any]]:
    """Train as configured, resuming from r.ckpt when there is one; returns the log and eval
    records (also in out_dir/metrics.jsonl)."""
    dist = init_distributed(r.cfg)
    from_source = r.source is not None and r.ckpt is None  # a fresh run from --init_from
    run = start_run(r, dist)
    try:
        describe_run(run)
        if from_source:  # where fine-tuning starts: the source model's loss on this data
            evaluate_and_save(run)
        run.progress = Progress(None if r.cfg.time_budget_s else r.cfg.max_steps, run.state.step,
                                enabled=dist.rank == 0 and sys.stdout.isatty())
        with SignalCatcher() as catcher:
            train_loop(run, catcher)
        run.progress.close()
        report_done(run)
        try:
            print_samples(sampling_model(run), run.tok, run.cfg, run.device,
                          start_ids=run.splits["train"].start_ids)
        except KeyboardInterrupt:  # training is over: say so, not "before training started"
            raise TrainingStopped(f"\ninterrupted while sampling; training is done and its checkpoints "
                                  f"are in {run.out}", status=130) from None
    finally:
        run.close()
        if dist.enabled:
            torch.distributed.destroy_process_group()
    return run.metrics.history


def train_loop(run: Run, catcher: SignalCatcher) -> None:
    """Step until max_steps, the time budget or --stop_at_step; log, evaluate and checkpoint,
    and sample on their intervals; stop at a step boundary on SIGINT or SIGTERM."""
    cfg, state = run.cfg, run.state
    run.model.train()
    loss_sum, steps_since_log = torch.zeros((), device=run.device), 0
    t_log = t_step = time.time()
    while not finished(run):
        lr = lr_at(state.step, cfg, state.elapsed)
        loss_sum += train_step(run, lr)
        run.progress.step()
        steps_since_log += 1
        now = time.time()
        state.elapsed += now - t_step
        if cfg.time_budget_s:  # the clock then steers the schedule and the stop: one clock for all ranks
            state.elapsed = agreed(run, state.elapsed)
        if state.step % cfg.log_interval == 0:  # the loss reaches the host only here
            log_step(run, mean_over_ranks(run, loss_sum) / steps_since_log, lr, now - t_log,
                     steps_since_log)
            loss_sum.zero_()
            steps_since_log, t_log = 0, now
        do_eval = state.step % cfg.eval_interval == 0 or finished(run)
        do_sample = bool(cfg.sample_interval) and state.step % cfg.sample_interval == 0 and not finished(run)
        if do_eval or do_sample:
            with run.progress.quiet():
                if do_eval:
                    evaluate_and_save(run)
                if do_sample:
                    print_samples(sampling_model(run), run.tok, dataclasses.replace(cfg, num_samples=1),
                                  run.device, max_new_tokens=120, start_ids=run.splits["train"].start_ids)
        pause = time.time() - now  # evaluation and sampling are not training time
        t_step, t_log = now + pause, t_log + pause
        signum = stop_requested(run, catcher)
        if signum:
            stop_for_signal(run, signum)


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One optimizer step; returns the mean training loss as a device tensor."""
    cfg, state = run.cfg, run.state
    context = context_at(state.step, cfg)
    batch = batch_at(context, cfg)
    # forward and backward per micro-batch; DDP syncs gradients on the last one only
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum_steps):
        sync = micro == cfg.grad_accum_steps - 1 or not run.dist.enabled
        with local_gradients(run, sync):
            with autocast(run.device, run.dtype):  # the objective's loss of one micro-batch (--objective)
                loss, figures = run.objective.loss(run, batch, context, micro)
            loss = loss / cfg.grad_accum_steps
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        for name, value in figures.items():  # what it logs beside the loss, averaged like it
            run.figures[name] = run.figures.get(name, 0) + value.detach() / cfg.grad_accum_steps
    # set the learning rate, unscale fp16 gradients, and take the global gradient norm
    params = [p for p in run.model.parameters() if p.grad is not None]
    for optimizer in run.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
        run.scaler.unscale_(optimizer)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # over the shards, with --fsdp
    whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # a non-finite norm (an fp16 overflow, or divergence) skips the update; after the sync the
    # norm is the same on every rank, so all ranks skip together. This is the step's host sync
    # (under fp16 the GradScaler adds its own).
    skipped = not torch.isfinite(whole).item()
    if not skipped:
        if cfg.grad_clip:  # clip, then step every optimizer (through the scaler under fp16)
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
        for optimizer in run.optimizers:
            run.scaler.step(optimizer)
    run.scaler.update()  # fp16: a skipped step lowers the loss scale
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)
    # the EMA follows every update that was made
    if not skipped and run.ema is not None:
        run.ema.update(run.model)
    state.step, state.grad_norm = state.step + 1, whole
    count_skip(run, skipped, whole)
    return loss_sum


@contextlib.contextmanager
def local_gradients(run: Run, sync: bool) -> Iterator[None]:
    """A micro-batch whose gradients are only added up on each rank, unless `sync` (the last of a
    step's micro-batches, which averages them over the ranks): DDP's no_sync, FSDP's switch."""
    if sync or not run.dist.enabled:
        yield
    elif run.sharded:
        run.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            run.model.set_requires_gradient_sync(True)
    else:
        with run.train_model.no_sync():
            yield


def start_run(r: Resolved, dist: Dist) -> Run:
    """What train() steps. An existing out_dir is locked first (rank 0); then the inputs are
    checked and prepared (tokenizer, token files); only then is a new out_dir created and
    locked, tokenizer.json and effective_config.json written, and the run built (resumed when r
    has a checkpoint) with its metrics."""
    cfg, ckpt = keep_global_batch(r.cfg, r.ckpt, dist), r.ckpt
    r.ckpt = None  # restored into the run below: the loaded copy need not outlive it
    device = pick_device(cfg.device, dist.local_rank)
    out = check_out_dir(cfg.out_dir)
    lock = lock_out_dir(out) if dist.rank == 0 and out.is_dir() else None  # an existing run: claim it first
    source = r.source.tokenizer if r.source else None
    # every input is checked here, before out_dir exists: token files, or the objective's own data
    tok, splits, data = OBJECTIVES[cfg.objective].inputs(cfg, ckpt, dist, source)
    if dist.rank == 0 and lock is None:
        lock = lock_out_dir(prepare_out_dir(out))
        if not ckpt and not cfg.overwrite and (out / "ckpt.pt").exists():  # another run got here first
            lock.close()
            refuse_existing_run(cfg)
    if dist.rank == 0:
        write_text_atomic(out / "tokenizer.json", tok.to_str())
        write_text_atomic(out / "effective_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        if not ckpt:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log
    run = new_run(cfg, tok=tok, splits=splits, device=device, out=out, dist=dist, ckpt=ckpt, source=r.source)
    run.lock, run.data_sha256 = lock, data
    run.source_fingerprint = r.source.fingerprint if r.source else (ckpt or {}).get("source_fingerprint", "")
    run.objective.prepare(run, r.source)  # e.g. its reference model, from the source on a resume
    r.source = None  # the model holds its weights now: the source's tensors (and mapped files) can go
    if ckpt and ckpt.get("data_sha256", data) != data:  # allowed by --allow_data_change: other val text
        run.state.best_val = float("inf")
    changed = [k for k in ("objective", *run.objective.flags) if ckpt and not run.objective.windows
               and ckpt["config"].get(k, FIELDS[k].default) != getattr(cfg, k)]
    if changed and run.state.best_val < float("inf"):  # the best was chosen by another loss or reward
        run.state.best_val = float("inf")
        print0(f"note: --{changed[0]} differs from the checkpoint's, so the val figures are not comparable "
               f"with its best: the best starts over")
    run.metrics = Metrics.for_run(cfg, out, dist.rank)  # opens TensorBoard/W&B: after every refusal
    if ckpt:
        print0(f"resume: continuing {out / 'ckpt.pt'} from step {run.state.step}")
    return run


def keep_global_batch(cfg: Config, ckpt: dict[str, Any] | None, dist: Dist) -> Config:
    """A resume on another number of ranks than the checkpoint's keeps the global batch (and so
    the schedule's tokens per step) by changing --grad_accum_steps; refused where it cannot."""
    saved = (ckpt or {}).get("world_size", dist.world_size)
    if saved == dist.world_size:
        return cfg
    batch, accum = ckpt["config"]["batch_size"], ckpt["config"]["grad_accum_steps"]
    total, per_micro = batch * accum * saved, cfg.batch_size * dist.world_size
    if total % per_micro:
        raise TinyLLMError(f"--resume on {dist.world_size} process(es): the run's global batch of {total} "
                           f"sequences ({batch} x {accum} accum x {saved} ranks) is "
                           f"not a multiple of {per_micro} ({cfg.batch_size} x {dist.world_size}); "
                           + (f"give a --batch_size that divides {total // dist.world_size}" if total %
                              dist.world_size == 0 else "resume on a number of ranks that divides it"))
    accum = total // per_micro
    how = f"--grad_accum_steps {cfg.grad_accum_steps} -> {accum}" if accum != cfg.grad_accum_steps else \
        f"--batch_size {cfg.batch_size} x {dist.world_size} ranks"
    print0(f"resume: {dist.world_size} process(es) instead of {saved}: {how} keeps the global batch of "
           f"{total} sequences")
    return dataclasses.replace(cfg, grad_accum_steps=accum)


def describe_run(run: Run) -> None:
    cfg = run.cfg
    source = f", from {cfg.init_from}" if cfg.init_from else ""
    print0(f"model: {run.model.num_params() / 1e6:.2f}M parameters, vocab {run.model.vocab_size}, "
           f"{cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.norm}/{cfg.mlp}/{cfg.pos_encoding}{source}")
    if cfg.lora_rank:
        trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        print0(f"lora: rank {cfg.lora_rank} on {cfg.lora_targets}, alpha {cfg.lora_alpha:g}: {trained:,} "
               f"trainable parameters ({100 * trained / run.model.num_params():.2f}%), trained without "
               f"weight decay; the rest frozen")
    print0(f"engine: device {run.device}, {str(run.dtype).removeprefix('torch.')}"
           f"{' autocast' if run.dtype != torch.float32 else ''}, optimizer {cfg.optimizer}, "
           f"{'compiled' if run.compiled else 'eager'}, {run.dist.world_size} process(es)"
           f"{' (FSDP: weights, gradients and optimizer state sharded)' if run.sharded else ''}"
           f"{', freed memory kept' if run.memory_kept else ''}")
    limit = f"{cfg.max_steps} steps" + (f" or {cfg.time_budget_s:g}s" if cfg.time_budget_s else "")
    per_step = f"{tokens_per_step(cfg, run.dist.world_size):,} tokens ({cfg.batch_size} x {cfg.block_size}" \
        if run.objective.windows else f"{cfg.batch_size * cfg.grad_accum_steps * run.dist.world_size:,} " \
        f"{run.objective.unit} ({cfg.batch_size}"
    print0(f"training: {limit} of {per_step} x {cfg.grad_accum_steps} accum x {run.dist.world_size} ranks), "
           f"--objective {cfg.objective}; writing {run.out}")
    peak = f"{run.peak / 1e12:.3g} TFLOP/s peak" if run.peak else "peak unknown (--peak_flops)"
    print0(f"measuring: {flops_per_token(run.model, cfg.block_size) / 1e6:.2f} MFLOPs per token, {peak}")


def finished(run: Run) -> bool:
    state, cfg = run.state, run.cfg
    return (state.step >= cfg.max_steps or (cfg.time_budget_s > 0 and state.elapsed >= cfg.time_budget_s)
            or (cfg.stop_at_step > 0 and state.step >= cfg.stop_at_step))


def count_skip(run: Run, skipped: bool, norm: torch.Tensor) -> None:
    """Count skipped updates (fp16 overflows apart); stop the run after too many in a row."""
    state, fp16 = run.state, run.scaler.is_enabled()
    state.overflow_skips += skipped and fp16
    state.nonfinite_skips += skipped and not fp16
    state.skips_in_a_row = state.skips_in_a_row + 1 if skipped else 0
    if skipped and not fp16:
        print0(f"step {state.step}: gradient norm is {norm.item()} (non-finite loss or gradient); "
               f"update skipped ({state.skips_in_a_row} in a row, {state.nonfinite_skips} in all)")
    if state.skips_in_a_row >= run.cfg.max_nonfinite:
        last = f"{run.out / 'ckpt.pt'} (step {state.saved_step})" if state.saved_step >= 0 else "none yet"
        raise TrainingStopped(
            f"stopping at step {state.step}: {state.skips_in_a_row} optimizer steps in a row had a "
            f"non-finite loss or gradient and were skipped; last good checkpoint: {last}. Lower "
            f"--learning_rate, raise --warmup_steps, or use --dtype bfloat16/float32", status=1)


def agreed(run: Run, value: float) -> float:
    """Rank 0's value on every rank, so that all ranks share one schedule and stop together."""
    if not run.dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=run.device)
    torch.distributed.broadcast(t, 0)
    return t.item()


def mean_over_ranks(run: Run, value: torch.Tensor) -> float:
    if run.dist.enabled:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
    return value.item()


def log_step(run: Run, loss: float, lr: float, seconds: float, steps: int) -> None:
    cfg, state = run.cfg, run.state
    windows = run.objective.windows  # else tokens per step vary, and are not counted
    per_step = tokens_per_step(cfg, run.dist.world_size)
    tok_s = per_step * steps / seconds if windows else None
    flops = flops_per_token(run.model, context_at(state.step - 1, cfg)) * tok_s / run.dist.world_size \
        if windows else 0.0
    mfu = model_flops_utilization(run, flops) if windows else None
    figures = {name: mean_over_ranks(run, value) / steps for name, value in run.figures.items()}
    run.figures.clear()
    run.metrics.record({"step": state.step, "tokens": state.step * per_step if windows else None,
                        "loss": loss, "lr": lr,
                        "grad_norm": state.grad_norm.item() if state.grad_norm is not None else None,
                        "tokens_per_s": tok_s, "mfu": mfu, "elapsed_s": state.elapsed,
                        "overflow_skips": state.overflow_skips, "nonfinite_skips": state.nonfinite_skips}
                       | figures)
    skips = f" | fp16 overflow skips {state.overflow_skips}" if run.scaler.is_enabled() else ""
    mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
    speed = f" | {tok_s:,.0f} tok/s{mfu_text}" if windows else ""
    shown = "".join(f" | {name} {figures[name]:.3f}" for name in run.objective.shown if name in figures)
    run.progress.log(f"step {state.step:>6}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                     f"{1000 * seconds / steps:.1f} ms/step{speed}{shown}{skips}",
                     f"loss {loss:.4f}, lr {lr:.2e}{speed.replace(' | ', ', ')}{shown.replace(' | ', ', ')}")


def evaluate_and_save(run: Run) -> None:
    """Evaluate, write the checkpoints, and say what is on disk now."""
    best, report = evaluate(run)
    written = save_checkpoints(run, best)
    if best is not None:
        saved = "saved to" if "ckpt_best.pt" in written else "not saved: could not write"
        report += f" (best: {best.which} weights {saved} ckpt_best.pt)"
    print0(report)


@dataclass
class Best:
    """Weights whose val loss beats the best so far: what ckpt_best.pt should hold."""
    val_loss: float
    weights: dict[str, torch.Tensor]
    which: str  # "live" or "ema"


def evaluate(run: Run) -> tuple[Best | None, str]:
    """Val loss of the live weights (and of the EMA), recorded; returns the better one's weights
    when they beat the best on disk so far (for ckpt_best.pt), else None, and the line to print."""
    score, figures, text = run.objective.evaluate(run, run.model)  # the objective's, val loss first
    record = {"step": run.state.step, **figures, "elapsed_s": run.state.elapsed}
    candidates = {"live": (score, run.model)}
    if run.ema is not None:
        ema_score, ema_figures, _ = run.objective.evaluate(run, run.ema.model, ("val",))
        candidates["ema"] = (ema_score, run.ema.model)
        record |= {f"ema_{name}": value for name, value in ema_figures.items() if name.startswith("val_")}
    which = min(candidates, key=lambda k: candidates[k][0])
    val, source = candidates[which]
    tasks = task_scores(run) if run.cfg.eval_tasks else {}
    record.update({f"{task}/{metric}": value for task, scores in tasks.items()
                   for metric, value in scores.items() if metric in TASK_METRICS})
    run.metrics.record(record)
    ema = f" | ema {run.objective.best(candidates['ema'][0])}" if run.ema is not None else ""
    benchmarks = "".join(f" | {task} {metric} {100 * scores[metric]:.1f}%" for task, scores in tasks.items()
                         for metric in ("acc_norm" if "acc_norm" in scores else "acc",))
    report = f"eval step {run.state.step}: {text}{ema}{benchmarks}"
    return (Best(val, saved_weights(source), which) if val < run.state.best_val else None), report


TASK_METRICS = ("acc", "acc_norm", "perplexity")  # what metrics.jsonl and loss.png keep of each task


def task_scores(run: Run) -> dict[str, dict[str, float]]:
    """The --eval_tasks on the live weights (the first --eval_tasks_limit items of each)."""
    return sibling("tinyllm_evals", "--eval_tasks").evaluate_tasks(
        run.model, run.tok, run.cfg.eval_tasks, run.cfg.task_format, run.cfg.eval_tasks_limit, run.device,
        run.dtype, say=False, render=task_renderer(run.cfg, run.tok))


def task_renderer(cfg: Config, tok: TextTokenizer) -> Callable[[str], str] | None:
    """--task_chat: a task's context as the user's turn of a conversation, up to the reply."""
    if not cfg.task_chat:
        return None
    template = chat_template_of(cfg, tok)
    if not template:
        raise TinyLLMError("--task_chat is for chat models, and this one has no chat template; leave it out "
                           "(or train the model on conversations)")
    render_chat = sibling("tinyllm_data", "--task_chat").render_chat
    return lambda context: render_chat(template, [{"role": "user", "content": context}],
                                       generation_prompt=True)


def save_checkpoints(run: Run, best: Best | None = None) -> set[str]:
    """ckpt_best.pt when `best` is given, then ckpt.pt (live weights, for resuming), which records
    the best val loss on disk; returns the files written. A failed write (disk full, permissions)
    is reported and training goes on: the temporary file is removed, the previous file stays as
    it was, and the state says which step is on disk (a best not saved is tried again)."""
    state = run.state
    if best is not None:
        state.best_val, previous = best.val_loss, (state.best_val, state.best_step)
        state.best_step = state.step
    if run.dist.rank != 0 and not run.sharded:
        return {"ckpt.pt", "ckpt_best.pt"}
    write = write_sharded if run.sharded else lambda run, name, weights: write_checkpoint(
        run, name, run.checkpoint(weights))
    written = set()
    if best is not None:
        if write(run, "ckpt_best.pt", best.weights):
            written.add("ckpt_best.pt")
        else:
            state.best_val, state.best_step = previous
    if write(run, "ckpt.pt", None):
        written.add("ckpt.pt")
        state.saved_step = state.step
    if not run.sharded and (run.out / "shards").is_dir():  # a sharded run resumed whole: its old shards
        drop_unnamed_shards(run.out)
    return written


def write_checkpoint(run: Run, name: str, ckpt: dict[str, Any]) -> bool:
    try:
        atomic_write(run.out / name, lambda p: torch.save(ckpt, p))
        return True
    except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError on a full disk
        latest = name == "ckpt.pt"
        what, step = ("a checkpoint", run.state.saved_step) if latest else (name, run.state.best_step)
        kept = f"the previous {'checkpoint' if latest else name} is kept (step {step})" if step >= 0 \
            else f"there is no {name} yet"
        print(f"warning: could not write {what} to {run.out} ({write_failure(e, run.out)}); {kept}; "
              f"free disk space or fix permissions", file=sys.stderr, flush=True)
        return False


def write_sharded(run: Run, name: str, weights: dict[str, torch.Tensor] | None) -> bool:
    """--fsdp: a checkpoint as a folder of shards, out_dir/shards/NAME-STEP-TIME: each rank writes
    its own shard of the weights and optimizer state (torch.distributed.checkpoint; no rank
    gathers the model), rank 0 the rest beside them (state.pt); then out_dir/NAME, a symlink, is
    pointed at the folder in one rename, so it names a whole checkpoint or the previous one.
    Every rank returns whether it was written (a failure anywhere is a failure everywhere)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    model_state, optimizer_state = get_model_state_dict(run.model), optimizer_state_of(run)
    if has_lora(run.model):  # the adapters only, as a whole LoRA checkpoint holds (the base is --init_from)
        model_state = {k: v for k, v in model_state.items() if ".lora_" in k}
    stamp = int(agreed(run, time.time()) * 1000)  # one folder name for every rank
    folder = run.out / "shards" / f"{name.removesuffix('.pt')}-{run.state.step}-{stamp}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    ok, failure = True, "it failed on another rank"
    try:
        ema = {"ema": saved_weights(run.ema.model)} if run.ema is not None else {}  # its own shards too
        optimizer = {"optimizer": optimizer_state} if optimizer_state is not None else {}
        dcp.save({"model": weights or model_state, **optimizer, **ema}, checkpoint_id=str(tmp))
        if run.dist.rank == 0:
            fields = {**run.state_fields(), "ema": run.ema and {"updates": run.ema.updates}}  # weights: above
            torch.save(fields, tmp / "state.pt")
    except (OSError, RuntimeError) as e:
        ok, failure = False, write_failure(e, run.out)
    ok = agreed_all(run, ok)
    missing = [r for r in range(run.dist.world_size) if not (tmp / f"__{r}_0.distcp").is_file()] \
        if ok and run.dist.rank == 0 else []
    if ok and not agreed_all(run, not missing):  # every rank stops with the same line
        raise TinyLLMError(f"the shards of some ranks are not in rank 0's {tmp}: with --fsdp on several "
                           f"machines, --out_dir must be a folder every machine sees (shared storage)")
    if ok and run.dist.rank == 0:
        os.replace(tmp, folder)
        link = run.out / f".{name}.link{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(Path("shards") / folder.name, target_is_directory=True)
        os.replace(link, run.out / name)  # one rename: the name is the old checkpoint, then the new
        drop_unnamed_shards(run.out)
    elif not ok and run.dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {name} is kept" if (run.out / name).exists() else f"there is no {name} yet"
        print(f"warning: could not write {name} to {run.out} ({failure}); {kept}; free disk space or fix "
              f"permissions", file=sys.stderr, flush=True)
    agreed_all(run, True)  # the others wait until the name points at the new folder
    return ok


def agreed_all(run: Run, flag: bool) -> bool:
    """Whether `flag` holds on every rank (a barrier too)."""
    t = torch.tensor([0 if flag else 1], device=run.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return not t.item()


def drop_unnamed_shards(out: Path) -> None:
    """Shard folders neither ckpt.pt nor ckpt_best.pt names any more (and half-written ones)."""
    named = {(out / n).resolve() for n in ("ckpt.pt", "ckpt_best.pt") if (out / n).is_symlink()}
    for folder in (out / "shards").iterdir():
        if folder.resolve() not in named:
            shutil.rmtree(folder, ignore_errors=True)


def write_failure(e: BaseException, folder: Path) -> str:
    """Why a write failed, in words: the OS's reason, or for torch's writer (which says only
    'unexpected pos') whether the disk is full."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
    except OSError:
        pass
    return first_line(e)


def sampling_model(run: Run) -> GPT:
    return run.ema.model if run.ema is not None else run.model


def stop_requested(run: Run, catcher: SignalCatcher) -> int:
    """The signal to stop for, agreed by all ranks (any rank that got one stops them all)."""
    if not run.dist.enabled:
        return catcher.signum
    flag = torch.tensor([catcher.signum], device=run.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def stop_for_signal(run: Run, signum: int) -> None:
    saved = "ckpt.pt" in save_checkpoints(run)
    name = signal.Signals(signum).name
    where = f"saved {run.out / 'ckpt.pt'}" if saved else on_disk(run)
    launch = "torchrun [its options] train_tinyllm.py" if run.dist.enabled else "python train_tinyllm.py"
    raise TrainingStopped(f"interrupted by {name} at step {run.state.step}: {where}; continue with: "
                          f"{launch} --out_dir {run.out} --resume", status=128 + signum)


def report_done(run: Run) -> None:
    state = run.state
    where = f"checkpoints in {run.out}" if state.saved_step == state.step else on_disk(run)
    print0(f"done: step {state.step}, {state.elapsed:.0f}s of training, best "
           f"{run.objective.best(state.best_val)}; {where}")
    if 0 <= state.saved_step < run.cfg.max_steps and not run.cfg.time_budget_s:
        print0(f"continue with: --out_dir {run.out} --resume")
    if run.dist.enabled:
        print0(memory_per_rank(run))


def memory_per_rank(run: Run) -> str:
    """What rank 0 holds of the weights (the gradients hold as much of the trained ones) and of the
    optimizer state: all of it with DDP, its shard with --fsdp; and its peak resident memory."""
    import resource

    def local(t: torch.Tensor) -> int:
        return local_part(t).numel() * t.element_size()
    weights = sum(local(p) for p in run.model.parameters())
    trained = sum(local(p) for p in run.model.parameters() if p.requires_grad)
    state = sum(local(v) for o in run.optimizers for s in o.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return (f"memory of rank 0 of {run.dist.world_size}{' (sharded)' if run.sharded else ''}: weights "
            f"{weights / 2**20:,.1f} MB, gradients {trained / 2**20:,.1f} MB, optimizer state "
            f"{state / 2**20:,.1f} MB; peak resident {peak / 2**30:.2f} GB")


def on_disk(run: Run) -> str:
    """What a run whose latest checkpoint could not be written has on disk, and from which step."""
    state = run.state
    if state.saved_step < 0:
        return f"no checkpoint could be written to {run.out}"
    best = f", ckpt_best.pt from step {state.best_step}" if state.best_step >= 0 else ""
    return f"the checkpoint could not be written: {run.out / 'ckpt.pt'} is from step {state.saved_step}{best}"


# ==============================================================================================
# You can stop reading here: everything above trains a model, and none of it calls what follows.
# Below are the modes that use a trained model (generate, evaluate, benchmark, plot), the
# invocation that turns flags into one checked Config, and main(), which runs its mode.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Using a trained model: generate, evaluate, benchmark, plot
# ----------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A checkpoint ready to use: its config merged with this invocation's settings."""
    cfg: Config
    path: Path
    step: int
    tok: TextTokenizer
    model: GPT
    device: torch.device
    start_ids: list[int] | None = None  # what an empty prompt starts from (newer checkpoints)


def model_from_checkpoint(ckpt: dict[str, Any], cfg: Config, device: torch.device,
                          base: Source | None = None) -> GPT:
    """The checkpoint's model; a LoRA checkpoint's adapters on their base, merged."""
    if base is not None:
        pretrained = PRETRAINED[""]
        model = pretrained.adapt(pretrained.model(cfg, base, device, 0), cfg)
        load_weights(model, ckpt["model"])
        return pretrained.merge(model)
    with weights_left_uninitialized():
        model = GPT(cfg, ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    return model.to(device)


@contextlib.contextmanager
def weights_left_uninitialized() -> Iterator[None]:
    """Modules built inside keep torch.empty's memory as their weights, for a model whose every
    weight a checkpoint replaces next: random values for 100M parameters take more than a second
    (and a model built on the meta device instead imports torch's compiler, as long again)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    kept = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in kept.items():
            setattr(nn.init, name, function)


def load_for_use(r: Resolved) -> Loaded:
    """The resolved checkpoint's model, in eval mode on the chosen device, and its tokenizer."""
    ckpt, r.ckpt = r.ckpt, None  # the model holds the weights now: the loaded copy can go
    device = pick_device(r.cfg.device)
    tok = TextTokenizer.from_str(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt, r.cfg, device, r.source).eval()
    r.source = None  # a LoRA base's tensors are in the merged model now
    return Loaded(r.cfg, r.ckpt_path, ckpt["step"], tok, model, device, ckpt.get("start_ids"))


def generate_from_checkpoint(r: Resolved) -> None:
    """--generate_only: stream samples to stdout (the "loaded" line goes to stderr)."""
    use = load_for_use(r)
    encode_prompt(use.tok, use.cfg.prompt)  # refuse a bad prompt before any output
    print0(f"loaded {use.path} (step {use.step}, {use.model.num_params() / 1e6:.2f}M parameters)",
           file=sys.stderr)
    print_samples(use.model, use.tok, use.cfg, use.device, start_ids=use.start_ids, frozen=True)


def evaluate_checkpoint(r: Resolved) -> dict[str, Any]:
    """--eval_only: the benchmarks of --eval_tasks, and loss, perplexity, bits per byte and
    accuracy of a checkpoint (on --eval_data; without --eval_tasks, else on the val split)."""
    use = load_for_use(r)
    if use.cfg.eval_tasks:
        scores = {"tasks": score_checkpoint_tasks(use)}
        if not use.cfg.eval_data:
            return scores
        return {**scores, **loss_of_checkpoint(use)}
    return loss_of_checkpoint(use)


def score_checkpoint_tasks(use: Loaded) -> dict[str, dict[str, float]]:
    """The --eval_tasks of a checkpoint, with the model in the sampling dtype for batched work
    (bf16 where the device has it natively) and quantized as --quantize asks."""
    render = task_renderer(use.cfg, use.tok)
    dist = init_distributed(use.cfg)  # under torchrun, the items are split over the ranks
    model = sampling_copy(use.model, use.cfg, use.device, compiled=True)
    keep_freed_memory(use.cfg, use.device)  # every batch allocates its activations anew, as a training step
    weights = use.cfg.quantize if use.cfg.quantize != "none" else \
        str(model.wte.weight.dtype).removeprefix("torch.")
    ranks = f", {dist.world_size} processes" if dist.enabled else ""
    print0(f"benchmarks of {use.path} (step {use.step}, {weights} weights{ranks}):")
    try:
        return sibling("tinyllm_evals", "--eval_tasks").evaluate_tasks(
            model, use.tok, use.cfg.eval_tasks, use.cfg.task_format, use.cfg.eval_tasks_limit, use.device,
            pick_dtype(use.cfg, use.device), render=render)
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def loss_of_checkpoint(use: Loaded) -> dict[str, float]:
    if not use.cfg.eval_data and not OBJECTIVES[use.cfg.objective].windows:
        raise TinyLLMError(f"{use.path} was tuned with --objective {use.cfg.objective} on --data_path "
                           f"{use.cfg.data_path}, which holds no text to measure a loss on; give --eval_data "
                           f"(a text file) or --eval_tasks")
    tokens, per_byte, name, mask = eval_tokens_for(use)
    if len(tokens) < use.cfg.block_size + 1:
        raise TinyLLMError(f"{name} has {len(tokens)} tokens; --eval_only needs at least block_size "
                           f"+ 1 = {use.cfg.block_size + 1}")
    model = QUANTIZERS[use.cfg.quantize](use.model)  # what decoding with --quantize computes
    result = evaluate_tokens(model, tokens, use.cfg.batch_size, use.device,
                             pick_dtype(use.cfg, use.device), mask, use.tok.eot_id)
    result.update(perplexity=perplexity(result["loss"]), bpb=bits_per_byte(result["loss"], per_byte))
    which = "assistant tokens (the replies and their end of turn)" if mask is not None else "tokens"
    weights = "" if use.cfg.quantize == "none" else f", {use.cfg.quantize} weights"
    print0(f"eval of {use.path} (step {use.step}{weights}) on {name}: {int(result['tokens']):,} {which}")
    print0(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | bits per byte "
           f"{result['bpb']:.4f} | next-token accuracy {100 * result['accuracy']:.2f}%")
    return result


def eval_tokens_for(use: Loaded) -> tuple[np.ndarray, float, str, np.ndarray | None]:
    """Tokens to evaluate, tokens per byte, a name, and for conversations the mask of the
    tokens that count (the replies): --eval_data, else the run's val split."""
    if use.cfg.eval_data:
        settings = ReadSettings("--eval_data", use.cfg.text_field, use.cfg.raw_text,
                                data_format=use.cfg.data_format, template=chat_template_of(use.cfg, use.tok))
        text = read_text_file(use.cfg.eval_data, settings)
        if "conversations" in settings.kinds:
            tokens, mask = encode_fenced(use.tok, text, use.cfg.eval_data)
            return tokens, len(tokens) / len(text.encode("utf-8")), use.cfg.eval_data, mask
        tokens = encode_text(use.tok, text, use.cfg.eval_data)
        return tokens, len(tokens) / len(text.encode("utf-8")), use.cfg.eval_data, None
    splits = prepare_data(use.cfg, load_corpus(use.cfg), use.tok, load_val_corpus(use.cfg))
    return splits["val"].tokens(), splits["val"].tokens_per_byte, "the val split", splits["val"].mask()


def encode_fenced(tok: TextTokenizer, text: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rendered conversations (a small --eval_data file) to tokens and their reply mask, as the
    token writer makes them."""
    runs, _ = reply_runs(tok, text, False)
    ids, mask = [], []
    for run, in_reply in runs:
        check_known_chars(tok, run, name)
        part = [tok.vocab_special[run]] if run in tok.vocab_special else tok.encode_batch([run])[0]
        ids += part
        mask += [in_reply] * len(part)
    return np.asarray(ids, dtype=token_dtype(tok.vocab_size)), np.asarray(mask, dtype=np.uint8)


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
                    dtype: torch.dtype, mask: np.ndarray | None = None, eot_id: int | None = None
                    ) -> dict[str, float]:
    """Loss and next-token accuracy over every non-overlapping block of the tokens; for
    conversations (a mask), over the reply tokens only, each conversation from its start (its
    window's targets past the next conversation's start do not count)."""
    T = model.cfg.block_size
    if mask is None:
        starts, ends = list(range(0, len(tokens) - T, T)), None
    else:
        starts = [0, *(np.flatnonzero(tokens == eot_id) + 1)] if eot_id is not None else [0]
        starts = [s for s in starts if s < len(tokens) - 1]
        ends = [*starts[1:], len(tokens)]
        padded = np.concatenate([tokens, np.zeros(T + 1, tokens.dtype)])
        learn = np.concatenate([mask, np.zeros(T + 1, np.uint8)])
        tokens = padded
    loss_sum = correct = count = 0.0
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        rows = np.stack([tokens[start:start + T + 1] for start in batch]).astype(np.int64)
        xy = torch.from_numpy(rows).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        if mask is not None:
            keep = np.stack([learn[start + 1:start + T + 1] * (np.arange(start + 1, start + T + 1) < end)
                             for start, end in zip(batch, ends[i:i + batch_size])]).astype(bool)
            y = y.masked_fill(~torch.from_numpy(keep).to(device), IGNORE)
        with autocast(device, dtype):
            logits, loss = model(x, y)
        n = (y != IGNORE).sum().item()
        loss_sum += loss.item() * n
        correct += ((logits.argmax(-1) == y) & (y != IGNORE)).sum().item()
        count += n
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "tokens": count}


def benchmark(r: Resolved, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """--benchmark: time real training steps (data, forward, backward, optimizer) after a
    warm-up, then generation with and without the KV cache. Nothing is written to out_dir."""
    cfg = r.cfg
    device = pick_device(cfg.device)
    tok, splits, _ = prepare_inputs(cfg, None)
    run = new_run(cfg, tok=tok, splits=splits, device=device, out=Path(cfg.out_dir))
    run.model.train()
    for _ in range(warmup):
        train_step(run, cfg.learning_rate)
    step_s = median_seconds(lambda: train_step(run, cfg.learning_rate).item(), repeats, device)
    result = {"train_tokens_per_s": tokens_per_step(cfg) / step_s, "step_ms": 1000 * step_s,
              "peak_memory_mb": peak_memory_bytes(device) / 2**20}
    flops = flops_per_token(run.model, cfg.block_size) * result["train_tokens_per_s"]
    mfu = model_flops_utilization(run, flops)
    result["mfu"] = float("nan") if mfu is None else mfu
    result.update(decode_benchmark(run.model, cfg, device, tok))
    print_benchmark(run, result)
    return result


def decode_benchmark(model: GPT, cfg: Config, device: torch.device, tok: TextTokenizer) -> dict[str, float]:
    """Greedy decoding at batch 1 from the start tokens, what --generate_only runs: tokens/s with
    the KV cache, in the sampling dtype and in int8 (compiled as --generate_only compiles it, the
    compile timed apart and not kept: this model is new each run), and without the cache; then
    prefill tokens/s and the time to the first token of a 200-token prompt; and llama.cpp's
    tokens/s on this model's GGUF export, where llama-cpp-python is installed."""
    result, prompt = {}, torch.tensor([tok.start_ids()], device=device)
    compiled = decode_compiles(cfg, device, frozen=True)
    settings = SampleSettings(cfg.max_new_tokens, temperature=0, compiled=compiled)
    for quantize in QUANTIZERS:
        try:
            sampler = sampling_copy(model, dataclasses.replace(cfg, quantize=quantize), device, compiled)
        except TinyLLMError as e:  # implemented beside this file, and not here: the row is left out
            print0(f"benchmark: no decode row for --quantize {quantize}, since {e}")
            continue
        start = time.perf_counter()
        generate(sampler, prompt, dataclasses.replace(settings, max_new_tokens=2))  # warm-up; compiles
        result[f"decode_warmup_s_{quantize}"] = time.perf_counter() - start
        result[f"decode_compiled_{quantize}"] = compiled and not getattr(  # the compile may have fallen back
            decode_step(sampler, compiled), "fell_back", False)
        seconds = median_seconds(lambda m=sampler: generate(m, prompt, settings), 3, device)
        result[f"decode_tokens_per_s_{quantize}"] = cfg.max_new_tokens / seconds
        result[f"decode_dtype_{quantize}"] = str(sampler.wte.weight.dtype).removeprefix("torch.")
    sampler = sampling_copy(model, cfg, device)
    uncached = dataclasses.replace(settings, kv_cache=False, compiled=False)
    result["decode_tokens_per_s_no_cache"] = cfg.max_new_tokens / median_seconds(
        lambda: generate(sampler, prompt, uncached), 3, device)
    result["prefill_tokens"] = n = min(200, cfg.block_size)
    long = torch.randint(model.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(device)

    def first_token() -> torch.Tensor:
        cache = sampler.new_cache(1, device, cache_dtype(sampler.wte.weight.dtype, device))
        return choose_next(feed(sampler, long, cache), long, settings, None)

    with torch.no_grad():
        seconds = median_seconds(first_token, 5, device)
    result.update(prefill_tokens_per_s=n / seconds, first_token_ms=1000 * seconds, decode_compiled=compiled)
    result.update(llama_cpp_benchmark(model, cfg, tok, prompt[0].tolist()))
    return result


def llama_cpp_benchmark(model: GPT, cfg: Config, tok: TextTokenizer, prompt: list[int]) -> dict[str, float]:
    """llama.cpp's greedy tokens/s on this model exported to GGUF (f16 and q8_0), with as many
    threads as torch has; nothing where llama-cpp-python or the export is missing, or the
    model is one llama.cpp cannot run (said in one line)."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("f16", "q8_0"):
            path = Path(tmp) / f"{weights}.gguf"
            try:
                EXPORTERS.entry("gguf", "benchmark's llama.cpp row").write(Loaded(
                    dataclasses.replace(cfg, gguf_type=weights), path, 0, tok,
                    copy.deepcopy(model).cpu().float().eval(), torch.device("cpu")), path)
            except TinyLLMError as e:
                print0(f"benchmark: no llama.cpp row, since {e}")
                return result
            llm = llama_cpp.Llama(str(path), n_threads=torch.get_num_threads(), n_ctx=cfg.block_size,
                                  verbose=False)

            def decode(llm: Any = llm) -> None:
                for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
                    if i + 1 == cfg.max_new_tokens:
                        break

            decode()
            result[f"llama_cpp_tokens_per_s_{weights}"] = cfg.max_new_tokens / median_seconds(
                decode, 3, torch.device("cpu"))
            llm.close()
    return result


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def print_benchmark(run: Run, r: dict[str, float]) -> None:
    cfg = run.cfg
    rows = [("model", f"{run.model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers x {cfg.n_embd}"),
            ("device / dtype", f"{run.device} / {str(run.dtype).removeprefix('torch.')}"
                               f"{' / compiled' if run.compiled else ''}"),
            ("training step", f"{r['step_ms']:.1f} ms (median of steps after warm-up)"),
            ("training tokens/s", f"{r['train_tokens_per_s']:,.0f}"),
            ("MFU", f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "unknown (--peak_flops)"),
            ("peak memory", f"{r['peak_memory_mb']:,.0f} MiB"),
            *[(f"decode tokens/s, {cfg.max_new_tokens} new, KV cache, "
               f"{r[f'decode_dtype_{q}'] if q == 'none' else q} weights",
               f"{r[f'decode_tokens_per_s_{q}']:,.0f}" + (
                   f" (compiled in {r[f'decode_warmup_s_{q}']:.1f} s"
                   f"{'; --generate_only keeps it' if run.device.type == 'cpu' else ''})"
                   if r[f"decode_compiled_{q}"] else " (eager)"))
              for q in QUANTIZERS if f"decode_tokens_per_s_{q}" in r],
            (f"decode tokens/s, {cfg.max_new_tokens} new, no cache",
             f"{r['decode_tokens_per_s_no_cache']:,.0f}"),
            *[(f"llama.cpp on this model's GGUF, {w}", f"{r[f'llama_cpp_tokens_per_s_{w}']:,.0f} tokens/s")
              for w in ("f16", "q8_0") if f"llama_cpp_tokens_per_s_{w}" in r],
            (f"prefill, {r['prefill_tokens']} tokens",
             f"{r['prefill_tokens_per_s']:,.0f} tokens/s, first token after {r['first_token_ms']:.1f} ms")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print0(f"{name:<{width}} | {value}")


def plot_run(r: Resolved) -> None:
    """--plot: draw out_dir/loss.png from its metrics.jsonl."""
    print0(f"plot: {plot_metrics(Path(r.cfg.out_dir))}")


def plot_metrics(out: Path) -> Path:
    """out_dir/loss.png: training loss at each log step, val (and EMA val) loss at each eval, and
    the --eval_tasks accuracies at each eval."""
    require("matplotlib", "--plot").use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    records = read_metrics(out)
    axis, keys = objective_of(out).plot
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, marker in zip(keys, ("train (log steps)", "val", "val, EMA"), (None, "o", "o")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker=marker, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(axis)
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    scores = sorted({k for r in records for k in r if k.endswith(("/acc", "/acc_norm"))})
    if scores:  # --eval_tasks: accuracies on their own axis, dashed
        right = ax.twinx()
        for key in scores:
            points = [(r["step"], 100 * r[key]) for r in records if r.get(key) is not None]
            right.plot(*zip(*points), label=key, linestyle="--", marker="s", markersize=3)
        right.set_ylabel("benchmark accuracy (%)")
        right.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out / "loss.png"


def objective_of(out: Path) -> Objective:
    """The objective of the run in `out` (its effective_config.json), lm when it does not say."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name = json.loads((out / "effective_config.json").read_text()).get("objective", "lm")
        if name in OBJECTIVES:
            return OBJECTIVES[name]
    return OBJECTIVES["lm"]


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise TinyLLMError(f"no metrics at {path}; train first or point --out_dir at a run")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# The invocation: flags and JSON configs into one checked Config, and the checkpoint it starts from
# ----------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (through TinyLLMError) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TinyLLMError(f"{message}; run with --help to see the options")


def field_type(name: str) -> type:
    return {"bool": bool, "int": int, "float": float, "str": str}[FIELDS[name].type]


def choices_of(name: str) -> tuple[str, ...] | None:
    """A field's allowed values, registries read when asked (so every entry counts), or None."""
    spec = FIELDS[name].metadata["choices"]
    if spec is None:
        return None
    return tuple(key for part in ([spec] if isinstance(spec, dict) else spec)
                 for key in (part if isinstance(part, dict) else (part,)))


def check_value(name: str, value: Any, where: str) -> Any:
    """Type- and choice-check one setting from a JSON file; ints are accepted for floats."""
    want = field_type(name)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        example = {bool: "true or false", int: "a whole number like 4", float: "a number like 0.001",
                   str: 'a string in "quotes"'}[want]
        raise TinyLLMError(f"{where}: key '{name}' must be {want.__name__}, got {json.dumps(value)}; "
                           f"write it as {example}")
    choices = choices_of(name)
    if choices and value not in choices:
        raise TinyLLMError(f"{where}: key '{name}' must be one of {', '.join(choices)}, got "
                           f"{json.dumps(value)}")
    return value


def load_json_config(path: str) -> dict[str, Any]:
    """Read a JSON config file into checked settings; unknown keys and bad types are refused."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinyLLMError(f"--config {path} does not exist; give the path of a JSON file "
                           f"(see config/ for examples)") from None
    except json.JSONDecodeError as e:
        raise TinyLLMError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                           f"fix the syntax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinyLLMError(f"--config {path} cannot be read ({e}); give a readable UTF-8 JSON "
                           f"file") from None
    if not isinstance(raw, dict):
        raise TinyLLMError(f"{path}: the top level must be a JSON object of option names and values")
    for key in raw:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see --help for the option names"
            raise TinyLLMError(f"{path}: unknown key '{key}'; {hint}")
    return {k: check_value(k, v, path) for k, v in raw.items()}


def build_parser() -> argparse.ArgumentParser:
    """argparse flags straight from the Config fields; defaults are SUPPRESSed so that only
    the flags a user actually typed come back (they override the JSON file)."""
    p = OneLineParser(
        prog="train_tinyllm.py", description="Train, checkpoint and sample a small GPT/Llama model.",
        epilog="Precedence: defaults < --arch preset < --config file < command-line flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    groups["data and I/O"].add_argument(
        "--config", default=argparse.SUPPRESS, metavar="PATH",
        help="JSON file of option values; command-line flags override it.")
    for name, f in FIELDS.items():
        kind = field_type(name)
        text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")  # argparse formats help
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, choices=choices_of(name),
                          metavar=None if choices_of(name) else kind.__name__.upper())
        groups[f.metadata["group"]].add_argument(f"--{name}", **kwargs)
    return p


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    """The settings the user gave: the --config file's, overridden by command-line flags."""
    flags = vars(build_parser().parse_args(argv))
    from_file = load_json_config(flags.pop("config")) if "config" in flags else {}
    return {**from_file, **flags}


def merge_config(explicit: dict[str, Any], base: dict[str, Any] | None = None) -> Config:
    """Defaults < base (a checkpoint's config) < the explicit --arch preset < explicit settings."""
    base = {k: v for k, v in (base or {}).items() if k in FIELDS and k not in RUN_KEYS}
    if "decode_cache_gb" not in base:  # a checkpoint from before the decode step was compiled by
        base.pop("compile_decode", None)  # default stored the old default (off), not a choice
    preset = PRESETS[explicit["arch"]] if "arch" in explicit else {}
    merged = {**base, **preset, **explicit}
    if "min_lr" not in merged and "learning_rate" in merged:  # a fine-tuning rate of 1e-4 gets 1e-5
        merged["min_lr"] = merged["learning_rate"] / 10
    return Config(**merged)


def build_config(explicit: dict[str, Any], base: dict[str, Any] | None = None) -> Config:
    """A merged and validated config from settings, for code that builds models by hand (tests,
    notebooks); the program itself goes through resolve()."""
    cfg = merge_config(explicit, base)
    validate(cfg)
    return cfg


Check = tuple[bool, str]  # (is it bad, the one-line message that names the option and the fix)


def finite_checks(cfg: Config) -> list[Check]:
    """Every float setting is a finite number: nan or inf would train on into a checkpoint full
    of NaN, or sample garbage. Checked first, so the message names the setting that is wrong."""
    return [(not math.isfinite(getattr(cfg, name)),
             f"--{name} must be a finite number, got {getattr(cfg, name)}; give a number like "
             f"{FIELDS[name].default!r}")
            for name in FIELDS if field_type(name) is float]


def model_checks(cfg: Config) -> list[Check]:
    kv = cfg.n_kv_head or cfg.n_head
    return [
        (cfg.n_layer < 1, "--n_layer must be at least 1"),
        (cfg.n_head < 1, "--n_head must be at least 1"),
        (cfg.n_embd < 1, "--n_embd must be at least 1"),
        (cfg.unet_skips and cfg.n_layer < 2, "--unet_skips joins the first half of the blocks to the "
                                              "second: it needs --n_layer 2 or more"),
        (not cfg.logit_softcap >= 0 or math.isinf(cfg.logit_softcap),
         "--logit_softcap must be 0 (off) or a positive number, such as 30"),
        (cfg.n_kv_head < 0, "--n_kv_head must be 0 (= n_head) or a positive divisor of n_head"),
        (cfg.head_dim < 0, "--head_dim must be 0 (n_embd / n_head) or positive"),
        (cfg.head_dim == 0 and cfg.n_embd % cfg.n_head != 0,
         f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}; pick n_embd as a "
         f"multiple of n_head, or set --head_dim"),
        (cfg.n_kv_head > 0 and cfg.n_head % kv != 0,
         f"--n_head {cfg.n_head} is not divisible by --n_kv_head {cfg.n_kv_head}; use a divisor of "
         f"n_head (1 = MQA, n_head = MHA)"),
        (cfg.pos_encoding == "rope" and head_size(cfg) % 2 != 0,
         f"rope needs an even head size, but it is {head_size(cfg)}; change --n_embd, --n_head or "
         f"--head_dim, or use --pos_encoding learned"),
        (cfg.block_size < 1, "--block_size must be at least 1"),
        (not 0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.norm_eps <= 0, "--norm_eps must be positive"),
        (cfg.mlp_hidden < 0, "--mlp_hidden must be 0 (automatic) or positive"),
        (cfg.rope_theta <= 0, "--rope_theta must be positive"),
        (cfg.sliding_window < 0, "--sliding_window must be 0 (off) or a positive window"),
    ]


def data_checks(cfg: Config) -> list[Check]:
    return [
        (not cfg.text_field, "--text_field must name a field or column, like text"),
        (cfg.bpe_vocab_size < 258 or cfg.bpe_vocab_size > 2**32,
         "--bpe_vocab_size must be at least 258 (256 bytes, the end-of-text token and one merge)"),
        (not 0 < cfg.val_fraction < 1, f"--val_fraction must be in (0, 1), got {cfg.val_fraction}"),
    ]


def training_checks(cfg: Config) -> list[Check]:
    targets = [t.strip() for t in cfg.lora_targets.split(",")]
    narrowest = min(cfg.n_embd, cfg.n_head * head_size(cfg))  # of the layers LoRA adapts
    return [
        (cfg.lora_rank < 0, "--lora_rank must be 0 (off) or positive"),
        (cfg.lora_rank > 0 and not cfg.init_from,
         "--lora_rank adapts a pretrained model: give --init_from (a HuggingFace directory or a "
         "tinyllm checkpoint)"),
        (cfg.lora_alpha <= 0, "--lora_alpha must be positive"),
        (not 0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (not targets or any(t not in LORA_TARGETS for t in targets),
         f"--lora_targets {cfg.lora_targets!r}: give attn, mlp or attn,mlp"),
        (cfg.lora_rank >= narrowest > 0,
         f"--lora_rank {cfg.lora_rank} is no low rank for layers {narrowest} wide; use a smaller rank (4 to "
         f"64 is usual), or full fine-tuning (no --lora_rank)"),
        (cfg.lora_rank > 0 and cfg.optimizer == "muon",
         "--optimizer muon orthogonalizes whole weight matrices, not adapters; with --lora_rank use "
         "adamw, adamw8bit or lion"),
        (cfg.max_steps < 1, "--max_steps must be at least 1"),
        (cfg.batch_size < 1, f"--batch_size must be at least 1, got {cfg.batch_size}"),
        (cfg.grad_accum_steps < 1, "--grad_accum_steps must be at least 1"),
        (cfg.learning_rate <= 0, f"--learning_rate must be positive, got {cfg.learning_rate}"),
        (not 0 <= cfg.min_lr <= cfg.learning_rate,
         f"--min_lr must be in [0, learning_rate={cfg.learning_rate}], got {cfg.min_lr}"),
        (cfg.warmup_steps < 0, "--warmup_steps must be 0 or more"),
        (cfg.weight_decay < 0, "--weight_decay must be 0 or more"),
        (not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1), "--beta1 and --beta2 must be in [0, 1)"),
        (cfg.grad_clip < 0, "--grad_clip must be 0 (off) or positive"),
        (cfg.eval_interval < 1, "--eval_interval must be at least 1"),
        (cfg.eval_iters < 1, "--eval_iters must be at least 1"),
        (cfg.log_interval < 1, "--log_interval must be at least 1"),
        (cfg.sample_interval < 0, "--sample_interval must be 0 (only at the end) or positive"),
        (not 0 < cfg.decay_fraction <= 1, "--decay_fraction must be in (0, 1]"),
        (cfg.max_nonfinite < 1, "--max_nonfinite must be at least 1"),
        (cfg.time_budget_s < 0, "--time_budget_s must be 0 (off) or positive"),
        (cfg.stop_at_step < 0, "--stop_at_step must be 0 (off) or positive"),
        (not 0 <= cfg.label_smoothing < 1, "--label_smoothing must be in [0, 1)"),
        (cfg.z_loss < 0, "--z_loss must be 0 (off) or positive"),
        (not 0 < cfg.ema_decay < 1, "--ema_decay must be in (0, 1)"),
        (cfg.curriculum and not 1 <= cfg.curriculum_start_block_size < cfg.block_size,
         f"--curriculum_start_block_size must be in [1, block_size={cfg.block_size})"),
        (cfg.curriculum_steps < 0, "--curriculum_steps must be 0 (a third of max_steps) or positive"),
        (cfg.peak_flops < 0, "--peak_flops must be 0 (automatic) or positive"),
        (cfg.zero_init_out_proj and bool(cfg.init_from), "--zero_init_out_proj sets how a new model's "
                                                         "weights start, and --init_from brings its own: "
                                                         "drop one"),
        (cfg.fsdp and cfg.ddp, "--fsdp and --ddp are two ways to run distributed; give one"),
        (cfg.fsdp and cfg.optimizer in ("muon", "adamw8bit"),
         f"--optimizer {cfg.optimizer} is not supported with --fsdp (muon orthogonalizes whole matrices, "
         f"which --fsdp splits over the ranks; adamw8bit's kernels take whole tensors): use adamw or lion"),
        (cfg.fsdp and cfg.objective != "lm", f"--objective {cfg.objective} with --fsdp is not supported yet "
                                             f"(its sampling and reference need whole weights): use --ddp"),
        (cfg.fsdp and bool(cfg.eval_tasks), "--eval_tasks with --fsdp is not supported yet (ranks score "
                                           "different items, which sharded weights cannot): score the "
                                           "checkpoint with --eval_only --eval_tasks after training"),
    ]


def sampling_checks(cfg: Config) -> list[Check]:
    return [
        (cfg.max_new_tokens < 0, f"--max_new_tokens must be 0 or more, got {cfg.max_new_tokens}"),
        (cfg.temperature < 0, f"--temperature must be 0 (greedy) or more, got {cfg.temperature}"),
        (cfg.top_k < 0, "--top_k must be 0 (off) or positive"),
        (not 0 < cfg.top_p <= 1, f"--top_p must be in (0, 1], got {cfg.top_p}"),
        (cfg.repetition_penalty <= 0, "--repetition_penalty must be positive (1 = off)"),
        (cfg.num_samples < 1, "--num_samples must be at least 1"),
        (cfg.decode_cache_gb < 0, "--decode_cache_gb must be 0 (keep nothing) or more"),
    ]


def run_checks(cfg: Config) -> list[Check]:
    """The mode and where it runs: RUN_KEYS only, which never come from a checkpoint."""
    flags = [f"--{mode.flag}" for mode in MODES.values() if mode.flag]
    return [
        (cfg.resume and cfg.overwrite, "--resume and --overwrite contradict each other; pick one"),
        (len(modes_asked(cfg)) > 1, f"{', '.join(flags[:-1])} and {flags[-1]} are separate modes; give one"),
        (not 0 <= cfg.port <= 65535, f"--port {cfg.port} is no port; give 1-65535, or 0 for a free one"),
        (cfg.serve_batch < 1, f"--serve_batch {cfg.serve_batch} must be at least 1"),
        (cfg.eval_tasks_limit < 0,
         f"--eval_tasks_limit {cfg.eval_tasks_limit} must be 0 (every item) or more"),
        (not is_valid_device(cfg.device),
         f"--device {cfg.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ]


SETTING_CHECKS = (finite_checks, model_checks, data_checks, training_checks, sampling_checks)


def validate(cfg: Config, groups: tuple[Callable[[Config], list[Check]], ...] = (run_checks, *SETTING_CHECKS)
             ) -> None:
    """Refuse impossible settings before any work, naming the option and the fix."""
    for checks in groups:
        for bad, message in checks(cfg):
            if bad:
                raise TinyLLMError(message)


def modes_asked(cfg: Config) -> list[str]:
    """The modes whose flags are set (run_checks allows one); none means training."""
    return [name for name, mode in MODES.items()
            if mode.flag and getattr(cfg, mode.flag) not in (False, "none")]


def resolve(argv: list[str] | None) -> Resolved:
    """The config of this invocation, merged and validated once, and its checkpoint. Precedence:
    defaults < --arch preset < --config file < flags; when the mode starts from a checkpoint, its
    config takes the place of the defaults. Every mode takes what this returns."""
    explicit = parse_args(argv)
    if explicit.get("chat_template"):
        explicit["chat_template"] = template_text(explicit["chat_template"])
    if explicit.get("init_from"):  # absolute (links kept): a LoRA checkpoint finds its base from anywhere
        explicit["init_from"] = os.path.abspath(explicit["init_from"])
    cfg = merge_config(explicit)
    validate(cfg, (run_checks,))  # the mode first: it decides whether a checkpoint is read
    mode = (modes_asked(cfg) or ["train"])[0]
    MODES.entry(mode, f"--{dict.get(MODES, mode).flag}")  # one implemented beside: imported now, or refused
    if explicit.get("compile_decode") and not cfg.kv_cache:
        raise TinyLLMError("--compile_decode compiles the KV-cache decode step; drop --no-kv_cache or "
                           "--compile_decode")
    for key in ("quantize", "compile_decode", "decode_cache_gb"):
        if key in explicit and not MODES[mode].decodes:
            raise TinyLLMError(f"--{key} is for decoding and --eval_only; --{mode} does not decode (exports "
                               f"keep the checkpoint's full weights): drop --{key}")
    if "fsdp_reshard_after_forward" in explicit and not cfg.fsdp:
        raise TinyLLMError("--fsdp_reshard_after_forward is for --fsdp; drop it or add --fsdp")
    if "gguf_type" in explicit and cfg.export != "gguf":
        raise TinyLLMError("--gguf_type is for --export gguf; drop it or add --export gguf")
    for key in SERVE_KEYS:
        if key in explicit and mode != "serve":
            raise TinyLLMError(f"--{key} is for --serve; drop it or add --serve")
    if "num_samples" in explicit and not MODES[mode].samples:
        raise TinyLLMError(f"--num_samples is for --generate_only and the samples training prints; "
                           f"--{MODES[mode].flag} prints none (an API request asks for n choices, --chat "
                           f"replies once): drop --num_samples")
    path = checkpoint_to_use(cfg, mode)
    if cfg.init_from and mode != "train" and path is None:
        flag = dict.get(MODES, mode).flag
        raise TinyLLMError(f"--init_from starts a training run (or points a LoRA checkpoint at its moved "
                           f"base); --{flag} does not take it: drop --init_from")
    if path is None and cfg.init_from:  # a new run from a pretrained model
        r = PRETRAINED[""].resolve(explicit, mode)
        return dataclasses.replace(r, cfg=check_entries(r.cfg, mode, explicit))
    if path is None:
        validate(cfg, SETTING_CHECKS)
        if mode == "train":
            refuse_existing_run(cfg)
        return Resolved(mode, check_entries(cfg, mode, explicit))
    ckpt = load_checkpoint(path, mmap=mode != "train", shards=mode != "train")  # read as they are copied
    cfg = merge_config(explicit, base=ckpt["config"])
    if mode == "train" and ckpt["config"].get("fsdp") and "fsdp" not in explicit and "RANK" in os.environ:
        cfg = dataclasses.replace(cfg, fsdp=True)  # a model that needed sharding still needs it
        print0("resume: --fsdp, as the checkpoint was trained (--no-fsdp resumes it under DDP)")
    validate(cfg, SETTING_CHECKS)
    check_compatible(cfg, explicit, ckpt, path, resuming=mode == "train")
    lora = ckpt["config"].get("lora_rank")  # adapters, which need their base model
    reference = mode == "train" and OBJECTIVES[cfg.objective].reference(cfg)  # the weights it started from
    pretrained = PRETRAINED.entry("", f"the LoRA checkpoint {path}") if lora or reference else None
    source = pretrained.base(ckpt, path, cfg.init_from) if pretrained else None
    return Resolved(mode, check_entries(cfg, mode, explicit), ckpt, path, source)


def check_entries(cfg: Config, mode: str, explicit: dict[str, Any]) -> Config:
    """The config, once the registry entries it chooses are known to be here: those implemented
    beside this file are imported now, so that a missing one is refused before any work, and
    one a checkpoint's config chose is its default instead (--quantize only where the mode
    decodes); then the readers of the files the mode reads (check_readers)."""
    for name, f in FIELDS.items():
        spec, value = f.metadata["choices"], getattr(cfg, name)
        if name == "quantize" and not MODES[mode].decodes:
            continue
        for registry in [spec] if isinstance(spec, dict) else [p for p in spec or () if isinstance(p, dict)]:
            try:
                if value in registry:
                    registry.entry(value, f"--{name} {value}")
            except TinyLLMError as e:
                if name in explicit:
                    raise
                print0(f"note: the checkpoint's config sets --{name} {value}, but {e}; using --{name} "
                       f"{f.default} instead", file=sys.stderr)
                cfg = dataclasses.replace(cfg, **{name: f.default})
    kinds = check_readers(cfg, MODES[mode].reads)
    check_objective(cfg, mode, explicit)
    if not cfg.eval_tasks and (cfg.task_chat or cfg.eval_tasks_limit or cfg.task_format != "auto"):
        raise TinyLLMError("--task_chat, --task_format and --eval_tasks_limit go with --eval_tasks; give the "
                           "task files, or leave them out")
    if cfg.eval_tasks:
        if mode not in ("train", "eval"):
            raise TinyLLMError(f"--eval_tasks is for --eval_only and training; --{MODES[mode].flag} does not "
                               f"score benchmarks")
        sibling("tinyllm_evals", "--eval_tasks").task_files(cfg.eval_tasks)  # each file there before any work
    if "chat_template" in explicit and MODES[mode].reads == CORPUS_FLAGS and kinds <= {"text"}:  # no records
        corpus = cfg.data_path or "(the default corpus)"
        raise TinyLLMError(f"--chat_template is for conversations, but --data_path {corpus} holds plain "
                           f"text; drop the flag or point it at conversations (JSON Lines)")
    return cfg


def check_objective(cfg: Config, mode: str, explicit: dict[str, Any]) -> None:
    """--objective is training's, its settings are its own (those of another are refused), a
    tuning objective starts from --init_from, and the objective checks the rest (Objective.checks)."""
    tuning = [k for k in ("objective", *DPO_FLAGS, *GRPO_FLAGS) if k in explicit]
    if tuning and mode != "train":
        raise TinyLLMError(f"--{tuning[0]} is for training; --{MODES[mode].flag} does not train: drop it")
    if mode != "train":
        return
    objective = OBJECTIVES[cfg.objective]
    for name, other in OBJECTIVES.items():
        owned = [f for f in other.flags if f in explicit and f not in objective.flags]
        if name != cfg.objective and owned:
            raise TinyLLMError(f"--{owned[0]} is for --objective {name}, and this run's is {cfg.objective}; "
                               f"drop it or add --objective {name}")
    if objective.tunes and not cfg.init_from:
        raise TinyLLMError(f"--objective {cfg.objective} tunes a trained model, which is also its reference: "
                           f"give --init_from (a tinyllm checkpoint, or a HuggingFace model directory)")
    for bad, message in objective.checks(cfg):  # training's own: a checkpoint's sampling settings stay free
        if bad:
            raise TinyLLMError(message)


def check_readers(cfg: Config, reads: tuple[str, ...]) -> set[str]:
    """The reader of every file the mode will read is here (reader_of): --eval_data when it is
    given and read first, else the corpus (files, directories and globs listed, URLs by the file
    they become, nothing read or downloaded). Returns what the corpus's readers yield."""
    if reads and reads[0] not in CORPUS_FLAGS:
        if getattr(cfg, reads[0]):
            return {reader_of(Path(getattr(cfg, reads[0])), f"--{reads[0]}").yields}
        reads = reads[1:]
    return {reader_of(path, f"--{name}").yields for name in reads
            for path in resolve_data_path(getattr(cfg, name), f"--{name}", fetch=False)}


# ----------------------------------------------------------------------------------------------
# main(): resolve the invocation once, then run its mode
# ----------------------------------------------------------------------------------------------

def train_and_plot(r: Resolved) -> list[dict[str, Any]]:
    """The default mode: train, then draw out_dir/loss.png when matplotlib is installed."""
    history = train(r)
    if is_rank0() and importlib.util.find_spec("matplotlib") is not None:
        try:
            plot_run(r)
        except KeyboardInterrupt:
            raise TrainingStopped(f"interrupted while plotting; training is done and its checkpoints "
                                  f"are in {r.cfg.out_dir}", status=130) from None
    return history


MODES.update({
    "train": Mode("", False, True, "interrupted before training started; nothing was lost", train_and_plot,
                  reads=CORPUS_FLAGS, samples=True),
    "generate": Mode("generate_only", True, True, "interrupted; generation stopped",
                     generate_from_checkpoint, samples=True),
    "chat": Mode("chat", True, True, "the chat ended", home="tinyllm_serve"),
    "serve": Mode("serve", True, True, "the server stopped", home="tinyllm_serve"),
    "eval": Mode("eval_only", True, True, "interrupted; nothing was written", evaluate_checkpoint,
                 reads=("eval_data", *CORPUS_FLAGS)),
    "benchmark": Mode("benchmark", False, True, "interrupted; nothing was written", benchmark,
                      reads=CORPUS_FLAGS),
    "plot": Mode("plot", False, False, "interrupted; loss.png was not changed", plot_run),
    "export": Mode("export", True, False, "interrupted; no export was written", home="tinyllm_hub"),
    "clear_decode_cache": Mode("clear_decode_cache", False, False, "interrupted; some compiled steps may be "
                               "left", home="tinyllm_serve"),
})


def main(argv: list[str] | None = None) -> int:
    mode = None
    try:
        r = resolve(argv)  # every setting checked, and the checkpoint read, before any work
        mode = r.mode
        MODES[r.mode].run(r)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print0(str(e), file=sys.stderr if e.status == 1 else sys.stdout)
        return e.status
    except KeyboardInterrupt as e:
        if mode == "generate":
            print(flush=True)  # end the sample's line first
        said = MODES[mode].interrupted if mode else "interrupted; nothing was done"
        print(said, file=sys.stderr, flush=True)
        if isinstance(e, NativeWorkInterrupted):  # nothing to clean up, and teardown would abort
            sys.stdout.flush()
            os._exit(130)
        return 130
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path, free space and permissions",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("train_tinyllm", sys.modules[__name__])  # siblings import this run, not a copy
    sys.exit(main())
