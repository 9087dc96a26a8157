#!/usr/bin/env python3
"""A telltale custom scorer (type = "command"): JSON Lines on stdin, one answer per line on stdout.

Each request: {"scorer": ..., "event_id": ..., "input": ..., "output": ..., "expected": ..., "context": ...}
Each answer:  {"score": 0..1, "passed": true|false (optional), "explanation": "..." (optional)}

telltale starts the process once and keeps it, so load models or data before the loop.
This one scores how many of the question's words the answer repeats (a toy relevance check),
and, for tests, sleeps when the output asks it to or exits when told to.
"""
import json
import re
import sys
import time

# `--delay S`: take S seconds per request (tests use it to stand in for a slow scorer).
DELAY = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0

WORD = re.compile(r"[a-z]{4,}")

for line in sys.stdin:
    req = json.loads(line)
    output = req.get("output") or ""
    time.sleep(DELAY)
    if output.startswith("#sleep"):
        time.sleep(float(output.split()[1]))
    if output.startswith("#exit"):
        sys.exit(3)
    asked = set(WORD.findall((req.get("input") or "").lower()))
    said = set(WORD.findall(output.lower()))
    score = len(asked & said) / len(asked) if asked else 1.0
    answer = {"score": round(score, 4), "explanation": f"{len(asked & said)} of {len(asked)} question words answered"}
    print(json.dumps(answer), flush=True)
