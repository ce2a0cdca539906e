"""What users see: the progress line per round, the run directory (config, metrics.jsonl, audit files,
summary), comparison tables and plots. The server is the single writer of a run directory."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


from . import provenance
from .rundir import FAILED_STATUSES  # a run directory's life and how a run ended: fedlora.rundir


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def progress_line(m: dict, num_rounds: int) -> str:
    acc = m.get("eval_accuracy")
    parts = [
        f"[round {m['round']:>3}/{num_rounds}]",
        f"clients {m.get('num_clients', 0):>3}",
        f"train_loss {_fmt(m.get('train_loss'))}",
        f"eval_loss {_fmt(m.get('eval_loss'))}",
    ]
    if acc is not None:
        parts.append(f"eval_acc {_fmt(acc)}")
    if "eval_perplexity" in m and acc is None:
        parts.append(f"ppl {_fmt(m['eval_perplexity'], '.2f')}")
    parts += [f"up {human_bytes(m.get('bytes_up', 0))}", f"down {human_bytes(m.get('bytes_down', 0))}",
              f"{m.get('wall_s', 0.0):.1f}s"]
    if m.get("rejected"):
        parts.append(f"rejected {len(m['rejected'])}")
    return "  ".join(parts)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def best_by_validation(rows: list[dict]) -> dict:
    """The round a user would pick without looking at the test split: the highest ``val_accuracy`` (round 0, the
    starting model, included; ties: the earliest round), or, without accuracy (instruction data), the lowest
    ``val_loss``. Returns ``best_val_accuracy``, ``best_round`` and ``test_at_best_val`` (that round's test
    ``eval_accuracy``); all None when no row has a validation figure."""
    if any("val_accuracy" in r for r in rows):
        cands = [r for r in rows if "val_accuracy" in r]
        best = min(cands, key=lambda r: (-r["val_accuracy"], r["round"]))
    elif any("val_loss" in r for r in rows):
        best = min((r for r in rows if "val_loss" in r), key=lambda r: (r["val_loss"], r["round"]))
    else:
        return {"best_val_accuracy": None, "best_round": None, "test_at_best_val": None}
    return {"best_val_accuracy": best.get("val_accuracy"), "best_round": best["round"],
            "test_at_best_val": best.get("eval_accuracy")}


class Recorder:
    """Owns a run directory: ``config.yaml``, ``metrics.jsonl``, ``audit/``, ``adapter/``, ``summary.json``."""

    def __init__(self, run_dir: Path, cfg_yaml: str, num_rounds: int, echo=print):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "config.yaml", cfg_yaml)
        self.num_rounds, self.echo = num_rounds, echo
        self.rows: list[dict] = []
        self.t0 = time.time()

    def log_round(self, metrics: dict) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.rows.append(metrics)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
            fh.flush()
        self.echo(progress_line(metrics, self.num_rounds))

    def restore(self, rows: list[dict]) -> None:
        """Resume: metrics up to the checkpointed round (rows of a round in progress are dropped)."""
        self.rows = list(rows)
        atomic_write(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def audit_dir(self, rnd: int) -> Path:
        d = self.dir / "audit" / f"round_{rnd:04d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def summary(self, extra: dict) -> dict:
        """``summary.json``: final and best test figures, the round chosen on validation (:func:`best_by_validation`),
        total bytes and wall time, then ``extra``."""
        evals = [r for r in self.rows if "eval_accuracy" in r]
        s = {
            "rounds": len([r for r in self.rows if r.get("round", 0) > 0]),
            "final_eval_loss": self.rows[-1].get("eval_loss") if self.rows else None,
            "final_eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "best_eval_accuracy": max((r["eval_accuracy"] for r in evals), default=None),
            **best_by_validation(self.rows),
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.rows),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.rows),
            "wall_s": time.time() - self.t0,
            "environment": provenance.environment(),  # what decides its float results (fedlora.provenance)
        }
        s.update(extra)
        atomic_write(self.dir / "summary.json", json.dumps(s, indent=2))
        return s


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------------------------
# Comparisons (``fedlora compare``): one row per (seed, strategy), aggregated over seeds into one row per
# strategy (mean ± sample sd, paired differences against a baseline, a verdict), tables (markdown, csv), plots
# ----------------------------------------------------------------------------------------------
#: the pooled-data row of a comparison (:mod:`fedlora.centralised`): a ceiling, never a verdict baseline
CENTRALISED = "centralised"
CEILING_NOTE = "ceiling: one model trained on the pooled client data"
#: one row per (seed, strategy): ``comparison_seeds.csv`` (``best_from``: the summary field "best" came from;
#: ``status``: how the run ended, :data:`STATUSES`; a failed one is kept here but left out of the means;
#: ``environment``: :func:`fedlora.provenance.fingerprint` of the machine it ran on, empty for older runs)
COLUMNS = ["seed", "strategy", "final_accuracy", "best_accuracy", "best_from", "rounds_to_target", "bytes_up",
           "bytes_down", "wall_s", "run_dir", "environment", "status", "note"]
#: the figures averaged over seeds
FIGURES = ["final_accuracy", "best_accuracy", "rounds_to_target", "bytes_up", "bytes_down", "wall_s"]
#: one row per strategy: ``comparison.csv``. A figure is the mean over seeds, ``<figure>_sd`` its sample standard
#: deviation (n−1; empty with one seed); ``rounds_to_target`` averages the seeds that reached the target
#: (``reached_target``: how many of them did); ``diff_*``: final accuracy minus the baseline's, paired by seed
#: (mean, min, max); ``diff_to_centralised``: final accuracy minus the centralised run's, mean over seeds.
SUMMARY_COLUMNS = (["strategy", "seeds"] + [c for f in FIGURES for c in (f, f + "_sd")]
                   + ["best_from", "reached_target", "baseline", "diff_final", "diff_min", "diff_max", "verdict",
                      "verdict_how", "diff_to_centralised", "note"])


def rounds_to(rows: list[dict], target: float):
    """The first round whose eval accuracy reaches ``target`` (None if none does)."""
    for r in rows:
        if r.get("eval_accuracy") is not None and r["eval_accuracy"] >= target:
            return r["round"]
    return None


def summarise(name: str, run_dir: Path, target: float) -> dict:
    """A comparison row for a finished run, from its ``metrics.jsonl`` and ``summary.json``. "best" is the test
    accuracy at the round of best validation accuracy (``test_at_best_val``) when the summary has it, else the
    best test accuracy over rounds (``best_eval_accuracy``). A run whose status is one of :data:`FAILED_STATUSES`
    (e.g. no round aggregated: its figures are the untrained model's) keeps its figures here, and its note says
    so; the aggregation over seeds (:func:`aggregate`) leaves it out of the means, differences and plots."""
    rows = read_metrics(run_dir)
    summ = json.loads((Path(run_dir) / "summary.json").read_text())
    best_from = "test_at_best_val" if summ.get("test_at_best_val") is not None else "best_eval_accuracy"
    status = summ.get("status") or "completed"
    note = ""
    if status in FAILED_STATUSES:
        note = (f"{status}: {summ.get('rounds_aggregated', 0)} of {summ.get('rounds', 0)} rounds aggregated, "
                "left out of the means")
    return {"strategy": name, "final_accuracy": summ.get("final_eval_accuracy"), "best_accuracy": summ.get(best_from),
            "best_from": best_from, "rounds_to_target": rounds_to(rows, target), "bytes_up": summ["bytes_up"],
            "bytes_down": summ["bytes_down"], "wall_s": round(summ["wall_s"], 1), "status": status, "note": note,
            "environment": provenance.fingerprint(summ.get("environment"))}


def not_run_row(name: str, reason) -> dict:
    """A comparison row for a strategy the pre-flight refused for this setting."""
    return {c: None for c in COLUMNS} | {"strategy": name, "note": f"not run: {reason}"}


def _ran(row: dict) -> bool:
    return not (row.get("note") or "").startswith("not run")


def failed(row: dict) -> bool:
    """Whether a comparison row is a run that ended with one of :data:`FAILED_STATUSES` (not the trained model
    its config asked for)."""
    return row.get("status") in FAILED_STATUSES


def _counts(row: dict) -> bool:
    """Whether a row enters the means, differences and plots: it ran and did not fail."""
    return _ran(row) and not failed(row)


def mean_sd(values) -> tuple:
    """Mean and sample standard deviation (n−1) of the values that are not None; sd is None for one value,
    both are None for none."""
    import statistics

    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def paired(seed_rows: list[dict], name: str, other: str, key: str) -> list[tuple]:
    """(seed, ``name``'s ``key``, ``other``'s ``key``) for each seed where both runs have it (not None or ""), in
    seed order."""
    def by_seed(n):
        return {r["seed"]: r[key] for r in seed_rows if r["strategy"] == n and r.get(key) not in (None, "")}

    a, b = by_seed(name), by_seed(other)
    return [(s, a[s], b[s]) for s in sorted(a) if s in b]


def paired_diffs(seed_rows: list[dict], name: str, other: str, key: str = "final_accuracy") -> list[float]:
    """``name``'s ``key`` minus ``other``'s, for each seed where both have it, in seed order."""
    return [x - y for _, x, y in paired(seed_rows, name, other, key)]


def mixed_machines(seed_rows: list[dict], name: str, other: str) -> list:
    """The seeds where runs ``name`` and ``other`` both have a known, different ``environment`` fingerprint
    (:func:`fedlora.provenance.fingerprint`): their paired difference then also holds the two machines' float-level
    differences."""
    return [s for s, x, y in paired(seed_rows, name, other, "environment") if x != y]


def _aggregate_one(name: str, rows: list[dict]) -> dict:
    """One strategy's rows over seeds -> its ``comparison.csv`` row (figures only). ``seeds``: the runs that count
    (:func:`_counts`); a failed run is named in the note with its seed."""
    ran = [r for r in rows if _counts(r)]
    broken = [r for r in rows if _ran(r) and failed(r)]
    if not ran:
        notes = [f"{r['note']} (seed {r['seed']})" for r in broken] or [rows[0]["note"]]
        return {c: None for c in SUMMARY_COLUMNS} | {"strategy": name, "seeds": 0, "note": "; ".join(notes)}
    out = {c: None for c in SUMMARY_COLUMNS} | {"strategy": name, "seeds": len(ran)}
    for f in FIGURES:
        out[f], out[f + "_sd"] = mean_sd(r.get(f) for r in ran)
    reached = sum(r.get("rounds_to_target") is not None for r in ran)
    out["reached_target"] = f"{reached}/{len(ran)}"
    out["best_from"] = "/".join(sorted({r.get("best_from") or "best_eval_accuracy" for r in ran}))
    notes = [CEILING_NOTE] if name == CENTRALISED else []
    notes += sorted({r["note"] for r in ran if r.get("note") and r["note"] != CEILING_NOTE})
    notes += [f"{r['note']} (seed {r['seed']})" for r in broken]
    refused = [r for r in rows if not _ran(r)]
    if refused:
        notes.append(f"{refused[0]['note']} (seed {', '.join(str(r['seed']) for r in refused)})")
    out["note"] = "; ".join(notes)
    return out


def aggregate(seed_rows: list[dict], baseline: str | None = None, alpha: float = 0.05) -> list[dict]:
    """One ``comparison.csv`` row per strategy (:data:`SUMMARY_COLUMNS`), in the order strategies first appear
    in ``seed_rows``: the figures over seeds, the paired difference of final accuracy against ``baseline`` with a
    verdict (:func:`fedlora.verdicts.verdict`), and the difference to the centralised row when there is one."""
    from .verdicts import verdict

    names = list(dict.fromkeys(r["strategy"] for r in seed_rows))
    rows = [_aggregate_one(n, [r for r in seed_rows if r["strategy"] == n]) for n in names]
    seed_rows = [r for r in seed_rows if _counts(r)]  # a failed run enters no difference
    has_ceiling = any(r["strategy"] == CENTRALISED and r["final_accuracy"] is not None for r in rows)
    for row in rows:
        n = row["strategy"]
        if n == CENTRALISED:
            continue
        if has_ceiling:
            row["diff_to_centralised"] = mean_sd(paired_diffs(seed_rows, n, CENTRALISED))[0]
        if baseline is None:
            continue
        row["baseline"] = baseline
        if n == baseline:
            row["verdict"] = "baseline"
            continue
        diffs = paired_diffs(seed_rows, n, baseline)
        if diffs:
            row["diff_final"], row["diff_min"], row["diff_max"] = mean_sd(diffs)[0], min(diffs), max(diffs)
            row["verdict"], row["verdict_how"] = verdict(diffs, alpha)
        mixed = mixed_machines(seed_rows, n, baseline)
        if mixed:  # the pair's runs were not computed alike: their difference holds the machines' too
            row["note"] = "; ".join(filter(None, [row["note"], f"paired with {baseline} across machines in seed "
                                                  f"{', '.join(map(str, mixed))} (comparison_seeds.csv: environment)"]))
    return rows


def _pm(mean, sd, spec: str) -> str:
    """``mean ± sd`` (just the mean when sd is None; "-" when there is no mean)."""
    if mean is None:
        return "-"
    return format(mean, spec) if sd is None else f"{format(mean, spec)} ± {format(sd, spec)}"


def _pm_bytes(mean, sd) -> str:
    if mean is None:
        return "-"
    return human_bytes(mean) + (f" ± {human_bytes(sd)}" if sd else "")


def _all_reached(reached: str) -> bool:
    k, n = reached.split("/")
    return k == n


def _cells(r: dict, multi: bool, with_ceiling: bool, with_baseline: bool) -> list[str]:
    """One markdown row's cells."""
    rounds = _pm(r["rounds_to_target"], r["rounds_to_target_sd"], ".1f" if multi else ".0f")
    if r["rounds_to_target"] is not None and not _all_reached(r["reached_target"]):
        rounds += f" ({r['reached_target']} seeds)"
    cells = [r["strategy"], _pm(r["final_accuracy"], r["final_accuracy_sd"], ".4f"),
             _pm(r["best_accuracy"], r["best_accuracy_sd"], ".4f"), rounds,
             _pm_bytes(r["bytes_up"], r["bytes_up_sd"]), _pm_bytes(r["bytes_down"], r["bytes_down_sd"]),
             _pm(r["wall_s"], r["wall_s_sd"], ".0f")]
    if with_baseline:
        diff = "-" if r["diff_final"] is None else format(r["diff_final"], "+.4f")
        if r["diff_final"] is not None and multi:
            diff += f" ({r['diff_min']:+.4f}..{r['diff_max']:+.4f})"
        cells.append(diff)
        if multi:
            word = r["verdict"] or "-"
            cells.append(f"{word} ({r['verdict_how']})" if r["verdict_how"] else word)
    if with_ceiling:
        cells.append("-" if r["diff_to_centralised"] is None else format(r["diff_to_centralised"], "+.4f"))
    return cells + [r["note"] or ""]


def markdown_table(rows: list[dict], target: float, baseline: str | None = None) -> str:
    """The table of :func:`aggregate`'s rows: "mean ± sd" with several seeds, the plain values with one; the
    difference to ``baseline`` (and with several seeds its range and verdict), and to the centralised row."""
    multi = max((r["seeds"] or 0 for r in rows), default=0) > 1
    with_ceiling = any(r["strategy"] == CENTRALISED and r["final_accuracy"] is not None for r in rows)
    with_baseline = baseline is not None and len(rows) > 1
    at_best_val = any("test_at_best_val" in (r["best_from"] or "") for r in rows)
    head = ["strategy", "final test acc", "test acc at best val round" if at_best_val else "best test acc",
            f"rounds to {target:g}", "bytes up", "bytes down", "wall s"]
    if with_baseline:
        head.append(f"Δ final vs {baseline}" + (" (min..max)" if multi else ""))
        head += ["verdict"] if multi else []
    head += ["Δ final vs centralised"] if with_ceiling else []
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, multi, with_ceiling, with_baseline)) + " |" for r in rows]
    return "\n".join(lines)


