"""tools/sweep.py: the grid, the report, and a real (tiny) sweep."""

import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "sweep.py")
SMOKE = os.path.join(ROOT, "configs", "smoke.gin")

_spec = importlib.util.spec_from_file_location("sweep_tool", TOOL)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def run(*args, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT}
    # conftest's XLA_FLAGS (no LLVM optimization) would double the cost of
    # the real runs: they run more than they compile.
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, env=env
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


# 1. The points --------------------------------------------------------------


def test_grid_product_and_random_subset():
    axes = sweep.parse_grid(
        [
            "build_optimizer.learning_rate=[2.0, 4.0]",
            "train_and_evaluate.batch_size = [1024, 2048, 4096]",
        ]
    )
    assert axes == [
        ("build_optimizer.learning_rate", [2.0, 4.0]),
        ("train_and_evaluate.batch_size", [1024, 2048, 4096]),
    ]
    points = sweep.expand(axes)
    assert [i for i, _ in points] == list(range(6))
    values = {tuple(p.values()) for _, p in points}
    assert len(values) == 6
    assert points[1][1] == {
        "build_optimizer.learning_rate": 2.0,
        "train_and_evaluate.batch_size": 2048,
    }
    subset = sweep.expand(axes, num_random=4, search_seed=3)
    assert len(subset) == 4 == len({i for i, _ in subset})
    for i, point in subset:  # each keeps its index in the full product
        assert points[i][1] == point
    assert sweep.expand(axes, 4, 3) == subset  # reproducible
    draws = {tuple(i for i, _ in sweep.expand(axes, 4, s)) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    assert sweep.expand(axes, 10, 0) == points  # more than there are: all
    for bad in ("lr", "a.b=3", "a.b=[]", "a.b=[1, oops]"):
        with pytest.raises(ValueError):
            sweep.parse_grid([bad])
    with pytest.raises(ValueError, match="twice"):
        sweep.parse_grid(["a.b=[1]", "a.b=[2]"])


def test_plan_runs_bindings_seeds_and_model_dirs(tmp_path):
    axes = [("config", ["x/a.gin", "y/b.gin"])] + sweep.parse_grid(
        ["build_model.model=['tanh_cnn', 'wrn']"]
    )
    runs = sweep.plan_runs(
        str(tmp_path), ["base.gin"], axes, ["run.export=False"], 10000, [0, 1]
    )
    assert len(runs) == 8 == len({r.model_dir for r in runs})
    first = runs[0]
    assert first.configs == [
        os.path.abspath(p) for p in ("base.gin", "x/a.gin")
    ]
    assert first.bindings == [
        "build_data.validation_size = 10000",
        "run.export=False",
        "build_model.model = 'tanh_cnn'",
        "train_and_evaluate.seed = 0",
    ]
    assert first.name == "00_a_model-tanh_cnn_seed-0"
    assert runs[7].name == "03_b_model-wrn_seed-1"
    # --validation_size=0: nothing bound, the runs read the test set.
    runs = sweep.plan_runs(str(tmp_path), ["base.gin"], axes[1:], [], 0)
    assert [r.bindings for r in runs] == [
        ["build_model.model = 'tanh_cnn'"],
        ["build_model.model = 'wrn'"],
    ]


def test_a_model_dir_of_other_settings_is_not_touched(tmp_path):
    config = tmp_path / "base.gin"
    config.write_text("train_and_evaluate.epochs = 15\n")
    (run,) = sweep.plan_runs(
        str(tmp_path / "sweep"), [str(config)], [], [], 10000
    )
    # A directory with files but no sweep_point.json (a run made by hand).
    os.makedirs(run.model_dir)
    (tmp_path / "sweep" / run.name / "result.json").write_text("{}")
    status, message = sweep.run_one(run)
    assert status == "failed" and "no sweep_point.json" in message
    # A finished run of this config; then the config is edited.
    os.remove(os.path.join(run.model_dir, "result.json"))
    with open(os.path.join(run.model_dir, "sweep_point.json"), "w") as f:
        json.dump(run.record(), f)
    config.write_text("train_and_evaluate.epochs = 30\n")
    status, message = sweep.run_one(run)
    assert status == "failed" and "edited since" in message
    assert os.listdir(run.model_dir) == ["sweep_point.json"]  # untouched


def test_test_set_warning_and_dry_list(tmp_path):
    out = run(
        f"--config={SMOKE}",
        "--grid=build_optimizer.learning_rate=[1.0, 2.0]",
        f"--sweep_dir={tmp_path / 's'}",
        "--validation_size=0",
        "--dry_list",
    ).stdout
    assert "WARNING" in out and "TEST set" in out
    assert "2 runs." in out and "build_data.validation_size" not in out
    assert not (tmp_path / "s").exists()  # nothing run, nothing written
    out = run(
        f"--config={SMOKE}",
        f"--sweep_dir={tmp_path / 's'}",
        "--dry_list",
    ).stdout
    assert "WARNING" not in out and "build_data.validation_size = 10000" in out


# 2. The report of finished runs ---------------------------------------------


def fake_run(sweep_dir, name, lr, seed, accuracy, epsilon, split="validation"):
    model_dir = os.path.join(sweep_dir, name)
    os.makedirs(model_dir)
    point = {"build_optimizer.learning_rate": repr(lr)}
    with open(os.path.join(model_dir, "sweep_point.json"), "w") as f:
        json.dump({"point": point, "seed": seed}, f)
    result = {
        f"{split}_accuracy": accuracy,
        "epsilon": epsilon,
        "delta": 1e-5,
        "noise_multiplier": 1.5,
        "steps": 100,
        "batch_size": 1024,
        "num_examples": 50000,
        "seconds": 60.0,
    }
    with open(os.path.join(model_dir, "result.json"), "w") as f:
        json.dump(result, f)


def test_report_only_sorts_aggregates_and_plots(tmp_path):
    sweep_dir = str(tmp_path)
    seeded = {0.5: [0.5, 0.6, 0.7], 1.0: [0.8, 0.9], 2.0: [0.75]}
    for i, (lr, accuracies) in enumerate(seeded.items()):
        for seed, accuracy in enumerate(accuracies):
            name = f"{i:02d}_lr-{lr}_seed-{seed}"
            fake_run(sweep_dir, name, lr, seed, accuracy, 2.0 + i)
    os.makedirs(os.path.join(sweep_dir, "03_unfinished"))  # no result.json
    out = run(f"--sweep_dir={sweep_dir}", "--report_only").stdout

    with open(os.path.join(sweep_dir, "results.md")) as f:
        table = f.read()
    assert table in out
    lines = table.strip().splitlines()
    assert "validation accuracy (mean ± std, runs)" in lines[0]
    assert "build_optimizer.learning_rate" in lines[0]
    rows = lines[2:]
    assert len(rows) == 3  # one per point; the unfinished run is left out
    # Sorted by mean accuracy: 0.85 (lr 1.0), 0.75 (lr 2.0), 0.6 (lr 0.5).
    assert [r.split("|")[1].strip() for r in rows] == ["1.0", "2.0", "0.5"]
    assert "0.8500 ± 0.0707 (2)" in rows[0]
    assert "0.6000 ± 0.1000 (3)" in rows[2]

    with open(os.path.join(sweep_dir, "results.csv")) as f:
        records = list(csv.DictReader(f))
    assert [r["build_optimizer.learning_rate"] for r in records] == [
        "1.0",
        "2.0",
        "0.5",
    ]
    for record in records:
        accuracies = seeded[float(record["build_optimizer.learning_rate"])]
        assert float(record["accuracy"]) == pytest.approx(
            statistics.fmean(accuracies)
        )
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        assert float(record["accuracy_std"]) == pytest.approx(std)
        assert int(record["runs"]) == len(accuracies)
        assert record["split"] == "validation"
    assert [float(r["epsilon"]) for r in records] == [3.0, 4.0, 2.0]
    assert {r["steps"] for r in records} == {"100"}  # not "100.0"

    png = os.path.join(sweep_dir, "accuracy_vs_epsilon.png")
    assert os.path.getsize(png) > 10_000


def test_read_result_without_sweep_point_and_test_split(tmp_path):
    fake_run(str(tmp_path), "07_mine_seed-3", 1.0, 3, 0.9, 1.0, split="test")
    os.remove(tmp_path / "07_mine_seed-3" / "sweep_point.json")
    record = sweep.read_result(str(tmp_path / "07_mine_seed-3"))
    assert record["point"] == {"run": "07_mine"} and record["seed"] == 3
    assert record["split"] == "test" and record["accuracy"] == 0.9
    rows = sweep.aggregate([record])
    assert sweep.accuracy_label(rows) == "test accuracy"
    assert "± " not in sweep.markdown_table(rows)  # one run: no std


# 3. and 4. A real sweep: two tiny runs, two that gin rejects ---------------

# smoke.gin made tiny: 5000 training examples (55000 held out), B = 2048,
# 2 steps, a fixed sigma (no calibration), RDP; no SavedModel.
TINY = [
    "train_and_evaluate.batch_size=2048",
    "build_optimizer.noise_multiplier=1.0",
    "build_optimizer.target_epsilon=None",
    'build_optimizer.accountant="rdp"',
    "run.export=False",
    "run.verbose=0",
]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """Runs the sweep twice; returns (sweep_dir, first, second run)."""
    tmp = tmp_path_factory.mktemp("sweep")
    typo = tmp / "typo.gin"  # an axis config that gin rejects
    typo.write_text("train_and_evaluate.batch_sise = 2048\n")
    plain = tmp / "plain.gin"
    plain.write_text("build_optimizer.momentum = 0.9\n")
    sweep_dir = tmp / "runs"
    args = [
        f"--config={SMOKE}",
        f"--axis_configs={typo},{plain}",  # the failing points come first
        "--grid=build_optimizer.learning_rate=[1.0, 2.0]",
        "--validation_size=55000",
        f"--sweep_dir={sweep_dir}",
        *(f"--gin_bindings={b}" for b in TINY),
    ]
    first = run(*args, check=False)
    second = run(*args, check=False)
    return sweep_dir, first, second


GOOD = ["02_plain_learning_rate-1.0", "03_plain_learning_rate-2.0"]
BAD = ["00_typo_learning_rate-1.0", "01_typo_learning_rate-2.0"]


def test_real_sweep_tunes_on_the_validation_split(real_sweep):
    sweep_dir, first, second = real_sweep
    for name in GOOD:
        with open(sweep_dir / name / "result.json") as f:
            result = json.load(f)
        assert "validation_accuracy" in result, result
        assert "test_accuracy" not in result
        assert result["num_examples"] == 5000 and result["steps"] == 2
        assert (
            "build_data.validation_size = 55000"
            in (sweep_dir / name / "train.log").read_text()
        )
        assert f"{name}: done: " in first.stdout
    table = (sweep_dir / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # the header and the two finished runs
    assert "validation accuracy" in rows[0]
    assert (sweep_dir / "accuracy_vs_epsilon.png").stat().st_size > 10_000
    # Again: the finished runs are not run again.
    for name in GOOD:
        assert f"{name}: done before" in second.stdout
        assert f"{name}: start" not in second.stdout
    assert second.stdout.count("done before") == 2


def test_failed_runs_are_reported_and_the_sweep_goes_on(real_sweep):
    sweep_dir, first, _ = real_sweep
    assert first.returncode != 0
    for name in BAD:
        assert f"{name}: FAILED: exit code" in first.stdout
        assert name in first.stderr  # the final "runs failed" line
        assert not (sweep_dir / name / "result.json").exists()
    assert "batch_sise" in first.stdout  # the end of the failed run's log
    # The failures came first; the points after them ran.
    assert first.stdout.index(BAD[0]) < first.stdout.index(f"{GOOD[1]}: done")
    assert "Failed: " + ", ".join(BAD) in (sweep_dir / "results.md").read_text()
