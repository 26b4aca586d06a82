"""Hyper-parameter sweep: one `tools/train.py` run per point, then a table.

    # a grid over a base config, tuned on a validation split (the default:
    # the last 10000 training examples; the test set is not read)
    python tools/sweep.py --config configs/fashion_mnist_tanh_cnn.gin \
        --grid "build_optimizer.learning_rate=[2.0, 4.0]" \
        --grid "train_and_evaluate.batch_size=[1024, 2048, 4096]" \
        --gin_bindings run.export=False --sweep_dir /tmp/sweep
    # 4 points drawn at random from that grid, each with 3 seeds
    python tools/sweep.py ... --random 4 --search_seed 0 --seeds 0,1,2
    # a list of configs as one axis (each run parses --config, then its own)
    python tools/sweep.py --axis_configs configs/cifar10_wrn_16_4_eps1.gin,\
configs/cifar10_wrn_16_4_eps8.gin --sweep_dir /tmp/eps
    # the runs and their model_dirs, nothing run
    python tools/sweep.py ... --dry_list
    # table and plot of the finished runs of a sweep_dir, nothing run
    python tools/sweep.py --sweep_dir /tmp/sweep --report_only
    # the final config, once, on the test set
    python tools/sweep.py --config configs/fashion_mnist_tanh_cnn.gin \
        --validation_size 0 --sweep_dir /tmp/final

The sweep is the cartesian product of the `--grid` axes (and of
`--axis_configs`, one more axis whose values are config files), or a random
subset of it (`--random`). Each point runs, one after the other, as a
subprocess `tools/train.py --model_dir SWEEP_DIR/<NN>_<slug>`, NN being the
point's index in the full product, the slug its values; its output goes to
`train.log` there and `sweep_point.json` records its settings. A point whose
`result.json` exists is not run again ("done before"); an unfinished one
resumes from its checkpoints. A failed run is reported and the sweep goes
on; the tool exits non-zero at the end if a run failed.

Every run binds `build_data.validation_size` (`--validation_size`): it
trains on the training set but its last N examples and reports
`validation_accuracy` on those, so tuning never reads the test set.
`--validation_size=0` evaluates on the test set: for final configs only.

At the end the results table (Markdown, sorted by accuracy, mean ± std over
`--seeds`) is printed and written to SWEEP_DIR/results.md and results.csv,
and accuracy against epsilon is plotted (`--plot`). Each run's epsilon
covers that run alone: choosing the best of several runs on private data
spends more privacy, which nothing here counts (docs/tuning.md).
"""

import ast
import csv
import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
CONFIG_AXIS = "config"
SEED_BINDING = "train_and_evaluate.seed"
VALIDATION_BINDING = "build_data.validation_size"
POINT_FILE = "sweep_point.json"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
FLAGS = flags.FLAGS


def define_flags():
    """Defines the tool's flags (only when run: the tests import it)."""
    flags.DEFINE_multi_string(
        "config", [], "Gin config files parsed for every run, in order."
    )
    flags.DEFINE_list(
        "axis_configs",
        [],
        "An axis of config files: one run per file (for every point of "
        "--grid), each parsed after --config.",
    )
    flags.DEFINE_multi_string(
        "grid",
        [],
        'An axis: "binding=[v1, v2, ...]" (Python literals, '
        "ast.literal_eval). The sweep is the product of the axes.",
    )
    flags.DEFINE_integer(
        "random", None, "Random search: this many points of the product."
    )
    flags.DEFINE_integer("search_seed", 0, "Seed of --random's draw.")
    flags.DEFINE_list(
        "seeds",
        [],
        f"Repeat every point with {SEED_BINDING}=<s> for each s; the table "
        "reports mean ± std over them.",
    )
    flags.DEFINE_string(
        "sweep_dir",
        None,
        "The runs' model_dirs go under it (local).",
        required=True,
    )
    flags.DEFINE_integer(
        "validation_size",
        10000,
        f"Every run binds {VALIDATION_BINDING}=<this>: it holds out the last "
        "N training examples and is evaluated on them. 0: evaluate on the "
        "test set (final configs only).",
    )
    flags.DEFINE_multi_string(
        "gin_bindings", [], "Gin bindings of every run (before the point's)."
    )
    flags.DEFINE_string(
        "data_dir", None, "tools/train.py --data_dir for every run."
    )
    flags.DEFINE_multi_string(
        "train_flag",
        [],
        "More flags for tools/train.py, e.g. --train_flag=--strategy=mirrored.",
    )
    flags.DEFINE_string(
        "plot", None, "PNG path (default SWEEP_DIR/accuracy_vs_epsilon.png)."
    )
    flags.DEFINE_bool("dry_list", False, "List the runs; run nothing.")
    flags.DEFINE_bool(
        "report_only",
        False,
        "Only collect the result.json files under --sweep_dir and write the "
        "table and the plot.",
    )


