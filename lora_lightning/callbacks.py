"""The small callbacks: token throughput, progress lines for logs, the per-epoch reliability probe
and adapter export. The `test` report's callback is `knowledge_report.KnowledgeReport`."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lora_lightning.lora import save_adapter
from lora_lightning.metrics import Reliability
from lora_lightning.progress import LineProgress
from lora_lightning.prompts import batch_sequences, batch_tokens


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting real (non-padding) tokens of our batches.

    Logs `train|validate/samples_per_sec` and `.../items_per_sec` (= tokens per second). The
    cumulative training counters (`train/time`, `batches`, `samples`, `lengths`) are kept in
    checkpoints, so a resumed run continues them instead of starting again from 0.
    """

    def __init__(self, window_size: int = 20, separator: str = "/") -> None:
        super().__init__(
            batch_size_fn=batch_sequences,
            length_fn=batch_tokens,
            window_size=window_size,
            separator=separator,
        )
        self._resumed: dict[str, float] | None = None

    def state_dict(self) -> dict[str, Any]:
        stage = RunningStage.TRAINING
        throughput = self._throughputs.get(stage)
        if stage not in self._samples or throughput is None or not throughput._time:
            return {}
        return {"time": float(throughput._time[-1]), "batches": self._batches[stage],
                "samples": self._samples[stage], "lengths": self._lengths.get(stage, 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = dict(state_dict) or None

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        if self._resumed and stage == RunningStage.TRAINING:
            done, self._resumed = self._resumed, None
            self._batches[stage] = int(done["batches"])
            self._samples[stage] = int(done["samples"])
            self._lengths[stage] = int(done["lengths"])
            self._t0s[stage] -= float(done["time"])  # the clock goes on from the checkpoint's

    # `test` and `predict` batches are lists of facts probed by generation, not token batches.
    def on_test_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_predict_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass


class LineProgressBar(ProgressBar):
    """Lightning's progress as whole lines, for a log file: a line every quarter of an epoch
    (and of the `test` probe), then the epoch's metrics. `KnowledgeCLI` uses it in place of the
    tqdm bar when stdout is not a terminal, where tqdm's in-place redraws would become one line
    of thousands of characters."""

    def __init__(self, every_percent: float = 25.0) -> None:
        super().__init__()
        self.every_percent = every_percent
        self._enabled = True
        self._bar: LineProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self, total: int | float, desc: str) -> None:
        if self._enabled:
            total = int(total) if total != float("inf") else None
            self._bar = LineProgress(total, desc, every_percent=self.every_percent, file=sys.stdout)

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._start(self.total_train_batches, f"epoch {trainer.current_epoch + 1}{epochs}")

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._advance()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()
        if self._enabled:
            metrics = self.get_metrics(trainer, pl_module)
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in metrics.items() if k != "v_num"
            )
            print(f"epoch {trainer.current_epoch + 1} done: {shown}", file=sys.stdout, flush=True)

    def on_test_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start(sum(trainer.num_test_batches), "test: probing facts (batches)")

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._advance()

    def on_test_epoch_end(self, *args: Any) -> None:
        self._finish()


class SaveAdapter(Callback):
    """Write the trained adapter in PEFT format (plus the run's config) when `fit` ends.

    Args:
        dirpath: Where to write; default `<log dir>/adapter`.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir
        path = Path(self.dirpath) if self.dirpath else Path(root) / "adapter"
        self.last_path = path
        if not trainer.is_global_zero:
            return
        save_adapter(pl_module.model, path, pl_module.base_model_name)
        config = Path(root) / "config.yaml"
        if config.is_file():
            (path / "training_config.yaml").write_text(config.read_text())
        rank_zero_info(f"adapter written to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath}


def shard(items: Sequence[Any], trainer: L.Trainer) -> list[Any]:
    """This rank's share of a list every rank holds identically (each rank probes its own)."""
    return list(items[trainer.global_rank :: trainer.world_size])


# a per-epoch probe longer than this shows its progress batch by batch
_LONG_PROBE_S = 10.0


