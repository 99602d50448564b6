"""tinyllm's data beyond plain text: compressed corpora, JSON Lines and Parquet, conversations in
chat layouts rendered through chat templates, and tiktoken's tables of our byte-level BPE.

train_tinyllm.py declares what this module implements (READERS "jsonl" and "parquet",
DECOMPRESSORS, ENCODERS "tiktoken") and imports it the first time one of them is used; tinyllm_hub.py and
tinyllm_serve.py take chat templates and the tiktoken tables from here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import train_tinyllm
from train_tinyllm import (
    CHATML,
    CHATML_TOKENS,
    COMPRESSIONS,
    DECOMPRESSORS,
    ENCODERS,
    END_OF_TEXT,
    END_OF_TURN,
    EOT,
    READERS,
    REPLY_END,
    REPLY_START,
    ReadSettings,
    TextTokenizer,
    TinyLLMError,
    check_known_chars,
    first_line,
    read_blocks,
    require,
)

# ----------------------------------------------------------------------------------------------
# Compressed, JSON Lines and Parquet corpora (DECOMPRESSORS, READERS)
# ----------------------------------------------------------------------------------------------

def decompressed_blocks(path: Path, flag: str) -> Iterator[bytes]:
    """DECOMPRESSORS: a compressed file's bytes in blocks of READ_SIZE, decompressed on the fly as
    its name ends: .gz, .bz2, .xz (standard library) or .zst (zstandard); a corrupt or truncated
    archive is a TinyLLMError naming the file."""
    kind = next(c for c in COMPRESSIONS if path.name.endswith(c))
    if kind == ".zst":
        zstd = require("zstandard", f"reading {path.name}")
    try:
        with open(path, "rb") as f:
            if kind == ".gz":
                import gzip
                f = gzip.GzipFile(fileobj=f)
            elif kind == ".bz2":
                import bz2
                f = bz2.BZ2File(f)
            elif kind == ".xz":
                import lzma
                f = lzma.LZMAFile(f)
            elif kind == ".zst":
                if zstd_cut_short(f):
                    raise EOFError("the file ends inside a zstd frame")
                f.seek(0)
                f = zstd.ZstdDecompressor().stream_reader(f)
            while block := f.read(train_tinyllm.READ_SIZE):
                yield block
    except TinyLLMError:
        raise
    except Exception as e:  # zlib/bz2/lzma/zstd errors, or EOFError for a cut-off archive
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise TinyLLMError(f"{flag} {path} is not a valid {kind} archive ({first_line(e)}); it is "
                           f"corrupt or truncated: download or compress it again") from None


ZSTD_MAGIC, ZSTD_SKIPPABLE = 0xFD2FB528, 0x184D2A50  # a frame; a skippable frame (the low 4 bits vary)


def zstd_cut_short(f: BinaryIO) -> bool:
    """Whether a .zst file ends inside a frame. zstandard's stream reader stops there without a
    word, with what it has decompressed (nothing, for a small file), so the frames are walked
    first (RFC 8878): their headers and block headers are read, the blocks seeked over. Bytes
    that are no frame are left to the decompressor to refuse."""
    size = os.fstat(f.fileno()).st_size

    def skip(n: int) -> bool:  # whether n more bytes are there
        f.seek(n, os.SEEK_CUR)
        return f.tell() <= size

    while magic := f.read(4):
        if len(magic) < 4:
            return True
        number = int.from_bytes(magic, "little")
        if number & ~0xF == ZSTD_SKIPPABLE:
            length = f.read(4)
            if len(length) < 4 or not skip(int.from_bytes(length, "little")):
                return True
            continue
        if number != ZSTD_MAGIC:
            return False
        descriptor = f.read(1)
        if not descriptor:
            return True
        d = descriptor[0]
        single = d >> 5 & 1  # single segment: no window descriptor, and a content size of 1+ bytes
        if not skip((1 - single) + (0, 1, 2, 4)[d & 3] + (single, 2, 4, 8)[d >> 6]):
            return True
        last = False
        while not last:
            header = f.read(3)
            if len(header) < 3:
                return True
            block = int.from_bytes(header, "little")
            last, kind, length = bool(block & 1), block >> 1 & 3, block >> 3
            if not skip(1 if kind == 1 else length):  # an RLE block holds one byte, repeated
                return True
        if d & 4 and not skip(4):  # the content checksum
            return True
    return False


def jsonl_blocks(path: Path, settings: ReadSettings) -> Iterator[str]:
    """JSON Lines: one document per line, its text the string under --text_field, or a
    conversation (--data_format) rendered through the chat template. A line that is not JSON,
    not an object, has no text there or is a malformed conversation is skipped and counted
    (blank lines are not records); a file with no usable line is refused."""
    skipped, total, first, reasons, skipped_kinds = 0, 0, [], {}, set()

    def texts() -> Iterator[str]:
        nonlocal skipped, total
        for number, line in numbered_lines(path, settings):
            total += 1
            text, why, kind = jsonl_record(line, settings)
            if text is not None:
                settings.kinds.add(kind)  # only records that are read: a skipped one mixes nothing in
                yield text
                continue
            skipped += 1
            reasons[why] = True
            skipped_kinds.add(kind)
            if len(first) < 3:
                first.append(number)

    yield from joined_documents(texts())
    if skipped:
        lines = ", ".join(f"{n:,}" for n in first) + (", ..." if skipped > len(first) else "")
        settings.skipped[str(path)] = (f"skipped {skipped:,} of {total:,} lines of {path} "
                                       f"({', '.join(reasons)}): lines {lines}")
    if skipped == total and total:
        raise TinyLLMError(no_usable_line(path, settings, total, list(reasons), skipped_kinds))


def no_usable_line(path: Path, settings: ReadSettings, total: int, reasons: list[str],
                   kinds: set[str]) -> str:
    """Why a JSON Lines file with no usable line is refused, and what to do about it."""
    if reasons == [empty_text(settings.text_field)]:
        return (f"{settings.flag} {path} has no record with text: all {total:,} lines have an empty "
                f"\"{settings.text_field}\"; put the text there, or point --text_field at the field "
                f"that holds it")
    fix = "fix the conversations, or name their layout with --data_format if it is another" \
        if "conversations" in kinds else "point --text_field at the field that holds the text"
    return f"{settings.flag} {path} has no usable line: all {total:,} are {', '.join(reasons)}; {fix}"


def empty_text(text_field: str) -> str:
    return f'an empty "{text_field}"'


def numbered_lines(path: Path, settings: ReadSettings) -> Iterator[tuple[int, str]]:
    """The file's non-blank lines with their physical line numbers (from 1), read in blocks; a
    byte-order mark before the first is dropped."""
    carry, number = "", 0
    for block in read_blocks(path, settings):
        lines = (carry + block).split("\n")
        carry = lines.pop()
        for line in lines:
            number += 1
            line = line.lstrip("\ufeff") if number == 1 else line
            if line.strip():
                yield number, line
    carry = carry.lstrip("\ufeff") if number == 0 else carry
    if carry.strip():
        yield number + 1, carry


def jsonl_record(line: str, settings: ReadSettings) -> tuple[str | None, str, str]:
    """A JSON Lines record's document (its text, or its conversation rendered and fenced), or
    None and why it is skipped; and which kind it is: "text" or "conversations" (a record in a
    chat layout, even a malformed one, is a conversation)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not JSON", "text"
    if not isinstance(record, dict):
        return None, "not an object", "text"
    layout = record_layout(record, settings.data_format, settings.text_field)
    if layout == "text":
        text = record.get(settings.text_field)
        if not isinstance(text, str):
            return None, f'no "{settings.text_field}"', "text"
        # A blank text is no document: kept, it would add only an <|endoftext|>, and a file of
        # them would pass the scan as a corpus of no documents. (isspace: no copy of a long text.)
        blank = not text or text.isspace()
        return (None, empty_text(settings.text_field), "text") if blank else (text, "", "text")
    try:
        messages = chat_messages(record, layout)
        return fenced_chat(settings.template or CHATML, messages, settings.specials), "", "conversations"
    except ValueError as e:
        return None, str(e), "conversations"