def legend(rows: list[dict], baseline: str | None, alpha: float = 0.05) -> str:
    """The sentences under the table that say how to read it."""
    from .verdicts import MIN_SEEDS_FOR_TEST

    n = max((r["seeds"] or 0 for r in rows), default=0)
    if n <= 1:
        text = "One seed: plain values; differences between strategies are not judged against seed noise."
    else:
        text = (f"Mean ± sample standard deviation over {n} seeds. Δ: final test accuracy minus {baseline}'s, "
                f"paired by seed: mean (min..max). Verdict: " +
                (f"paired t-test at {alpha:g} (≥ {MIN_SEEDS_FOR_TEST} seeds)." if n >= MIN_SEEDS_FOR_TEST else
                 "better or worse when every seed's difference has that sign, otherwise within seed noise."))
    if any(r["strategy"] == CENTRALISED for r in rows):
        text += " centralised: the same model and adapter trained on the pooled client data (a ceiling)."
    return text


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns or COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _curve(run_dir: Path, xkey: str, ykey: str = "eval_accuracy") -> dict:
    """round -> (x, y) of one run, at the rounds that report ``ykey`` (default the test accuracy); x is the round or
    the cumulative MB (up + down) after it."""
    tot, out = 0, {}
    for r in read_metrics(run_dir):
        tot += r.get("bytes_up", 0) + r.get("bytes_down", 0)
        if r.get(ykey) is not None:
            out[r["round"]] = (r["round"] if xkey == "round" else tot / 1e6, r[ykey])
    return out


