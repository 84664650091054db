"""The human-readable report: `<out>/report.md` with PNG plots in `<out>/report_plots/`.

Stage funnel, mix target vs achieved, length and perplexity histograms, the largest duplicate
clusters, top removal reasons, and where the time went.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plots(out: Path, manifest: dict, table) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = out / "report_plots"
    d.mkdir(exist_ok=True)
    names = []
    df = table.to_pandas()
    kept = df[df["outcome"] == "kept"]

    funnel = manifest["funnel"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["stage"] for r in funnel], [r["all"] for r in funnel], color="tab:blue")
    ax.set_ylabel("documents remaining")
    ax.set_title("stage funnel")
    plt.xticks(rotation=30)
    fig.tight_layout()
    fig.savefig(d / "funnel.png")
    plt.close(fig)
    names.append("funnel.png")

    mix = manifest.get("mix", {})
    doms = sorted(mix)
    x = np.arange(len(doms))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [100 * mix[k]["target"] for k in doms], 0.4, label="target")
    ax.bar(x + 0.2, [100 * mix[k]["achieved"] for k in doms], 0.4, label="achieved")
    ax.set_xticks(x, doms)
    ax.set_ylabel("% of tokens")
    ax.legend()
    ax.set_title("domain mix")
    fig.tight_layout()
    fig.savefig(d / "mix.png")
    plt.close(fig)
    names.append("mix.png")

    def histogram(frame, values, xlabel: str, title: str, name: str) -> None:
        """One log10 histogram per domain, overlaid."""
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for dom, g in frame.groupby("domain"):
            ax.hist(np.log10(values(g)), bins=40, alpha=0.5, label=dom)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(d / name)
        plt.close(fig)
        names.append(name)

    histogram(kept, lambda g: g["n_chars"].clip(lower=1), "log10(characters) of kept documents",
              "document lengths", "lengths.png")  # fmt: skip
    scored = df[df["ppl"].notna() & np.isfinite(df["ppl"])]
    if len(scored):
        histogram(scored, lambda g: g["ppl"], "log10(perplexity) under the proxy bigram LM", "perplexity",
                  "perplexity.png")  # fmt: skip
    return names


def write(out: Path, manifest: dict, table) -> Path:
    plots = _plots(out, manifest, table)
    lines = ["# Curation report", ""]
    c = manifest["counts"]["all"]
    read = (f"{manifest['records_read']:,} records read from {manifest['files_read']:,} files: {c['kept']:,} kept, "
            f"{c['filtered']:,} filtered, {c['duplicate']:,} duplicates, {c['quarantined']:,} quarantined.")  # fmt: skip
    if "splits" in manifest:
        lines += [f"{read} seq_len {manifest['seq_len']}, vocab {manifest['vocab_size']:,}, "
                  f"{manifest['splits']['train']['sequences']:,} train / {manifest['splits']['val']['sequences']:,} "
                  f"val sequences; {manifest['seconds']:.0f} s.", ""]  # fmt: skip
    else:  # the run stopped before packing (pipeline.EmptyCurationError)
        lines += [read, "", f"**No output: {manifest['no_output']}.**", ""]
    if manifest.get("blank_lines"):
        lines += [f"{manifest['blank_lines']:,} blank lines in JSON-lines files were skipped: they are not records.",
                  ""]  # fmt: skip
    if manifest.get("skipped_files_by_reason"):
        lines += ["Files not read: " + ", ".join(f"{n:,} {r}" for r, n in manifest["skipped_files_by_reason"].items())
                  + " (the paths are in the manifest's `skipped_files`).", ""]  # fmt: skip
    lines += ["## Counts per domain", "", "| domain | input | kept | filtered | duplicate | quarantined |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for dom, r in manifest["counts"].items():
        lines.append(
            f"| {dom} | {r['input']:,} | {r['kept']:,} | {r['filtered']:,} | {r['duplicate']:,} | {r['quarantined']:,} |"
        )
    doms = [k for k in manifest["funnel"][0] if k != "stage"]
    lines += ["", "## Stage funnel (documents remaining)", "", "![funnel](report_plots/funnel.png)", "",
              "| stage | " + " | ".join(doms) + " |", "|---|" + "---:|" * len(doms)]  # fmt: skip
    for r in manifest["funnel"]:
        lines.append(f"| {r['stage']} | " + " | ".join(f"{r[k]:,}" for k in doms) + " |")
    lines += ["", "## Mix: target vs achieved (tokens after packing)", "", "![mix](report_plots/mix.png)", "",
              "| domain | target | achieved | tokens | sampling ratio |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for dom, m in manifest.get("mix", {}).items():
        lines.append(
            f"| {dom} | {100 * m['target']:.1f}% | {100 * m['achieved']:.1f}% | {m['tokens']:,} | {m['sampling_ratio']:.2f} |"
        )
    lines += ["", "## Top removal reasons", "", "| reason | documents |", "|---|---:|"]
    for r, n in list(manifest["reasons"].items())[:25]:
        lines.append(f"| `{r}` | {n:,} |")
    lines += [
        "",
        "## Largest duplicate clusters",
        "",
        "| reason | size | survivor | some members |",
        "|---|---:|---|---|",
    ]
    clusters = [
        c for k in ("dedup", "semdedup") for c in manifest["dedup"].get(k, {}).get("largest_clusters", [])
    ]
    for cl in sorted(clusters, key=lambda c: -c["size"])[:15]:
        lines.append(
            f"| {cl['reason']} | {cl['size']} | `{cl['survivor']}` | {', '.join(f'`{m}`' for m in cl['members'][:3])} |"
        )
    for name in plots[2:]:
        lines += ["", f"![{name}](report_plots/{name})"]
    acc = manifest.get("langid_accuracy")
    if acc:
        per = ", ".join(f"{k} {v:.3f}" for k, v in acc["per_language"].items())
        lines += ["", "## Language identification", "",
                  f"Accuracy {acc['accuracy']:.3f} on the {acc['n']:,} records whose source gave a language "
                  f"(per language: {per})."]  # fmt: skip
    t = manifest.get("timings_s", {})
    if t:
        lines += [
            "",
            "## Time per stage (s)",
            "",
            " · ".join(f"{k} {v:.1f}" for k, v in t.items() if not math.isnan(v)),
        ]
    if manifest.get("stages_skipped_on_resume"):
        lines += [
            "",
            f"Skipped on resume (already done for this config): {', '.join(manifest['stages_skipped_on_resume'])}",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