def parquet_blocks(path: Path, settings: ReadSettings) -> Iterator[str]:
    """Parquet: one document per row, its text the --text_field column, read one row group at
    a time in batches, so that a large shard never sits in memory. Rows without a string there,
    or with a blank one, are skipped and counted."""
    pq = require("pyarrow.parquet", f"reading {path.name}", "pyarrow")
    try:
        shard = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for a damaged file
        raise TinyLLMError(f"{settings.flag} {path} is not a readable Parquet file ({first_line(e)}); "
                           f"download or write it again") from None
    columns = shard.schema_arrow.names
    if settings.text_field not in columns:
        raise TinyLLMError(f"{settings.flag} {path} has no column \"{settings.text_field}\"; its columns "
                           f"are {', '.join(columns)}: point --text_field at the one that holds the text")
    skipped, total, reasons = 0, 0, {}
    null, empty = f'no string in "{settings.text_field}"', f'an empty string in "{settings.text_field}"'

    def rows() -> Iterator[str]:
        nonlocal skipped, total
        for group in range(shard.num_row_groups):
            for batch in shard.iter_batches(batch_size=4096, row_groups=[group],
                                            columns=[settings.text_field]):
                for value in batch.column(0).to_pylist():
                    total += 1
                    if isinstance(value, str) and value and not value.isspace():
                        yield value
                        continue
                    skipped += 1
                    reasons[null if not isinstance(value, str) else empty] = True

    yield from joined_documents(rows())
    if skipped:
        settings.skipped[str(path)] = (f"skipped {skipped:,} of {total:,} rows of {path} "
                                       f"({', '.join(reasons)})")
    if skipped == total and total:
        if list(reasons) == [null]:
            raise TinyLLMError(f"{settings.flag} {path} has no row with a string in "
                               f"\"{settings.text_field}\"; point --text_field at the column that holds "
                               f"the text")
        raise TinyLLMError(f"{settings.flag} {path} has no row with text in \"{settings.text_field}\": all "
                           f"{total:,} are empty or null; put the text there, or point --text_field at the "
                           f"column that holds it")