def band(run_dirs: list[Path], xkey: str, ykey: str = "eval_accuracy") -> tuple[list, list, list]:
    """xs, the mean of ``ykey`` (default the test accuracy) and its sample sd (0 with one run) over the runs, at the
    rounds every run reported it."""
    curves = [_curve(d, xkey, ykey) for d in run_dirs]
    rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    xs, ys, sds = [], [], []
    for rnd in rounds:
        xs.append(mean_sd(c[rnd][0] for c in curves)[0])
        m, sd = mean_sd(c[rnd][1] for c in curves)
        ys.append(m)
        sds.append(sd or 0.0)
    return xs, ys, sds


#: per-round figures averaged over seeds in ``comparison_rounds.csv``: test and validation accuracy, and the
#: aggregation's cross-term error ‖s B̄Ā − ΔW*‖/‖ΔW*‖ of the strategies that average factors (empty for the others)
ROUND_FIGURES = ["eval_accuracy", "val_accuracy", "cross_term_error"]
ROUND_COLUMNS = ["strategy", "round", "seeds"] + [c for f in ROUND_FIGURES for c in (f, f + "_sd")]


def round_rows(runs: dict[str, list[Path]]) -> list[dict]:
    """One row per (strategy, round that every one of its runs reached): each of :data:`ROUND_FIGURES` as the mean
    and sample sd over the runs (one per seed), or None where some run did not report it that round."""
    rows = []
    for name, dirs in runs.items():
        per_run = [{r["round"]: r for r in read_metrics(d)} for d in dirs]
        for rnd in sorted(set.intersection(*(set(m) for m in per_run))):
            row = {"strategy": name, "round": rnd, "seeds": len(dirs)}
            for k in ROUND_FIGURES:
                vals = [m[rnd].get(k) for m in per_run]
                row[k], row[k + "_sd"] = (None, None) if None in vals else mean_sd(vals)
            rows.append(row)
    return rows


