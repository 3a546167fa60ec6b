"""The speed/fidelity trade-off of several `cllm distill` runs: one point per run and guess.

Reads RUN/bench/<bench>/bench.json (the CLLM's Jacobi rows, the target being the first model) and
RUN/eval/fidelity.json of each run; prints a markdown table and draws tokens/forward against same
top-1 and KL, in-domain and out-of-domain.

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
    return {
        "run": run.name,
        "paper": rows.get("jacobi:16"), "lookup": rows.get("jacobi:16:lookup"),
        "in_top1": in_domain["same_top1"], "in_kl": in_domain["kl_mean"], "identical": in_domain.get("identical"),
        "out_top1": fidelity["out_of_domain"]["same_top1"], "out_kl": fidelity["out_of_domain"]["kl_mean"],
        "ppl_ratio": in_domain.get("perplexity_ratio"),
    }


def target_point(run: Path) -> dict:
    """The target itself (perfectly faithful by definition), from the first run's bench."""
    summary = json.loads(next(run.glob("bench/*/bench.json")).read_text())["summary"]
    rows = {row["decoder"]: row for row in summary if row["model"] == summary[0]["model"]}
    return {"run": "target", "paper": rows.get("jacobi:16"), "lookup": rows.get("jacobi:16:lookup"), "in_top1": 1.0,
            "in_kl": 0.0, "identical": 1.0, "out_top1": 1.0, "out_kl": 0.0, "ppl_ratio": 1.0}


def table(rows: list[dict]) -> str:
    lines = ["| run | tok/fwd (paper guess) | speedup | tok/fwd (lookup) | speedup | same top-1 GSM8K | KL GSM8K "
             "| same top-1 out-of-domain | KL out-of-domain | identical outputs GSM8K | perplexity ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def speed(guess: str) -> str:
            row = r[guess]
            return "- | -" if row is None else f"{row['tokens_per_forward']:.2f} | {row['speedup_vs_reference_ar']:.2f}x"
        lines.append(f"| {r['run']} | {speed('paper')} | {speed('lookup')} | {r['in_top1']:.1%} | {r['in_kl']:.3f} "
                     f"| {r['out_top1']:.1%} | {r['out_kl']:.3f} | {r['identical']:.0%} | {r['ppl_ratio']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (metric, label) in zip(axes, (("top1", "same top-1 as the target"), ("kl", "KL(target || CLLM), nats/token"))):
        for domain, marker in (("in", "o"), ("out", "s")):
            for guess, colour in (("paper", "tab:blue"), ("lookup", "tab:orange")):
                xs = [r[f"{domain}_{metric}"] for r in rows if r[guess]]
                ys = [r[guess]["tokens_per_forward"] for r in rows if r[guess]]
                axis.scatter(xs, ys, marker=marker, color=colour, alpha=0.8 if domain == "in" else 0.45,
                             label=f"{'GSM8K' if domain == 'in' else 'out-of-domain'}, {guess} guess")
                if domain == "in":
                    for r in (r for r in rows if r[guess]):
                        axis.annotate(r["run"], (r[f"in_{metric}"], r[guess]["tokens_per_forward"]), fontsize=7,
                                      xytext=(3, 3), textcoords="offset points")
        axis.set(xlabel=label, ylabel="tokens per forward (CLLM, Jacobi n=16)")
        axis.grid(alpha=0.3)
    axes[0].axvline(0.95, color="grey", linestyle=":", linewidth=1)
    axes[1].axvline(0.05, color="grey", linestyle=":", linewidth=1)
    axes[1].set_xscale("symlog", linthresh=0.01)
    axes[0].legend(fontsize=7)
    figure.suptitle("speed vs fidelity: every run a point (dotted: the fidelity targets)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    args = parser.parse_args()
    rows = [target_point(args.runs[0])] + [points(run) for run in args.runs]
    print(table(rows))
    plot(rows, args.out)


if __name__ == "__main__":
    main()
