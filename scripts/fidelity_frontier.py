"""The speed/fidelity trade-off of several `cllm distill` runs: one point per run and guess.

Reads RUN/bench/<bench>/bench.json (the CLLM's Jacobi rows on GSM8K, the target being the first
model) and RUN/eval/fidelity.json of each run; prints a markdown table and draws tokens/forward
against same top-1 and KL. In-domain points take their speed from the bench (both guesses);
out-of-domain points from the fidelity run's own free-running decoding of those prompts (the
lookup guess, float32), the only speed measured there.

Usage: .venv/bin/python scripts/fidelity_frontier.py --out docs/figures/fidelity-frontier.png RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def points(run: Path) -> dict:
    bench = json.loads(next(run.glob("bench/*/bench.json")).read_text())
    fidelity = json.loads((run / "eval" / "fidelity.json").read_text())
    rows = {row["decoder"]: row for row in bench["summary"] if row["model"] != bench["summary"][0]["model"]}
    in_domain = fidelity["domains"][fidelity["in_domain"]]
    others = [row for name, row in fidelity["domains"].items() if name != fidelity["in_domain"]]
    return {
        "out_lookup_tpf": sum(row["model_tokens_per_forward"] for row in others) / len(others),
        "run": run.name,
        "paper": rows.get("jacobi:16"), "lookup": rows.get("jacobi:16:lookup"),
        "in_top1": in_domain["same_top1"], "in_kl": in_domain["kl_mean"], "identical": in_domain.get("identical"),
        "out_top1": fidelity["out_of_domain"]["same_top1"], "out_kl": fidelity["out_of_domain"]["kl_mean"],
        "ppl_ratio": in_domain.get("perplexity_ratio"),
    }


def target_point(run: Path, itself: Path | None) -> dict:
    """The target, from the first run's bench; `itself` is `cllm eval fidelity` of the target against
    itself (where it has run), for its out-of-domain speed."""
    summary = json.loads(next(run.glob("bench/*/bench.json")).read_text())["summary"]
    rows = {row["decoder"]: row for row in summary if row["model"] == summary[0]["model"]}
    out_speed = None
    if itself is not None:
        domains = json.loads(itself.read_text())["domains"]
        others = [row for name, row in list(domains.items())[1:]]
        out_speed = sum(row["model_tokens_per_forward"] for row in others) / len(others)
    return {
        "out_lookup_tpf": out_speed,
        "run": "target",
        "paper": rows.get("jacobi:16"),
        "lookup": rows.get("jacobi:16:lookup"),
        "in_top1": 1.0,
        "in_kl": 0.0,
        "identical": 1.0,
        "out_top1": 1.0,
        "out_kl": 0.0,
        "ppl_ratio": 1.0,
    }


def table(rows: list[dict]) -> str:
    lines = ["| run | tok/fwd (paper guess) | speedup | tok/fwd (lookup) | speedup | same top-1 GSM8K | KL GSM8K "
             "| same top-1 out-of-domain | KL out-of-domain | identical outputs GSM8K | perplexity ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def speed(guess: str) -> str:
            row = r[guess]
            return (
                "- | -" if row is None else f"{row['tokens_per_forward']:.2f} | {row['speedup_vs_reference_ar']:.2f}x"
            )

        lines.append(f"| {r['run']} | {speed('paper')} | {speed('lookup')} | {r['in_top1']:.1%} | {r['in_kl']:.3f} "
                     f"| {r['out_top1']:.1%} | {r['out_kl']:.3f} | {r['identical']:.0%} | {r['ppl_ratio']:.2f} |")
    return "\n".join(lines)


def domain_table(runs: list[Path]) -> str:
    """Every run's `cllm eval fidelity` rows, domain by domain."""
    lines = [
        "| run | domain | same top-1 | KL mean | KL p90 | KL p99 | identical outputs | common prefix "
        "| perplexity ratio | CLLM tokens/forward (lookup, float32) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        fidelity = json.loads((run / "eval" / "fidelity.json").read_text())
        for name, row in fidelity["domains"].items():
            ratio = "-" if row.get("perplexity_ratio") is None else f"{row['perplexity_ratio']:.2f}"
            lines.append(
                f"| {run.name} | {name} | {row['same_top1']:.1%} | {row['kl_mean']:.3f} | {row['kl_p90']:.3f} "
                f"| {row['kl_p99']:.3f} | {row['identical']:.0%} | {row['common_prefix_fraction']:.0%} | {ratio} "
                f"| {row['model_tokens_per_forward']:.2f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [  # (label, marker, colour, x domain, speed of a row)
        (
            "GSM8K, paper guess (bf16 bench)",
            "o",
            "tab:blue",
            "in",
            lambda r: r["paper"] and r["paper"]["tokens_per_forward"],
        ),
        (
            "GSM8K, lookup guess (bf16 bench)",
            "o",
            "tab:orange",
            "in",
            lambda r: r["lookup"] and r["lookup"]["tokens_per_forward"],
        ),
        ("MT-bench + HumanEval, lookup guess (float32)", "s", "tab:green", "out", lambda r: r["out_lookup_tpf"]),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (metric, label) in zip(
        axes, (("top1", "same top-1 as the target"), ("kl", "KL(target || CLLM), nats/token"))
    ):
        for name, marker, colour, domain, speed in series:
            points = [(r[f"{domain}_{metric}"], speed(r), r["run"]) for r in rows if speed(r)]
            axis.scatter([x for x, _, _ in points], [y for _, y, _ in points], marker=marker, color=colour, label=name)
            for x, y, run in points:
                axis.annotate(run, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set(xlabel=label, ylabel="tokens per forward (Jacobi n=16)")
        axis.grid(alpha=0.3)
    axes[0].axvline(0.95, color="grey", linestyle=":", linewidth=1)
    axes[1].axvline(0.05, color="grey", linestyle=":", linewidth=1)
    axes[1].set_xscale("symlog", linthresh=0.01)
    axes[1].set_xlim(left=0)
    axes[0].legend(fontsize=7)
    figure.suptitle("speed vs fidelity to the target, every run a point (dotted: the fidelity targets)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    parser.add_argument("--target-fidelity", type=Path, help="`cllm eval fidelity` of the target against itself")
    args = parser.parse_args()
    rows = [target_point(args.runs[0], args.target_fidelity)] + [points(run) for run in args.runs]
    print(table(rows))
    print()
    print(domain_table(([args.target_fidelity.parent.parent] if args.target_fidelity else []) + args.runs))
    plot(rows, args.out)


if __name__ == "__main__":
    main()
