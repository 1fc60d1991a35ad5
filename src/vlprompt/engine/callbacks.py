"""What the training loop does besides training, as callbacks of :class:`~vlprompt.engine.trainer.Trainer`:
``metrics.jsonl`` (one record per epoch), TensorBoard scalars, the best epoch on the validation split, and the
training curve. The trainer calls ``on_epoch_end`` on rank 0 only (these write the run's files), ``on_resume``
after a checkpoint is loaded and ``on_fit_end`` on every rank."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from .._io import atomic_save_safetensors, atomic_write_text
from ..errors import ConfigError
from . import distributed

log = logging.getLogger("vlprompt")


class Callback:
    def on_resume(self, trainer) -> None:
        """After a checkpoint was loaded (``trainer.state.history`` holds the epochs already run)."""

    def on_epoch_end(self, trainer, record: dict) -> None:
        """After an epoch (rank 0 only): ``record`` is its line of metrics.jsonl."""

    def on_fit_end(self, trainer) -> None:
        """After the last epoch (every rank)."""


class MetricsJsonl(Callback):
    """``metrics.jsonl``: one JSON record per epoch; a resumed run rewrites it from the checkpoint's history, so
    it never holds an epoch twice."""

    def __init__(self, run_dir: Path, resumed: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        if not resumed and distributed.is_main():
            self.path.unlink(missing_ok=True)

    def on_resume(self, trainer) -> None:
        if distributed.is_main():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in trainer.state.history))

    def on_epoch_end(self, trainer, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoard(Callback):
    """Every numeric field of each epoch's record as a TensorBoard scalar (``RUN/tensorboard``)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'vlprompt[tensorboard]'") from e
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard")) if distributed.is_main() else None

    def on_epoch_end(self, trainer, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class BestEpoch(Callback):
    """Keep the learned tensors of the epoch with the best validation metric (``method.selection()``:
    ``(metric, "min" | "max"[, "first" | "last"])``, the validation split evaluated every ``eval_every``
    epochs); they replace the last epoch's when training ends. The file ``best.safetensors`` survives
    interruptions, so resumed runs select the same epoch. ``selected`` is the chosen epoch (or None)."""

    def __init__(self, method, run_dir: Path):
        self.method = method
        sel = tuple(method.selection())
        self.key, self.mode = sel[0], sel[1]
        self.ties = sel[2] if len(sel) > 2 else "first"
        if self.mode not in ("min", "max") or self.ties not in ("first", "last"):
            raise ValueError(f"{method.name}.selection() must be (metric, 'min'|'max'[, 'first'|'last']), got {sel}")
        self.path = Path(run_dir) / "best.safetensors"
        self.selected: Optional[int] = None

    def _best(self, history: list) -> Optional[dict]:
        recs = [r for r in history if f"val_{self.key}" in r]
        if not recs:
            return None
        if self.ties == "last":
            recs = recs[::-1]
        pick = min if self.mode == "min" else max
        return pick(recs, key=lambda r: r[f"val_{self.key}"])  # the first of equals in that order

    def on_epoch_end(self, trainer, record: dict) -> None:
        history = trainer.state.history
        if history and self._best(history) is history[-1]:
            atomic_save_safetensors(self.path, self.method.learned_state())

    def on_fit_end(self, trainer) -> None:
        distributed.barrier()  # rank 0 has written the selected epoch's tensors
        best = self._best(trainer.state.history)
        if best is None or not self.path.exists():
            return
        from safetensors.torch import load_file

        device = self.method.backbone.device
        self.method.load_learned_state({k: v.to(device) for k, v in load_file(str(self.path)).items()})
        log.info("selected epoch %d (val %s %.4f)", best["epoch"], self.key, best[f"val_{self.key}"])
        self.selected = int(best["epoch"])


class TrainingCurve(Callback):
    """``training_curve.png``: the training loss and accuracy per epoch, and the validation accuracy."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_fit_end(self, trainer) -> None:
        if distributed.is_main():
            plot_curve(self.run_dir, trainer.state.history)


def plot_curve(run_dir: Path, history: list) -> Optional[Path]:
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(epochs, [r["loss"] for r in history], color="tab:blue", label="loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [r["train_accuracy"] for r in history], color="tab:orange", label="train accuracy")
    if any("val_accuracy" in r for r in history):
        pts = [(r["epoch"], r["val_accuracy"]) for r in history if "val_accuracy" in r]
        ax2.plot(*zip(*pts), "o-", color="tab:green", label="val accuracy")
    ax2.set_ylabel("accuracy (%)")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(run_dir) / "training_curve.png"
    tmp = Path(run_dir) / ".training_curve.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


__all__ = ["Callback", "MetricsJsonl", "TensorBoard", "BestEpoch", "TrainingCurve", "plot_curve"]
