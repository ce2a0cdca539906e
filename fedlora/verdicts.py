"""One plain verdict on a strategy against a baseline, from the paired differences (strategy − baseline, one per
seed) of a figure such as final test accuracy. Pure: no Flower, no files.

- one seed: no verdict (nothing measures the seed noise);
- 2 to 4 seeds: "better" when every difference is above 0, "worse" when every one is below 0, otherwise (the
  range crosses or touches 0) "within seed noise";
- 5 seeds or more: a two-sided paired t-test (``scipy.stats.ttest_rel``) at ``alpha``: "better" or "worse" by
  the sign of the mean difference when p < alpha, otherwise "within seed noise".
"""

from __future__ import annotations

import math

#: seeds from which the paired t-test decides instead of the range
MIN_SEEDS_FOR_TEST = 5


def verdict(diffs: list[float], alpha: float = 0.05) -> tuple[str, str]:
    """``(word, how)``: word is "better", "worse", "within seed noise" or "no verdict" (one seed); how says what
    decided it, e.g. "all 3 seeds > 0", "range crosses 0", "paired t-test, p=0.03"."""
    d = [round(float(x), 12) for x in diffs]  # 0.8 - 0.8 may leave 1e-17: that is a tie
    if not d or any(math.isnan(x) for x in d):
        raise ValueError("verdict needs at least one difference and no NaN.")
    n = len(d)
    if n == 1:
        return "no verdict", "one seed"
    if n >= MIN_SEEDS_FOR_TEST:
        return _t_test(d, alpha)
    if min(d) > 0:
        return "better", f"all {n} seeds > 0"
    if max(d) < 0:
        return "worse", f"all {n} seeds < 0"
    touches = min(d) == 0 or max(d) == 0
    return "within seed noise", "range touches 0" if touches else "range crosses 0"


def _t_test(d: list[float], alpha: float) -> tuple[str, str]:
    """The ≥ 5 seeds case: ttest_rel of the strategy's figures against the baseline's (here: d against 0)."""
    from scipy.stats import ttest_rel

    if len(set(d)) == 1:  # no spread: the t statistic is undefined, the difference is the same in every seed
        if d[0] == 0:
            return "within seed noise", "identical in every seed"
        return ("better" if d[0] > 0 else "worse"), f"the same difference in all {len(d)} seeds"
    p = float(ttest_rel(d, [0.0] * len(d)).pvalue)
    if p < alpha:
        return ("better" if sum(d) > 0 else "worse"), f"paired t-test, p={p:.2g}"
    return "within seed noise", f"paired t-test, p={p:.2g}"
