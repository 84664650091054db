"""End-of-run plots for MLflow: the loss curve and an expert-load heatmap."""

from __future__ import annotations

from pathlib import Path


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return []
    paths = []
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["lm_loss"] for r in rows], label="train LM loss")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "loss_curve.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    loads = rows[-1].get("loads") or {}
    if loads:
        layers = sorted(loads, key=int)
        grid = np.array([loads[k] for k in layers], dtype=float)
        grid = grid / grid.sum(axis=1, keepdims=True).clip(min=1)
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.4 * len(layers)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
        ax.set_xlabel("routed expert")
        ax.set_title(f"share of routed tokens per expert (step {rows[-1]['step']})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / "expert_load_heatmap.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