# The sweep's points ---------------------------------------------------------


def parse_grid(specs):
    """Parses --grid flags into axes.

    Args:
        specs: strings "name=[v1, v2, ...]" (a list or tuple of Python
            literals).

    Returns:
        A list of (name, values) in the order given.

    Raises:
        ValueError: a malformed spec, an empty list or a repeated name.
    """
    axes = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--grid {spec!r}: expected name=[v1, v2, ...]")
        try:
            values = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                f"--grid {spec!r}: the values must be a list of Python "
                f"literals ({e})"
            ) from None
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"--grid {spec!r}: the values must be a list")
        if name in {n for n, _ in axes}:
            raise ValueError(f"--grid: {name} is given twice")
        axes.append((name, list(values)))
    return axes


def expand(axes, num_random=None, search_seed=0):
    """The points of the sweep: the product of the axes, or a subset.

    Args:
        axes: (name, values) pairs (`parse_grid`).
        num_random: draw this many distinct points of the product at random
            (all of them if it has no more); None: all.
        search_seed: the seed of the draw.

    Returns:
        A list of (index, point): the index in the full product (row-major,
        the first axis outermost) and a dict name -> value, in index order.
    """
    names = [name for name, _ in axes]
    product = [
        dict(zip(names, values))
        for values in itertools.product(*(values for _, values in axes))
    ]
    indices = range(len(product))
    if num_random is not None and num_random < len(product):
        if num_random < 1:
            raise ValueError(f"--random must be positive, got {num_random}")
        indices = sorted(random.Random(search_seed).sample(indices, num_random))
    return [(i, product[i]) for i in indices]


def gin_value(value):
    """A Python literal as gin reads it."""
    return repr(value)


def slug(point, seed=None, limit=60):
    """A short file-name-safe label of a point: "learning_rate-2.0_...".

    Args:
        point: a dict name -> value; the config axis's value is a path.
        seed: the run's seed, or None.
        limit: the most characters of the values' part.

    Returns:
        The label (the seed, if any, last as "_seed-<s>").
    """
    parts = []
    for name, value in point.items():
        if name == CONFIG_AXIS:
            text = os.path.splitext(os.path.basename(value))[0]
        else:
            short = name.rsplit(".", 1)[-1]
            shown = (
                "x".join(map(str, value))
                if isinstance(value, (list, tuple))
                else str(value)
            )
            text = f"{short}-{shown}"
        parts.append(re.sub(r"[^A-Za-z0-9_.+-]+", "", text))
    label = "_".join(parts)[:limit] or "run"
    return label if seed is None else f"{label}_seed-{seed}"


@dataclasses.dataclass
class Run:
    """One training run of the sweep.

    Attributes:
        index: its point's index in the full product.
        point: the point: axis name -> value.
        seed: its `train_and_evaluate.seed`, or None (the config's).
        model_dir: where it writes.
        configs: the gin files it parses, in order.
        bindings: the gin bindings it parses after them, in order.
    """

    index: int
    point: dict
    seed: object
    model_dir: str
    configs: list
    bindings: list

    @property
    def name(self):
        return os.path.basename(self.model_dir)

    def command(self, data_dir=None, train_flags=()):
        """The tools/train.py command line of the run."""
        cmd = [sys.executable, TRAIN]
        for config in self.configs:
            cmd += ["--config", config]
        for binding in self.bindings:
            cmd += ["--gin_bindings", binding]
        cmd += ["--model_dir", self.model_dir]
        if data_dir:
            cmd += ["--data_dir", data_dir]
        return cmd + list(train_flags)

    def record(self):
        """What `sweep_point.json` holds: the run's settings."""
        return {
            "index": self.index,
            "point": {k: display(k, v) for k, v in self.point.items()},
            "seed": self.seed,
            "configs": self.configs,
            "config_sha256": [_sha256(c) for c in self.configs],
            "bindings": self.bindings,
        }


