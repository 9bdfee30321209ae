"""Training metrics as people like to read them: metrics.csv, TensorBoard events and a loss-curve PNG.

Everything is written under a local folder: the output itself, or for s3:// outputs a scratch
folder that the trainer uploads with each checkpoint (``kubetune.storage.Mirror``). On resume, rows
after the resumed step are dropped so the files read like one uninterrupted run.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["step", "epoch", "train_loss", "train_accuracy", "learning_rate", "tokens_per_second",
           "valid_loss", "valid_perplexity", "valid_mean_token_accuracy", "batch"]
# objective: dpo adds the preference metrics (kubetune.train.dpo) before the batch fingerprint
DPO_COLUMNS = COLUMNS[:-1] + ["pref_accuracy", "reward_margin", "valid_pref_accuracy", "valid_reward_margin",
                              "valid_logp_chosen", "valid_logp_rejected", "valid_logp_accuracy", "batch"]

# objective: rft (kubetune.train.rft): rewards of the sampled answers, KL to the base, their length, samples/s
RFT_COLUMNS = ["step", "epoch", "train_loss", "reward_mean", "reward_std", "kl", "completion_length", "clip_ratio",
               "learning_rate", "tokens_per_second", "samples_per_second", "valid_reward", "batch"]


def columns_for(objective: str, sub_graders: tuple[str, ...] = ()) -> list[str]:
    """metrics.csv's columns; rft adds one reward column per sub-grader of a multi grader."""
    if objective == "rft":
        return RFT_COLUMNS[:-1] + [f"reward_{name}" for name in sub_graders] + ["batch"]
    return DPO_COLUMNS if objective == "dpo" else COLUMNS


class MetricsLog:
    def __init__(self, folder: Path, resume_step: int, columns: list[str] = COLUMNS):
        from torch.utils.tensorboard import SummaryWriter

        self.folder, self.columns = folder, columns
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "metrics.csv"
        self.rows = [r for r in self._read() if int(r["step"]) <= resume_step]
        self._rewrite()
        # purge_step drops events a killed run logged after the checkpoint we resume from
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _read(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self) -> None:
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def log(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in self.columns}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        for key in self.columns[2:-1]:
            if row[key] not in ("", None):
                self.tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "valid")) else key,
                                   float(row[key]), int(row["step"]))

    def flush(self) -> None:
        self.tb.flush()

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key):
            pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in ("", None)]
            return [p[0] for p in pts], [p[1] for p in pts]

        if "reward_mean" in self.columns:
            return self._plot_rewards(plt, series)
        dpo = "valid_pref_accuracy" in self.columns
        fig, axes = plt.subplots(1, 3 if dpo else 2, figsize=(16 if dpo else 11, 4))
        ax_loss, ax_acc = axes[:2]
        for key, style in (("train_loss", "-"), ("valid_loss", "o-")):
            ax_loss.plot(*series(key), style, label=key.replace("_", " "))
        for key, style in (("train_accuracy", "-"), ("valid_mean_token_accuracy", "o-")):
            ax_acc.plot(*series(key), style, label=key.replace("_", " "))
        ax_loss.set(xlabel="step", ylabel="DPO loss (per pair)" if dpo else "loss (nats/token)", title="Loss")
        ax_acc.set(xlabel="step", ylabel="token accuracy",
                   title="Preferred-answer token accuracy" if dpo else "Assistant-token accuracy")
        if dpo:  # preference accuracy (chosen's implicit reward above rejected's) and the mean reward margin
            ax_pref = axes[2]
            for key, style in (("pref_accuracy", "-"), ("valid_pref_accuracy", "o-")):
                ax_pref.plot(*series(key), style, label=key.replace("_", " "))
            ax_margin = ax_pref.twinx()
            for key, style in (("reward_margin", "--"), ("valid_reward_margin", "s--")):
                ax_margin.plot(*series(key), style, color="tab:green" if key.startswith("valid") else "tab:olive",
                               label=key.replace("_", " "))
            ax_pref.set(xlabel="step", ylabel="preference accuracy", title="Preferences (DPO)", ylim=(-0.02, 1.02))
            ax_margin.set(ylabel="reward margin")
            ax_margin.legend(loc="lower right")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(loc="center right" if ax is axes[-1] and dpo else "best")
        fig.tight_layout()
        path = self.folder / "loss_curve.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _plot_rewards(self, plt, series) -> Path:
        """objective rft: the loss, the rewards (training samples and held-out prompts) and the KL to the base."""
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        axes[0].plot(*series("train_loss"), "-", label="train loss")
        for key, style in (("reward_mean", "-"), ("valid_reward", "o-")):
            axes[1].plot(*series(key), style, label=key.replace("_", " "))
        axes[2].plot(*series("kl"), "-", label="kl")
        axes[0].set(xlabel="step", ylabel="GRPO loss (per token)", title="Loss")
        axes[1].set(xlabel="step", ylabel="grader reward", title="Rewards")
        axes[2].set(xlabel="step", ylabel="KL to the base (k3, per token)", title="KL")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        fig.tight_layout()
        path = self.folder / "loss_curve.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.tb.close()


def higher_is_better(metric: str) -> bool:
    """Token and preference accuracy and rewards rise as a model gets better; losses and perplexity fall."""
    return metric in ("valid_mean_token_accuracy", "valid_pref_accuracy", "valid_reward")


def improves(metric: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (anything beats no best)."""
    if best is None:
        return True
    return value - best > min_delta if higher_is_better(metric) else best - value > min_delta


class EarlyStopping:
    """Counts validations in a row without an improvement of ``metric``; ``update`` says when to stop."""

    def __init__(self, metric: str, patience: int, min_delta: float, state: dict | None = None):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.best: float | None = (state or {}).get("best")
        self.bad: int = (state or {}).get("bad", 0)

    def update(self, value: float) -> bool:
        if improves(self.metric, value, self.best, self.min_delta):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run counts on from there."""
        return {"best": self.best, "bad": self.bad}
