"""The data behind README's "Preference tuning and RL" figures: python docs/tune_demo.py FOLDER writes
a base corpus (short prompts, replies in lower and upper case), preference pairs that prefer the
upper-case reply, GRPO prompts, and a reward function (the share of upper-case characters)."""

import json
import random
import sys
from pathlib import Path

WORDS = ["cat", "dog", "sun", "mat", "red", "big", "run", "far", "sky", "sea"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [f"{words(rng, 3)}: {words(rng, 2).upper() if i % 2 else words(rng, 2)}" for i in range(600)]
    (folder / "base.txt").write_text("\n".join(lines) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(300):
            prompt, reply = words(rng, 3) + ":", " " + words(rng, 2)
            f.write(json.dumps({"prompt": prompt, "chosen": reply.upper(), "rejected": reply}) + "\n")
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"prompt": words(rng, 3) + ":"}) + "\n")
    (folder / "rewards.py").write_text(
        "def score(prompt, completion, record):\n"
        "    return sum(c.isupper() for c in completion) / max(1, len(completion))\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/tune_demo"))