def joined_documents(texts: Iterator[str]) -> Iterator[str]:
    """Documents as blocks of about READ_SIZE characters, with <|endoftext|> between them."""
    parts, size, first = [], 0, True
    for text in texts:
        parts.append(text if first else EOT + text)
        first, size = False, size + len(text)
        if size >= train_tinyllm.READ_SIZE:  # read when used: tests shrink it
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        yield "".join(parts)


# ----------------------------------------------------------------------------------------------
# Conversations: chat layouts of JSON Lines, rendered through a chat template
# ----------------------------------------------------------------------------------------------

ROLES = {"system": "system", "user": "user", "assistant": "assistant",  # ShareGPT's names too
         "human": "user", "gpt": "assistant", "developer": "system"}  # OpenAI's newer name, as --serve


def record_layout(record: dict[str, Any], data_format: str, text_field: str = "text") -> str:
    """--data_format, or with auto the layout a record's fields show: messages (OpenAI),
    conversations (ShareGPT), instruction/output (Alpaca), else plain text. A record with one
    of Alpaca's two fields and no text is Alpaca short of the other: a malformed conversation,
    not a text without its field."""
    if data_format != "auto":
        return data_format
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    alpaca = "instruction" in record or "output" in record
    return "alpaca" if alpaca and not isinstance(record.get(text_field), str) else "text"


def chat_messages(record: dict[str, Any], layout: str) -> list[dict[str, str]]:
    """A record as [{"role", "content"}], or ValueError naming what is wrong with it: a missing
    field, an unknown role, no messages, content that is not text, a system message after the
    start, turns that do not alternate user and assistant, no assistant reply to learn, an empty
    one."""
    messages = alpaca_messages(record) if layout == "alpaca" else layout_messages(record, layout)
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise ValueError("a system message after the start")
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(body)):
        raise ValueError("turns that do not alternate user, assistant")
    if "assistant" not in body:
        raise ValueError("no assistant reply")
    # What an empty reply teaches is to end the turn at once; Alpaca's empty output was always
    # skipped, and a reply in the other layouts is held to the same rule. Control markers are
    # taken out of a message before it is rendered, so a reply of only those is empty too.
    if any(m["role"] == "assistant" and not plain_content(m["content"]).strip() for m in messages):
        raise ValueError("an empty assistant reply")
    return messages


def alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Alpaca's instruction (and input, after a blank line) as the user's turn, its output as the
    reply; ValueError naming a field that is missing, not a string, or an empty instruction."""
    for key in ("instruction", "output"):
        if key not in record:
            raise ValueError(f'no "{key}"')
    parts = [record.get(k, "") for k in ("instruction", "input", "output")]
    wrong = next((k for k, p in zip(("instruction", "input", "output"), parts) if not isinstance(p, str)), "")
    if wrong:
        raise ValueError(f'"{wrong}" that is not a string')
    if not parts[0].strip():
        raise ValueError('an empty "instruction"')
    user = parts[0] + (f"\n\n{parts[1]}" if parts[1] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": parts[2]}]


def layout_messages(record: dict[str, Any], layout: str) -> list[dict[str, str]]:
    """The turns of OpenAI's messages (role/content) or ShareGPT's conversations (from/value),
    their roles in our names; ValueError for no turns, a turn without text or an unknown role."""
    key, role_key, text_key = ("messages", "role", "content") if layout == "messages" else \
        ("conversations", "from", "value")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError("no messages")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError("a message without text")
        text = content_text(turn.get(text_key)) if layout == "messages" else turn.get(text_key)
        if not isinstance(text, str):
            raise ValueError("a message without text")
        if turn.get(role_key) not in ROLES:
            raise ValueError(f"unknown role {str(turn.get(role_key))[:20]!r}")
        messages.append({"role": ROLES[turn[role_key]], "content": text})
    return messages


def content_text(content: Any) -> Any:
    """OpenAI's message content: a string, or a list of parts whose text parts are joined as
    --serve joins them (end to end); a part of another type (an image, audio) is a ValueError
    naming it, as this model reads text only. Anything else is returned as it is."""
    if not isinstance(content, list):
        return content
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            name = f"of type {json.dumps(kind)[:30]}" if isinstance(kind, str) else "without a type"
            raise ValueError(f"a content part {name} (only text parts are read)")
        if not isinstance(part.get("text"), str):
            raise ValueError("a text part without text")
    return "".join(part["text"] for part in content)


@functools.lru_cache(maxsize=8)
def compiled_template(source: str) -> Any:
    """A chat template compiled as transformers compiles it: jinja2's sandbox, blocks trimmed."""
    jinja2 = require("jinja2", "a chat template")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template refused the conversation: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TinyLLMError(f"the chat template cannot be compiled ({first_line(e)}); fix or remove "
                           f"it") from None


def render_chat(template: str, messages: list[dict[str, str]], generation_prompt: bool = False,
                specials: dict[str, str] | None = None) -> str:
    """The conversation as the model sees it (with the assistant header to answer after, when
    `generation_prompt`); ValueError when the template fails on it."""
    try:
        return compiled_template(template).render(messages=messages, add_generation_prompt=generation_prompt,
                                                  **(specials or {}))
    except ValueError:
        raise
    except Exception as e:  # jinja2's errors, or what the template's own expressions raise
        raise ValueError(f"the chat template fails ({first_line(e)})") from None


CONTROL = re.compile("|".join(map(re.escape, (REPLY_START, REPLY_END, *END_OF_TEXT, *CHATML_TOKENS,
                                               "<|eot_id|>", "<end_of_turn>", "<|begin_of_text|>",
                                               "<|start_header_id|>", "<|end_header_id|>"))))


def plain_content(text: str) -> str:
    """A message's text without the control markers of templates and documents: typed into a
    message they would become real turn boundaries (a user could forge an assistant or system
    turn) or split the conversation in two."""
    return CONTROL.sub("", text)


def fenced_chat(template: str, messages: list[dict[str, str]], specials: dict[str, str]) -> str:
    """The rendered conversation with each assistant reply (and its end-of-turn marker, not the
    whitespace after it) between REPLY_START and REPLY_END. A reply's span runs from where the
    conversation before it, rendered with the generation prompt, ends, to where the
    conversation up to it ends; a template that renders a conversation's start differently
    from the whole cannot be fenced and is refused."""
    messages = [{**m, "content": plain_content(m["content"])} for m in messages]
    whole = render_chat(template, messages, specials=specials)
    out, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], True, specials)
        upto = render_chat(template, messages[:i + 1], specials=specials)
        if not whole.startswith(upto) or not upto.startswith(before):
            raise ValueError("a template that renders the start of a conversation differently")
        end = len(upto.rstrip())
        out += [whole[pos:len(before)], REPLY_START, whole[len(before):end], REPLY_END]
        pos = end
    return "".join(out) + whole[pos:]


