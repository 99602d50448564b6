"""Decide a change by evidence: N seeds of two settings, interleaved on this machine, each run for
the same wall-clock budget; then the mean final val loss and bits per byte of each, their spread,
and an exact permutation p-value for the difference. A change belongs in a recipe only at
p < 0.01 over at least 5 seeds (with 5 against 5 seeds that means every run of one setting beats
every run of the other: the smallest two-sided p is 2/252). With --pair the seed-by-seed
differences give a paired p as well, whose smallest is 2/2**N: 8 seeds that all go one way give
2/256, under 0.01.

    python docs/seeds.py --seeds 5 --budget 90 --common "--config config/shakespeare_char.json" \\
        --a "" --b "--mlp relu2" --out /tmp/seeds

(A setting that is one flag is given as --b=--unet_skips, so that it is not taken for an option.)

Each run is `python train_tinyllm.py COMMON SETTING --seed S --time_budget_s BUDGET --max_steps
10**9 --out_dir OUT/NAME-S`; seed by seed the order of A and B alternates (A B, B A, ...), so that
a machine that speeds up or slows down over the session favours neither. With --pair, A and B of
a seed run at the same time, each on a core of its own with one thread (the cores swap seed by
seed): twice the runs per hour, both under the same machine state; the budget is then one core's.
Runs already done (a metrics.jsonl with a final evaluation) are read, not run again. A summary is
printed and written to OUT/summary.json."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

CARD = Path(__file__).resolve().parent.parent / "train_tinyllm.py"


def run_command(common: str, setting: str, seed: int, budget: float, out: Path) -> list[str]:
    return [sys.executable, str(CARD), *shlex.split(common), *shlex.split(setting), "--seed", str(seed),
            "--time_budget_s", str(budget), "--max_steps", str(10**9), "--sample_interval", "0",
            "--out_dir", str(out)]


def launch(command: list[str], core: int | None) -> subprocess.Popen:
    """Start a run, quiet; with a core, pinned to it with one thread."""
    if core is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))


def final_figures(out: Path) -> dict[str, float] | None:
    """The last evaluation of a finished run (val_loss, and val_bpb where the run logs it)."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return None
    evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "val_loss" in r]
    return {k: evals[-1][k] for k in ("val_loss", "val_bpb", "step") if k in evals[-1]} if evals else None


def permutation_p(a: list[float], b: list[float], samples: int = 200_000) -> float:
    """Two-sided p-value of the difference of means under relabelling: exact (every split of the
    pooled runs) up to 10 + 10 runs, else from `samples` random splits with a fixed seed."""
    pooled, n = a + b, len(a)
    observed = abs(statistics.fmean(a) - statistics.fmean(b)) - 1e-12  # ties count as extreme
    total = sum(pooled)

    def extreme(first: tuple[float, ...]) -> bool:
        s = sum(first)
        return abs(s / n - (total - s) / len(b)) >= observed
    if len(pooled) <= 20:
        splits = list(itertools.combinations(pooled, n))
        return sum(map(extreme, splits)) / len(splits)
    rng = random.Random(0)
    return (1 + sum(extreme(tuple(rng.sample(pooled, n))) for _ in range(samples))) / (samples + 1)


def paired_p(differences: list[float], samples: int = 200_000) -> float:
    """Two-sided p-value of a mean paired difference under random signs (each pair's two runs
    exchangeable): exact over every assignment of signs up to 16 pairs (the smallest is then
    2 / 2**n), else from `samples` random assignments with a fixed seed."""
    observed = abs(statistics.fmean(differences)) - 1e-12

    def extreme(flip: tuple[int, ...]) -> bool:
        return abs(statistics.fmean(s * d for s, d in zip(flip, differences))) >= observed
    if len(differences) <= 16:
        signs = list(itertools.product((1, -1), repeat=len(differences)))
        return sum(map(extreme, signs)) / len(signs)
    rng = random.Random(0)
    draws = (tuple(rng.choice((1, -1)) for _ in differences) for _ in range(samples))
    return (1 + sum(map(extreme, draws))) / (samples + 1)


def summary(a: list[float], b: list[float]) -> dict[str, float]:
    """Means, spreads and the p-value of B against A (negative difference: B is lower); and the
    same for the seed-by-seed differences B - A, which --pair runs side by side under one machine
    state (what that state adds to both cancels)."""
    def spread(x: list[float]) -> float:
        return statistics.stdev(x) if len(x) > 1 else 0.0
    pairs = [y - x for x, y in zip(a, b)]
    return {"mean_a": statistics.fmean(a), "std_a": spread(a), "min_a": min(a), "max_a": max(a),
            "mean_b": statistics.fmean(b), "std_b": spread(b), "min_b": min(b), "max_b": max(b),
            "difference": statistics.fmean(b) - statistics.fmean(a), "p": permutation_p(a, b),
            "std_paired": spread(pairs), "b_lower": sum(d < 0 for d in pairs), "p_paired": paired_p(pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of training per run")
    parser.add_argument("--common", default="", help="flags both settings share")
    parser.add_argument("--a", default="", help="setting A's own flags (the baseline)")
    parser.add_argument("--b", default="", help="setting B's own flags (the change)")
    parser.add_argument("--first_seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=Path("out/seeds"))
    parser.add_argument("--pair", action="store_true",
                        help="run A and B of a seed at once, each on its own core with one thread")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (a spread needs two runs)")
    cores = sorted(os.sched_getaffinity(0))
    if args.pair and len(cores) < 2:
        parser.error("--pair needs two cores")
    results: dict[str, dict[str, list[float]]] = {"a": {}, "b": {}}
    for i in range(args.seeds):
        seed = args.first_seed + i
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        runs = {name: args.out / f"{name}-{seed}" for name in order}
        todo = [name for name in order if final_figures(runs[name]) is None]
        for batch in ([todo] if args.pair else [[name] for name in todo]):
            started = []
            for core, name in enumerate(batch):
                command = run_command(args.common, getattr(args, name), seed, args.budget, runs[name])
                print("running:", shlex.join(command), flush=True)
                started.append((name, command, launch(command, cores[core] if args.pair else None)))
            for name, command, process in started:
                if process.wait() != 0:
                    print(f"error: the run {runs[name]} failed: {shlex.join(command)}", file=sys.stderr)
                    return 1
        for name in order:
            figures = final_figures(runs[name])
            if figures is None:
                print(f"error: the run {runs[name]} logged no evaluation; give --eval_interval",
                      file=sys.stderr)
                return 1
            for key, value in figures.items():
                results[name].setdefault(key, []).append(value)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in figures.items()), flush=True)
    report = {"a": args.a, "b": args.b, "common": args.common, "seeds": args.seeds, "budget_s": args.budget,
              "pair": args.pair, "runs": results}
    for key in ("val_loss", "val_bpb"):
        if key in results["a"] and key in results["b"]:
            report[key] = s = summary(results["a"][key], results["b"][key])
            print(f"{key}: A {s['mean_a']:.4f} ± {s['std_a']:.4f} ({s['min_a']:.4f}-{s['max_a']:.4f}), "
                  f"B {s['mean_b']:.4f} ± {s['std_b']:.4f} ({s['min_b']:.4f}-{s['max_b']:.4f}); "
                  f"B - A {s['difference']:+.4f}, p = {s['p']:.4f} over {args.seeds} seeds each; "
                  f"seed by seed B - A ± {s['std_paired']:.4f}, B lower in {s['b_lower']}, "
                  f"paired p = {s['p_paired']:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