def _sha256(path):
    """The SHA-256 of a file's content ("" if it cannot be read): a config
    edited since a run was made makes another run."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def display(name, value):
    """A point's value as the table shows it."""
    return value if name == CONFIG_AXIS else gin_value(value)


def plan_runs(
    sweep_dir,
    configs,
    axes,
    fixed_bindings=(),
    validation_size=10000,
    seeds=(),
    num_random=None,
    search_seed=0,
):
    """The runs of a sweep, in order.

    Args:
        sweep_dir: the model_dirs' parent.
        configs: gin files parsed by every run.
        axes: (name, values) pairs; the axis named `CONFIG_AXIS` holds
            config files, parsed after `configs`, the others are bindings.
        fixed_bindings: bindings of every run (before the point's).
        validation_size: bound to `build_data.validation_size` (0: nothing
            bound; the run reads the test set).
        seeds: repeat each point with `train_and_evaluate.seed` bound to
            each of them; empty: once, with the config's seed.
        num_random, search_seed: see `expand`.

    Returns:
        A list of `Run`.
    """
    points = expand(axes, num_random, search_seed)
    total = math.prod(len(values) for _, values in axes)
    width = max(2, len(str(total - 1)))
    base = [os.path.abspath(c) for c in configs]
    head = (
        [f"{VALIDATION_BINDING} = {validation_size}"] if validation_size else []
    )
    runs = []
    for index, point in points:
        extra = (
            [os.path.abspath(point[CONFIG_AXIS])]
            if CONFIG_AXIS in point
            else []
        )
        own = [
            f"{name} = {gin_value(value)}"
            for name, value in point.items()
            if name != CONFIG_AXIS
        ]
        for seed in list(seeds) or [None]:
            seeded = [] if seed is None else [f"{SEED_BINDING} = {seed}"]
            runs.append(
                Run(
                    index=index,
                    point=point,
                    seed=seed,
                    model_dir=os.path.join(
                        sweep_dir, f"{index:0{width}d}_{slug(point, seed)}"
                    ),
                    configs=base + extra,
                    bindings=head + list(fixed_bindings) + own + seeded,
                )
            )
    return runs


# Running ---------------------------------------------------------------------


def tail(path, lines=15):
    """The last lines of a text file ("" if it is absent)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_one(run, data_dir=None, train_flags=(), env=None):
    """Runs one point as a tools/train.py subprocess, unless done before.

    Args:
        run: the `Run`.
        data_dir, train_flags: passed to tools/train.py.
        env: the subprocess's environment (default: this one, with the
            repository on PYTHONPATH).

    Returns:
        ("done before" | "done" | "failed", a one-line message).
    """
    os.makedirs(run.model_dir, exist_ok=True)
    point_file = os.path.join(run.model_dir, POINT_FILE)
    record = run.record()
    if os.path.exists(point_file):
        with open(point_file) as f:
            before = json.load(f)
        keys = ("configs", "config_sha256", "bindings")
        if [before.get(k) for k in keys] != [record[k] for k in keys]:
            return "failed", (
                f"{run.model_dir} holds a run of other settings or of "
                f"configs edited since ({POINT_FILE}); not touched: use "
                "another --sweep_dir"
            )
    elif os.listdir(run.model_dir):
        return "failed", (
            f"{run.model_dir} holds files but no {POINT_FILE} (a run not "
            "made by this tool?); not touched: use another --sweep_dir"
        )
    if os.path.exists(os.path.join(run.model_dir, RESULT_FILE)):
        return "done before", summary(run.model_dir)
    with open(point_file, "w") as f:
        json.dump(record, f, indent=2)
    if env is None:
        path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "PYTHONPATH": ROOT + (os.pathsep + path if path else ""),
        }
    cmd = run.command(data_dir, train_flags)
    log = os.path.join(run.model_dir, LOG_FILE)
    started = time.time()
    with open(log, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: ")
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        code = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        ).returncode
    seconds = time.time() - started
    if code == 0 and os.path.exists(os.path.join(run.model_dir, RESULT_FILE)):
        return "done", f"{seconds:.0f} s: {summary(run.model_dir)}"
    why = f"exit code {code}" if code else f"no {RESULT_FILE}"
    last = "".join(f"    {line}\n" for line in tail(log).splitlines())
    return "failed", f"{why} after {seconds:.0f} s; the end of {log}:\n{last}"


def summary(model_dir):
    """One line of a finished run's result.json."""
    record = read_result(model_dir)
    return (
        f"{record['split']} accuracy {record['accuracy']:.4f}, epsilon "
        f"{record['epsilon']:.3f} at delta {record['delta']:g}"
    )


