"""Using a trained tinyllm model interactively: fast decoding (int8 weights, the decode step
compiled ahead of time with the weights built in), a conversation in the terminal (--chat), and an
OpenAI-compatible HTTP API with a chat page (--serve; the page is tinyllm_chat.html beside this).

train_tinyllm.py declares what this module implements (MODES "chat" and "serve", QUANTIZERS
"int8", STEP_COMPILERS "aot") and imports it the first time one of them is used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import hmac
import http
import http.server
import json
import math
import os
import queue
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyllm_data import chat_prompt, plain_content
from train_tinyllm import (
    ARCH_KEYS,
    CHATML,
    GPT,
    MODES,
    QUANTIZERS,
    STEP_COMPILERS,
    Config,
    GrowingText,
    KVCache,
    Loaded,
    Resolved,
    SampleSettings,
    SignalCatcher,
    StepStore,
    TextStreamer,
    TextTokenizer,
    TinyLLMError,
    cache_dtype,
    chat_template_of,
    check_known_chars,
    choose_next,
    cpp_compiler,
    cpu_name,
    decode_compiles,
    decode_step,
    feed,
    first_line,
    load_for_use,
    normalized,
    prepare_step,
    print0,
    sampling_copy,
    sha256_hex,
    step_store,
    write_text_atomic,
)

# ----------------------------------------------------------------------------------------------
# Fast decoding: int8 weights (--quantize int8), the decode step compiled ahead of time
# ----------------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """A linear layer with int8 weights for decoding: each output row is int8 values times one
    scale, max |w| / 127 of the row (symmetric and weight-only: activations keep their dtype).
    On CPU, torch's int8-weight matmul reads the int8 values directly, with bf16 activations: fp32
    ones are rounded to bf16 for it, since its fp32 path is several times slower, and widening
    the weights to fp32 for each call reads four times the bytes (README: Performance). Elsewhere,
    and for shapes that kernel gets wrong (it returns NaN or crashes unless the input width is a
    multiple of 16, checked on torch 2.13), the weights are widened for each call: a quarter of
    the memory but no faster."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(w / scale.unsqueeze(1)).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.packed_kernel = linear.in_features % 16 == 0 and linear.out_features >= 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(x.dtype)
        if self.packed_kernel and x.device.type == "cpu":
            half = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(half), self.weight, scale.to(half))
            y = y.view(*x.shape[:-1], -1).to(x.dtype)  # (..., out)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * scale
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model: GPT) -> GPT:
    """Every linear layer (the output head included) as an Int8Linear in the model's dtype, in
    place. The embedding stays: decoding reads one row of it per token."""
    dtype = model.wte.weight.dtype
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Int8Linear(module, dtype))
    return model


QUANTIZERS.implement("int8", quantize_int8)