def _band_line(ax, xs, ys, sds, with_band: bool, **style) -> None:
    """One strategy's mean line on ``ax``, with a band of ± one sd when it averages several seeds."""
    (line,) = ax.plot(xs, ys, marker="o", ms=3, **style)
    if with_band:
        ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def plots(out: Path, runs: dict[str, list[Path]]) -> None:
    """``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` in ``out``: one line per strategy (the mean over
    its run directories, one per seed) with a band of ± one sample sd. The centralised run moves no bytes: on the
    bytes plot it is a dashed horizontal line at its final accuracy. ``cross_term_error_vs_round.png`` likewise,
    for the strategies whose runs report a cross-term error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for xkey, fname, xlabel in (("round", "accuracy_vs_round.png", "round"),
                                ("bytes", "accuracy_vs_bytes.png", "cumulative bytes (up + down, MB)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, dirs in runs.items():
            xs, ys, sds = band(dirs, xkey)
            if not xs:
                continue
            if name == CENTRALISED and xkey == "bytes":
                ax.axhline(ys[-1], ls="--", color="grey", label=f"{name} (ceiling)")
                continue
            style = {"ls": "--", "color": "grey", "label": f"{name} (ceiling)"} if name == CENTRALISED else {}
            _band_line(ax, xs, ys, sds, len(dirs) > 1, **({"label": name} | style))
        _save(fig, ax, out / fname, xlabel, "test accuracy" + (
            " (mean ± sd over seeds)" if any(len(d) > 1 for d in runs.values()) else ""))
    curves = {n: band(d, "round", "cross_term_error") for n, d in runs.items()}
    crossed = {n: c for n, c in curves.items() if c[0]}  # the strategies whose runs report the error
    if crossed:  # next to accuracy: when the averaged factors' cross terms are large, and whether accuracy pays
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in crossed.items():
            _band_line(ax, *curve, len(runs[name]) > 1, label=name)
        _save(fig, ax, out / "cross_term_error_vs_round.png", "round", "cross-term error ‖sB̄Ā − ΔW*‖ / ‖ΔW*‖")


def _save(fig, ax, path: Path, xlabel: str, ylabel: str) -> None:
    """Label, grid and legend ``ax``, write ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(out: Path, seed_rows: list[dict], target: float, setting: str,
                     baseline: str | None = None) -> str:
    """From one row per (seed, strategy) (:data:`COLUMNS`; ``run_dir`` relative to ``out``): ``comparison_seeds.csv``,
    ``comparison.csv`` (:func:`aggregate`), ``comparison.md`` (``setting``: one sentence on what was compared) and,
    when some run finished, ``comparison_rounds.csv`` (:func:`round_rows`) and the plots; returns the markdown table."""
    out = Path(out)
    write_csv(out / "comparison_seeds.csv", seed_rows, COLUMNS)
    rows = aggregate(seed_rows, baseline)
    write_csv(out / "comparison.csv", rows, SUMMARY_COLUMNS)
    table = markdown_table(rows, target, baseline)
    (out / "comparison.md").write_text(f"# fedlora compare\n\n{setting}\n\n{table}\n\n{legend(rows, baseline)}\n")
    runs: dict[str, list[Path]] = {}
    for r in seed_rows:
        if _counts(r) and r.get("run_dir"):
            runs.setdefault(r["strategy"], []).append(out / r["run_dir"])
    if runs:
        write_csv(out / "comparison_rounds.csv", round_rows(runs), ROUND_COLUMNS)
        plots(out, runs)
    return table
