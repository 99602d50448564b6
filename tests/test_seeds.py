"""docs/seeds.py: the harness that decides a change by seeds and an exact permutation p-value."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "seeds.py"
spec = importlib.util.spec_from_file_location("seeds", SCRIPT)
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def test_the_permutation_p_value_is_exact():
    assert seeds.permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)  # the split and its mirror
    assert seeds.permutation_p([1.0] * 5, [1.0] * 5) == 1.0
    separated = seeds.permutation_p([1.50, 1.51, 1.52, 1.53, 1.54], [1.40, 1.41, 1.42, 1.43, 1.44])
    assert separated == pytest.approx(2 / 252) and separated < 0.01  # 5 seeds can reach p < 0.01
    overlapping = seeds.permutation_p([1.50, 1.41, 1.52, 1.53, 1.54], [1.40, 1.51, 1.42, 1.43, 1.44])
    assert overlapping > 0.01
    s = seeds.summary([1.5, 1.7], [1.2, 1.4])
    assert s["difference"] == pytest.approx(-0.3) and s["std_a"] == pytest.approx(0.1414, abs=1e-4)
    assert s["b_lower"] == 2 and s["std_paired"] == pytest.approx(0.0, abs=1e-12)


def test_the_paired_p_value_flips_the_signs_of_seed_by_seed_differences():
    assert seeds.paired_p([-0.1, -0.2, -0.1, -0.3, -0.2]) == pytest.approx(2 / 32)  # all lower: the least p
    assert seeds.paired_p([-0.1] * 8) == pytest.approx(2 / 256) and 2 / 256 < 0.01  # 8 pairs reach p < 0.01
    assert seeds.paired_p([-0.1, 0.1, -0.1, 0.1]) == 1.0
    assert seeds.paired_p([-0.1] * 30, samples=2000) == pytest.approx(1 / 2001)  # sampled past 16 pairs
    # runs whose level moves with the machine: unpaired the shift hides B's edge, paired it does not
    level = [1.80, 1.90, 1.70, 1.85, 1.75, 1.95, 1.72, 1.88]
    a, b = level, [x - 0.01 for x in level]
    assert seeds.permutation_p(a, b) > 0.5 and seeds.paired_p([y - x for x, y in zip(a, b)]) < 0.01


def test_a_finished_run_is_read_from_its_last_evaluation(tmp_path):
    assert seeds.final_figures(tmp_path) is None
    rows = [{"step": 10, "val_loss": 2.0, "val_bpb": 3.0}, {"step": 11, "loss": 1.9},
            {"step": 20, "val_loss": 1.5, "val_bpb": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert seeds.final_figures(tmp_path) == {"val_loss": 1.5, "val_bpb": 2.5, "step": 20}
    command = seeds.run_command("--config config/x.json", "--mlp relu2", 7, 90, tmp_path)
    assert command[-10:] == ["--seed", "7", "--time_budget_s", "90", "--max_steps", str(10**9),
                             "--sample_interval", "0", "--out_dir", str(tmp_path)][-10:]
    assert "--mlp" in command and "relu2" in command


@pytest.mark.slow
def test_two_seeds_of_a_pair_run_end_to_end(tmp_path):
    """--pair: A and B of each seed at once on a core each; the summary holds every run, and a
    second call reads the finished runs instead of running them again."""
    from conftest import TINY, make_corpus
    corpus = make_corpus(tmp_path / "corpus.txt")
    common = " ".join([*TINY, "--data_path", str(corpus), "--cache_dir", str(tmp_path / "cache")])
    argv = ["--seeds", "2", "--budget", "1", "--pair", "--common", common, "--a", "", "--b", "--mlp relu2",
            "--out", str(tmp_path / "seeds")]
    assert seeds.main(argv) == 0
    report = json.loads((tmp_path / "seeds" / "summary.json").read_text())
    runs = report["runs"]
    assert report["pair"] and len(runs["a"]["val_loss"]) == len(runs["b"]["val_loss"]) == 2
    assert 0 < report["val_loss"]["p"] <= 1
    assert json.loads((tmp_path / "seeds" / "b-1338" / "effective_config.json").read_text())["mlp"] == "relu2"
    metrics = tmp_path / "seeds" / "a-1337" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime
    assert seeds.main(argv) == 0 and metrics.stat().st_mtime == stamp
