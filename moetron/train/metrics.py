"""Per-step metrics: the JSONL log, MoE router statistics, and end-of-run plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moetron.model.transformer import Transformer


def reset_expert_load(model: Transformer) -> None:
    for layer in model.moe_layers():
        layer.tokens_per_expert.zero_()


def router_losses(model: Transformer) -> tuple[float, float]:
    """Mean load-balancing and z-loss over MoE layers from the latest training forward."""
    layers = [layer for layer in model.moe_layers() if layer.last_aux_loss is not None]
    if not layers:
        return 0.0, 0.0
    aux = sum(float(layer.last_aux_loss) for layer in layers) / len(layers)
    z = sum(float(layer.last_z_loss) for layer in layers) / len(layers)
    return aux, z


class MetricsLog:
    """Appends one JSON object per line; flushed each write so a killed run keeps its history."""

    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and path.exists():
            # a resumed run rewrites the steps after its checkpoint, so drop them
            kept = [line for line in path.read_text().splitlines() if _step(line) <= truncate_after_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 62  # unreadable (a torn last line): drop it


def plot_run(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """loss.png (train and validation loss) and expert_load.png (share of tokens per expert)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "lm_loss" if any("lm_loss" in r for r in records) else "dpo_loss"  # `moetron finetune` DPO
    train = [r for r in records if key in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    label = "train LM loss" if key == "lm_loss" else "train DPO loss"
    ax.plot([r["step"] for r in train], [r[key] for r in train], label=label, lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="moetron training")
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    paths = [loss_png]
    loads = [r["expert_load"] for r in train if r.get("expert_load")]
    if loads:
        # mean share of routed tokens per (layer, expert) over the last quarter of training
        recent = torch.tensor(loads[-max(len(loads) // 4, 1) :], dtype=torch.float64)
        share = recent.sum(0) / recent.sum(0).sum(-1, keepdim=True)
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * share.shape[0]))
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title="share of routed tokens (last quarter of training)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        heatmap_png = out_dir / "expert_load.png"
        fig.savefig(heatmap_png, dpi=120)
        plt.close(fig)
        paths.append(heatmap_png)
    return paths


class Progress:
    """A tqdm bar with ETA on a terminal; one line every 10% of the run otherwise (CI logs). A run on
    a time budget (`time_budget_s` > 0) counts seconds of training rather than steps: the trainer's
    clock, passed to `update`."""

    def __init__(
        self,
        start: int,
        total: int,
        enabled: bool,
        label: str = "train",
        time_budget_s: float = 0.0,
        time_spent_s: float = 0.0,
    ) -> None:
        import sys

        from tqdm import tqdm

        self.total, self.enabled, self.label = total, enabled, label
        self.budget, self.spent = time_budget_s, time_spent_s
        unit, total_units, done = (
            ("s", time_budget_s, time_spent_s) if time_budget_s > 0 else ("step", total, start)
        )
        self.bar = (
            tqdm(total=total_units, initial=done, unit=unit, dynamic_ncols=True)
            if enabled and sys.stderr.isatty()
            else None
        )

    def update(self, step: int, record: dict, time_spent_s: float = 0.0) -> None:
        if not self.enabled:
            return
        loss = record["lm_loss"] if "lm_loss" in record else record["dpo_loss"]
        summary = f"loss {loss:.3f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if "val_loss" in record:
            summary += f" val {record['val_loss']:.3f}"
            if "val_bpb" in record:
                summary += f" ({record['val_bpb']:.3f} bits/byte)"
        before, self.spent = self.spent, time_spent_s
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(min(self.spent, self.budget) - min(before, self.budget) if self.budget > 0 else 1)
        elif self.budget > 0:
            tenth = self.budget / 10
            if int(self.spent / tenth) > int(before / tenth) or "val_loss" in record:
                print(f"[{self.label}] step {step}, {self.spent:.1f}/{self.budget:g} s {summary}", flush=True)
        elif step % max(self.total // 10, 1) == 0 or step == self.total or "val_loss" in record:
            print(f"[{self.label}] step {step}/{self.total} {summary}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