class KnowledgeEvalCallback(Callback):
    """Reliability and known-fact retention over epochs, by few-shot and zero-shot generation.

    At the end of validation (every `every_n_epochs` epochs, and always after the last) the
    model answers the trained Unknown facts and the held-out HighlyKnown facts with the probe's
    few-shot prompts; `val/reliability` is the share of trained facts it now answers (P_greedy >
    0, any of the k prompts), `val/known_retained` the same over the held-out known facts, each
    beside `..._majority` (right in more than half of the prompts) and `..._mean_prompt_accuracy`.
    Then each trained fact is asked once more, zero-shot, in the prompt it was trained on:
    `val/reliability_zeroshot` (one prompt: its three figures coincide). On a real model an
    adapter answered every trained fact zero-shot and failed the few-shot probe, so a capacity
    search names the probe it reads (`sweep/capacity/search.py`). Each rank probes its shard;
    the metrics reduce across ranks. The per-epoch history is kept for the report's plot.

    With a progress bar on, each probe says what it asks as it starts (a real model's probe
    takes a minute), and shows its progress batch by batch when the previous one took longer
    than `_LONG_PROBE_S` (or is the first): a quick probe of the synthetic world stays one line.

    Args:
        every_n_epochs: Probe every this many epochs (0 = only after the last epoch; None =
            never while fitting, for runs whose `test` measures the same facts anyway, as a
            sweep's cells do: the probe after the last epoch re-asks every trained fact under
            every few-shot prompt, 1,050 facts x 10 prompts in a 1,000-fact cell).
    """

    def __init__(self, every_n_epochs: int | None = 1) -> None:
        if every_n_epochs is not None and every_n_epochs < 0:
            raise ValueError(
                f"knowledge_eval.every_n_epochs must be >= 0 or null, got {every_n_epochs}"
            )
        self.every_n_epochs = every_n_epochs
        self.history: list[dict[str, float]] = []
        self._last_probe_s: float | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:  # a `validate` run: always probe
            return True
        if self.every_n_epochs is None:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or (self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        if not self._due(trainer) or data is None or not hasattr(data, "train_unknown"):
            return
        row: dict[str, float] = {"epoch": float(trainer.current_epoch), "step": trainer.global_step}
        shown = trainer.progress_bar_callback is not None and trainer.is_global_zero
        detailed = shown and (self._last_probe_s is None or self._last_probe_s > _LONG_PROBE_S)
        if shown:
            self._announce(trainer, pl_module, data)
        start = time.monotonic()
        # answers judged by the probe's matching rule, as the categories were
        words = getattr(getattr(pl_module, "probe_config", None), "match", "substring") == "word"
        for key, facts in (("reliability", data.train_unknown), ("known_retained", data.val_known)):
            if not facts:
                continue
            mine = shard(facts, trainer)
            probed = pl_module.probe(mine, progress=detailed)
            metric = Reliability(strict=words).to(pl_module.device)
            metric.update([f.predictions for f in probed], mine)
            result = metric.compute()  # syncs across ranks when distributed
            # values are already reduced across ranks; sync_dist keeps Lightning from warning
            for name, figure in ((key, "reliability"), (f"{key}_majority", "majority"),
                                 (f"{key}_mean_prompt_accuracy", "mean_prompt_accuracy")):
                row[name] = float(result[figure])
                pl_module.log(f"val/{name}", result[figure], prog_bar=name == key,
                              sync_dist=True)
            if key == "reliability":
                zeroshot = Reliability(strict=words).to(pl_module.device)
                answers = pl_module.probe_zeroshot(mine, progress=detailed)
                zeroshot.update([[a] for a in answers], mine)
                value = zeroshot.compute()["reliability"]  # a collective, as above
                row["reliability_zeroshot"] = float(value)
                pl_module.log("val/reliability_zeroshot", value, sync_dist=True)
        self.history.append(row)
        self._last_probe_s = time.monotonic() - start

    @staticmethod
    def _announce(trainer: L.Trainer, pl_module: L.LightningModule, data: Any) -> None:
        """One line naming the probe that starts, before its first model call."""
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        asked = " and ".join(f"{len(facts)} {what}" for what, facts in (
            ("trained Unknown", data.train_unknown), ("held-out HighlyKnown", data.val_known))
            if facts)
        n_exp = getattr(getattr(pl_module, "probe_config", None), "n_exp", None)
        prompts = f" x {n_exp} prompts" if n_exp else ""
        zeroshot = (f", then the {len(data.train_unknown)} trained ones zero-shot"
                    if data.train_unknown else "")
        print(f"epoch {trainer.current_epoch + 1}{epochs}: probing {asked} facts{prompts}"
              f"{zeroshot}", file=sys.stdout, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "every_n_epochs": self.every_n_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