def run_all(runs, data_dir=None, train_flags=(), out=sys.stdout):
    """Runs the points in order, one line per start and end.

    Returns:
        The names of the runs that failed.
    """
    failed = []
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{len(runs)}] {run.name}"
        done = os.path.exists(os.path.join(run.model_dir, RESULT_FILE))
        if not done:
            print(f"{prefix}: start", file=out, flush=True)
        status, message = run_one(run, data_dir, train_flags)
        if status == "failed":
            failed.append(run.name)
            print(f"{prefix}: FAILED: {message}", file=out, flush=True)
        else:
            print(f"{prefix}: {status}: {message}", file=out, flush=True)
    return failed


# Collecting and reporting ----------------------------------------------------

_SEED_SUFFIX = re.compile(r"_seed-(-?\d+)$")
# What the table takes from each run's result.json, besides the accuracy.
RESULT_FIELDS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "steps",
    "batch_size",
    "num_examples",
    "seconds",
)


def read_result(model_dir):
    """A run's record: its point, seed and result.

    The point and seed come from `sweep_point.json`; without one (a run
    not made by this tool), the point is the directory's name, less a
    "_seed-<s>" suffix, which gives the seed.

    Args:
        model_dir: a run's directory, holding result.json.

    Returns:
        A dict: run (the directory's name), point (name -> shown value),
        seed, split ("validation", "test", ...), accuracy, epsilon, delta,
        noise_multiplier, steps, batch_size, num_examples, seconds.
    """
    with open(os.path.join(model_dir, RESULT_FILE)) as f:
        result = json.load(f)
    name = os.path.basename(os.path.normpath(model_dir))
    point_file = os.path.join(model_dir, POINT_FILE)
    if os.path.exists(point_file):
        with open(point_file) as f:
            settings = json.load(f)
        point, seed = settings["point"], settings.get("seed")
    else:
        match = _SEED_SUFFIX.search(name)
        seed = int(match[1]) if match else None
        point = {"run": _SEED_SUFFIX.sub("", name)}
    keys = [k for k in result if k.endswith("_accuracy")]
    if len(keys) != 1:
        raise ValueError(f"{model_dir}/{RESULT_FILE}: no single *_accuracy")
    return {
        "run": name,
        "point": point,
        "seed": seed,
        "split": keys[0][: -len("_accuracy")],
        "accuracy": float(result[keys[0]]),
        **{k: result.get(k) for k in RESULT_FIELDS},
    }


def finished_runs(sweep_dir):
    """The directories under `sweep_dir` that hold a result.json, sorted."""
    return sorted(
        os.path.dirname(path)
        for path in glob.glob(os.path.join(sweep_dir, "*", RESULT_FILE))
    )


def collect(model_dirs):
    """The records (`read_result`) of those of `model_dirs` that finished."""
    return [
        read_result(d)
        for d in model_dirs
        if os.path.exists(os.path.join(d, RESULT_FILE))
    ]