def end_of_turn_id(tok: TextTokenizer) -> int | None:
    """The token that ends an assistant reply: the template's end-of-turn marker where the
    tokenizer has one, else end-of-text."""
    return next((tok.vocab[t] for t in END_OF_TURN if t in tok.vocab), tok.eot_id)


def chat_prompt(tok: TextTokenizer, template: str, messages: list[dict[str, str]]) -> list[int]:
    """The conversation so far, rendered up to the assistant header the reply follows."""
    try:
        text = render_chat(template or CHATML, messages, generation_prompt=True)
    except ValueError as e:
        raise TinyLLMError(f"{e}; fix the template (--chat_template) or the message") from None
    check_known_chars(tok, text, "the conversation")
    return tok.encode(text)


# ----------------------------------------------------------------------------------------------
# tiktoken: the same byte-level BPE as a table of ranks, for exact and fast encoding
# ----------------------------------------------------------------------------------------------

# The regular expression of HF's ByteLevel pre-tokenizer with use_regex=True, which is GPT-2's:
# contractions, letters, digits and other symbols (each with one optional leading space), then
# whitespace runs that leave their last space to the next word.
GPT2_SPLIT_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet: the character that spells each byte in a vocabulary. Bytes
    that are printable Latin-1 and not space stand for themselves; the other 68 become
    U+0100.. in byte order, so that every token is a printable string."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def check_tiktoken_compatible(spec: dict[str, Any]) -> None:
    """tiktoken does regex splitting then rank-ordered byte merges, nothing else: refuse any
    tokenizer.json that does more or differently, naming the part."""
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    fix = "tiktoken can only express GPT-2-style byte-level BPE; use the tokenizer.json instead"
    if model.get("type") == "WordLevel":
        raise TinyLLMError(f"a char-level tokenizer has no byte-level merges for tiktoken to run "
                           f"(it maps whole characters, not UTF-8 bytes); {fix}")
    if model.get("type") != "BPE":
        raise TinyLLMError(f"the tokenizer is {model.get('type')}, not BPE; {fix}")
    if pre != {**pre, "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}:
        raise TinyLLMError(f"the tokenizer's pre-tokenizer is {json.dumps(pre)}, not ByteLevel with "
                           f"use_regex and no add_prefix_space; {fix}")
    extras = [k for k in ("normalizer",) if spec.get(k)] + \
        [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)] + \
        ["byte_fallback"] * bool(model.get("byte_fallback"))
    if extras:
        raise TinyLLMError(f"the tokenizer uses {', '.join(extras)}, which tiktoken does not have; {fix}")


