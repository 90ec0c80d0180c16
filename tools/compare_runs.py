"""Compare runs: a table, PNG plots and a Markdown summary of their evaluations.

  python tools/compare_runs.py SWEEP_DIR [--output=REPORT_DIR] [--baseline=CELL]
  python tools/compare_runs.py WORKDIR... --output=REPORT_DIR [--baseline=CELL]

A sweep directory (launch/sweep.py) stands for all its evaluated runs, its report going to
SWEEP_DIR/report by default; or any set of evaluated workdirs (tools/evaluate.py), sweeps' or not.
Runs whose names differ only in a `-seed<N>` suffix form a cell (llada_jax/compare.py says how
cells, standard errors and significance are computed).

REPORT_DIR gets report.md (the table and the plots), table.csv, eval_bits.png (held-out bits per
token against training tokens, bands of +- one standard error), train_loss.png (training loss
against training tokens) and, when the evaluations measured it (eval.objective_draws),
estimator_spread.png (each cell's spread of its training loss and gradient norm over draws on one
batch). The table's "training loss" column says whether the cell's training loss is a bound
(unweighted or clipped objectives are not; the held-out bound compares across all cells).
SWEEP_DIR, the workdirs and REPORT_DIR may be gs://bucket/... prefixes (the `gcs` extra; the plots
are drawn in a local temporary directory, then uploaded).
--baseline names the cell the others are compared with (default: the first). Bad arguments, or
a run whose config.json, eval/step_<N>.json or metrics.jsonl does not read: one error line naming
the file, exit 2.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import cli, compare, files  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "The report directory.")
flags.DEFINE_string("baseline", None, "The cell the others are compared with (default: first).")

COLUMNS = [
    "cell",
    "seeds",
    "final bits/token",
    "se",
    "vs baseline",
    "difference se",
    "significant",
    "training tokens",
    "train seconds",
    "tokens/s",
    "training loss",
    "loss std",
    "grad-norm std",
]


def table(cells: list[compare.Cell], baseline: compare.Cell) -> list[list[str]]:
    rows = []
    for c in cells:
        d = compare.difference(c, baseline)
        speeds = [r.tokens_per_sec for r in c.runs if r.tokens_per_sec]
        seconds = [r.train_seconds for r in c.runs if r.train_seconds]
        last = c.runs[0]
        rows.append(
            [
                c.name,
                str(len(c.runs)),
                f"{c.mean:.4f}",
                f"{c.stderr:.4f}",
                "baseline" if c is baseline else f"{d.delta:+.4f}",
                "" if c is baseline else f"{d.stderr:.4f}",
                "" if c is baseline else ("yes" if d.significant else "no"),
                f"{last.eval_steps[-1] * last.tokens_per_step:,}",
                f"{sum(seconds) / len(seconds):.0f}" if seconds else "-",
                f"{sum(speeds) / len(speeds):,.0f}" if speeds else "-",
                "not a bound" if last.bound_note else "bound",
                spread(c, "loss_std"),
                spread(c, "grad_norm_std"),
            ]
        )
    return rows


def spread(c: compare.Cell, key: str) -> str:
    """The mean over the cell's runs of their last evaluation's objective spread `key`."""
    values = [r.objective[key] for r in c.runs if r.objective]
    return f"{sum(values) / len(values):.4f}" if values else "-"


def plot(cells: list[compare.Cell], output: str) -> list[str]:
    """eval_bits.png and train_loss.png; returns their names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cells:
        steps = sorted(set.intersection(*(set(r.eval_steps) for r in c.runs)))
        by_step = [[r.bits[r.eval_steps.index(s)] for r in c.runs] for s in steps]
        mean = np.array([np.mean(v) for v in by_step])
        if len(c.runs) > 1:
            se = np.array([np.std(v, ddof=1) / np.sqrt(len(v)) for v in by_step])
        else:
            se = np.array([c.runs[0].bits_stderr[c.runs[0].eval_steps.index(s)] for s in steps])
        tokens = np.array(steps) * c.runs[0].tokens_per_step
        ax.plot(tokens, mean, marker="o", label=c.name)
        ax.fill_between(tokens, mean - se, mean + se, alpha=0.2)
    ax.set(xlabel="training tokens", ylabel="held-out NLL bound (bits/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "eval_bits.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cells:
        for i, r in enumerate(c.runs):
            tokens = np.array(r.train_steps) * r.tokens_per_step
            ax.plot(
                tokens,
                r.train_loss,
                color=f"C{cells.index(c)}",
                alpha=0.7,
                label=c.name if i == 0 else None,
            )
    ax.set(xlabel="training tokens", ylabel="training loss (its schedule's ELBO weight)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "train_loss.png"), dpi=120)
    plt.close(fig)
    names = ["eval_bits.png", "train_loss.png"]
    with_spread = [c for c in cells if all(r.objective for r in c.runs)]
    if with_spread:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, key, label in zip(axes, ("loss_std", "grad_norm_std"), ("loss", "gradient norm")):
            values = [[r.objective[key] for r in c.runs] for c in with_spread]
            ax.bar(range(len(values)), [np.mean(v) for v in values], color="C0", alpha=0.7)
            for i, v in enumerate(values):
                ax.plot([i] * len(v), v, "k.", ms=4)
            ax.set_xticks(
                range(len(values)), [c.name for c in with_spread], rotation=45, ha="right"
            )
            ax.set(title=f"training {label}", ylabel="std over draws on one batch")
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(os.path.join(output, "estimator_spread.png"), dpi=120)
        plt.close(fig)
        names.append("estimator_spread.png")
    return names


def markdown(
    cells: list[compare.Cell], rows: list[list[str]], baseline: str, images: list[str]
) -> str:
    notes = [f"- `{c.name}`: {c.runs[0].bound_note}" for c in cells if c.runs[0].bound_note]
    lines = [
        "# Run comparison",
        "",
        f"Final held-out NLL bound (bits per token, lower is better) per cell, the mean over its "
        f"seeds +- its standard error; differences against `{baseline}`, significant when "
        "larger than twice their standard error.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", "Training losses that are not bounds (their held-out bound still compares):"]
        lines += notes
    lines += [""] + [f"![{name[:-4]}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def report(workdirs: list[str], output: str, baseline_name: str | None) -> list[list[str]]:
    """Writes the report into `output` (a local directory or a URI); returns the table's rows."""
    runs = [compare.read_run(w) for w in workdirs]
    cells = compare.cells(runs)
    names = [c.name for c in cells]
    if baseline_name is not None and baseline_name not in names:
        raise ValueError(f"--baseline={baseline_name!r} is not a cell; cells: {', '.join(names)}")
    baseline = cells[names.index(baseline_name)] if baseline_name else cells[0]
    files.makedirs(output)
    rows = table(cells, baseline)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    files.write_atomically(files.join(output, "table.csv"), buffer.getvalue())
    if files.is_uri(output):  # matplotlib writes local files: draw them here, then upload each
        with tempfile.TemporaryDirectory() as local:
            images = plot(cells, local)
            for name in images:
                files.upload(os.path.join(local, name), files.join(output, name))
    else:
        images = plot(cells, output)
    text = markdown(cells, rows, baseline.name, images)
    files.write_atomically(files.join(output, "report.md"), text)
    return rows


def is_sweep_dir(path: str) -> bool:
    """Whether `path` is a sweep directory (launch/sweep.py): it has a runs/ directory."""
    return files.isdir(files.join(path, "runs"))


def evaluated_runs(sweep_dir: str) -> list[str]:
    """The workdirs of a sweep directory's runs that have evaluations, by name."""
    runs = files.join(sweep_dir, "runs")
    workdirs = [files.join(runs, n) for n in files.listdir(runs)]
    workdirs = [w for w in workdirs if files.isdir(files.join(w, "eval"))]
    if not workdirs:
        raise ValueError(f"{sweep_dir!r}: no run is evaluated yet")
    return workdirs


def main(argv: list[str]) -> int:
    try:
        cli.exit_on_help(argv, __doc__)
        workdirs = FLAGS(argv)[1:]
        output = FLAGS.output
        for path in [*workdirs, output or ""]:
            if files.is_uri(path):
                files.check_uri(path)  # one line if the gcs extra is missing
        workdirs = [w.rstrip("/") if files.is_uri(w) else w for w in workdirs]
        if len(workdirs) == 1 and is_sweep_dir(workdirs[0]):
            output = output or files.join(workdirs[0], "report")
            workdirs = evaluated_runs(workdirs[0])
        if not workdirs or not output:
            raise ValueError("give a sweep directory, or workdirs and --output=REPORT_DIR")
        rows = report(workdirs, output, FLAGS.baseline)
    except (ValueError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for r in [COLUMNS, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, width)).rstrip())
    print(f"report: {files.join(output, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
