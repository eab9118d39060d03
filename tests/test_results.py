"""The published figures are the committed run's own: README quotes results/, results/ agrees
with itself."""
import csv
import re
import statistics

import pytest

from conftest import ROOT, exp

RESULTS = ROOT / "results"
README = ROOT / "README.md"


def test_readme_quotes_the_final_epoch_line_of_the_committed_log():
    log = (RESULTS / "train.log").read_text()
    final = re.findall(r"^Epoch (\d+)/(\d+), .*$", log, re.M)
    last_line = [line for line in log.splitlines() if line.startswith(f"Epoch {final[-1][0]}/")][-1]
    assert final[-1][0] == final[-1][1], "the headline run did not finish"
    assert last_line in README.read_text()


def metrics_rows(folder):
    with open(RESULTS / folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_matches_the_log():
    log = (RESULTS / "train.log").read_text()
    logged = re.findall(r"^Epoch (\d+)/\d+, .*Test Accuracy: (\d+\.\d\d)%$", log, re.M)
    rows = metrics_rows(".")
    assert [(r["epoch"], f"{float(r['test_acc']):.2f}") for r in rows] == logged
    assert "ImageFolder ../shared/cifar10-jpeg" in log  # the data the README names


def test_pictures_are_published():
    for name in ("augmentations.png", "curves.png", "confusion.png", "misclassified.png"):
        assert (RESULTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(results/{name})" in README.read_text()


SEED_FOLDERS = sorted(p.parent.name for p in RESULTS.glob("seed[0-9]*/train.log"))
LENGTH_FOLDERS = sorted(p.parent.name for p in RESULTS.glob("budget/epochs*-seed*/train.log"))


def seed_of(folder):
    """The seed of a headline folder: results/ is seed 0, results/seedN/ seed N."""
    return folder[len("seed"):] if folder != "." else "0"


def settings_other_than(log, command):
    """The logged settings that differ from what the README's command computes today."""
    config = re.search(r"^config: (.*)$", log, re.M).group(1)
    logged = dict(item.split("=", 1) for item in config.split(", "))
    defaults = vars(exp.build_parser().parse_args(command))
    defaults["workers"] = 0  # what the default (None) resolves to on a CPU, logged resolved
    # --out does not change the numbers; --tta (added later) is read by --evaluate only;
    # --cuda-graphs (added later) is off on the CPU
    return {k: (logged.get(k), str(v)) for k, v in defaults.items()
            if k not in ("out", "tta", "cuda_graphs") and logged.get(k) != str(v)}


def final_accuracy_text(log):
    return re.search(r"^Done: final test accuracy (\d+\.\d\d)%", log, re.M).group(1)


@pytest.mark.parametrize("folder", ["."] + SEED_FOLDERS)
def test_the_committed_logs_ran_the_current_defaults(folder):
    # a change to a default changes what the README's command computes: the headline must then be
    # re-run; results/seedN/ holds the same command with --seed N
    log = (RESULTS / folder / "train.log").read_text()
    seed = seed_of(folder)
    differ = settings_other_than(log, ["--data-dir", "../shared/cifar10-jpeg", "--seed", seed])
    assert not differ, (f"results/{folder}/train.log ran other settings than the defaults "
                        f"(logged, default): {differ}")
    final = final_accuracy_text(log)
    row = rf"^\| seed {seed} \(.*?\) \| (\*\*)?{re.escape(final)}%(\*\*)? \|"
    readme = README.read_text()
    assert re.search(row, readme, re.M), f"README's row for seed {seed} lacks {final}%"


@pytest.mark.parametrize("folder", ["."] + SEED_FOLDERS)
def test_the_results_table_row_is_its_metrics(folder):
    # best (epoch) and the first epoch at 85%, as README's Results table gives them
    seed = seed_of(folder)
    rows = metrics_rows(folder)
    best = max(rows, key=lambda r: float(r["test_acc"]))  # the first of equals, as the log says
    first_85 = next((r["epoch"] for r in rows if float(r["test_acc"]) >= 85), None)
    readme = README.read_text()
    row = re.search(rf"^\| seed {seed} \(.*$", readme.split("## Results")[1], re.M).group(0)
    cells = [cell.strip() for cell in row.split("|")[2:-1]]
    assert f"{float(best['test_acc']):.2f}% ({best['epoch']})" in cells, row
    reached = [cell for cell in cells if cell == "never" or cell.startswith("epoch ")]
    assert reached and reached[0].split(",")[0] == (f"epoch {first_85}" if first_85 else "never")


def test_readme_quotes_the_per_class_line_of_the_committed_log():
    log = (RESULTS / "train.log").read_text()
    per_class = re.search(r"^Per-class accuracy: .*$", log, re.M).group(0)
    assert per_class in README.read_text()


def test_the_recipe_table_gives_the_default_length():
    readme = README.read_text()
    row = re.search(r"^\| epochs \| (\d+) \|", readme.split("## Training recipe")[1], re.M)
    assert row.group(1) == str(exp.build_parser().parse_args([]).epochs)


def logged_setting(log, name):
    return re.search(rf"^config: .*\b{name}=(\w+)", log, re.M).group(1)


def runs_by_length():
    """{epochs: {seed: final test accuracy text}} of every committed run of the default command:
    the headline runs and those of the table of training lengths."""
    runs = {}
    for folder in ["."] + SEED_FOLDERS + [f"budget/{f}" for f in LENGTH_FOLDERS]:
        log = (RESULTS / folder / "train.log").read_text()
        epochs, seed = logged_setting(log, "epochs"), logged_setting(log, "seed")
        runs.setdefault(epochs, {})[seed] = final_accuracy_text(log)
    return runs


def mean_and_sd(finals):
    values = [float(v) for v in finals]
    return f"{statistics.mean(values):.2f}% ± {statistics.stdev(values):.2f}"


@pytest.mark.parametrize("folder", LENGTH_FOLDERS)
def test_each_run_of_another_length_is_the_default_command_with_its_epochs_and_seed(folder):
    log = (RESULTS / "budget" / folder / "train.log").read_text()
    epochs, seed = logged_setting(log, "epochs"), logged_setting(log, "seed")
    assert folder == f"epochs{epochs}-seed{seed}"
    differ = settings_other_than(log, ["--data-dir", "../shared/cifar10-jpeg", "--epochs", epochs,
                                       "--seed", seed])
    assert not differ, f"results/budget/{folder}/train.log is not the default command: {differ}"


def test_the_table_of_training_lengths_quotes_every_run_and_each_five_seeds_mean():
    readme = README.read_text()
    table = readme.split("### Training lengths")[1].split("\n## ")[0]
    for epochs, finals in runs_by_length().items():
        row = re.search(rf"^\| {epochs}\b.*$", table, re.M)
        assert row, f"no row for {epochs} epochs"
        if len(finals) == 5:
            assert f" {mean_and_sd(finals.values())} " in row.group(0), row.group(0)
        else:
            assert all(re.search(rf"[ |]{re.escape(final)}%[ ,|]", row.group(0))
                       for final in finals.values()), row.group(0)
    assert sorted(re.findall(r"^\| (\d+)\b", table, re.M), key=int) == sorted(
        runs_by_length(), key=int), "a row without its runs"


def test_the_docstring_headline_is_the_readmes():
    docstring = re.search(r"(\d+\.\d\d)% \+- (\d\.\d\d) test accuracy over five seeds", exp.__doc__)
    mean, sd = docstring.groups()
    assert f"**{mean}% ± {sd}**" in README.read_text().split("## Two commands")[0]


def final_accuracy(folder):
    return float(final_accuracy_text((RESULTS / folder / "train.log").read_text()))


def test_the_readme_headline_is_the_mean_and_sd_of_the_committed_seed_logs():
    finals = [final_accuracy(folder) for folder in ["."] + SEED_FOLDERS]
    assert len(finals) == 5
    headline = f"{statistics.mean(finals):.2f}% ± {statistics.stdev(finals):.2f}"
    readme = README.read_text()
    assert f"**{headline}**" in readme.split("## Two commands")[0]
    # every mean ± sd quoted is that of five committed runs of one length
    fives = {mean_and_sd(f.values()) for f in runs_by_length().values() if len(f) == 5}
    assert set(re.findall(r"\d+\.\d\d% ± \d+\.\d\d", readme)) <= fives and headline in fives


def test_every_file_in_results_is_linked_from_a_readme():
    linked = set()
    for readme in [README, *RESULTS.rglob("README.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", readme.read_text()):
            linked.add((readme.parent / target).resolve())
    files = {p.resolve() for p in RESULTS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert not sorted(files - linked), "files in results/ that no README links to"