class RowLinear(nn.Module):
    """A linear layer for one row at a time, written as products and a sum over the inputs: the
    compiler makes one streaming loop over the weights of it, which reads bf16 weights about
    twice as fast as its matrix-product kernels for one row on CPUs without AMX, and int8 ones
    faster than torch's int8-weight kernel (README: Performance). Used in the ahead-of-time step
    for batch 1; it shares the layer's tensors. Of an Int8Linear it keeps the int8 values and
    their scales, and rounds the input to bf16 as that layer does."""

    def __init__(self, linear: nn.Linear | Int8Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.scale = linear.scale if isinstance(linear, Int8Linear) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.to(torch.bfloat16) if self.scale is not None else x
        rows = computed_once(rows.float())  # (..., in)
        y = (rows.unsqueeze(-2) * self.weight.float()).sum(-1)  # (..., out)
        if self.scale is not None:
            y = y * self.scale.float()
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """x, kept in memory by the compiler: without this it computes what produces a layer's input
    (the residual sum, the norm) again inside the loop of every output row."""
    import torch._inductor.inductor_prims  # noqa: F401 (declares the operation below)
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


def with_row_linears(model: GPT) -> GPT:
    """A copy of the model's modules (its tensors shared) with every linear layer a RowLinear;
    int8 ones too where the CPU widens int8 values quickly (AVX-512), since with AVX2 alone the
    compiler's widening is slower than torch's int8-weight kernel (README: Performance)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    rows = copy.deepcopy(model, memo=shared)
    kinds = (nn.Linear, Int8Linear) if torch.backends.cpu.get_cpu_capability().startswith("AVX512") \
        else nn.Linear
    for name, module in list(rows.named_modules()):
        if isinstance(module, kinds):
            parent, _, attr = name.rpartition(".")
            setattr(rows.get_submodule(parent), attr, RowLinear(module))
    return rows


class FlatStep(nn.Module):
    """GPT.step over plain tensors (the token, the positions, every layer's keys then values), the
    form torch.export takes; `like` gives the cache's constant parts (slots, index grids)."""

    def __init__(self, model: GPT, like: KVCache):
        super().__init__()
        self.model, self.like = model, like

    def forward(self, idx: torch.Tensor, pos_t: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        cache = copy.copy(self.like)
        cache.k, cache.v, cache.pos_t = list(kv[:len(kv) // 2]), list(kv[len(kv) // 2:]), pos_t
        return self.model.step(idx, cache)


Step = Callable[[torch.Tensor, KVCache], torch.Tensor]


class FrozenStep:
    """The decode step compiled ahead of time with the model's weights built in (AOTInductor, on
    CPU), one library per batch width and context: the weights become constants laid out for the
    compiler's own kernels, and a call runs no Python and checks no guards. The libraries are
    kept in a StepStore (see StoredStep): a later launch with the same model loads its library
    in a second instead of compiling it again. For a model that keeps its weights for the rest
    of the process: --generate_only, --chat, --serve, --benchmark (which keeps nothing)."""
    made = 0  # libraries compiled in this process

    @classmethod
    def of(cls, model: GPT, store: StepStore | None = None) -> FrozenStep:
        """STEP_COMPILERS["aot"]: the model's step, one per model (compiled when a cache asks)."""
        if model not in FROZEN_STEPS:
            FROZEN_STEPS[model] = cls(model, store)
        return FROZEN_STEPS[model]

    def __init__(self, model: GPT, store: StepStore | None):
        self.model = weakref.ref(model)  # FROZEN_STEPS keeps this while the model lives, no longer
        self.store = store
        self.runners: dict[tuple[int, int, torch.dtype], Step] = {}
        self.fell_back = False  # some batch width decodes eagerly, since its step could not be compiled

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.prepare(cache)(idx, cache)

    def prepare(self, cache: KVCache) -> Step:
        """The library for the cache's batch width, loaded or compiled now if it is new; where it
        cannot be compiled, the eager step, with one line saying why."""
        key = (cache.batch, cache.capacity, cache.k[0].dtype)
        if key not in self.runners:
            try:
                self.runners[key] = self.load_or_compile(cache)
            except (TinyLLMError, OSError, RuntimeError) as e:  # RuntimeError: torch cannot load the library
                why = str(e) if isinstance(e, TinyLLMError) else (
                    f"the compiled decode step could not be loaded ({first_line(e)}); "
                    f"--no-compile_decode skips trying")
                print0(f"decoding eagerly: {why}", file=sys.stderr)
                self.fell_back = True
                self.runners[key] = lambda idx, c, model=self.model: model().step(idx, c)
        return self.runners[key]

    def load_or_compile(self, cache: KVCache) -> Step:
        store = self.store
        if store is None:
            return self.compile_for_now(cache)
        entry = StoredStep(store, *step_key(self.model(), cache))
        if (runner := entry.load()) is not None:
            return runner
        with contextlib.ExitStack() as held:
            try:
                store.folder.mkdir(parents=True, exist_ok=True)
                held.enter_context(locked(store.folder / f"{entry.key}.lock"))
            except OSError as e:  # a read-only or full cache_dir: the step still compiles, for this run
                print0(f"decode step store: cannot write to {store.folder} ({first_line(e)}); the step is "
                       f"compiled for this run only", file=sys.stderr)
                return self.compile_for_now(cache)
            if (runner := entry.load()) is not None:  # another process compiled it while we waited
                return runner
            seconds = self.compile(cache, entry.temp, f", kept in {store.folder} for later launches")
            return entry.keep(seconds)

    def compile_for_now(self, cache: KVCache) -> Step:
        """The step compiled into a temporary package, its library loaded, and both removed."""
        with tempfile.TemporaryDirectory() as tmp:
            self.compile(cache, Path(tmp) / "step.pt2", "")
            unpack_library(Path(tmp) / "step.pt2", Path(tmp) / "step.so")
            return load_library(Path(tmp) / "step.so")

    @torch.no_grad()
    def compile(self, cache: KVCache, package: Path, kept: str) -> float:
        """Compile the step for the cache's shapes into the AOTInductor package `package`."""
        import torch._inductor.config
        model = self.model()
        weights = "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else \
            str(model.wte.weight.dtype).removeprefix("torch.")
        start = time.perf_counter()
        idx = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.pos_t.device)
        args = (idx, cache.pos_t, *cache.k, *cache.v)
        tuned = {"max_autotune": True, "autotune_num_choices_displayed": 0,  # quietly
                 "max_autotune_report_choices_stats": False}
        with Ticking(f"compiling the decode step once for this model (batch {cache.batch}, context "
                     f"{cache.capacity}, {weights} weights; AOTInductor{kept})") as ticking, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, from inside it
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")
            try:
                ticking.stage = "exporting the graph"
                step = FlatStep(with_row_linears(model) if cache.batch == 1 else model, cache)
                program = torch.export.export(step, args)
                ticking.stage = "generating and compiling its C++"
                with torch._inductor.config.patch(tuned):
                    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
            except Exception as e:  # no C++ compiler, a full disk, an operation the exporter cannot take
                package.unlink(missing_ok=True)
                raise TinyLLMError(f"the decode step could not be compiled ({first_line(e)}); "
                                   f"--no-compile_decode skips trying") from None
        FrozenStep.made += 1
        seconds = time.perf_counter() - start
        print0(f"decode step compiled in {seconds:.1f} s", file=sys.stderr)
        return seconds


def unpack_library(package: Path, library: Path) -> None:
    """The compiled library (the step's code and, built in, its weights) out of an AOTInductor
    package, to `library`: loaded from there, a later launch skips the package loader's copy
    of it into a temporary folder (seconds for a 135M model)."""
    with zipfile.ZipFile(package) as z:
        names = [n for n in z.namelist() if n.endswith(".so")]
        if len(names) != 1:
            raise TinyLLMError(f"the compiled package holds {len(names)} libraries, not one")
        with z.open(names[0]) as src, open(library, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)


def load_library(path: Path) -> Step:
    """The step of a compiled library, through torch's own runner for AOTInductor libraries,
    called with the flat list of tensors: torch's packaged call would first flatten and check
    them as a tree, for every token, and its Python loader first compiles probes of the CPU's
    vector units (a second) to warn of a mismatch that the step's key already rules out."""
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
    return lambda idx, cache: runner.run([idx, cache.pos_t, *cache.k, *cache.v])[0]


class Ticking:
    """A line saying what is being done, then how long it has taken: every second on a terminal,
    every 15 s elsewhere (a log), on stderr, until the block ends."""

    def __init__(self, what: str):
        self.what, self.stage, self.done = what, "", threading.Event()
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> Ticking:
        print0(f"{self.what}...", file=sys.stderr)
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self.tick, daemon=True)
        self.thread.start()
        return self

    def tick(self) -> None:
        while not self.done.wait(1 if self.tty else 15):
            line = f"  {self.stage}: {time.perf_counter() - self.start:.0f} s"
            if self.tty:
                sys.stderr.write(f"\r{line}\033[K")
                sys.stderr.flush()
            else:
                print0(line, file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


STEP_FORMAT = 2  # what a stored step holds and how it is called; a new one makes older entries miss


def step_key(model: GPT, cache: KVCache) -> tuple[str, dict[str, Any]]:
    """A digest of everything that changes the compiled code, and those things, readable: the
    weights' content, dtype and shape, the model's architecture and modules (int8 or not), the
    cache's batch width, capacity and dtype, tinyllm's code, torch's version, the CPU and the
    compiler."""
    parts = {
        "format": STEP_FORMAT,
        "weights": weights_digest(model),
        "architecture": {key: getattr(model.cfg, key) for key in ARCH_KEYS},
        "modules": sha256_hex(repr(model)),
        "weights_dtype": str(model.wte.weight.dtype),
        "batch": cache.batch, "capacity": cache.capacity, "cache_dtype": str(cache.k[0].dtype),
        "code": sha256_hex(*(Path(f).read_bytes() for f in (__file__, sys.modules[GPT.__module__].__file__))),
        "torch": torch.__version__,
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sha256_hex(cpu_flags()),
        "compiler": cpp_compiler(),
        "threads": torch.get_num_threads(),  # max-autotune picks its kernels by timing them
    }
    parts = json.loads(json.dumps(parts, default=str))  # as the record reads back
    return sha256_hex(json.dumps(parts, sort_keys=True))[:32], parts


def weights_digest(model: GPT) -> str:
    """sha256 of every tensor of the model (names, dtypes, shapes and bytes); a tensor shared by
    two names (tied weights) is read once."""
    h, seen = hashlib.sha256(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{seen.get(t.data_ptr(), '')}".encode())
        if t.data_ptr() not in seen:
            seen[t.data_ptr()] = name
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform
        return platform.processor()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class StoredStep:
    """One compiled step in a StepStore: KEY.so, the library out of its AOTInductor package, and
    KEY.json, the record of what it was compiled for, its size and its digest. Each is written whole and
    renamed into place, the record last, so a reader sees an entry or none; an entry is checked
    against its record before use, and one that fails (damaged, cut short, put there for another
    model, unloadable) is removed and compiled again. Eviction goes by the record's time of last
    use."""

    def __init__(self, store: StepStore, key: str, parts: dict[str, Any]):
        self.store, self.key, self.parts = store, key, parts
        self.library = store.folder / f"{key}.so"
        self.record = store.folder / f"{key}.json"
        self.temp = store.folder / f"{key}.partial.pt2"  # the compiler's package (torch wants the ending)
        self.temp_library = store.folder / f"{key}.partial.so"

    def load(self) -> Step | None:
        """The stored step, checked and loaded; None when there is none or it fails its checks."""
        if not self.record.exists():
            return None
        start = time.perf_counter()
        try:
            problem = self.problem(json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # AttributeError: not a dict
            problem = f"has an unreadable record ({first_line(e)})"
        runner = None
        if not problem:
            try:
                runner = load_library(self.library)
            except Exception as e:  # torch's loader raises RuntimeError, and worse for a foreign file
                problem = f"does not load ({first_line(e)})"
        if problem:
            print0(f"decode step store: {self.library} {problem}; compiling it again", file=sys.stderr)
            self.remove(temps=False)  # a compile in progress (under the lock) owns those
            return None
        with contextlib.suppress(OSError):
            os.utime(self.record)  # used now
        print0(f"decode step for batch {self.parts['batch']} loaded from {self.library} in "
               f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        return runner

    def problem(self, record: dict[str, Any]) -> str:
        if record.get("key") != self.key or record.get("parts") != self.parts:
            return "was compiled for another model or setup"
        size = self.library.stat().st_size if self.library.exists() else None
        if size != record["bytes"]:
            return f"is {size or 0:,} bytes, not the {record['bytes']:,} its record says"
        if file_digest(self.library) != record["sha256"]:
            return "does not match its record's digest (damaged)"
        return ""

    def keep(self, seconds: float) -> Step:
        """The step just compiled into the package self.temp, its library stored (and older ones
        evicted to make room) unless it alone is over the limit or cannot be written, then used
        for this run only."""
        try:
            unpack_library(self.temp, self.temp_library)
        except (OSError, zipfile.BadZipFile) as e:
            self.remove()
            raise TinyLLMError(f"the compiled step could not be unpacked ({first_line(e)})") from None
        finally:
            self.temp.unlink(missing_ok=True)
        size = self.temp_library.stat().st_size
        if size > self.store.limit:
            runner = load_library(self.temp_library)  # loaded, the file can go
            self.remove()
            print0(f"decode step store: the compiled step ({size / 1e6:,.0f} MB) is over --decode_cache_gb "
                   f"{self.store.limit / 1e9:g}; it is used by this run only (raise --decode_cache_gb to "
                   f"keep it)", file=sys.stderr)
            return runner
        try:
            record = {"key": self.key, "parts": self.parts, "bytes": size,
                      "sha256": file_digest(self.temp_library), "compile_seconds": round(seconds, 1)}
            os.replace(self.temp_library, self.library)
            write_text_atomic(self.record, json.dumps(record, indent=1))
        except OSError as e:
            runner = load_library(self.temp_library if self.temp_library.exists() else self.library)
            self.remove()
            print0(f"decode step store: could not keep the compiled step in {self.store.folder} "
                   f"({first_line(e)}); it is used by this run only", file=sys.stderr)
            return runner
        print0(f"decode step kept as {self.library} ({size / 1e6:,.0f} MB)", file=sys.stderr)
        evict(self.store, self.key)
        return load_library(self.library)

    def remove(self, temps: bool = True) -> None:
        for path in (self.record, self.library, *((self.temp, self.temp_library) if temps else ())):
            with contextlib.suppress(OSError):
                path.unlink()


def evict(store: StepStore, keep: str) -> None:
    """Remove the least recently used stored steps (not `keep`) until the rest fit the limit, and
    what compiles killed halfway left behind."""
    entries = []
    for library in libraries(store.folder):
        record = library.with_suffix(".json")
        try:
            used = (record if record.exists() else library).stat().st_mtime
            entries.append((used, library.stat().st_size, library.stem))
        except OSError:
            continue
    total, removed, freed = sum(size for _, size, _ in entries), 0, 0
    for _, size, key in sorted(entries):
        if total <= store.limit:
            break
        if key != keep and lock_is_free(store.folder / f"{key}.lock"):
            for suffix in (".json", ".so", ".pt2"):
                with contextlib.suppress(OSError):
                    (store.folder / f"{key}{suffix}").unlink()
            total, removed, freed = total - size, removed + 1, freed + size
    for temp in store.folder.glob("*.partial.*"):
        if lock_is_free(store.folder / f"{temp.name.split('.')[0]}.lock"):
            temp.unlink(missing_ok=True)
    if removed:
        print0(f"decode step store: removed {removed} least recently used compiled step"
               f"{'s' if removed > 1 else ''} ({freed / 1e6:,.0f} MB) to stay within --decode_cache_gb "
               f"{store.limit / 1e9:g}", file=sys.stderr)


def libraries(folder: Path) -> list[Path]:
    """The stored steps' libraries in `folder` (not the ones being written), and packages an
    earlier format kept, which no key finds any more but which count against the bound."""
    return [p for p in (*folder.glob("*.so"), *folder.glob("*.pt2")) if ".partial." not in p.name]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes on `path` (flock: released by the system when its holder
    dies), waited for with a line saying so. Where there is no flock (Windows), none: entries
    are still renamed into place whole, so two compiles of one step only cost time."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print0("waiting for another process that is compiling this decode step...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_is_free(path: Path) -> bool:
    """Whether no process holds the lock on `path` (so what it guards may be removed); no file, no
    holder."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def clear_decode_cache(r: Resolved) -> None:
    """--clear_decode_cache: remove every stored step (its library, record, lock and any file
    half written) in cache_dir; a step another process is compiling right now is left to it."""
    folder = Path(r.cfg.cache_dir) / "decode_steps"
    keys: dict[str, list[Path]] = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        keys.setdefault(path.name.split(".")[0], []).append(path)
    removed, freed, busy = 0, 0, 0
    for key, paths in sorted(keys.items()):
        if not lock_is_free(folder / f"{key}.lock"):
            busy += 1
            continue
        for path in paths:
            removed += path.name in (f"{key}.so", f"{key}.pt2")
            freed += path.stat().st_size
            path.unlink()
    left = f"; {busy} being compiled by another process now, left to it" if busy else ""
    print0(f"removed {removed} compiled decode step{'' if removed == 1 else 's'} ({freed / 1e6:,.0f} MB) "
           f"from {folder}{left}")


FROZEN_STEPS: weakref.WeakKeyDictionary[GPT, FrozenStep] = weakref.WeakKeyDictionary()


# ---- --chat: a conversation in the terminal ----------------------------------------------

@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[threading.Event]:
    """While inside, Ctrl-C sets the event it yields instead of raising KeyboardInterrupt (in
    the main thread; elsewhere nothing changes)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:  # a handler not set from Python reads as None: Python's own then
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class ChatSession:
    """One conversation with a model, its KV cache kept across turns: each turn feeds only the
    tokens the cache has not seen (the rendered conversation only grows, so they are what the
    new message added). When the conversation outgrows the context, the oldest turns go (the
    system prompt stays) and the cache starts over."""

    def __init__(self, use: Loaded, system: str = ""):
        self.use, self.tok = use, use.tok
        compiled = decode_compiles(use.cfg, use.device, frozen=True)
        self.model = sampling_copy(use.model, use.cfg, use.device, compiled)
        self.step = decode_step(self.model, compiled, step_store(use.cfg))
        self.template = use.cfg.chat_template or CHATML
        self.system = system
        self.reset()
        prepare_step(self.step, self.cache)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": plain_content(self.system)}] if self.system else []
        self.cache = self.model.new_cache(1, self.use.device, cache_dtype(self.model.wte.weight.dtype,
                                                                           self.use.device))
        self.ids: list[int] = []  # what the cache holds, in order

    def prompt(self, text: str, room: int) -> tuple[list[int], int]:
        """The conversation with `text` as the next user turn, rendered up to the reply, within
        `room` tokens: the oldest turns are dropped until it fits. Returns it and how many
        turns went; the conversation changes only when it is returned."""
        messages = [*self.messages, {"role": "user", "content": plain_content(text)}]
        dropped = 0
        while True:
            ids = chat_prompt(self.tok, self.template, messages)
            first = 1 if messages[0]["role"] == "system" else 0
            if len(ids) <= room or len(messages) - first <= 1:
                break
            del messages[first:first + 2]  # the oldest user turn and its reply
            dropped += 1
        if len(ids) < self.cache.capacity:
            self.messages = messages
        return ids, dropped

    @torch.inference_mode()
    def reply(self, text: str, settings: SampleSettings, generator: torch.Generator,
              on_token: Callable[[torch.Tensor], None] | None = None) -> tuple[str, int]:
        """Answer `text`; returns the reply and how many old turns were dropped to make room.
        Ctrl-C ends the reply early (what was generated stays in the conversation)."""
        capacity = self.cache.capacity
        ids, dropped = self.prompt(text, capacity - min(settings.max_new_tokens, capacity // 2))
        if len(ids) >= capacity:
            raise TinyLLMError(f"that message takes {len(ids)} tokens with the conversation's start, more "
                               f"than the context of {capacity}; send a shorter one, or /reset")
        same = (i for i, (a, b) in enumerate(zip(self.ids, ids)) if a != b)
        common = next(same, min(len(self.ids), len(ids)))  # tokens the cache already holds
        common = min(common, len(ids) - 1)  # at least one new token gives the next logits
        self.cache.seek(common)
        self.ids = ids[:common]
        reply: list[int] = []
        with ctrl_c_stops() as stop:  # a flag, not an exception: it never lands inside native code
            logits = self.feed(ids[common:])
            history = torch.zeros((1, 0), dtype=torch.long, device=self.use.device)
            for _ in range(min(settings.max_new_tokens, capacity - len(ids))):
                if settings.repetition_penalty != 1.0:  # the only reader of the tokens so far
                    history = torch.tensor([ids + reply], device=self.use.device)
                nxt = choose_next(logits, history, settings, generator)  # (1, 1)
                token = int(nxt)
                if token in self.tok.end_ids or stop.is_set():
                    break
                reply.append(token)
                if on_token is not None:
                    on_token(nxt)
                if self.cache.pos >= capacity:
                    break
                logits = self.feed([token])
        answer = self.tok.decode(reply)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, dropped

    def feed(self, new: list[int]) -> torch.Tensor:
        """Run `new` tokens through the model after what the cache holds; the next logits."""
        self.ids += new
        return feed(self.model, torch.tensor([new], device=self.use.device), self.cache, self.step)


def chat_in_terminal(r: Resolved) -> None:
    """--chat: a conversation in the terminal, replies streamed; /reset, /system TEXT, /exit.
    With stdin piped, each line is a message and only the replies are printed, one a line."""
    check_decoding(r.cfg, "--chat keeps a KV cache across turns",
                   "the most tokens of each reply: every reply would be empty")
    use = load_for_use(r)
    if not chat_template_of(use.cfg, use.tok):
        raise TinyLLMError(f"{use.path} is no chat model: it was not trained on conversations and has no "
                           f"chat template; train one (README: Make a chat model) or use --generate_only")
    system = as_trained(use.cfg.system, use.cfg)
    check_known_chars(use.tok, system, "--system")
    session = ChatSession(use, system)
    settings = SampleSettings.from_config(use.cfg)
    generator = torch.Generator(device=use.device).manual_seed(use.cfg.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {use.path} (step {use.step}); {CHAT_COMMANDS}", file=sys.stderr)
    with undecodable_stdin_kept():
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            text = as_trained(line.strip(), use.cfg)
            if text in ("/exit", "/quit"):
                break
            if text.startswith("/") and not text.startswith("//"):
                chat_command(session, text, interactive)
            elif text:
                answer_in_terminal(session, text.removeprefix("/"), settings, generator, interactive)


CHAT_COMMANDS = ("/reset starts over, /system TEXT sets the system prompt (and starts over), /exit or "
                 "Ctrl-D leaves; a message that begins with / is typed as //")


def check_decoding(cfg: Config, cache_use: str, new_tokens_mean: str) -> None:
    """--chat and --serve decode with a KV cache and need replies of a token or more: each
    setting is named only when it is the one that is wrong."""
    problems = []
    if not cfg.kv_cache:
        problems.append(f"{cache_use}: drop --no-kv_cache")
    if cfg.max_new_tokens < 1:
        problems.append(f"--max_new_tokens is {cfg.max_new_tokens}, {new_tokens_mean}; give 1 or more")
    if problems:
        raise TinyLLMError("; ".join(problems))


def as_trained(text: str, cfg: Config) -> str:
    """Text typed or sent to the model as training read its corpus: unless --raw_text, a leading
    byte-order mark dropped and \\r\\n line ends as \\n (the model never saw either, and a
    char-level vocabulary has no token for \\r)."""
    return text if cfg.raw_text else "".join(normalized(iter([text])))


@contextlib.contextmanager
def undecodable_stdin_kept() -> Iterator[None]:
    """While inside, bytes on stdin that are not UTF-8 arrive as lone surrogates (a byte 0xff as
    U+DCFF) instead of raising UnicodeDecodeError from input(), which would end the chat with a
    traceback; check_utf8 then refuses that one message, as an unknown character is refused."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)  # a replaced stdin may have none
    errors = getattr(sys.stdin, "errors", None)
    if reconfigure is None or errors is None:
        yield
        return
    reconfigure(errors="surrogateescape")
    try:
        yield
    finally:
        reconfigure(errors=errors)


def chat_command(session: ChatSession, text: str, interactive: bool) -> None:
    """/reset or /system TEXT; any other /word is no command, and nothing is sent to the model."""
    command, _, rest = text.partition(" ")
    if command not in ("/reset", "/system"):
        print(f"{command} is no command, and nothing was sent: {CHAT_COMMANDS}", file=sys.stderr)
        if not interactive:
            print(flush=True)  # piped: an empty line, as for a refused message, keeps replies in step
        return
    if command == "/system":
        try:
            check_known_chars(session.tok, rest, "/system")
        except TinyLLMError as e:
            print(e, file=sys.stderr)
            return
        session.system = rest.strip()
    session.reset()
    print("(a new conversation)", file=sys.stderr)


def answer_in_terminal(session: ChatSession, text: str, settings: SampleSettings, generator: torch.Generator,
                       interactive: bool) -> None:
    """Send one message and print the reply: streamed in a terminal, one line when piped. A
    message that is refused prints why on stderr (piped: an empty line on stdout)."""
    if interactive:
        print("model> ", end="", flush=True)
    streamer = TextStreamer(session.tok) if interactive else None
    try:
        check_known_chars(session.tok, text, "the message")  # named as typed, not in the rendering
        answer, dropped = session.reply(text, settings, generator, streamer)
    except TinyLLMError as e:
        answer, dropped = "", 0  # piped: an empty line keeps replies in step with messages
        print(f"\n{e}" if interactive else e, file=sys.stderr)
    # piped: one line a reply, its own line breaks written as \n
    print("" if interactive else answer.replace("\\", "\\\\").replace("\n", "\\n"), flush=True)
    if dropped:
        print(f"(the conversation outgrew the context: its oldest {dropped} turn(s) were dropped)",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Serving: an OpenAI-compatible HTTP API and a chat page (--serve)
# ----------------------------------------------------------------------------------------------

MAX_BODY = 1 << 20  # bytes of a request body; a longer one is refused (413) before it is read
MAX_CHOICES = 16  # completions one request may ask for: n times its prompts
MAX_STOPS = 4  # stop strings a request may give, as OpenAI allows
MAX_STOP_CHARS = 256  # characters of one stop string: each is looked for after every token
POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there


class ApiError(Exception):
    """A request the server refuses: an HTTP status and the message of OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """One choice being generated: its prompt, how it is sampled, and the queue its text goes to
    as (choice index, new text, finish reason or None, tokens generated so far). A choice that
    cannot go on finishes as "error" (the text is why) or "shutdown"."""
    index: int
    prompt: list[int]
    settings: SampleSettings  # max_new_tokens: what this choice may generate at most
    generator: torch.Generator
    stop_ids: tuple[int, ...]
    stops: list[str]
    events: queue.SimpleQueue[tuple[int, str, str | None, int]]
    cancelled: threading.Event
    text: GrowingText  # of ids
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the reply already sent


class Engine:
    """Decodes the choices of every client together. Each choice holds a row of one KV cache of
    --serve_batch rows: it is prefilled into a free row, then every decode step advances all the
    rows in use, each at its own position. Rows stay packed at the front (a finished row takes
    the last one's place), so an eager step reads only the rows in use; a compiled one reads all
    of them, to stay one graph. Choices beyond the rows wait in a queue, first come first served.
    `run` decodes in the main thread under --serve (torch's CPU kernels, launched from another
    thread, took far longer per token: README, Performance); the HTTP threads only queue work and
    read events."""

    def __init__(self, use: Loaded):
        self.tok, self.device = use.tok, use.device
        self.compiled = decode_compiles(use.cfg, use.device, frozen=True)
        self.model = sampling_copy(use.model, use.cfg, use.device, self.compiled)
        self.step = decode_step(self.model, self.compiled, step_store(use.cfg))
        self.cache = self.model.new_cache(use.cfg.serve_batch, use.device,
                                          cache_dtype(self.model.wte.weight.dtype, use.device))
        prepare_step(self.step, self.cache)  # before the server listens, not in the first request
        self.rows: list[Completion] = []
        self.waiting: queue.Queue[Completion] = queue.Queue()
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # between submit() and the end of run()
        self.closed = False
        self.thread: threading.Thread | None = None  # when run() is not in the main thread
        self.failure: str | None = None

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def submit(self, choices: list[Completion]) -> None:
        with self.lock:
            if self.closed:
                raise ApiError(503, f"the server cannot generate: {self.failure or 'it is shutting down'}",
                               kind="server_error")
            for c in choices:
                self.waiting.put(c)

    def start(self) -> None:
        """Decode in a thread of its own (tests; --serve decodes in the main thread)."""
        self.thread = threading.Thread(target=self.run, name="tinyllm-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()

    @torch.inference_mode()
    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Decode until stop() or `until()`; then every choice still open is told why it ends."""
        try:
            while not self.stopping.is_set() and not until():
                self.admit()
                if self.rows:
                    self.advance()
        except Exception as e:  # the model failed (out of memory, a kernel): every client is told
            self.failure = first_line(e)
        reason = "error" if self.failure else "shutdown"
        with self.lock:
            self.closed = True
            for c in self.rows:
                c.events.put((c.index, self.failure or "", reason, len(c.ids)))
            while not self.waiting.empty():
                c = self.waiting.get_nowait()
                c.events.put((c.index, self.failure or "", reason, 0))

    def admit(self) -> None:
        """Prefill waiting choices into the free rows; with nothing to decode, wait for one."""
        while len(self.rows) < self.cache.batch:
            try:
                c = self.waiting.get(timeout=POLL_SECONDS) if not self.rows else self.waiting.get_nowait()
            except queue.Empty:
                return
            if c.cancelled.is_set():
                continue
            row = self.cache.rows(len(self.rows), len(self.rows) + 1)
            row.seek(0)
            self.rows.append(c)
            try:
                logits = feed(self.model, torch.tensor([c.prompt], device=self.device), row)
            except Exception as e:  # this prompt failed: the others go on
                self.fail(len(self.rows) - 1, e)
                continue
            self.take_or_fail(len(self.rows) - 1, logits)

    def advance(self) -> None:
        """One decode step over the rows in use: each feeds its last token and samples its next."""
        n = len(self.rows)
        width = self.cache.batch if self.compiled else n
        last = torch.tensor([[c.ids[-1]] for c in self.rows] + [[0]] * (width - n), device=self.device)
        in_use = self.cache.rows(0, n)
        logits = self.step(last, self.cache if width == self.cache.batch else in_use)
        in_use.advance(1)
        for i in reversed(range(n)):  # from the end: a finished row is replaced by the last one
            self.take_or_fail(i, logits[i:i + 1])

    def take_or_fail(self, i: int, logits: torch.Tensor) -> None:
        try:
            self.take(i, logits)
        except Exception as e:  # one choice's sampling or decoding failed: the others go on
            self.fail(i, e)

    def fail(self, i: int, e: Exception) -> None:
        c = self.rows[i]
        print(f"error: a request failed ({first_line(e)}); the server goes on", file=sys.stderr, flush=True)
        c.events.put((c.index, first_line(e), "error", len(c.ids)))
        if self.rows[i] is c:  # unless dropping it was what failed
            self.drop(i)

    def take(self, i: int, logits: torch.Tensor) -> None:
        """Row i's next token from its logits (1, V); send its text; free the row when it is done."""
        c = self.rows[i]
        if c.cancelled.is_set():  # the client left
            self.drop(i)
            return
        history = torch.tensor([c.prompt + c.ids], device=self.device) \
            if c.settings.repetition_penalty != 1.0 else torch.zeros((1, 0), dtype=torch.long)
        token = int(choose_next(logits, history, c.settings, c.generator))
        finish = None
        if token in c.stop_ids:
            finish = "stop"
        else:
            c.ids.append(token)
            if len(c.ids) >= c.settings.max_new_tokens or len(c.prompt) + len(c.ids) >= self.capacity:
                finish = "length"
        if self.send(c, finish):
            self.drop(i)

    def send(self, c: Completion, finish: str | None) -> bool:
        """Queue the text the choice has added since the last event; True when it is finished. Text
        that may be the start of a stop string, or ends inside a UTF-8 character, waits."""
        text = c.text.of(c.ids)
        end = len(text)
        for s in c.stops:
            at = text.find(s, max(0, c.sent - len(s) + 1))
            if at != -1 and at < end:
                end, finish = at, "stop"
        if finish is None:
            if text.endswith("\ufffd"):
                return False
            held = 0  # the longest end of the text that may grow into a stop string
            for s in c.stops:
                longest = min(len(s) - 1, len(text))
                held = next((k for k in range(longest, held, -1) if text.endswith(s[:k])), held)
            end -= held
        if end > c.sent or finish is not None:
            c.events.put((c.index, text[c.sent:end], finish, len(c.ids)))
            c.sent = max(c.sent, end)
        return finish is not None

    def drop(self, i: int) -> None:
        """Free row i: the last row in use moves into it, so the rows in use stay packed."""
        last = len(self.rows) - 1
        if i != last:
            for layer in self.cache.k + self.cache.v:
                layer[i].copy_(layer[last])
            self.cache.pos_t[i] = self.cache.pos_t[last]
            self.rows[i] = self.rows[last]
        self.cache.pos_t[last] = 0  # a free row stays at 0: a compiled step still writes it
        self.rows.pop()


# ---- Requests: OpenAI's fields, checked, to prompts and sampling settings ------------------

# fields accepted only at the value that changes nothing: this server has no tools, penalties
# other than repetition_penalty, or structured output
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
           "best_of": (1,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
           "response_format": ({"type": "text"},)}
OWN_FIELDS = {False: ("prompt", "logprobs", "echo"), True: ("messages", "logprobs", "top_logprobs")}
MAX_LOGPROBS = 20  # alternatives per token a request may ask for


IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")  # no effect on the text
SAMPLING_FIELDS = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
                   "top_p", "top_k", "repetition_penalty", "n", "stop", "seed")


def api_value(body: dict[str, Any], name: str, kind: type, default: Any,
              ok: Callable[[Any], bool] | None = None, need: str = "") -> Any:
    """body[name] (null or absent: default), refused (400) when not of `kind` or not `ok`."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and type(value) is int:
        value = float(value) if abs(value) < 1e300 else math.inf  # float() of a longer one raises
    finite = type(value) is not float or math.isfinite(value)
    if type(value) is not kind or not finite or (ok is not None and not ok(value)):
        raise ApiError(400, f"'{name}' must be {need or kind.__name__}; got {json.dumps(value)[:80]}",
                       param=name)
    return value


def check_fields(body: dict[str, Any], own: tuple[str, ...]) -> None:
    for name, value in body.items():
        if name in own or name in SAMPLING_FIELDS or name in IGNORED or (name in NEUTRAL and value is None):
            continue
        if name not in NEUTRAL:
            raise ApiError(400, f"unrecognized request argument: '{name}'", param=name)
        if value not in NEUTRAL[name]:
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out", param=name)


def sampling_of(body: dict[str, Any], cfg: Config, zero_ok: bool = False) -> SampleSettings:
    """The request's sampling settings; what it leaves out comes from the server's settings.
    max_tokens has no cap of its own: the context is the cap (a reply that reaches its end stops
    there, finish_reason "length"), and --max_new_tokens only the default; 0 (`zero_ok`: a
    completion that echoes its prompt's log-probabilities) generates nothing."""
    least = 0 if zero_ok else 1
    need = f"an integer of at least {least}"
    asked = api_value(body, "max_completion_tokens", int, None, lambda v: v >= least, need)
    asked = api_value(body, "max_tokens", int, asked, lambda v: v >= least, need)
    return SampleSettings(
        cfg.max_new_tokens if asked is None else asked,
        api_value(body, "temperature", float, cfg.temperature, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
        api_value(body, "top_k", int, cfg.top_k, lambda v: v >= 0, "an integer of at least 0"),
        api_value(body, "top_p", float, cfg.top_p, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        api_value(body, "repetition_penalty", float, cfg.repetition_penalty, lambda v: 0.01 <= v <= 100,
                  "a number in [0.01, 100]"))


def logprobs_asked(body: dict[str, Any], chat: bool) -> tuple[int | None, bool]:
    """How many alternatives per token the request wants beside each token's log-probability
    (None: no log-probabilities), and whether the prompt's own come first (completions' echo)."""
    most = f"an integer from 0 to {MAX_LOGPROBS}"
    if chat:
        wanted = api_value(body, "logprobs", bool, False)
        top = api_value(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, most)
        if top and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top if wanted else None), False
    top = None if body.get("logprobs") is False else \
        api_value(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS, most)
    return top, api_value(body, "echo", bool, False)


@torch.no_grad()
def scored_tokens(model: GPT, ids: list[int], first: int, top: int, device: torch.device
                  ) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
    """(token, its log-probability after the tokens before it, the `top` likeliest tokens there
    and theirs) for ids[first:], by the plain forward pass over all of them; the very first
    token of a text has none (None)."""
    out = []
    if len(ids) > 1 and first < len(ids):
        logits = model(torch.tensor([ids[:-1]], device=device))[0][0]
        logp = torch.log_softmax(logits.float(), -1)  # (T - 1, V)
    for t in range(first, len(ids)):
        if t == 0:
            out.append((ids[0], None, []))
            continue
        best = logp[t - 1].topk(top) if top else None
        alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        out.append((ids[t], logp[t - 1, ids[t]].item(), alternatives))
    return out


def completion_logprobs(tok: TextTokenizer, scored: list[tuple[int, float | None, list[tuple[int, float]]]]
                        ) -> dict[str, Any]:
    """/v1/completions' logprobs object: tokens, their log-probabilities, the top alternatives of
    each (null where there are none: the text's first token) and where each token starts in the
    text (its pieces' lengths added up: a token that is part of a character counts its own)."""
    tokens = [tok.decode([i]) for i, _, _ in scored]
    offsets = [0]
    for piece in tokens[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in scored],
            "top_logprobs": [None if lp is None else {tok.decode([a]): v for a, v in alts}
                             for _, lp, alts in scored],
            "text_offset": offsets}


def chat_logprobs(tok: TextTokenizer, scored: list[tuple[int, float | None, list[tuple[int, float]]]]
                  ) -> dict[str, Any]:
    """Chat's logprobs object: each reply token with its log-probability, bytes and top alternatives."""
    def entry(i: int, lp: float) -> dict[str, Any]:
        text = tok.decode([i])
        return {"token": text, "logprob": lp, "bytes": list(text.encode(errors="replace"))}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(a, v) for a, v in alts]}
                        for i, lp, alts in scored], "refusal": None}


def stops_of(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters, or a list of "
                            f"at most {MAX_STOPS} of them", param="stop")
    return [unicode_text(s, "stop") for s in stops]


def unicode_text(text: str, param: str) -> str:
    """The text, refused when JSON's escapes made it something UTF-8 cannot hold (a lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' holds a lone surrogate (\\ud800-\\udfff), which is no text",
                       param=param) from None
    return text


def readable_text(text: str, tok: TextTokenizer, cfg: Config, param: str, name: str) -> str:
    """A text of a request as the model reads it (as_trained: \\r\\n as \\n unless --raw_text),
    refused (400) when it is no text or holds characters a char-level vocabulary lacks. An API
    client cannot train another model: the message says what to take out."""
    text = as_trained(unicode_text(text, param), cfg)
    unknown = tok.unknown_chars(text)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:10])
        raise ApiError(400, f"{name} has {len(unknown)} character(s) that this model cannot read ({shown}; "
                            f"it knows only the characters it was trained on): remove them", param=param)
    return text


def prompts_of(body: dict[str, Any], tok: TextTokenizer, cfg: Config, start_ids: list[int],
               most: int) -> list[list[int]]:
    """/v1/completions' prompt: a text, a list of texts, a list of token ids, or a list of (at
    most `most`) of those."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    is_ids = isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)
    prompts = [prompt] if isinstance(prompt, str) or is_ids else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(400, "'prompt' must be a text, a list of texts or a list of token ids", param="prompt")
    if len(prompts) > most:
        raise ApiError(400, f"{len(prompts)} prompts times n asks for more than {MAX_CHOICES} choices",
                       param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            p = readable_text(p, tok, cfg, "prompt", "the prompt")
            out.append(tok.encode(p) if p else list(start_ids))
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < tok.vocab_size for t in p):
            out.append(list(p))
        else:
            raise ApiError(400, f"'prompt' holds {json.dumps(p)[:60]}: give texts, or token ids under "
                                f"{tok.vocab_size}", param="prompt")
    return out


def message_text(message: Any, i: int) -> tuple[str, str]:
    """(role, text) of messages[i]; the text of content parts is joined."""
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
    role, content = message.get("role"), message.get("content")
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise ApiError(400, f"messages[{i}] has role {json.dumps(role)}; this server takes system, "
                            f"developer, user and assistant", param="messages")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"messages[{i}] has content parts other than text; this model reads text "
                                f"only", param="messages")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param="messages")
    return role, unicode_text(content, "messages")


def chat_prompt_of(body: dict[str, Any], tok: TextTokenizer, cfg: Config, template: str) -> list[int]:
    """The conversation rendered with the model's chat template, up to the reply; a model without
    a template continues the messages' texts, joined by blank lines."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    # each content checked alone: a refusal names the message, not a place in the rendering
    turns = [(role, readable_text(plain_content(text) if template else text, tok, cfg, "messages",
                                  f"messages[{i}]")) for i, (role, text) in enumerate(turns)]
    if not template:
        text = "\n\n".join(text for _, text in turns)
        return tok.encode(text) if text else tok.start_ids()
    return chat_prompt(tok, template, [{"role": role, "content": text} for role, text in turns])


# ---- The HTTP server: routes, streaming, errors --------------------------------------------

@dataclass
class Served:
    """What the HTTP threads share: the engine and the settings of the server."""
    engine: Engine
    cfg: Config
    model_id: str
    template: str
    start_ids: list[int]
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # requests being answered
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self, seconds: float) -> None:
        """Wait (a while at most) for the requests being answered to finish."""
        deadline = time.monotonic() + seconds
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP connection (a thread each). Errors are OpenAI's JSON error objects."""
    protocol_version = "HTTP/1.1"
    server_version = "tinyllm"
    timeout = 60  # seconds a client may stay silent while it sends its request
    served: Served  # set on a subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)

    def do_GET(self) -> None:
        self.respond(self.route_get)

    def do_POST(self) -> None:
        self.respond(self.route_post)

    def respond(self, route: Callable[[], None]) -> None:
        self.unread = self.body_length() or 0  # bytes of the request body not read yet
        if self.unread and self.command != "POST":  # a body nothing here reads: the connection ends
            self.close_connection = True
        try:
            try:
                route()
            except ApiError as e:
                self.refuse(e)
            except TinyLLMError as e:  # a prompt the tokenizer or the template refuses
                self.refuse(ApiError(400, str(e)))
            except OSError:
                raise
            except Exception as e:  # a bug: this client is told, and the server goes on
                print(f"error: {type(e).__name__} ({first_line(e)}) answering {self.requestline[:80]!r}",
                      file=sys.stderr, flush=True)
                self.refuse(ApiError(500, f"the server failed on this request ({type(e).__name__}); it "
                                          f"serves others", kind="server_error"))
        except OSError:  # the client left, or stopped reading for `timeout` seconds
            self.close_connection = True

    def refuse(self, e: ApiError) -> None:
        """Answer with the error. A body left unread would be taken for the next request: the
        connection closes, after what is left of the body (within limits) is read and dropped,
        so that the client is not reset before it reads the answer."""
        if self.unread:
            self.close_connection = True
        self.send_json(e.status, e.body())
        if self.unread:
            self.connection.settimeout(1.0)
            left = min(self.unread, 4 * MAX_BODY)
            while left > 0 and (data := self.rfile.read1(min(left, 1 << 16))):
                left -= len(data)

    def body_length(self) -> int | None:
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):
            return None
        return int(length) if len(length) <= 18 else 1 << 62  # int() refuses 4,300 digits and more

    def handle_expect_100(self) -> bool:
        """A client that waits for leave to send its body hears of a body too big before sending it."""
        if (self.body_length() or 0) > MAX_BODY:
            self.close_connection, self.unread = True, 0
            self.send_json(413, ApiError(413, f"the request body is over {MAX_BODY} bytes").body())
            return False
        return super().handle_expect_100()

    def do_other(self) -> None:
        self.respond(lambda: self.refuse_method())

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_other

    def refuse_method(self) -> None:
        raise ApiError(405, f"{self.command} is not served; use GET for /, /health and /v1/models, POST for "
                            f"/v1/completions and /v1/chat/completions")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors of the HTTP layer itself (a malformed request line, headers too long) as JSON too."""
        self.close_connection = True
        self.send_json(code, ApiError(code, message or http.HTTPStatus(code).phrase).body())

    def route_get(self) -> None:
        path = urllib.parse.unquote(self.path.split("?")[0])
        s = self.served
        if path == "/":
            self.send_body(200, chat_page(), "text/html; charset=utf-8")
        elif path == "/health":
            self.send_json(200, {"status": "ok" if not s.engine.failure else "failed", "model": s.model_id,
                                 # max_tokens: a request's default, where the page's field starts
                                 "context": s.engine.capacity, "max_tokens": s.cfg.max_new_tokens,
                                 "temperature": s.cfg.temperature, "decoding": len(s.engine.rows),
                                 "waiting": s.engine.waiting.qsize()})
        elif path in ("/v1/models", f"/v1/models/{s.model_id}"):
            self.authorize()
            # beside OpenAI's fields, what bounds a request: the context (prompt and reply
            # together), and the max_tokens of a request that gives none
            card = {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "tinyllm",
                    "context_length": s.engine.capacity, "default_max_tokens": s.cfg.max_new_tokens}
            self.send_json(200, card if path != "/v1/models" else {"object": "list", "data": [card]})
        elif path.startswith("/v1/models/"):
            self.authorize()
            raise ApiError(404, f"the model '{path[len('/v1/models/'):]}' does not exist; this server has "
                                f"'{s.model_id}'", code="model_not_found")
        elif path in ("/v1/completions", "/v1/chat/completions"):
            raise ApiError(405, f"{path} takes POST")
        else:
            raise ApiError(404, f"no such path: {path}", code="not_found")

    def route_post(self) -> None:
        path = urllib.parse.unquote(self.path.split("?")[0])
        body = self.read_json()  # first: a body left unread would break the connection
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise ApiError(404 if path not in ("/", "/health", "/v1/models") else 405,
                           f"no POST route: {path}; use /v1/completions or /v1/chat/completions")
        self.authorize()
        self.complete(body, path == "/v1/chat/completions")

    def authorize(self) -> None:
        key = self.served.cfg.api_key
        given = bearer_token(self.headers.get("Authorization", ""))
        # both as the bytes that were sent: headers arrive decoded as Latin-1, argv as UTF-8
        if key and not hmac.compare_digest(given.encode("latin-1", errors="replace"),
                                           key.encode(errors="surrogateescape")):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def read_json(self) -> dict[str, Any]:
        length = self.body_length()
        if length is None:
            self.close_connection = True  # where the body ends is unknown
            raise ApiError(411, "send the request body with a Content-Length header")
        if length > MAX_BODY:
            raise ApiError(413, f"the request body is {length} bytes; this server takes at most {MAX_BODY}")
        raw, self.unread = self.rfile.read(length), 0
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, numbers or nesting too deep
            raise ApiError(400, f"the request body is not valid JSON ({first_line(e)})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def complete(self, body: dict[str, Any], chat: bool) -> None:
        """Check the request, queue its choices, then stream or return what the engine sends."""
        s = self.served
        check_fields(body, OWN_FIELDS[chat])
        model = api_value(body, "model", str, s.model_id)
        if model != s.model_id:
            raise ApiError(404, f"the model '{model}' does not exist; this server has '{s.model_id}'",
                           param="model", code="model_not_found")
        stream = api_value(body, "stream", bool, False)
        options = api_value(body, "stream_options", dict, {})
        usage_chunk = api_value(options, "include_usage", bool, False)
        top, echo = logprobs_asked(body, chat)
        if stream and (top is not None or echo):
            raise ApiError(400, "log-probabilities and echo come with whole responses; leave out 'stream'",
                           param="stream")
        settings = sampling_of(body, s.cfg, zero_ok=not chat)
        n = api_value(body, "n", int, 1, lambda v: 1 <= v <= MAX_CHOICES,
                      f"an integer from 1 to {MAX_CHOICES}")
        seed = api_value(body, "seed", int, None, lambda v: -2 ** 63 <= v < 2 ** 64, "an integer of 64 bits")
        stops = stops_of(body)
        prompts = [chat_prompt_of(body, s.engine.tok, s.cfg, s.template)] if chat \
            else prompts_of(body, s.engine.tok, s.cfg, s.start_ids, MAX_CHOICES // n)
        longest = max(len(p) for p in prompts)
        if longest >= s.engine.capacity:
            raise ApiError(400, f"the prompt is {longest} tokens; this model's context is "
                                f"{s.engine.capacity}, and the reply needs room too: shorten it (nothing "
                                f"is cut)",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        tok = s.engine.tok
        stop_ids = tuple(tok.end_ids)  # what ends a reply, chat or not: the rule of every mode
        events: queue.SimpleQueue[tuple[int, str, str | None, int]] = queue.SimpleQueue()
        cancelled = threading.Event()
        choices = [Completion(i, prompts[i // n], settings, new_generator(seed, i, s.engine.device), stop_ids,
                              stops, events, cancelled, GrowingText(tok, prompts[i // n]))
                   for i in range(len(prompts) * n)]
        reply = Reply(chat, f"{'chatcmpl' if chat else 'cmpl'}-{os.urandom(12).hex()}", model, len(choices),
                      sum(len(p) for p in prompts))
        with s.lock:  # counted first: a shutdown in between still waits for this reply
            s.active += 1
        try:
            if settings.max_new_tokens:
                s.engine.submit(choices)
            else:  # nothing to generate (the prompt's scores alone): done at once
                for c in choices:
                    events.put((c.index, "", "length", 0))
            if stream:
                self.stream(reply, events, cancelled, usage_chunk)
                return
            answer = reply.whole(self.collect(events, cancelled, len(choices)))
            if top is not None or echo:
                self.add_logprobs(answer, choices, top, echo, chat)
            self.send_json(200, answer)
        finally:
            cancelled.set()  # whatever ended this request, its rows are freed
            with s.lock:
                s.active -= 1

    def add_logprobs(self, answer: dict[str, Any], choices: list[Completion], top: int | None, echo: bool,
                     chat: bool) -> None:
        """Each choice's log-probabilities (and, echoed, its prompt's text and scores first), from
        one plain forward pass over prompt and reply with the weights that generated it."""
        engine = self.served.engine
        for out, c in zip(answer["choices"], choices):
            scored = scored_tokens(engine.model, c.prompt + c.ids, 0 if echo else len(c.prompt), top or 0,
                                   engine.device)
            if chat:
                out["logprobs"] = chat_logprobs(engine.tok, scored)
                continue
            if echo:
                out["text"] = engine.tok.decode(c.prompt) + out["text"]
            if top is not None:
                out["logprobs"] = completion_logprobs(engine.tok, scored)

    def collect(self, events: queue.SimpleQueue[tuple[int, str, str | None, int]], cancelled: threading.Event,
                count: int) -> Iterator[tuple[int, str, str | None, int]]:
        """The engine's events until every choice is finished; a client that leaves cancels them."""
        finished, checked = 0, time.monotonic()
        while finished < count:
            if time.monotonic() - checked > POLL_SECONDS:  # a reply not streamed writes nothing till the end
                checked = time.monotonic()
                if client_gone(self.connection):
                    cancelled.set()
                    raise ConnectionResetError("the client left")
            try:
                event = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if event[2] == "error":
                raise ApiError(500, f"generation failed: {event[1]}", kind="server_error")
            if event[2] == "shutdown":
                raise ApiError(503, "the server is shutting down", kind="server_error")
            finished += event[2] is not None
            yield event

    def stream(self, reply: Reply, events: queue.SimpleQueue[tuple[int, str, str | None, int]],
               cancelled: threading.Event, usage_chunk: bool) -> None:
        """Server-sent events in OpenAI's chunk format, each flushed as it is made; the response
        ends with the connection (no length is known in advance)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in reply.opening():
                self.send_event(chunk)
            for event in self.collect(events, cancelled, reply.count):
                self.send_event(reply.chunk(event))
            if usage_chunk:
                self.send_event(reply.usage_chunk())
            self.wfile.write(b"data: [DONE]\n\n")
        except ApiError as e:  # the status line is sent: the error travels as an event
            self.send_event(e.body())
        except OSError:  # the client left: its rows are freed
            cancelled.set()

    def send_event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json_bytes(payload) + b"\n\n")
        self.wfile.flush()

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        self.send_body(status, json_bytes(payload), "application/json")

    def send_body(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # an answer to HEAD has headers only
            self.wfile.write(data)


def bearer_token(header: str) -> str:
    """The token of an 'Authorization: Bearer TOKEN' header, or "" for another scheme; the scheme's
    name is case-insensitive (RFC 7235: 'bearer KEY' is the same header)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def json_bytes(payload: dict[str, Any]) -> bytes:
    """UTF-8 JSON; a lone surrogate echoed from a request becomes '?' instead of failing."""
    return json.dumps(payload, ensure_ascii=False).encode(errors="replace")


def new_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    """The sampler of choice `index`: seeded from the request's seed (the same seed, the same
    text), else from the operating system."""
    generator = torch.Generator(device=device)
    return generator.manual_seed((seed + index) % 2 ** 64) if seed is not None else generator.manual_seed(
        int.from_bytes(os.urandom(8), "little") >> 1)


def client_gone(sock: Any) -> bool:
    """True when the client closed its side of the connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@dataclass
class Reply:
    """The response to one request in OpenAI's shapes, whole or as stream chunks."""
    chat: bool
    id: str
    model: str
    count: int  # choices
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))
    tokens: dict[int, int] = field(default_factory=dict)  # generated tokens per choice

    def head(self, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict[str, int]:
        done = sum(self.tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def opening(self) -> list[dict[str, Any]]:
        """A chat stream first names the role of every choice, as OpenAI's does."""
        return [{**self.head(True), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
                for i in range(self.count)] if self.chat else []

    def chunk(self, event: tuple[int, str, str | None, int]) -> dict[str, Any]:
        index, text, finish, tokens = event
        self.tokens[index] = tokens
        delta = ({"content": text} if text or finish is None else {}) if self.chat else None
        choice = {"index": index, "delta": delta} if self.chat else {"index": index, "text": text}
        return {**self.head(True), "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.head(True), "choices": [], "usage": self.usage()}

    def whole(self, events: Iterator[tuple[int, str, str | None, int]]) -> dict[str, Any]:
        texts, finishes = [""] * self.count, [""] * self.count
        for index, text, finish, tokens in events:
            texts[index] += text
            finishes[index] = finish or finishes[index]
            self.tokens[index] = tokens
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}} if self.chat
                   else {"index": i, "text": texts[i]} for i in range(self.count)]
        return {**self.head(False), "choices": [{**c, "logprobs": None, "finish_reason": f}
                                                for c, f in zip(choices, finishes)], "usage": self.usage()}


class ApiServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a connection left open never holds up the shutdown
    # connections waiting to be accepted: beyond this, a burst of clients has its connections
    # dropped, and their systems retry only after a second
    request_queue_size = 128


class ApiServer6(ApiServer):
    address_family = socket.AF_INET6


@dataclass
class Listening:
    """A server answering in threads of its own: its address, and how to stop it."""
    url: str
    http: ApiServer
    served: Served

    def stop(self) -> None:
        """Stop taking requests, end the ones in flight (a stream ends, a waiting request gets a
        503), and close the socket."""
        self.http.shutdown()
        self.served.engine.stop()
        self.served.settle(5.0)  # each hears that the server is shutting down
        self.http.server_close()


def start_server(use: Loaded, decode_here: bool = False) -> Listening:
    """Listen on --host:--port and answer from threads. The model decodes in a thread of its own,
    or with `decode_here` wherever the caller then calls served.engine.run()."""
    cfg, path = use.cfg, use.path
    chat_page()  # the page is part of the server: refused now when missing, not at the first visit
    served = Served(Engine(use), cfg, path.parent.resolve().name, chat_template_of(cfg, use.tok),
                    use.start_ids or use.tok.start_ids())
    handler = type("Handler", (ApiHandler,), {"served": served})
    try:
        server = (ApiServer6 if ":" in cfg.host else ApiServer)((cfg.host, cfg.port), handler)
    except OSError as e:
        raise TinyLLMError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port "
                           f"or --host") from None
    if not decode_here:
        served.engine.start()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_SECONDS},
                     name="tinyllm-http", daemon=True).start()
    host, port = server.server_address[:2]
    return Listening(f"http://{f'[{host}]' if ':' in host else host}:{port}", server, served)


