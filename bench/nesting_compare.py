"""Heterogeneous ranks before and after the nested start (issue 17 item 6), over seeds, with paired verdicts.

Tabulates two finished `fedlora compare` runs of the same setting, one with ``strategy.nested_init=false``
(each client its own A at its own rank: the behaviour before nesting) and one with the default nested start
(every client the first r_k rows of one seeded A of the largest rank):

    R=bench/results/compare_heterogeneous
    S="preset=heterogeneous partitioner=dirichlet partitioner.alpha=0.5 centralised.lr_grid=[1.0e-3] seeds=[0,1,2]"
    fedlora compare strategies=[hetlora,flexlora,flora] baseline=flora $S out_dir=$R/nested
    fedlora compare strategies=[hetlora,flexlora] $S strategy.nested_init=false compare.centralised=false \
        out_dir=$R/unrelated
    python bench/nesting_compare.py --nested $R/nested --unrelated $R/unrelated

Per strategy and start: final test accuracy and test accuracy at the best validation round (mean ± sample sd
over seeds), the round's ``cross_term_error`` ‖B_g A_g − ΔW*‖/‖ΔW*‖ (zero-padded or SVD-truncated average
against the exact weighted sum of the clients' products) at rounds 1, 2 and the last; then nested − unrelated
final accuracy paired by seed with its verdict (:func:`fedlora.verdicts.verdict`). Writes ``nesting.md`` and
``nesting.json`` beside the two comparisons. Pure tabulation: it trains nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora import config  # noqa: E402
from fedlora.compare import describe  # noqa: E402
from fedlora.report import mean_sd, read_metrics, summarise  # noqa: E402
from fedlora.rundir import STATUSES  # noqa: E402
from fedlora.verdicts import verdict  # noqa: E402

STARTS = ("unrelated", "nested")
SUCCESS = {s for s, code in STATUSES.items() if code == 0}


def seed_rows(comparison: Path) -> dict[tuple[int, str], dict]:
    """``{(seed, strategy): row}`` of every finished, successful run under ``comparison/seed_<s>/<strategy>/``
    (:func:`fedlora.report.summarise`), so an interrupted comparison tabulates the seeds it has."""
    out = {}
    for d in sorted(comparison.glob("seed_*/*/summary.json")):
        row = summarise(d.parent.name, d.parent, 0.8)
        if row["status"] in SUCCESS:
            out[int(d.parent.parent.name.split("_", 1)[1]), d.parent.name] = {**row, "run_dir": d.parent}
    return out


def cross_terms(run_dir: Path) -> list[float]:
    """The run's ``cross_term_error`` per round from round 1 (NaN where a round has none)."""
    return [float(m.get("cross_term_error", float("nan"))) for m in read_metrics(run_dir) if m["round"] > 0]


def pm(values, spec=".4f") -> str:
    mean, sd = mean_sd(values)
    return "-" if mean is None else f"{mean:{spec}}" + ("" if sd is None else f" ± {sd:{spec}}")


def tabulate(dirs: dict[str, Path], strategies: list[str]) -> dict:
    rows = {s: seed_rows(d) for s, d in dirs.items()}
    out = {}
    for name in strategies:
        per = {}
        for start in STARTS:
            runs = {seed: r for (seed, n), r in rows[start].items() if n == name}
            errs = {seed: cross_terms(r["run_dir"]) for seed, r in runs.items()}
            per[start] = {
                "seeds": sorted(runs),
                "final_accuracy": [float(runs[s]["final_accuracy"]) for s in sorted(runs)],
                "test_at_best_val": [float(runs[s]["best_accuracy"]) for s in sorted(runs)],
                "cross_term_error": {str(s): errs[s] for s in sorted(runs)},
            }
        paired = sorted(set(per["nested"]["seeds"]) & set(per["unrelated"]["seeds"]))
        acc = {st: dict(zip(per[st]["seeds"], per[st]["final_accuracy"])) for st in STARTS}
        diffs = [acc["nested"][s] - acc["unrelated"][s] for s in paired]
        word, how = verdict(diffs) if diffs else ("no verdict", "no paired seeds")
        out[name] = {**per, "paired_seeds": paired, "nested_minus_unrelated": diffs, "verdict": word, "how": how}
    return out


def markdown(result: dict, setting: str) -> str:
    lines = [f"# Heterogeneous ranks: unrelated vs nested first-round A\n\n{setting}\n",
             "| strategy | start | seeds | final test acc | test acc at best val | cross-term error r1 | r2 | last round |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        for start in STARTS:
            e = list(r[start]["cross_term_error"].values())
            at = lambda i: pm([x[i] for x in e if len(x) > abs(i)], ".3f")  # noqa: E731
            seeds = ", ".join(str(x) for x in r[start]["seeds"]) or "-"
            lines.append(f"| {name} | {start} | {seeds} | {pm(r[start]['final_accuracy'])} | {pm(r[start]['test_at_best_val'])}"
                         f" | {at(0)} | {at(1)} | {at(-1)} |")
    lines += ["", "| strategy | nested − unrelated, final test acc (min..max) | verdict |", "|---|---|---|"]
    for name, r in result.items():
        d = r["nested_minus_unrelated"]
        span = f"{statistics.fmean(d):+.4f} ({min(d):+.4f}..{max(d):+.4f})" if d else "-"
        lines.append(f"| {name} | {span} | {r['verdict']} ({r['how']}) |")
    lines += ["", "Mean ± sample standard deviation over seeds. Cross-term error: ‖B_g A_g − ΔW*‖_F / ‖ΔW*‖_F over all "
              "modules, ΔW* = Σ p_k s_k B_k A_k (the exact aggregate); FlexLoRA's global is the exact SVD of ΔW* (float "
              "rounding only), what it loses is the truncation to each client's rank (`truncation_error` in its "
              "metrics). Verdict: better or worse when every seed's "
              "difference has that sign, otherwise within seed noise."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nested", type=Path, required=True, help="the comparison with the default nested start")
    ap.add_argument("--unrelated", type=Path, required=True, help="the comparison with strategy.nested_init=false")
    ap.add_argument("--strategies", nargs="+", default=["hetlora", "flexlora"])
    ap.add_argument("--out", type=Path, help="where nesting.md/.json go (default: beside the two comparisons)")
    args = ap.parse_args()
    out = args.out or args.nested.parent
    result = tabulate({"nested": args.nested, "unrelated": args.unrelated}, args.strategies)
    first = next(iter(sorted(args.nested.glob("seed_*/*/config.yaml"))))
    cfg = config.from_yaml(first.read_text())
    setting = (f"{describe(cfg).rsplit(', seed', 1)[0]}, client ranks {list(cfg.client_ranks)}, Dirichlet({cfg.partitioner.alpha}); "
               "seeds as listed per row.")
    (out / "nesting.md").write_text(markdown(result, setting))
    doc = {"what": "heterogeneous ranks, unrelated vs nested start (bench/nesting_compare.py)",
           "command": "python bench/nesting_compare.py " + " ".join(sys.argv[1:]), "setting": setting,
           "strategies": result}
    (out / "nesting.json").write_text(json.dumps(doc, indent=1) + "\n")
    print((out / "nesting.md").read_text())


if __name__ == "__main__":
    main()
