#!/usr/bin/env python3
"""Replays drift_eval's statistics through verdict rules, offline.

    DRIFT_EVAL_DUMP=z.tsv cargo run --release --example drift_eval -- --runs 30 --static --windows 100
    python3 scripts/drift_replay.py z.tsv          # needs numpy
    python3 scripts/drift_replay.py z.tsv knn      # the verdicts of some methods only

Each dumped statistic is calibrated as the drift stage does it (residual against the median
of the series' earlier windows over a spread: the larger of 1.4826 · MAD and (q90 − median)
/ 1.2816, never below 1, after 12 windows; all three leave out the windows the rule judges
together with this one), then judged by each rule below. The first rule is the shipped
default: its line matches the eval's own "any" column (false alarms per 1,000 stationary
windows per series, input or output; share of shifted runs whose input drift is found
within 3 windows).
"""
import collections
import math
import sys

import numpy as np

METHODS = ["mmd", "centroid", "knn"]
FIELDS = ["input", "output"]
CALIBRATION_WINDOWS = 12
TAIL_QUANTILE, TAIL_Z, TAIL_MIN_HISTORY = 0.9, 1.2815515655446004, 20
HORIZON = 10


def load(path, hold=2):
    """(phase, run) -> (windows, residuals[field, method, window], NaN where not judged);
    `hold`: the newest history values left out of the median, MAD and tail quantile
    (persistence − 1)."""
    rows = collections.defaultdict(lambda: collections.defaultdict(list))
    for line in open(path):
        phase, run, w, field, method, stat, status = line.rstrip("\n").split("\t")
        # Every window is kept: one that was not judged (too few texts, a reference still
        # filling up) has no residual, and breaks a run of windows as in the stage.
        z = float(stat) if status in ("judged", "calibrating") else math.nan
        rows[(phase, int(run))][(field, method)].append((int(w), z))
    out = {}
    for key, series in rows.items():
        ws = sorted({w for s in series.values() for w, _ in s})
        at = {w: i for i, w in enumerate(ws)}
        r = np.full((len(FIELDS), len(METHODS), len(ws)), np.nan)
        for (field, method), seq in series.items():
            history = []
            for w, z in sorted(seq):
                if math.isnan(z):
                    continue
                if len(history) >= CALIBRATION_WINDOWS:
                    older = np.sort(history[:len(history) - hold])
                    h = older if len(older) else np.sort(history)
                    median = h[len(h) // 2]
                    dev = np.sort(np.abs(h - median))
                    sigma = max(1.4826 * dev[len(dev) // 2], 1.0)
                    if len(older) >= TAIL_MIN_HISTORY:
                        q = min(int(TAIL_QUANTILE * len(older)), len(older) - 1)
                        sigma = max(sigma, (older[q] - median) / TAIL_Z)
                    r[FIELDS.index(field), METHODS.index(method), at[w]] = (z - median) / sigma
                history.append(z)
        out[key] = (np.array(ws), r)
    return out


def persistence(k, sigma, instant=math.inf):
    """Above `sigma` in `k` windows running (an unjudged window breaks the run), or above
    `instant` in one."""
    def rule(r):
        above = np.nan_to_num(r, nan=-np.inf) > sigma
        run = np.array([t + 1 >= k and above[t - k + 1:t + 1].all() for t in range(len(r))], bool)
        return run | (np.nan_to_num(r, nan=-np.inf) > instant)
    return rule


def either(a, b):
    """Flags where either rule does."""
    return lambda r: a(r) | b(r)


def cusum(clip, slack, threshold):
    """Page's CUSUM on residuals clipped at `clip`."""
    def rule(r):
        s, out = 0.0, np.zeros(len(r), bool)
        for t, x in enumerate(r):
            if not np.isnan(x):
                s = max(0.0, s + min(x, clip) - slack)
                out[t] = s > threshold
        return out
    return rule


def evaluate(data, rule, methods=None):
    alarms = windows = 0
    found = collections.defaultdict(list)
    for (phase, _), (ws, r) in data.items():
        fields = (0, 1) if phase == "stationary" else (0,)
        flagged = np.zeros(len(ws), bool)
        for f in fields:
            for m in range(len(METHODS)):
                if methods is None or METHODS[m] in methods:
                    flagged |= rule(r[f, m])
        if phase == "stationary":
            counted = ws >= 0  # drift_eval numbers warm-up windows negative
            alarms += flagged[counted].sum()
            windows += counted.sum()
        else:
            hits = np.where((ws >= 0) & flagged)[0]
            found[phase].append(int(ws[hits[0]]) + 1 if len(hits) else HORIZON + 1)
    shares = {p: np.mean(np.array(d) <= 3) for p, d in sorted(found.items())}
    return 1000 * alarms / max(windows, 1), windows, shares


# (name, rule, the stage's `persistence` for it: its calibration holds out persistence − 1).
RULES = [
    ("4σ in 3 windows (default)", persistence(3, 4.0), 3),
    ("3σ in 3 windows", persistence(3, 3.0), 3),
    ("4σ in 2 windows", persistence(2, 4.0), 2),
    ("3σ in 2 windows", persistence(2, 3.0), 2),
    ("6σ in 1 window", persistence(1, 6.0), 1),
    ("4σ in 3 windows, or 6σ in 1", persistence(3, 4.0, 6.0), 3),
    ("4σ in 3 windows, or 8σ in 2", either(persistence(3, 4.0), persistence(2, 8.0)), 3),
    ("CUSUM clip 4σ, slack 1σ, h 6σ", cusum(4.0, 1.0, 6.0), 1),
]

if __name__ == "__main__":
    data = {}
    methods = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    unknown = set(methods or []) - set(METHODS)
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(sorted(unknown))}: the dump has {', '.join(METHODS)}")
    for name, rule, k in RULES:
        if k not in data:
            data[k] = load(sys.argv[1], hold=k - 1)
        fa, n, shares = evaluate(data[k], rule, methods)
        cells = "  ".join(f"{p} {100 * s:.0f} %" for p, s in shares.items())
        print(f"{name:32s} false alarms {fa:4.1f}/1,000 ({n} windows)  {cells}")
