"""Pretrained models in and out of tinyllm: the model families of transformers that our model
computes exactly (gpt2, llama, qwen3, described once for both directions), --init_from a
transformers model directory, and every --export (hf, safetensors, onnx, torchscript, tiktoken,
gguf), with .safetensors exports read back as checkpoints.

train_tinyllm.py declares what this module implements (MODES "export", EXPORTERS, PRETRAINED,
CHECKPOINT_FILES ".safetensors") and imports it the first time one is used.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyllm_data import GPT2_SPLIT_PATTERN, end_of_turn_id, tiktoken_tables, token_not_made_by_merges
from train_tinyllm import (
    ARCH_KEYS,
    CHATML,
    CHECKPOINT_FILES,
    CKPT_FORMAT,
    END_OF_TEXT,
    EXPORTERS,
    FIELDS,
    GPT,
    GREEDY_BELOW,
    LORA_TARGETS,
    MODES,
    POSITIONS,
    PRETRAINED,
    SAFETENSORS_FORMAT,
    SETTING_CHECKS,
    Config,
    Loaded,
    Pretrained,
    Resolved,
    Source,
    TextTokenizer,
    TinyLLMError,
    atomic_write,
    byte_bar,
    chat_template_of,
    choices_of,
    first_line,
    head_and_tail,
    head_size,
    holds_code,
    load_checkpoint,
    load_for_use,
    local_part,
    lora_target_set,
    merge_config,
    mlp_hidden_size,
    print0,
    refuse_existing_run,
    require,
    sha256_hex,
    validate,
    write_failure,
    write_text_atomic,
)

# ----------------------------------------------------------------------------------------------
# The families: gpt2, llama and qwen3, described once for both directions
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFFamily:
    """One transformers model_type that our model computes exactly, described once for both
    directions: its config.json as our fields and the context (`settings`, what --init_from
    reads) and our config as its fields (`config`, what --export hf writes, under `architecture`);
    the names of its tensors for each of our parameters (`tensors`: several are stacked along the
    rows, as q, k and v in our qkv), which --init_from reads one way and --export hf and gguf the
    other; which it stores transposed (GPT-2's Conv1D); whether it has grouped key/value heads
    (GPT-2 has not: an export repeats each for the query heads that read it); and whether
    llama.cpp's runtime for it rotates adjacent pairs of a head's dimensions (its `llama`: a GGUF
    export reorders the q and k rows) rather than halves, as we do."""
    architecture: str
    settings: Callable[[dict[str, Any], str], tuple[dict[str, Any], int]]
    config: Callable[[Config], dict[str, Any]]
    tensors: Callable[[Config, set[str] | None], dict[str, list[str]]]
    transposed: Callable[[str], bool] = lambda name: False
    grouped_kv: bool = True
    gguf_rope_pairs: bool = False


GPT2_MLPS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_settings(hf: dict[str, Any], path: str) -> tuple[dict[str, Any], int]:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_MLPS:
        raise hf_refusal(path, "activation_function", act, f"our MLPs do not compute (we have "
                         f"{', '.join(GPT2_MLPS)})")
    for key, ours in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, ours) != ours:
            raise hf_refusal(path, key, hf[key], f"our attention does not do (it needs {ours})")
    return arch_fields(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=GPT2_MLPS[act],
                       mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"], pos_encoding="learned",
                       bias=True, tie_weights=hf.get("tie_word_embeddings", True)), hf["n_positions"]


def gpt2_config(cfg: Config) -> dict[str, Any]:
    return {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_positions": cfg.block_size, "n_inner": mlp_hidden_size(cfg),
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",  # tanh or erf
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def gpt2_tensors(cfg: Config, names: set[str] | None) -> dict[str, list[str]]:
    """Our parameters under GPT2LMHeadModel's names; `names`, a source's tensors (None: writing)."""
    p = "transformer." if names is None or "transformer.wte.weight" in names else ""  # older files lack it
    t = {"wte.weight": [p + "wte.weight"], "positions.wpe.weight": [p + "wpe.weight"],
         "norm_f.weight": [p + "ln_f.weight"], "norm_f.bias": [p + "ln_f.bias"]}
    for i in range(cfg.n_layer):
        theirs, ours = f"{p}h.{i}.", f"blocks.{i}."
        for a, b in (("attn.qkv", "attn.c_attn"), ("norm_1", "ln_1"), ("norm_2", "ln_2"), ("attn.out_proj",
                     "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.out_proj", "mlp.c_proj")):
            t |= {f"{ours}{a}.weight": [f"{theirs}{b}.weight"], f"{ours}{a}.bias": [f"{theirs}{b}.bias"]}
    if not cfg.tie_weights:
        t["lm_head.weight"] = ["lm_head.weight"]
    return t


def llama_settings(hf: dict[str, Any], path: str, qwen3: bool = False) -> tuple[dict[str, Any], int]:
    if hf.get("hidden_act", "silu") != "silu":
        raise hf_refusal(path, "hidden_act", hf["hidden_act"], "our SwiGLU MLP does not compute (it "
                         "needs silu)")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise hf_refusal(path, key, rope, f"changes the rotary frequencies ({kind}) in a way we do "
                             f"not implement")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if bias != mlp_bias or (qwen3 and bias):
        key, value = ("attention_bias", bias) if bias else ("mlp_bias", mlp_bias)
        raise hf_refusal(path, key, value, "puts biases on some projections only; our --bias is all "
                         "or none")
    windows = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if hf.get("use_sliding_window") or windows:
        key = "use_sliding_window" if hf.get("use_sliding_window") else "layer_types"
        raise hf_refusal(path, key, hf[key], "gives layers sliding windows of their own; ours is one "
                         "window for every layer")
    heads = hf["num_attention_heads"]
    return arch_fields(n_layer=hf["num_hidden_layers"], n_head=heads,
                       n_kv_head=hf.get("num_key_value_heads") or heads,
                       n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                       norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                       mlp_hidden=hf["intermediate_size"], pos_encoding="rope", rope_theta=float(theta),
                       bias=bias, qk_norm=qwen3,
                       tie_weights=hf.get("tie_word_embeddings", False)), hf["max_position_embeddings"]


def llama_config(cfg: Config, qwen3: bool = False) -> dict[str, Any]:
    return {"hidden_size": cfg.n_embd, "intermediate_size": mlp_hidden_size(cfg),
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head or cfg.n_head, "head_dim": head_size(cfg),
            "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "attention_dropout": cfg.dropout, "pretraining_tp": 1,
            # rope_theta for transformers 4.x, rope_parameters for 5.x
            "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            **({"use_sliding_window": False, "sliding_window": None} if qwen3 else {})}


def llama_tensors(cfg: Config, names: set[str] | None = None) -> dict[str, list[str]]:
    """Our parameters under LlamaForCausalLM's and Qwen3ForCausalLM's names (q, k and v stacked
    into our qkv). Both rotate halves of each head, as we do: no permutation of q and k."""
    t = {"wte.weight": ["model.embed_tokens.weight"], "norm_f.weight": ["model.norm.weight"]}
    for i in range(cfg.n_layer):
        theirs, ours = f"model.layers.{i}.", f"blocks.{i}."
        pairs = [("attn.qkv", [f"self_attn.{x}_proj" for x in "qkv"]),
                 ("attn.out_proj", ["self_attn.o_proj"]), ("mlp.gate", ["mlp.gate_proj"]),
                 ("mlp.up", ["mlp.up_proj"]), ("mlp.out_proj", ["mlp.down_proj"])]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            t |= {f"{ours}{a}.{kind}": [f"{theirs}{b}.{kind}" for b in bs] for a, bs in pairs}
        t |= {f"{ours}norm_1.weight": [f"{theirs}input_layernorm.weight"],
              f"{ours}norm_2.weight": [f"{theirs}post_attention_layernorm.weight"]}
        if cfg.qk_norm:
            t |= {f"{ours}attn.{x}_norm.weight": [f"{theirs}self_attn.{x}_norm.weight"] for x in "qk"}
    if not cfg.tie_weights:
        t["lm_head.weight"] = ["lm_head.weight"]
    return t


def hf_refusal(path: str, key: str, value: Any, why: str) -> TinyLLMError:
    return TinyLLMError(f"--init_from {path}: config.json has {key} = {value!r}, which {why}")


HF_FAMILIES: dict[str, HFFamily] = {  # config.json's model_type -> its family
    "gpt2": HFFamily("GPT2LMHeadModel", gpt2_settings, gpt2_config, gpt2_tensors,
                     transposed=lambda n: n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")),
                     grouped_kv=False),
    "llama": HFFamily("LlamaForCausalLM", llama_settings, llama_config, llama_tensors, gguf_rope_pairs=True),
    "qwen3": HFFamily("Qwen3ForCausalLM", lambda hf, path: llama_settings(hf, path, qwen3=True),
                      lambda cfg: llama_config(cfg, qwen3=True), llama_tensors),
}


# ----------------------------------------------------------------------------------------------
# Reading a transformers model directory (--init_from) and a .safetensors export
# ----------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorFiles:
    """The tensors of a HF model directory by name, each read when asked for: safetensors (one
    file, or the shards its index maps each tensor to) through plain file reads, so that no
    mapped page of a multi-gigabyte file counts as resident memory; else pytorch_model.bin (or
    its shards), loaded with weights_only=True, memory-mapped."""

    def __init__(self, folder: Path):
        self.entries: dict[str, tuple[Path, int, torch.dtype, list[int]] | torch.Tensor] = {}
        self.files: list[Path] = []
        kinds = (("model.safetensors", "model.safetensors.index.json", self.add_safetensors),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json", self.add_bin))
        for single, index, add in kinds:
            if (folder / single).is_file():
                self.files = [folder / single]
                add(folder / single, None)
                return
            if (folder / index).is_file():
                shards = shard_map(folder, index)
                self.files = [folder / shard for shard in sorted(set(shards.values()))]
                for path in self.files:
                    add(path, {name for name, shard in shards.items() if shard == path.name})
                return
        raise TinyLLMError(f"--init_from {folder}: no model.safetensors, model.safetensors.index.json or "
                           f"pytorch_model.bin in it; download the whole model directory")

    def keep(self, path: Path, found: dict[str, Any], wanted: set[str] | None) -> None:
        """A file's tensors: all of them, or with an index exactly those it maps to this file."""
        if wanted is not None and wanted - found.keys():
            raise TinyLLMError(f"--init_from: {path} lacks {sorted(wanted - found.keys())[0]}, which the "
                               f"index puts there; download the shards again")
        self.entries.update({k: v for k, v in found.items() if wanted is None or k in wanted})

    def add_safetensors(self, path: Path, wanted: set[str] | None) -> None:
        lfs_pointer(path)
        try:
            self.keep(path, safetensors_header(path), wanted)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TinyLLMError(f"--init_from: {path} cannot be read as safetensors ({first_line(e)}); "
                               f"it is corrupt, truncated or of a kind we do not read: download it "
                               f"again") from None

    def add_bin(self, path: Path, wanted: set[str] | None) -> None:
        lfs_pointer(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # a file from before torch's zip format cannot be mapped
                    if "mmap" not in str(e):
                        raise
                    state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if holds_code(e, path):
                raise TinyLLMError(f"--init_from: {path} was refused: it holds Python code, which we never "
                                   f"run; use the model's .safetensors files") from None
            raise TinyLLMError(f"--init_from: {path} cannot be read ({first_line(e)}); it is corrupt or "
                               f"truncated: download it again") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TinyLLMError(f"--init_from: {path} holds no plain state dict of tensors; use the model's "
                               f".safetensors files")
        self.keep(path, state, wanted)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.entries[name]
        if isinstance(entry, torch.Tensor):
            return tuple(entry.shape), entry.dtype
        return tuple(entry[3]), entry[2]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or only its `rows` (a safetensors file is read from where they start)."""
        entry = self.entries[name]
        if isinstance(entry, torch.Tensor):
            return entry if rows is None else entry[rows]
        path, offset, dtype, shape = entry
        start, stop, _ = (rows or slice(None)).indices(shape[0] if shape else 1)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        tensor = torch.empty([stop - start, *shape[1:]] if rows is not None else shape, dtype=dtype)
        view = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(path, "rb") as f:
            f.seek(offset + start * row_bytes)
            if f.readinto(view) != view.nbytes:
                raise TinyLLMError(f"--init_from: {path} is truncated at {name}; download it again")
        return tensor


def shard_map(folder: Path, index: str) -> dict[str, str]:
    """An index's weight_map: tensor name -> shard file, every shard a file in `folder`."""
    weight_map = read_json(folder / index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TinyLLMError(f"--init_from: {folder / index} has no weight_map of shard names; download it "
                           f"again")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise TinyLLMError(f"--init_from: {folder / index} maps tensors to {shard}, outside the model "
                               f"directory; use the index the model came with")
        if not (folder / shard).is_file():
            raise TinyLLMError(f"--init_from {folder}: {index} lists {shard}, which is missing; download "
                               f"every shard")
    return weight_map


def safetensors_header(path: Path) -> dict[str, tuple[Path, int, torch.dtype, list[int]]]:
    """Where each tensor of a .safetensors file lies, checked: every span inside the file, of
    exactly its shape's size, none overlapping another (the format's own rules)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        if start > size:
            raise ValueError("its header is longer than the file")
        header = json.loads(f.read(start - 8))
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise TinyLLMError(f"--init_from: {path} stores {name} as {info['dtype']}, which we do not "
                               f"read; use the model's bf16, fp16 or fp32 weights")
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end]):
            raise ValueError(f"{name} has a negative or non-integer shape or offset")
        if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
            raise ValueError(f"{name} takes bytes {begin}-{end}, which do not hold its shape {shape} "
                             f"inside the file")
        entries[name] = (path, start + begin, dtype, shape)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{name} and {other} share bytes")
    return entries


def lfs_pointer(path: Path) -> None:
    """Refuse the small text file git leaves where a large file goes when git-lfs is missing."""
    with open(path, "rb") as f:
        if f.read(24) == b"version https://git-lfs.":
            raise TinyLLMError(f"--init_from: {path} is a Git LFS pointer, not the weights; run git lfs pull "
                               f"in that clone, or download with huggingface-cli")


def hf_source(path: Path) -> Source:
    """A HF model directory (config.json, weights, tokenizer.json) as a
    Source; only headers are read here."""
    hf = read_json(path / "config.json")
    family = HF_FAMILIES.get(hf.get("model_type", ""))
    if family is None:
        raise TinyLLMError(f"--init_from {path}: config.json has model_type = {hf.get('model_type')!r}, "
                           f"which tinyllm cannot compute; it imports {', '.join(HF_FAMILIES)}")
    tok = source_tokenizer(path)
    try:
        settings, context = family.settings(hf, str(path))
        vocab_size = int(hf["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise TinyLLMError(f"--init_from {path}: config.json lacks or garbles {first_line(e)}, which a "
                           f"{hf['model_type']} config has; download it again") from None
    if tok.vocab_size > vocab_size:
        raise TinyLLMError(f"--init_from {path}: tokenizer.json has {tok.vocab_size} tokens but the model "
                           f"only {vocab_size} rows of embeddings; the files do not belong together")
    if json.loads(tok.to_str())["model"]["type"] == "BPE":  # recorded in our configs and checkpoints
        settings |= {"tokenizer": "bpe", "bpe_vocab_size": tok.vocab_size}
    files = TensorFiles(path)
    cfg = Config(**settings)
    names = set(files.entries)
    return Source(path=path, family=hf["model_type"], config=settings, context=context,
                  vocab_size=vocab_size, tokenizer=tok.to_str(), tensors=family.tensors(cfg, names),
                  read=files.read, spec=files.spec, names=names,
                  transposed=frozenset(n for n in names if family.transposed(n)),
                  ignored=frozenset(n for n in names if n.endswith((".attn.bias", ".attn.masked_bias",
                                                                    "rotary_emb.inv_freq"))
                                    or (n == "lm_head.weight" and cfg.tie_weights)),
                  fingerprint=content_fingerprint([path / "config.json", *files.files]),
                  chat_template=source_chat_template(path))


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers' save_pretrained keeps the template now


def source_chat_template(path: Path) -> str:
    """A model directory's chat template: chat_template.jinja, which wins as it does in
    transformers, else the field of tokenizer_config.json (the default one of a list), with
    the values it reads of bos_token and eos_token set at its top, so that it renders alone as
    transformers renders it with the tokenizer."""
    config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    template = read_template_file(path / CHAT_TEMPLATE_FILE) or config.get("chat_template") or ""
    if isinstance(template, list):
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    if not isinstance(template, str):
        return ""
    for name in ("bos_token", "eos_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if name in template and isinstance(value, str):
            template = "{%- set " + name + " = " + json.dumps(value) + " %}" + template
    return template


def read_template_file(path: Path) -> str:
    """A chat_template.jinja's text ("" when there is none), or one line that names the file."""
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TinyLLMError(f"--init_from: {path} cannot be read as text ({first_line(e)}); download it "
                           f"again") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a downloaded model's file, or one line that names the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TinyLLMError(f"--init_from: {path} cannot be read as JSON ({first_line(e)}); download it "
                           f"again") from None
    if not isinstance(value, dict):
        raise TinyLLMError(f"--init_from: {path} holds no JSON object; download it again")
    return value


def source_tokenizer(path: Path) -> TextTokenizer:
    if not (path / "tokenizer.json").is_file():
        fix = ("convert it once with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
               if (path / "tokenizer.model").is_file() else "download the model's tokenizer files too")
        raise TinyLLMError(f"--init_from {path}: no tokenizer.json; {fix}")
    try:
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        return TextTokenizer.from_str(char_lookup_restored(text))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise TinyLLMError(f"--init_from: {path / 'tokenizer.json'} cannot be read as a tokenizer "
                           f"({first_line(e)}); download it again") from None


def load_safetensors(path: Path) -> dict[str, Any]:
    """export_safetensors' file in the shape of a checkpoint (config, vocab_size, tokenizer,
    model, step), so that --generate_only and --eval_only take either. A tied head is restored
    as wte.weight under both names."""
    require("safetensors", "reading a .safetensors file")
    from safetensors import SafetensorError, safe_open
    if not Path(path).is_file():
        raise TinyLLMError(f"no file at {path}; give the path of a .safetensors file written by "
                           f"export_safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise TinyLLMError(f"{path} cannot be read as safetensors ({e}); it is corrupt or truncated: "
                           f"export it again") from None
    if meta.get("tinyllm") != SAFETENSORS_FORMAT:
        raise TinyLLMError(f"{path} is not a tinyllm safetensors export (no '{SAFETENSORS_FORMAT}' "
                           f"metadata); use a file written by export_safetensors")
    cfg = json.loads(meta["config"])
    if cfg.get("tie_weights"):
        state["lm_head.weight"] = state["wte.weight"]
    return {"format": CKPT_FORMAT, "config": cfg, "vocab_size": int(meta["vocab_size"]),
            "tokenizer": meta["tokenizer"], "model": state, "step": int(meta.get("step", "-1")),
            "start_ids": json.loads(meta.get("start_ids", "null"))}


# ----------------------------------------------------------------------------------------------
# Starting from a pretrained model (--init_from) and LoRA adapters on it (--lora_rank)
# ----------------------------------------------------------------------------------------------

class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update: x W^T + b + (alpha / r) dropout(x)
    A^T B^T. It holds the base layer's own tensors (nothing copied) under their own names, so a
    merged model is a plain one. B starts at zero: the first step starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight of its own
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialization
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """The adapters as __init__ makes them, for a model built on the meta device: drawn whole
        and each rank keeping its rows under --fsdp (ranks drawing their own would draw alike)."""
        whole = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device=local_part(self.lora_A).device)
        nn.init.kaiming_uniform_(whole, a=math.sqrt(5))
        lo, hi = held_rows(self.lora_A)
        local_part(self.lora_A).copy_(whole[lo:hi])
        local_part(self.lora_B).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain layer computing W + (alpha / r) B A (and b)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight = nn.Parameter(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear


def add_lora(model: GPT, cfg: Config) -> GPT:
    """Freeze every weight and put adapters on the --lora_targets layers of every block; the
    embedding and output head (tied or not) stay as they are."""
    model.requires_grad_(False)
    wanted = {name for target in lora_target_set(cfg.lora_targets) for name in LORA_TARGETS[target]}
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and name.split(".", 2)[2] in wanted:
            setattr(model.get_submodule(parent), attr,
                    LoRALinear(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    return model


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer, in place: what sampling, evaluation and export use."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.merged())
    return model


def load_source(path: Path) -> Source:
    """A tinyllm checkpoint or safetensors export, or a HF model directory (config.json, weights,
    tokenizer.json), as a Source; only headers are read here."""
    if not path.exists():
        raise TinyLLMError(f"--init_from {path} does not exist; give a model directory or a tinyllm "
                           f"checkpoint")
    if path.is_file():
        try:
            return checkpoint_source(path)
        except TinyLLMError:
            if (path.parent / "config.json").is_file():
                raise TinyLLMError(f"--init_from {path} is one file of a model directory; give the "
                                   f"directory, {path.parent}") from None
            raise
    if (path / "state.pt").is_file():  # a sharded checkpoint (--fsdp): its folder of shards
        return tinyllm_source(path)
    if not (path / "config.json").is_file():
        raise TinyLLMError(f"--init_from {path}: neither a tinyllm checkpoint (.pt) or export "
                           f"(.safetensors) nor a HF model directory with a config.json")
    return hf_source(path)


INIT_FROM_TAKES = ("--init_from takes a HF model directory (with config.json), a tinyllm checkpoint (.pt) "
                   "or a .safetensors export")


def checkpoint_source(path: Path) -> Source:
    """A file given to --init_from: our checkpoint (torch's zip format, which every torch.save of
    ours writes) or a .safetensors export. Anything else (a text file, a legacy pickle) is refused
    here in one line, before torch is asked to map it and answers with a message about mmap."""
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        raise TinyLLMError(f"--init_from {path} is no tinyllm checkpoint (not torch's zip format); "
                           f"{INIT_FROM_TAKES}")
    return tinyllm_source(path)


def content_fingerprint(files: list[Path]) -> str:
    """Sizes and the first and last MB of a model's files: cheap for gigabytes, and the same for
    a copy or a move (unlike file_fingerprint, which keys caches by place and date)."""
    parts: list[str | bytes] = []
    for p in files:
        size = p.stat().st_size
        parts += [str(size), *head_and_tail(p, size)]
    return sha256_hex(*parts)


def tinyllm_source(path: Path) -> Source:
    """Our own checkpoint or safetensors export: its weights to continue from."""
    ckpt = load_checkpoint(path, mmap=True)
    state, cfg = ckpt["model"], ckpt["config"]
    if cfg.get("lora_rank"):
        raise TinyLLMError(f"--init_from {path} holds LoRA adapters, not a whole model; export it merged "
                           f"(--export safetensors --ckpt {path} --out_dir {path.parent}) and start from "
                           f"{path.parent / 'export-safetensors' / 'model.safetensors'}")
    settings = {k: cfg.get(k, FIELDS[k].default) for k in ARCH_KEYS if k != "block_size"}
    tied = settings["tie_weights"]
    names = set(state)
    return Source(path=path, family="tinyllm", config=settings, context=cfg["block_size"],
                  vocab_size=ckpt["vocab_size"], tokenizer=ckpt["tokenizer"],
                  tensors={k: [k] for k in state if not (tied and k == "lm_head.weight")},
                  read=lambda n, rows=None: state[n] if rows is None else state[n][rows],
                  spec=lambda n: (tuple(state[n].shape), state[n].dtype),
                  names=names,
                  ignored=frozenset({"lm_head.weight"} if tied else ()),
                  fingerprint=content_fingerprint(sorted(f for f in path.iterdir() if f.is_file())
                                                  if path.is_dir() else [path]))


def lora_base(ckpt: dict[str, Any], path: Path, base: str) -> Source:
    """The base model a LoRA checkpoint's adapters were trained on: where the checkpoint says,
    or where --init_from says it has moved; refused when it is gone or its files differ (the
    adapters only fit the weights they were trained with)."""
    try:
        source = load_source(Path(base))
    except TinyLLMError as e:
        raise TinyLLMError(f"{path} holds LoRA adapters for the base model {base}, which cannot be read "
                           f"({e}); put it back, or give its new place with --init_from") from None
    if source.fingerprint != ckpt.get("source_fingerprint"):
        raise TinyLLMError(f"{path} holds LoRA adapters for a base whose files differ from those at {base} "
                           f"(size or content); give the base they were trained on (--init_from), or train "
                           f"anew")
    return source


def arch_fields(**fields: Any) -> dict[str, Any]:
    """Every architecture field: the defaults, then `fields`, written the way our own configs
    write them (0 for automatic sizes), so that an import, an export and a re-import agree."""
    out = {k: FIELDS[k].default for k in ARCH_KEYS if k != "block_size"} | fields
    if out["n_kv_head"] == out["n_head"]:
        out["n_kv_head"] = 0
    if out["head_dim"] * out["n_head"] == out["n_embd"]:
        out["head_dim"] = 0
    if out["mlp_hidden"] == mlp_hidden_size(Config(**{**out, "mlp_hidden": 0})):
        out["mlp_hidden"] = 0
    return out


def resolve_source(explicit: dict[str, Any], mode: str) -> Resolved:
    """The invocation of a new training run from --init_from: the source read (headers only), its
    architecture and context under the explicit settings, checked against it."""
    source = load_source(Path(explicit["init_from"]))
    cfg = merge_config(explicit, base=source_defaults(source))
    try:
        validate(cfg, SETTING_CHECKS)
    except TinyLLMError as e:  # the source's own config may be what cannot work
        raise TinyLLMError(f"--init_from {source.path}, with its config: {e}") from None
    check_source_compatible(cfg, explicit, source)
    check_source_shapes(cfg, source)
    refuse_existing_run(cfg)
    return Resolved(mode, cfg, source=source)


def source_defaults(source: Source) -> dict[str, Any]:
    """The config a run from `source` starts from: its architecture, and a context of at most
    1,024 tokens unless --block_size says otherwise (a 32K context would make every KV cache
    and rotary table that long)."""
    template = {"chat_template": source.chat_template} if source.chat_template else {}
    return source.config | {"block_size": min(source.context, 1024)} | template


def check_source_compatible(cfg: Config, explicit: dict[str, Any], source: Source) -> None:
    """Refuse settings that contradict the model --init_from starts from."""
    where = f"--init_from {source.path}"
    if "arch" in explicit:
        raise TinyLLMError(f"--arch sets an architecture, but {where} brings its own; drop --arch")
    for key in ("tokenizer", "tokenizer_path", "bpe_vocab_size"):
        if key in explicit:
            raise TinyLLMError(f"--{key}: {where} brings its own tokenizer; drop the flag")
    given = {k: explicit[k] for k in ARCH_KEYS if k in explicit and k not in ("block_size", "tokenizer",
                                                                             "bpe_vocab_size")}
    meant = arch_fields(**{**source.config, **given})  # --n_kv_head 4 means 0 with 4 heads, and so on
    for key in given:
        if meant[key] != source.config[key]:
            raise TinyLLMError(f"--{key} {given[key]!r} contradicts {where} ({source.config[key]!r}); "
                               f"the architecture comes from the source: drop the flag")
    if cfg.pos_encoding == "learned" and cfg.block_size > source.context:
        raise TinyLLMError(f"--block_size {cfg.block_size} is longer than the {source.context} positions "
                           f"{where} has learned; use --block_size {source.context} or less")
    out = Path(cfg.out_dir).resolve()
    if cfg.lora_rank and (source.path == out or out in source.path.parents):
        raise TinyLLMError(f"{where} lies in --out_dir {cfg.out_dir}, where this run writes its checkpoints; "
                           f"the adapters need their base to stay as it is: copy it elsewhere or pick "
                           f"another --out_dir")
    if cfg.block_size > source.context:  # rope: allowed, but past what the source was trained on
        print0(f"note: --block_size {cfg.block_size} is longer than the {source.context} tokens {where} was "
               f"trained on; rotary positions extend, but quality past {source.context} is not known")


def check_source_shapes(cfg: Config, source: Source, vocab_size: int = 0) -> None:
    """Every parameter of the model `cfg` describes has its tensors in the source, of the right
    shapes and floating-point, and no source tensor is left over; checked from the headers
    before any run directory is touched. With a larger `vocab_size` (tokens added for ChatML),
    the embedding and head have rows the source does not fill."""
    grown = max(vocab_size, source.vocab_size)
    with torch.device("meta"):
        params = dict(GPT(cfg, grown).named_parameters())
    missing = sorted(set(params) - set(source.tensors))
    absent = sorted(n for names in source.tensors.values() for n in names if n not in source.names)
    unused = sorted(source.names - {n for names in source.tensors.values() for n in names} - source.ignored)
    for problem, names in (("lacks", absent or missing),
                           ("holds tensors we have no place for, such as", unused)):
        if names:
            raise TinyLLMError(f"--init_from {source.path} {problem} {', '.join(names[:3])}; it is not a "
                               f"plain {source.family} model of the shape its config describes")
    for ours, names in source.tensors.items():
        rows, want = 0, tuple(params[ours].shape)
        for name in names:
            shape, dtype = source.spec(name)
            shape = shape[::-1] if name in source.transposed else shape
            if ours == "positions.wpe.weight":
                shape = (min(shape[0], cfg.block_size), *shape[1:])  # learned positions cropped
            if not dtype.is_floating_point or shape[1:] != want[1:]:
                kind = str(dtype).removeprefix("torch.")
                raise TinyLLMError(f"--init_from {source.path}: {name} is {kind} {list(shape)}, which does "
                                   f"not fit {ours} {list(want)} of the model its config describes; the "
                                   f"files do not belong together")
            rows += shape[0] if shape else 1
        if rows != want[0] - (grown - source.vocab_size if ours in ("wte.weight", "lm_head.weight") else 0):
            raise TinyLLMError(f"--init_from {source.path}: {', '.join(names)} fill {rows} of the {want[0]} "
                               f"rows of {ours}; the files do not belong together")


def model_from_source(cfg: Config, source: Source, device: torch.device, vocab_size: int = 0,
                      prepare: Callable[[GPT], None] | None = None) -> GPT:
    """The model with the source's weights, built without random initialization and filled one
    tensor at a time in place: no second copy of the weights is ever held. `prepare` changes the
    model on the meta device, before any weight exists: LoRA's adapters, and with --fsdp every
    weight sharded over the ranks, each of which then reads only its own rows of each tensor (no
    rank ever holds the whole model). Embedding rows past the source's (tokens added for ChatML)
    start as the mean of the others."""
    check_source_shapes(cfg, source, vocab_size)
    with torch.device("meta"):
        model = GPT(cfg, max(vocab_size, source.vocab_size))
    if prepare is not None:
        prepare(model)
    untie = cfg.tie_weights and not hasattr(model.wte.weight, "to_local")  # FSDP keeps the tie itself
    if untie:  # to_empty would give the head a tensor of its own: tie it again after
        model.lm_head.register_parameter("weight", None)
    model.to_empty(device=device)
    if untie:
        model.lm_head.weight = model.wte.weight
    with torch.device(device):  # rotary tables are computed, not loaded: into the module `prepare` saw
        for name, table in POSITIONS[cfg.pos_encoding](cfg).named_buffers():
            model.positions.get_buffer(name).copy_(table)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, names in source.tensors.items():
            fill_rows(params[ours], source, names, cfg.block_size if ours == "positions.wpe.weight" else 0)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.reset_adapters()
    return model


def fill_rows(param: torch.Tensor, source: Source, names: list[str], crop: int = 0) -> None:
    """One of our parameters from the source tensors stacked along its rows, only the rows this
    process holds of it (all, unless --fsdp sharded it) read; `crop`: at most so many rows of each
    (learned positions, cut to the context). Rows past the source's start as their mean."""
    mine, (lo, hi) = local_part(param), held_rows(param)
    row = 0
    for name in names:
        shape, transposed = source.spec(name)[0], name in source.transposed
        n = shape[1] if transposed else shape[0]
        n = min(n, crop) if crop else n
        a, b = max(lo, row), min(hi, row + n)
        if a < b:
            part = source.read(name).t()[a - row:b - row] if transposed else \
                source.read(name, slice(a - row, b - row))
            mine[a - lo:b - lo].copy_(part)
        row += n
    if row < param.shape[0] and max(lo, row) < hi:  # new tokens: an embedding like the average one
        whole = mine if (lo, hi) == (0, param.shape[0]) else \
            torch.cat([source.read(name) for name in names]).to(mine.dtype)
        mine[max(lo, row) - lo:] = whole[:row].mean(0)


def held_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows of a parameter this process holds: all of them, or under --fsdp its shard's."""
    if not hasattr(param, "to_local"):
        return 0, param.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], offset[0] + shape[0]


# ----------------------------------------------------------------------------------------------
# Export: HuggingFace transformers, safetensors, ONNX, TorchScript, tiktoken (EXPORTERS)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Exporter:
    """A format of --export: the file it writes in the export directory ("" when the directory
    itself is the export), and the writer, called as write(checkpoint, target) with the loaded
    checkpoint (its model on the CPU in float32)."""
    filename: str
    write: Callable[[Loaded, Path], None]


EXPORT_MARK = ".tinyllm-export"  # in every export directory: a later export may replace it


def export_checkpoint(r: Resolved) -> Path:
    """--export FORMAT: the checkpoint (--ckpt, else out_dir's best, else latest) into
    --export_dir (default out_dir/export-FORMAT). It is written into a staging folder inside
    that directory, and its files are renamed into place only when all are written: a failure
    (a full disk, a refusal) leaves no half export, and the previous one stays. Renames within
    one directory need no space, and the directory itself is never replaced (a mount point or a
    symlink stays what it is)."""
    folder = Path(r.cfg.export_dir or Path(r.cfg.out_dir) / f"export-{r.cfg.export}")
    base = r.source.path.resolve() if r.source else None  # a LoRA checkpoint's base
    if base is not None and (base == folder.resolve() or folder.resolve() in base.parents):
        raise TinyLLMError(f"--export_dir {folder} holds the base model of {r.ckpt_path}, which its adapters "
                           f"need; exporting there would overwrite it: pick another --export_dir")
    use = load_for_use(r)
    fmt, exporter = use.cfg.export, EXPORTERS[use.cfg.export]
    created = check_export_dir(folder, chosen=bool(use.cfg.export_dir))
    staging = folder / f"{STAGING}{os.getpid()}"
    use.model = use.model.cpu().float()
    try:
        staging.mkdir(parents=True)
        exporter.write(use, staging / exporter.filename if exporter.filename else staging)
        mark = {"format": fmt, "checkpoint": str(use.path), "step": use.step}
        write_text_atomic(staging / EXPORT_MARK, json.dumps(mark) + "\n")
        for item in sorted(staging.iterdir()):
            os.replace(item, folder / item.name)
    except TinyLLMError:
        raise
    except Exception as e:  # OSError, torch's RuntimeError, SafetensorError, protobuf's errors...
        reason = write_failure(e, folder)
        advice = "; free disk space or fix permissions" if isinstance(e, OSError) or "space" in reason else ""
        target = folder / exporter.filename if exporter.filename else folder
        raise TinyLLMError(f"--export {fmt}: could not write {target} ({reason}); nothing was changed "
                           f"in {folder}{advice}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a failed export leaves no empty directory it made
    print0(f"exported {use.path} (step {use.step}) as {fmt}: "
          f"{folder / exporter.filename if exporter.filename else folder}")
    return folder


STAGING = ".staging-"  # an export being written, inside its directory: .staging-PID


def check_export_dir(folder: Path, chosen: bool) -> bool:
    """Refuse, before any work, a file where the export directory should be, or a --export_dir
    holding someone else's files (a previous export of ours holds EXPORT_MARK; the default
    out_dir/export-FORMAT is ours). Removes what exports killed midway left, and returns whether
    the directory is new."""
    if folder.exists() and not folder.is_dir():
        raise TinyLLMError(f"export directory {folder} is an existing file; pick a directory path")
    if not folder.is_dir():
        return True
    for left in folder.glob(f"{STAGING}*"):
        pid = left.name.removeprefix(STAGING)
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(left, ignore_errors=True)
    others = sorted(p.name for p in folder.iterdir() if not p.name.startswith(STAGING))
    if chosen and others and not (folder / EXPORT_MARK).is_file():
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise TinyLLMError(f"--export_dir {folder} holds files that are not a tinyllm export ({shown}); "
                           f"pick a new or empty directory, or move those files away")
    return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is someone else's
        return True
    return True


def make_export_dir(out_dir: Path) -> Path:
    """out_dir, created; a file in its place is refused (mkdir would raise FileExistsError).
    For the export functions called directly; --export writes through export_checkpoint."""
    out_dir = Path(out_dir)
    check_export_dir(out_dir, chosen=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def export_file(path: Path) -> Path:
    """path, with its folder created; a directory in its place is refused."""
    path = Path(path)
    if path.is_dir():
        raise TinyLLMError(f"export path {path} is a directory; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# Every architecture field of Config (ARCH_KEYS), and how an export to a family carries it:
# "mapped" (its config.json, tensors or tokenizer files hold it; hf_layout picks the family for
# the parts, GPT-2's fixed head width included), or the one value it must have, for none of the
# families has a switch for another. A field missing here is refused at any but its default.
EXPORTED_FIELDS: dict[str, Any] = {
    **dict.fromkeys(("tokenizer", "bpe_vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                     "block_size", "bias", "norm", "norm_eps", "mlp", "mlp_hidden", "pos_encoding",
                     "rope_theta", "qk_norm", "tie_weights"), "mapped"),
    "parallel_block": False, "sliding_window": 0, "logit_softcap": 0.0, "unet_skips": False,
}


def hf_layout(cfg: Config, runtime: str = "transformers'", export: str = "a HuggingFace export") -> str:
    """'gpt2', 'llama' or 'qwen3' (Llama with per-head q/k norms): the architecture of `runtime`
    (transformers, llama.cpp) that computes exactly what this config computes, or TinyLLMError
    naming the first setting that none can express (a model that loads but computes something
    else would be worse than no export)."""
    other = "export_safetensors/export_onnx keep every setting"
    for flag in [*EXPORTED_FIELDS, *(key for key in ARCH_KEYS if key not in EXPORTED_FIELDS)]:
        value, rule = getattr(cfg, flag), EXPORTED_FIELDS.get(flag)
        if rule == "mapped" or value == (FIELDS[flag].default if rule is None else rule):
            continue
        given = f"--{flag}" if value is True else f"--{flag} {value}"
        off = f"without --{flag}" if isinstance(value, bool) else f"with --{flag} {rule}"
        if rule is None:  # a field added to Config without saying how an export carries it
            raise TinyLLMError(f"{given} has no place in {runtime} GPT-2, Llama or Qwen3 that tinyllm knows "
                               f"of; {other}, or train without it for {export}")
        raise TinyLLMError(f"{given} has no switch in {runtime} GPT-2, Llama or Qwen3; "
                           f"{other}, or train {off} for {export}")
    parts = (cfg.norm, cfg.mlp, cfg.pos_encoding)
    if parts in (("layernorm", "gelu", "learned"), ("layernorm", "gelu_tanh", "learned")):
        if cfg.qk_norm or head_size(cfg) * cfg.n_head != cfg.n_embd:
            flag = "--qk_norm" if cfg.qk_norm else f"--head_dim {cfg.head_dim}"
            raise TinyLLMError(f"{flag} has no switch in {runtime} GPT-2; {other}, or train "
                               f"without it for {export}")
        return "gpt2"
    if parts == ("rmsnorm", "swiglu", "rope"):
        if cfg.qk_norm and cfg.bias:
            raise TinyLLMError(f"--qk_norm with --bias: Qwen3, the layout with q/k norms, has no biases "
                               f"in its MLP; {other}, or train without --bias for {export}")
        return "qwen3" if cfg.qk_norm else "llama"
    raise TinyLLMError(f"--norm {cfg.norm} --mlp {cfg.mlp} --pos_encoding {cfg.pos_encoding} is "
                       f"neither GPT-2 (layernorm, gelu, learned) nor Llama or Qwen3 (rmsnorm, swiglu, "
                       f"rope), the layouts {runtime} runs; {other}, or train with --arch gpt2 "
                       f"or --arch llama for {export}")


def repeat_kv_heads(w: torch.Tensor | None, n_head: int, n_kv_head: int) -> torch.Tensor | None:
    """k or v rows (H_kv*D, ...) -> (H*D, ...): each key/value head copied to the query heads
    that read it (query head h reads kv head h // group), so GQA/MQA runs as plain multi-head
    attention in layouts that have no num_key_value_heads (GPT-2). Exact, at the cost of size."""
    if w is None or n_head == n_kv_head:
        return w
    group = n_head // n_kv_head
    return w.reshape(n_kv_head, -1, *w.shape[1:]).repeat_interleave(group, dim=0).flatten(0, 1)


def family_tensors(model: GPT, layout: str) -> dict[str, torch.Tensor]:
    """Our weights under the family's names and in its layout: the table --init_from reads them
    by (HFFamily.tensors), read the other way. Our qkv is cut back into q, k and v (or kept whole
    where the family fuses them too); a family without grouped key/value heads gets each one
    repeated; a bias the family has and our model has not (--no-bias) is zeros, which compute
    exactly what no bias does."""
    family, attn = HF_FAMILIES[layout], model.blocks[0].attn
    params = {name: p.detach() for name, p in model.named_parameters()}
    out = {}
    for ours, names in family.tensors(model.cfg, None).items():
        value = params.get(ours)
        if value is None:  # a bias our layer lacks: as many zeros as its weight has rows
            rows = len(params[ours.removesuffix("bias") + "weight"])
            value = torch.zeros(rows, dtype=model.wte.weight.dtype)
        parts = [value]
        if ".attn.qkv." in ours:
            q, k, v = value.split(attn.qkv_sizes)
            if not family.grouped_kv:
                k, v = (repeat_kv_heads(t, attn.n_head, attn.n_kv_head) for t in (k, v))
            parts = [q, k, v] if len(names) == 3 else [torch.cat([q, k, v])]
        for name, part in zip(names, parts, strict=True):
            out[name] = part.t() if family.transposed(name) else part
    return out


def hf_config(model: GPT, tok: TextTokenizer, layout: str) -> dict[str, Any]:
    """config.json for the layout, written by hand so that exporting needs no transformers; keys
    that both transformers 4.x and 5.x read. Dropout carries over for fine-tuning."""
    family = HF_FAMILIES[layout]
    common = {"vocab_size": model.vocab_size, "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
              "pad_token_id": None, "tie_word_embeddings": model.cfg.tie_weights, "initializer_range": 0.02,
              "use_cache": True, "torch_dtype": str(model.wte.weight.dtype).removeprefix("torch.")}
    return {"architectures": [family.architecture], "model_type": layout, **common,
            **family.config(model.cfg)}


def runtime_end_id(cfg: Config, tok: TextTokenizer) -> int | None:
    """The token an exported model's runtime stops at: the end of a turn for a chat model (one
    with a template), else end-of-text."""
    return end_of_turn_id(tok) if chat_template_of(cfg, tok) else tok.eot_id


def hf_generation_config(cfg: Config, tok: TextTokenizer) -> dict[str, Any]:
    """generation_config.json with this run's sampling settings, so that model.generate() samples
    as --generate_only does: same processors in the same order (repetition penalty, temperature,
    top-k, top-p). top_k is written even when 0 because transformers' default is 50."""
    ends = tok.end_ids  # what ends a reply here, in every mode
    out: dict[str, Any] = {"bos_token_id": tok.eot_id, "eos_token_id": ends[0] if len(ends) == 1 else ends,
                           "max_new_tokens": cfg.max_new_tokens,
                           "repetition_penalty": cfg.repetition_penalty}
    if cfg.temperature < GREEDY_BELOW:  # greedy here: transformers would divide by it
        return out | {"do_sample": False}
    return out | {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k,
                  "top_p": cfg.top_p}


def hf_tokenizer_files(tok: TextTokenizer, cfg: Config) -> dict[str, str]:
    """tokenizer.json (hf_tokenizer_json), plus the tokenizer_config.json and
    special_tokens_map.json that AutoTokenizer reads: end-of-text is BOS and EOS (as in GPT-2),
    and a char-level tokenizer's unknown token; a char-level tokenizer without one has no special
    tokens. Spaces are never 'cleaned up' on decode: decoding must give back the text. A chat
    model's template goes along, so that apply_chat_template renders as --chat does: in
    chat_template.jinja, which transformers reads first since it writes templates there, and in
    tokenizer_config.json, the only place older ones read (4.45, the floor here, among them)."""
    special = {"bos_token": tok.eot, "eos_token": tok.eot} if tok.eot is not None else {}
    if tok.kind == "char" and tok.eot is not None:
        special["unk_token"] = tok.eot
    template = chat_template_of(cfg, tok)
    if template:  # runtimes that stop at eos_token stop at the end of a turn
        special["eos_token"] = tok.hf.id_to_token(runtime_end_id(cfg, tok))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              **special, **({"chat_template": template} if template else {})}
    return {"tokenizer.json": hf_tokenizer_json(tok),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
            **({CHAT_TEMPLATE_FILE: template} if template else {})}


def hf_tokenizer_json(tok: TextTokenizer) -> str:
    """tokenizer.json for transformers. Ours as it is, except that a char-level vocabulary gets an
    unknown token: with none, the tokenizers library fails on any character outside it ("WordLevel
    error: Missing [UNK] token"). There is no row to give a new token, so end-of-text stands for
    one (GPT-2's tokenizer declares it its unk_token too): transformers encodes such a character
    as the end of a document, where --prompt refuses it. char_lookup_restored undoes this when the
    export comes back through --init_from."""
    if tok.kind != "char" or tok.eot is None:
        return tok.to_str()
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"][tok.eot] = tok.eot_id  # WordLevel looks its unk_token up in its own vocab
    spec["model"]["unk_token"] = tok.eot
    return json.dumps(spec, ensure_ascii=False)


def char_lookup_restored(text: str) -> str:
    """A tokenizer.json as hf_tokenizer_json wrote it for a char-level vocabulary (a WordLevel of
    single characters whose unknown token is its end-of-text special token) back as ours, which
    has no unknown token, so that the export of a char-level model imports as char-level (it
    refuses a character it lacks instead of reading a document's end there). Any other text as
    it is."""
    spec = json.loads(text)
    model = spec.get("model") or {}
    unk, vocab = model.get("unk_token"), model.get("vocab")
    if model.get("type") != "WordLevel" or unk not in END_OF_TEXT or not isinstance(vocab, dict):
        return text
    special = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or [] if t.get("special")}
    single = all(len(t) == 1 for t in vocab if t != unk)  # else a word-level vocabulary: its unk is its own
    if unk not in vocab or special.get(unk) != vocab[unk] or not single:
        return text
    del vocab[unk]
    model["unk_token"] = "<unk>"  # what ours serializes (none in the vocabulary)
    return json.dumps(spec, ensure_ascii=False)


def save_safetensors_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write through atomic_write. safetensors refuses tensors that share memory (tied weights,
    slices of the fused qkv) and non-contiguous ones (transposes): every tensor is a fresh copy."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def check_tokenizer_fits(model: GPT, tok: TextTokenizer) -> None:
    if model.vocab_size < tok.vocab_size:
        raise TinyLLMError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                           f"{model.vocab_size}; export the tokenizer the model was trained with")


def export_hf(model: GPT, tok: TextTokenizer, out_dir: Path) -> None:
    """A directory that transformers loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained:
    GPT2LMHeadModel for layernorm+gelu+learned models, LlamaForCausalLM for rmsnorm+swiglu+rope
    ones, computing the same logits (fp32). Tied embeddings are stored once (safetensors refuses
    shared tensors) and tie_word_embeddings re-ties them on load."""
    require("safetensors", "exporting to HuggingFace")
    layout = hf_layout(model.cfg)
    check_tokenizer_fits(model, tok)
    out = make_export_dir(out_dir)
    tensors = family_tensors(model, layout)
    save_safetensors_file(tensors, out / "model.safetensors", {"format": "pt"})
    files = {"config.json": hf_config(model, tok, layout),
             "generation_config.json": hf_generation_config(model.cfg, tok)}
    for name, value in files.items():
        write_text_atomic(out / name, json.dumps(value, indent=2) + "\n")
    for name, text in hf_tokenizer_files(tok, model.cfg).items():
        write_text_atomic(out / name, text)
    if tok.kind == "char":  # what hf_tokenizer_json gave it
        print0(f"hf: transformers encodes a character outside the char-level vocabulary as {tok.eot} (the "
               f"tokenizer's unk_token, as in GPT-2's), the end of a document; --prompt refuses one here"
               if tok.eot is not None else
               "hf: transformers fails on a character outside the char-level vocabulary: the tokenizer has "
               "no end-of-text token to stand for one")


def export_safetensors(model: GPT, tok: TextTokenizer, cfg: Config, path: Path, step: int = -1,
                       start_ids: list[int] | None = None) -> None:
    """One .safetensors file that is a whole sampling checkpoint: the weights (no pickle, so
    loading can never run code), and in the string-to-string metadata our config JSON, the
    vocabulary size and the tokenizer JSON. A tied output head is stored once, as wte.weight."""
    require("safetensors", "--export safetensors")
    mismatched = [k for k in ARCH_KEYS if getattr(cfg, k) != getattr(model.cfg, k)]
    if mismatched:
        raise TinyLLMError(f"the config given to export_safetensors differs from the model's in "
                           f"{', '.join(mismatched)}; pass the model's own config")
    tensors = {k: v for k, v in model.state_dict().items()
               if not (cfg.tie_weights and k == "lm_head.weight")}
    plain = dataclasses.replace(cfg, lora_rank=0)  # the weights written are merged: no adapters
    metadata = {"format": "pt", "tinyllm": SAFETENSORS_FORMAT, "config": json.dumps(asdict(plain)),
                "vocab_size": str(model.vocab_size), "tokenizer": tok.to_str(), "step": str(step),
                "start_ids": json.dumps(start_ids)}
    save_safetensors_file(tensors, export_file(path), metadata)


class LogitsOnly(nn.Module):
    """GPT.forward as a pure function of the token ids, (B, T) -> (B, T, V) logits: the one
    output that tracers and exporters want (no loss, no cache)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]


def export_copy(model: GPT) -> LogitsOnly:
    """A CPU fp32 eval copy to trace: exporting never disturbs the live model (its device, its
    dtype, train mode), and the graph does not bake in dropout."""
    return LogitsOnly(copy.deepcopy(model).float().cpu()).eval()


def export_onnx(model: GPT, path: Path) -> None:
    """ONNX graph of the forward pass: input_ids (batch, seq) int64 -> logits (batch, seq, vocab)
    float32; batch is dynamic, seq too from 1 to block_size (past it there are no positions).
    No KV cache: each call recomputes the whole sequence. torch's dynamo exporter (torch.export,
    then onnxscript); the older TorchScript-based one cannot translate RMSNorm."""
    require("onnxscript", "--export onnx", "onnx onnxscript")  # the dynamo exporter translates through it
    if model.cfg.block_size < 2:
        raise TinyLLMError("ONNX export needs --block_size of at least 2 (torch.export treats an "
                           "example axis of size 1 as fixed)")
    wrapper = export_copy(model)
    example = torch.zeros(2, min(model.cfg.block_size, 8), dtype=torch.long)  # (B, T)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=model.cfg.block_size)
    big = sum(p.numel() * 4 for p in wrapper.parameters()) >= 2**31  # protobuf's 2 GB limit
    program = torch.onnx.export(wrapper, (example,), input_names=["input_ids"],
                                output_names=["logits"], dynamo=True, external_data=big,
                                dynamic_shapes={"idx": {0: batch, 1: seq}}, verbose=False)
    path = export_file(path)
    if big:  # the weights go to a side file named after the graph file: no temporary name
        program.save(str(path), external_data=True)
    else:
        atomic_write(path, lambda p: program.save(str(p), external_data=False))


def export_torchscript(model: GPT, path: Path) -> None:
    """torch.jit.trace of the logits-only forward (LogitsOnly), loadable with torch.jit.load
    and no tinyllm code. Traced at batch 2 x seq 8, it runs any batch and any seq from 1 to
    block_size: the trace records sizes as graph ops and LogitsOnly has no Python branch on
    them. No KV cache. torch deprecates torch.jit (use export_onnx, or torch.export, for new
    work); its deprecation warnings are silenced here, any other tracer warning is shown."""
    if model.cfg.block_size < 2:
        raise TinyLLMError("TorchScript export needs --block_size of at least 2")
    wrapper = export_copy(model)
    example = torch.zeros(2, min(model.cfg.block_size, 8), dtype=torch.long)  # (B, T)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message="`torch.jit", category=DeprecationWarning)
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        atomic_write(export_file(path), lambda p: torch.jit.save(traced, str(p)))


def export_tiktoken(tok: TextTokenizer, path: Path) -> None:
    """The byte-level BPE tokenizer for tiktoken: `path` holds the mergeable ranks in tiktoken's
    own format (base64 of the token's bytes, space, rank; one a line), `path`.json the split
    pattern, the special tokens and the ranks file's sha256. Load it with:

        import json, tiktoken
        from tiktoken.load import load_tiktoken_bpe
        meta = json.load(open("tokenizer.tiktoken.json"))
        enc = tiktoken.Encoding(
            name=meta["name"], pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
            mergeable_ranks=load_tiktoken_bpe("tokenizer.tiktoken", expected_hash=meta["sha256"]))
        enc.encode("some text<|endoftext|>", allowed_special="all")

    (expected_hash matters: load_tiktoken_bpe caches every path it reads, local ones too, in
    $TIKTOKEN_CACHE_DIR or /tmp/data-gym-cache, and without a hash a re-exported file would be
    read from the stale cache.) tiktoken merges by the rank of the merged bytes and first looks
    a whole pre-token up in the ranks, where HF applies its merge list in order; the two agree
    on tokenizers that train_bpe_tokenizer makes, see the tests."""
    ranks, special = tiktoken_tables(tok)
    import base64
    lines = "".join(f"{base64.b64encode(b).decode('ascii')} {i}\n" for b, i in
                    sorted(ranks.items(), key=lambda item: item[1]))
    path = export_file(path)
    atomic_write(path, lambda p: p.write_bytes(lines.encode("ascii")))
    meta = {"name": path.name.split(".")[0] or "tinyllm", "pat_str": GPT2_SPLIT_PATTERN,
            "special_tokens": special, "mergeable_ranks": path.name,
            "sha256": hashlib.sha256(lines.encode("ascii")).hexdigest(),
            "n_vocab": tok.vocab_size}
    write_text_atomic(path.with_name(path.name + ".json"), json.dumps(meta, indent=2) + "\n")


# ---- GGUF: one file for llama.cpp, Ollama and LM Studio ------------------------------------

Q8_BLOCK = 32  # q8_0 quantizes blocks of 32 weights along a row, one scale each


# Split patterns of the Llama 3 and Qwen2 pre-tokenizers, as their tokenizer.json files write them.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


QWEN2_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_SPLIT_PATTERNS = {LLAMA3_SPLIT_PATTERN: "llama-bpe", QWEN2_SPLIT_PATTERN: "qwen2"}  # llama.cpp's names
SPM_SPACE = "\u2581"  # how llama.cpp's SentencePiece-style tokenizer spells a space


def export_gguf(model: GPT, tok: TextTokenizer, cfg: Config, path: Path, weights: str = "f16") -> None:
    """One .gguf file that llama.cpp loads, and with it Ollama and LM Studio: the weights under
    llama.cpp's names for the gpt2, llama or qwen3 architecture (hf_layout picks it), the
    metadata its loader reads, the tokenizer (so that llama.cpp encodes text to our ids), the
    chat template, and this run's sampling settings as defaults. An Ollama Modelfile is written
    beside it. `weights`: f32, f16 (1-D tensors stay f32, as llama.cpp wants) or q8_0."""
    gguf = require("gguf", "--export gguf")
    if weights not in choices_of("gguf_type"):
        raise TinyLLMError(f"--gguf_type {weights!r} is not one of {', '.join(choices_of('gguf_type'))}")
    arch = hf_layout(model.cfg, "llama.cpp's", "a GGUF export")
    check_tokenizer_fits(model, tok)
    vocab = gguf_vocab(tok, model.vocab_size)
    if vocab["model"] == "llama":
        print0("gguf: llama.cpp stops with an error on a character outside a char-level vocabulary (as "
               "--prompt refuses them here); Ollama and llama-server would drop the request")
    if arch == "qwen3" and vocab["pre"] != "qwen2":
        print0("gguf: Ollama runs qwen3 models on its own engine, which tokenizes as Qwen2 whatever the file "
               "says; llama.cpp and LM Studio read this model's own tokenizer from the file")
    if cfg.mlp == "gelu" and arch == "gpt2":
        print0("gguf: llama.cpp's GPT-2 computes GELU by its tanh approximation; this model was trained "
               "with the exact (erf) GELU, which differs by at most 5e-4 per activation")
    tensors = gguf_tensors(model, arch)
    context = gguf_context_length(model.cfg)
    if context > model.cfg.block_size:
        print0(f"gguf: llama.cpp rounds its context up to a multiple of {LLAMA_CPP_CONTEXT_STEP} tokens and "
               f"reads GPT-2's position table at each, so the file holds {context} positions: the "
               f"{model.cfg.block_size} learned ones, then copies of the last (what it computes past "
               f"{model.cfg.block_size} tokens was never trained); its context_length is {context}, the "
               f"Modelfile's num_ctx {model.cfg.block_size}; a -c longer than {context} would read past it")
    kept = [n for n, t in tensors.items() if weights == "q8_0" and gguf_kind(t, weights, n) == "f16"]
    if kept:
        print0(f"gguf: q8_0 needs rows of a multiple of {Q8_BLOCK} weights; {len(kept)} tensors stay "
               f"f16: {', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''}")

    def write(target: Path) -> None:
        writer = gguf.GGUFWriter(target, arch)
        gguf_metadata(writer, model, arch, weights, vocab, tok, cfg)
        bar = byte_bar(sum(t.numel() * 4 for t in tensors.values()), f"gguf {weights}")
        for name, t in tensors.items():
            data, kind = gguf_array(t, weights, name)
            writer.add_tensor(name, data, raw_dtype=kind)
            bar.update(t.numel() * 4)
        bar.close()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=bar.shows)
        writer.close()
    path = export_file(path)
    atomic_write(path, write)
    write_text_atomic(path.with_name("Modelfile"), ollama_modelfile(cfg, tok, path.name))


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names, the gguf package's map from transformers' names
    (family_tensors), in nn.Linear's (out, in) layout: the family's transposes are undone. Where
    llama.cpp rotates adjacent pairs of a head's dimensions (its `llama`), the q and k rows are
    reordered; `qwen3` rotates halves, as we do."""
    import gguf
    family, attn = HF_FAMILIES[arch], model.blocks[0].attn
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.cfg.n_layer)
    out = {}
    for hf_name, t in family_tensors(model, arch).items():
        t = t.t() if family.transposed(hf_name) else t
        if family.gguf_rope_pairs and ".q_proj." in hf_name:
            t = rotate_half_to_pairs(t, attn.n_head)
        elif family.gguf_rope_pairs and ".k_proj." in hf_name:
            t = rotate_half_to_pairs(t, attn.n_kv_head)
        if hf_name.endswith("wpe.weight"):
            t = pad_positions(t, gguf_context_length(model.cfg))
        out[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = t.detach()
    return out


# llama.cpp rounds every context it runs up to a multiple of this (llama_context's constructor:
# n_ctx = GGML_PAD(n_ctx, 256), with n_ctx 0, its tools' default, meaning context_length)
LLAMA_CPP_CONTEXT_STEP = 256


def gguf_context_length(cfg: Config) -> int:
    """The context_length a GGUF export declares. Rotary positions extend to any length: the
    block size. A learned position table (GPT-2) must have exactly context_length rows for
    llama.cpp's loader, and its graph reads the row of every position of the context it runs,
    which is at least the next multiple of LLAMA_CPP_CONTEXT_STEP: a table of block_size rows
    would be read past its end (GGML_ASSERT, an abort) once a generation outgrows it. So the
    table, and context_length, are that multiple (pad_positions)."""
    if cfg.pos_encoding != "learned":
        return cfg.block_size
    return -(-cfg.block_size // LLAMA_CPP_CONTEXT_STEP) * LLAMA_CPP_CONTEXT_STEP


def pad_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """The learned position table (block_size, C) grown to `rows` with copies of its last row, so
    that every position llama.cpp may read is defined; the learned rows stay as they are, and so
    does everything computed within the learned context."""
    return torch.cat([table, table[-1:].expand(rows - len(table), -1)])


def rotate_half_to_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows (H*D, ...), or their bias (H*D,), from rotate-half order (dimension i of a
    head pairs with i + D/2) to adjacent pairs (2i with 2i+1): per head, the rows of the two
    halves interleave."""
    halves = w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:])  # (H, 2, D/2, ...)
    return halves.transpose(1, 2).reshape(w.shape)


def gguf_kind(t: torch.Tensor, weights: str, name: str) -> str:
    """f32, f16 or q8_0: what one tensor is written as. Norms, biases and GPT-2's position table
    stay f32 (llama.cpp's own converter keeps them so); q8_0 quantizes what has rows of a
    multiple of 32 and leaves the rest f16."""
    if weights == "f32" or t.dim() == 1 or name.startswith("position_embd"):
        return "f32"
    return "q8_0" if weights == "q8_0" and t.size(-1) % Q8_BLOCK == 0 else "f16"


def gguf_array(t: torch.Tensor, weights: str, name: str) -> tuple[np.ndarray, Any]:
    """(data, ggml type or None when numpy's dtype says it) of one tensor, as gguf_kind says."""
    import gguf
    data = t.float().cpu().numpy()
    kind = gguf_kind(t, weights, name)
    if kind == "q8_0":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return (data, None) if kind == "f32" else (data.astype(np.float16), None)


def gguf_vocab(tok: TextTokenizer, n_vocab: int) -> dict[str, Any]:
    """The tokenizer as llama.cpp reads it, or TinyLLMError naming why llama.cpp could not
    encode as we do. Byte-level BPE is llama.cpp's `gpt2` model with the merges and the
    pre-tokenizer (the regex that splits text before BPE) named; a char-level vocabulary is its
    SentencePiece-style `llama` model without merges, which looks every character up whole. The
    tokens go by id, padded to the model's rows with unused ones."""
    spec, added = json.loads(tok.to_str()), tok.hf.get_added_tokens_decoder()
    by_id = {i: t for t, i in tok.vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise TinyLLMError("the tokenizer's ids have gaps, which a GGUF token list cannot hold; "
                           "use --export hf")
    if tok.eot_id is None:
        raise TinyLLMError(f"the tokenizer has no end-of-text token ({', '.join(END_OF_TEXT)}), which "
                           f"llama.cpp needs to end a generation; train with --tokenizer bpe or char")
    tokens = [by_id[i] for i in range(len(by_id))]
    if tok.kind == "char":
        if SPM_SPACE in tok.vocab:
            raise TinyLLMError(f"the char-level vocabulary has {SPM_SPACE!r}, the character llama.cpp's "
                               f"char lookup spells a space with, so it could not tell them apart; "
                               f"train with --tokenizer bpe for a GGUF export")
        tokens = [SPM_SPACE if t == " " else t for t in tokens]
        model, pre, merges = "llama", None, []
    else:
        model, pre = "gpt2", gguf_pre_tokenizer(spec)
        check_whole_word_lookup(tok, spec, pre)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    padding = range(len(tokens), n_vocab)  # rows the model has beyond the tokenizer
    names = tokens + [f"[PAD{i}]" for i in padding]
    if len(set(names)) < len(names):
        raise TinyLLMError("the tokenizer has two tokens with the same text (or one named like the padding "
                           "rows, [PADn]); llama.cpp needs every token's text to be unique: use --export hf")
    import gguf
    kind = gguf.TokenType
    types = [(kind.CONTROL if added[i].special else kind.USER_DEFINED) if i in added else kind.NORMAL
             for i in range(len(tokens))]
    return {"model": model, "pre": pre, "merges": merges, "tokens": names,
            "types": types + [kind.UNUSED] * len(padding)}


def gguf_pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the byte-level BPE pre-tokenizer of a tokenizer.json: GPT-2's (ours),
    SmolLM's (digits split one by one first), Llama 3's or Qwen2's; TinyLLMError for another, or
    for parts llama.cpp lacks."""
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    fix = "llama.cpp's converter (convert_hf_to_gguf.py) may handle the --export hf directory"
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise TinyLLMError(f"the tokenizer is not byte-level BPE (it is {model.get('type')}"
                           f"{' with byte fallback' if model.get('byte_fallback') else ''}); {fix}")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    first, last = (parts[0], parts[-1]) if parts else ({}, {})
    regex = last.get("use_regex", True)  # the byte-level step also splits as GPT-2 does
    name = None
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and regex:
            name = "gpt-2"
        elif kinds == ["Digits", "ByteLevel"] and first.get("individual_digits") and regex:
            name = "smollm"
        elif kinds == ["Split", "ByteLevel"] and not regex and not first.get("invert") \
                and first.get("behavior") == "Isolated":
            name = GGUF_SPLIT_PATTERNS.get(first.get("pattern", {}).get("Regex"))
    if name is None:
        raise TinyLLMError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is none of the "
                           f"byte-level ones llama.cpp has (GPT-2's, SmolLM's, Llama 3's, Qwen2's); {fix}")
    normalizer = spec.get("normalizer")
    if normalizer and normalizer != {"type": "NFC"}:
        raise TinyLLMError(f"the tokenizer normalizes text ({json.dumps(normalizer)[:80]}), which llama.cpp "
                           f"does not; {fix}")
    if normalizer:
        print0("gguf: the tokenizer NFC-normalizes text and llama.cpp does not: text that is not in NFC "
               "form may encode differently there")
    return name


def check_whole_word_lookup(tok: TextTokenizer, spec: dict[str, Any], pre: str) -> None:
    """llama.cpp looks a pre-token up whole before merging (ignore_merges) for Llama 3's
    pre-tokenizer only, and always merges for the others. Where the tokenizer.json does otherwise,
    the two agree only if every token is what the merges make of its own text."""
    ignores = bool(spec["model"].get("ignore_merges"))
    if ignores == (pre == "llama-bpe"):
        return
    if ignores:
        raise TinyLLMError("the tokenizer looks whole words up before merging (ignore_merges), which "
                           "llama.cpp does only with Llama 3's pre-tokenizer; use --export hf")
    odd = token_not_made_by_merges(tok)
    if odd:
        raise TinyLLMError(f"token {odd[0]} ({odd[1]!r}) is not what the tokenizer's merges make of its "
                           f"text, and llama.cpp, which looks whole words up first here, would give it "
                           f"where we do not; use --export hf")


def gguf_metadata(writer: Any, model: GPT, arch: str, weights: str, vocab: dict[str, Any],
                  tok: TextTokenizer, cfg: Config) -> None:
    """The keys llama.cpp's loader reads for `arch`, the tokenizer, and the sampling defaults.
    Generation ends at end-of-text, or for a chat model at the end of a turn (as --chat's)."""
    import gguf
    c, attn = model.cfg, model.blocks[0].attn
    writer.add_name(Path(cfg.out_dir).name or "tinyllm")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[weights])
    if weights == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(gguf_context_length(c))
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(mlp_hidden_size(c))
    writer.add_head_count(attn.n_head)
    # a family without grouped key/value heads has them repeated by family_tensors: plain multi-head
    writer.add_head_count_kv(attn.n_kv_head if HF_FAMILIES[arch].grouped_kv else attn.n_head)
    if c.pos_encoding == "rope":
        writer.add_key_length(attn.head_dim)
        writer.add_value_length(attn.head_dim)
        writer.add_rope_dimension_count(attn.head_dim)
        writer.add_rope_freq_base(c.rope_theta)
    (writer.add_layer_norm_rms_eps if c.norm == "rmsnorm" else writer.add_layer_norm_eps)(c.norm_eps)
    if c.pos_encoding == "rope":  # the llama and qwen3 loaders read it; GPT-2's takes the token list's
        writer.add_vocab_size(model.vocab_size)
    writer.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "llama":  # SentencePiece-style: no merges, so no scores to rank them by
        writer.add_token_scores([0.0] * len(vocab["tokens"]))
        writer.add_add_space_prefix(False)
    else:
        writer.add_token_merges(vocab["merges"])
    template = chat_template_of(cfg, tok)
    end = runtime_end_id(cfg, tok)
    writer.add_bos_token_id(tok.eot_id)
    writer.add_eos_token_id(end)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if template:
        writer.add_eot_token_id(end)
        writer.add_chat_template(template)
    writer.add_sampling_sequence("penalties;temperature;top_k;top_p")  # our order (choose_next)
    writer.add_sampling_temp(cfg.temperature)
    writer.add_sampling_top_k(cfg.top_k)
    writer.add_sampling_top_p(cfg.top_p)
    writer.add_sampling_min_p(0.0)  # llama.cpp's default is 0.05; we have no min-p
    writer.add_sampling_penalty_repeat(cfg.repetition_penalty)
    writer.add_sampling_penalty_last_n(-1)  # the whole context, as --repetition_penalty counts


OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")  # CHATML as an Ollama (Go) template


def ollama_modelfile(cfg: Config, tok: TextTokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the .gguf beside it: the prompt template (ChatML for our chat
    models, the bare prompt for a plain language model), the stop tokens, the context length
    and this run's sampling settings, each written out because Ollama's defaults differ (top_k
    40, repeat_penalty 1.1 over the last 64 tokens)."""
    template = chat_template_of(cfg, tok)
    lines = ["# ollama create NAME -f Modelfile, then: ollama run NAME", f"FROM ./{gguf_name}"]
    if not template:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif template == CHATML:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
    else:
        print0("gguf: the Modelfile has no TEMPLATE: Ollama's templates are Go templates and this model's "
               "chat template is not ChatML; Ollama uses the GGUF's chat template when it knows it, "
               "else add a TEMPLATE line")
    if '"""' in cfg.system:
        print0('gguf: the Modelfile has no SYSTEM: Ollama cannot quote a system prompt that holds """')
    elif cfg.system:
        lines.append(f'SYSTEM """{cfg.system}"""')
    ends = dict.fromkeys((runtime_end_id(cfg, tok), *tok.end_ids))  # the GGUF's end token first
    stops = [tok.hf.id_to_token(i) for i in ends if i is not None]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    settings = {"num_ctx": cfg.block_size, "num_predict": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_k": cfg.top_k, "top_p": cfg.top_p, "min_p": 0, "repeat_penalty": cfg.repetition_penalty,
                "repeat_last_n": -1}  # top_k 0 = off; -1 = the whole context
    lines += [f"PARAMETER {k} {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


for fmt, filename, write in (
    ("hf", "", lambda use, target: export_hf(use.model, use.tok, target)),
    ("safetensors", "model.safetensors", lambda use, target: export_safetensors(
        use.model, use.tok, use.model.cfg, target, use.step, use.start_ids)),
    ("onnx", "model.onnx", lambda use, target: export_onnx(use.model, target)),
    ("torchscript", "model.pt", lambda use, target: export_torchscript(use.model, target)),
    ("tiktoken", "tokenizer.tiktoken", lambda use, target: export_tiktoken(use.tok, target)),
    ("gguf", "model.gguf", lambda use, target: export_gguf(use.model, use.tok, use.cfg, target,
                                                           use.cfg.gguf_type)),
):
    EXPORTERS.implement(fmt, Exporter(filename, write))
MODES.implement("export", run=export_checkpoint)
PRETRAINED.implement("", Pretrained(resolve_source, lora_base, model_from_source, add_lora, merge_lora))
CHECKPOINT_FILES.implement(".safetensors", load_safetensors)