def serve(r: Resolved) -> None:
    """--serve: the model behind an OpenAI-compatible API and a chat page, until SIGINT/SIGTERM."""
    check_decoding(r.cfg, "--serve decodes every request with a KV cache",
                   "the max_tokens of a request that gives none: its reply would be empty")
    use = load_for_use(r)
    if use.cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {use.cfg.host} makes the server reachable from other machines"
              f"{'' if use.cfg.api_key else ', and it has no --api_key'}", file=sys.stderr)
    with SignalCatcher() as catcher:
        server = start_server(use, decode_here=True)
        print(f"serving {use.path} (step {use.step}) as '{server.served.model_id}' at {server.url}/ (chat "
              f"page there, API under /v1); Ctrl-C stops", file=sys.stderr, flush=True)
        server.served.engine.run(until=lambda: catcher.signum != 0)
    server.stop()
    if server.served.engine.failure:  # a status a supervisor can restart on
        raise TinyLLMError(f"generation failed ({server.served.engine.failure}); the server stopped")
    print("the server stopped", file=sys.stderr, flush=True)


@functools.cache
def chat_page() -> bytes:
    """The chat page served at /: tinyllm_chat.html, beside this file."""
    path = Path(__file__).with_name("tinyllm_chat.html")
    try:
        return path.read_bytes()
    except OSError:
        raise TinyLLMError(f"--serve's chat page is {path.name}, which is not beside {Path(__file__).name}; "
                           f"copy it there from tinyllm") from None


MODES.implement("chat", run=chat_in_terminal)
MODES.implement("serve", run=serve)
MODES.implement("clear_decode_cache", run=clear_decode_cache)
STEP_COMPILERS.implement("aot", FrozenStep)