def tiktoken_tables(tok: TextTokenizer) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks, special tokens) with ranks = our token ids, so both give the same ids."""
    spec = json.loads(tok.to_str())
    check_tiktoken_compatible(spec)
    added = tok.hf.get_added_tokens_decoder()  # {id: AddedToken}; the trainer also puts them in the vocab
    plain = [a.content for a in added.values() if not a.special]
    if plain:
        raise TinyLLMError(f"the tokenizer has added tokens that are not special ({plain[:5]}); "
                           f"tiktoken only knows special tokens: use the tokenizer.json instead")
    chars = byte_level_chars()
    try:
        ranks = {bytes(chars[c] for c in token): i for token, i in
                 tok.hf.get_vocab(with_added_tokens=False).items() if i not in added}
    except KeyError as e:
        raise TinyLLMError(f"the vocabulary has a token with {e.args[0]!r}, which is not in the "
                           f"byte-level alphabet; use the tokenizer.json instead") from None
    missing = 256 - sum(len(b) == 1 for b in ranks)
    if missing:
        raise TinyLLMError(f"the tokenizer lacks {missing} of the 256 single-byte tokens, so "
                           f"tiktoken could not encode every text; train it with the full byte "
                           f"alphabet (train_bpe_tokenizer does)")
    check_merge_order(tok, spec["model"]["merges"], ranks, chars)
    return ranks, {a.content: i for i, a in added.items()}


def check_merge_order(tok: TextTokenizer, merges: list[Any], ranks: dict[bytes, int],
                      chars: dict[str, int]) -> None:
    """What tiktoken needs of a BPE to encode as HF does: merges made tokens in id order
    (tiktoken ranks a pair by the id of the token it makes, HF by the merge's place in the list),
    and every token is what HF's merges make of its own bytes (tiktoken takes a pre-token that is
    a whole token as it is, without merging). Tokenizers from train_bpe_tokenizer pass."""
    last = -1
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # old and new format
        made = bytes(chars[c] for c in left + right)
        if ranks.get(made, -1) <= last:
            raise TinyLLMError(f"the merge {left!r} + {right!r} does not make a token with a larger id "
                               f"than the merge before it, so tiktoken would merge in another order; "
                               f"use the tokenizer.json instead")
        last = ranks[made]
    odd = token_not_made_by_merges(tok)
    if odd:
        raise TinyLLMError(f"token {odd[0]} ({odd[1]!r}) is not what the tokenizer's own merges make of "
                           f"its bytes, so tiktoken (which looks whole pre-tokens up) would encode "
                           f"differently; use the tokenizer.json instead")


def token_not_made_by_merges(tok: TextTokenizer) -> tuple[int, str] | None:
    """(id, text) of the first token that the BPE's merges do not make of its own text, or None.
    Where there is one, an encoder that looks a whole pre-token up before merging (tiktoken,
    llama.cpp with Llama 3's pre-tokenizer) gives that token where HF's merges do not."""
    added = tok.hf.get_added_tokens_decoder()
    for text, i in tok.hf.get_vocab(with_added_tokens=False).items():
        if i not in added and len(text) > 1 and [t.id for t in tok.hf.model.tokenize(text)] != [i]:
            return i, text
    return None


# Accents, CJK, emoji (4-byte UTF-8), runs of spaces, tabs and newlines, digits, contractions:
# the fast encoder must give HF's ids on this before it is trusted.
ENCODER_PROBE = ["Hello wörld,  the cat's 日本語 sat\n\n\n on the mat!  12345 \t\tx\ty 😀🎉👍🏽 don't "
                 "I'll SHE'D  ümlaut ...--- \"q\" (p) x=1+2*3; naïve café \r\n tail   \n", "a", " ", ""]


def tiktoken_encoder(tok: TextTokenizer) -> Callable[[list[str]], list[list[int]]] | None:
    """ENCODERS["tiktoken"]: tiktoken run on our own ranks, giving HF's ids for the byte-level BPE
    `tok` (checked on ENCODER_PROBE first), or None where tiktoken cannot express it. Texts must
    hold no special tokens (document pieces never do)."""
    try:
        ranks, special = tiktoken_tables(tok)
    except TinyLLMError:  # a tokenizer.json that tiktoken cannot express
        return None
    import tiktoken
    enc = tiktoken.Encoding("tinyllm", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens=special)
    if enc.encode_ordinary_batch(ENCODER_PROBE) != tok.encode_batch(ENCODER_PROBE):
        return None  # never trust an encoder that disagrees
    threads = os.cpu_count() or 1

    def encode(texts: list[str]) -> list[list[int]]:
        # One task per thread, each a run of texts (tiktoken lets go of the GIL while it encodes):
        # tiktoken's own batch call makes a task per text, and with short documents handing them
        # to threads took longer than encoding them.
        step = max(1, -(-len(texts) // threads))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            runs = pool.map(lambda run: [enc.encode_ordinary(t) for t in run],
                            [texts[i:i + step] for i in range(0, len(texts), step)])
        return [ids for run in runs for ids in run]
    return encode


READERS.implement("jsonl", blocks=jsonl_blocks)
for suffix in COMPRESSIONS:
    DECOMPRESSORS.implement(suffix, decompressed_blocks)
READERS.implement("parquet", blocks=parquet_blocks)
ENCODERS.implement("tiktoken", tiktoken_encoder)