def _mean(values):
    """The mean, or the value itself where all are equal (ints stay ints)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return values[0] if len(set(values)) == 1 else statistics.fmean(values)


def aggregate(records):
    """One row per point (its seeds pooled), best accuracy first.

    Args:
        records: `read_result` dicts.

    Returns:
        A list of dicts: point, split, accuracy (the mean over the point's
        runs), accuracy_std (their sample standard deviation, 0 for one
        run), runs (how many), epsilon, delta, noise_multiplier, steps,
        batch_size, num_examples and seconds (means over the runs) and
        names (the runs' directories), sorted by accuracy, descending.
    """
    groups = {}
    for record in records:
        key = json.dumps([record["point"], record["split"]], sort_keys=True)
        groups.setdefault(key, []).append(record)
    rows = []
    for group in groups.values():
        accuracies = [r["accuracy"] for r in group]
        row = {
            "point": group[0]["point"],
            "split": group[0]["split"],
            "accuracy": statistics.fmean(accuracies),
            "accuracy_std": (
                statistics.stdev(accuracies) if len(group) > 1 else 0.0
            ),
            "runs": len(group),
            "names": [r["run"] for r in group],
        }
        for key in RESULT_FIELDS:
            row[key] = _mean([r[key] for r in group])
        rows.append(row)
    rows.sort(key=lambda row: -row["accuracy"])
    return rows


def axes_of(rows):
    """The point's names over all rows, in first-seen order."""
    names = []
    for row in rows:
        names += [n for n in row["point"] if n not in names]
    return names


def accuracy_label(rows):
    """ "validation accuracy", "test accuracy" or "accuracy" (mixed)."""
    splits = {row["split"] for row in rows}
    return f"{splits.pop()} accuracy" if len(splits) == 1 else "accuracy"


def _number(value, spec):
    return "" if value is None else format(value, spec)


def markdown_table(rows):
    """The rows (`aggregate`) as a Markdown table."""
    axes = axes_of(rows)
    label = accuracy_label(rows)
    mixed = label == "accuracy"
    seeded = any(row["runs"] > 1 for row in rows)
    header = [
        *axes,
        *(["split"] if mixed else []),
        label + (" (mean ± std, runs)" if seeded else ""),
        "epsilon",
        "delta",
        "noise multiplier",
        "steps",
        "B",
        "seconds",
        "run",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        accuracy = f"{row['accuracy']:.4f}"
        if seeded:
            accuracy += f" ± {row['accuracy_std']:.4f} ({row['runs']})"
        cells = [
            *(str(row["point"].get(a, "")) for a in axes),
            *([row["split"]] if mixed else []),
            accuracy,
            _number(row["epsilon"], ".3f"),
            _number(row["delta"], "g"),
            _number(row["noise_multiplier"], ".4g"),
            _number(row["steps"], ".0f"),
            _number(row["batch_size"], ".0f"),
            _number(row["seconds"], ".0f"),
            ", ".join(row["names"]),
        ]
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "split",
    "accuracy",
    "accuracy_std",
    "runs",
    *RESULT_FIELDS,
    "names",
]


def write_csv(path, rows):
    """The rows (`aggregate`) as CSV: the axes, then `CSV_COLUMNS`."""
    axes = axes_of(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(axes + CSV_COLUMNS)
        for row in rows:
            writer.writerow(
                [row["point"].get(a, "") for a in axes]
                + [
                    " ".join(row[c]) if c == "names" else row[c]
                    for c in CSV_COLUMNS
                ]
            )


def plot(path, rows, title=None):
    """Accuracy against epsilon: one point per row, ± std if seeded."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [row for row in rows if row["epsilon"] is not None]
    deltas = {row["delta"] for row in rows}
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [row["epsilon"] for row in rows]
    y = [row["accuracy"] for row in rows]
    if any(row["runs"] > 1 for row in rows):
        yerr = [row["accuracy_std"] for row in rows]
        ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=3, label="mean ± std")
        ax.legend()
    else:
        ax.plot(x, y, "o")
    if len(rows) <= 24:
        for row in rows:
            text = ", ".join(f"{v}" for v in row["point"].values())
            ax.annotate(
                text[:40],
                (row["epsilon"], row["accuracy"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    at = f" at delta={deltas.pop():g}" if len(deltas) == 1 else ""
    ax.set_xlabel(f"epsilon{at} (each run alone; the selection not counted)")
    ax.set_ylabel(accuracy_label(rows))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir, records, plot_path=None, failed=(), out=sys.stdout):
    """Prints the table; writes results.md, results.csv and the plot.

    Args:
        sweep_dir: where results.md and results.csv go.
        records: the finished runs (`collect`).
        plot_path: the PNG (default SWEEP_DIR/accuracy_vs_epsilon.png).
        failed: names of failed runs, listed under the table.
        out: where the table is printed.

    Returns:
        The rows (`aggregate`).
    """
    rows = aggregate(records)
    os.makedirs(sweep_dir, exist_ok=True)
    text = markdown_table(rows) if rows else "No finished runs.\n"
    if failed:
        text += "\nFailed: " + ", ".join(failed) + "\n"
    if rows and rows[0]["split"] == "test":
        text += (
            "\nThese accuracies are on the TEST set: choose among runs on a "
            "validation split (--validation_size) instead.\n"
        )
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write(text)
    print(text, file=out, end="")
    if rows:
        write_csv(os.path.join(sweep_dir, "results.csv"), rows)
        plot_path = plot_path or os.path.join(
            sweep_dir, "accuracy_vs_epsilon.png"
        )
        plot(
            plot_path, rows, title=os.path.basename(os.path.normpath(sweep_dir))
        )
        print(
            f"wrote {os.path.join(sweep_dir, 'results.md')}, results.csv and "
            f"{plot_path}",
            file=out,
        )
    return rows


# main ------------------------------------------------------------------------

TEST_SET_WARNING = (
    "WARNING: --validation_size=0: every run is evaluated on the TEST set. "
    "Use it only for final configs chosen beforehand; tune on a validation "
    "split (--validation_size=N)."
)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"sweep.py: unexpected arguments {argv[1:]}")
    sweep_dir = FLAGS.sweep_dir
    if FLAGS.report_only:
        records = collect(finished_runs(sweep_dir))
        if not records:
            sys.exit(f"sweep.py: no {RESULT_FILE} under {sweep_dir}/*/")
        write_report(sweep_dir, records, FLAGS.plot)
        return
    if not FLAGS.config and not FLAGS.axis_configs:
        sys.exit("sweep.py: give --config and/or --axis_configs")
    try:
        axes = parse_grid(FLAGS.grid)
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError as e:
        sys.exit(f"sweep.py: {e}")
    bound = [b.split("=")[0].strip() for b in FLAGS.gin_bindings]
    bound += [name for name, _ in axes]
    if VALIDATION_BINDING in bound:
        sys.exit(f"sweep.py: set {VALIDATION_BINDING} by --validation_size")
    for flag in FLAGS.train_flag:
        if re.match(r"--?(gin_bindings|config|model_dir)\b", flag):
            sys.exit(
                f"sweep.py: --train_flag={flag}: give it to sweep.py "
                "(--gin_bindings, --config), which records it per run"
            )
    if seeds and SEED_BINDING in bound:
        sys.exit(f"sweep.py: --seeds and {SEED_BINDING} both given")
    if FLAGS.axis_configs:
        axes.insert(0, (CONFIG_AXIS, list(FLAGS.axis_configs)))
    try:
        runs = plan_runs(
            sweep_dir,
            FLAGS.config,
            axes,
            FLAGS.gin_bindings,
            FLAGS.validation_size,
            seeds,
            FLAGS.random,
            FLAGS.search_seed,
        )
    except ValueError as e:
        sys.exit(f"sweep.py: {e}")
    if FLAGS.validation_size == 0:
        print(TEST_SET_WARNING, flush=True)
    else:
        print(
            f"Tuning on a validation split: the last {FLAGS.validation_size} "
            "training examples (the test set is not read).",
            flush=True,
        )
    if FLAGS.dry_list:
        for run in runs:
            done = os.path.exists(os.path.join(run.model_dir, RESULT_FILE))
            print(f"{run.model_dir}{' (done before)' if done else ''}")
            print(
                f"    {shlex.join(run.command(FLAGS.data_dir, FLAGS.train_flag))}"
            )
        print(f"{len(runs)} runs.")
        return
    failed = run_all(runs, FLAGS.data_dir, FLAGS.train_flag)
    records = collect([run.model_dir for run in runs])
    write_report(sweep_dir, records, FLAGS.plot, failed)
    if failed:
        sys.exit(
            f"sweep.py: {len(failed)} of {len(runs)} runs failed: "
            + ", ".join(failed)
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
