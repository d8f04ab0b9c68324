"""The small callbacks: token throughput, progress lines for logs, the per-epoch reliability probe
and adapter export. The `test` report's callback is `knowledge_report.KnowledgeReport`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lora_lightning.files import atomic_write_text
from lora_lightning.lora import save_adapter
from lora_lightning.metrics import Reliability
from lora_lightning.metrics.functional import prompt_accuracy
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


class Convergence(Callback):
    """Train until the trained facts stop improving: the convergence mode of `capacity`.

    After every validation it logs `val/answered_unknown`, the share of trained Unknown facts
    whose every answer token is the model's top choice given the answer so far (teacher-forced,
    LoRA dropout off: greedy decoding of the training prompt then writes the answer), beside
    the answer loss on them. It costs one forward pass over the trained facts, which validation
    runs anyway, where a generation probe every epoch would cost many. With `patience` set,
    training stops once every trained fact is answered, or once for `patience` validations in a
    row neither has the share risen by more than `min_delta` nor the loss fallen by more than
    `min_loss_drop` of itself, never before `min_epochs`; `trainer.max_epochs` is the budget, and
    the epochs it took are in metrics.csv (`train/epochs`). The loss matters: a small adapter
    answers no fact for many epochs while its loss falls, and the share alone stopped it there.
    `KnowledgeEvalCallback` probes after the epoch it stops at, as after a last one: register
    this callback before it.

    Args:
        patience: Validations without improvement before stopping; None: never stop early (the
            share is still logged), the paper's fixed epochs.
        min_epochs: Train at least this many epochs (e.g. the fixed-epoch budget, so that a
            converged probe never trains less than the fixed one).
        min_delta: A rise of the share by no more than this is no improvement.
        min_loss_drop: A fall of the loss by no more than this fraction of the best loss so far
            is no improvement.
    """

    def __init__(self, patience: int | None = None, min_epochs: int = 0,
                 min_delta: float = 0.0, min_loss_drop: float = 0.01) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"convergence.patience must be >= 1 or null, got {patience}")
        if min_epochs < 0:
            raise ValueError(f"convergence.min_epochs must be >= 0, got {min_epochs}")
        if not 0.0 <= min_delta < 1.0:
            raise ValueError(f"convergence.min_delta must be in [0, 1), got {min_delta}")
        if not 0.0 <= min_loss_drop < 1.0:
            raise ValueError(f"convergence.min_loss_drop must be in [0, 1), got {min_loss_drop}")
        self.patience, self.min_epochs = patience, min_epochs
        self.min_delta, self.min_loss_drop = min_delta, min_loss_drop
        self.best = -1.0
        self.best_loss = float("inf")
        self.wait = 0
        self.stopped_epoch: int | None = None  # 1-based epoch after which training stopped
        self._answered = MeanMetric()
        self._loss = MeanMetric()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._answered = self._answered.to(pl_module.device)
        self._loss = self._loss.to(pl_module.device)
        self._answered.reset()
        self._loss.reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "answered" in outputs:
            unknown = outputs["kind"] == 0  # `data.VAL_KINDS`: trained Unknown facts first
            self._answered.update(outputs["answered"][unknown].float())
            if "loss" in outputs:
                self._loss.update(outputs["loss"][unknown].float())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._answered.update_count == 0:
            return
        share = float(self._answered.compute())  # reduced across ranks
        loss = float(self._loss.compute()) if self._loss.update_count else float("nan")
        pl_module.log("val/answered_unknown", share, sync_dist=True)
        if self.patience is None or trainer.state.fn != TrainerFn.FITTING:
            return
        epoch = trainer.current_epoch + 1
        improved = share > self.best + self.min_delta
        if loss < self.best_loss * (1.0 - self.min_loss_drop):  # False for NaN
            improved = True
        self.best = max(self.best, share)
        self.best_loss = min(self.best_loss, loss) if loss == loss else self.best_loss
        self.wait = 0 if improved else self.wait + 1
        if epoch >= self.min_epochs and (share >= 1.0 or self.wait >= self.patience):
            trainer.should_stop = True
            self.stopped_epoch = epoch

    def stops_after(self, trainer: L.Trainer) -> bool:
        """Whether training stops after the current epoch by this callback's decision."""
        return self.stopped_epoch == trainer.current_epoch + 1 and trainer.should_stop

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train/epochs", float(trainer.current_epoch + 1))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_loss": self.best_loss, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict.get("best", -1.0))
        self.best_loss = float(state_dict.get("best_loss", float("inf")))
        self.wait = int(state_dict.get("wait", 0))
        self.stopped_epoch = state_dict.get("stopped_epoch")


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
        converged = any(isinstance(cb, Convergence) and cb.stops_after(trainer)
                        for cb in trainer.callbacks)
        return last or converged or (self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0)

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
        per_fact: dict[str, list[bool]] = {}
        for key, facts in (("reliability", data.train_unknown), ("known_retained", data.val_known)):
            if not facts:
                continue
            mine = shard(facts, trainer)
            probed = pl_module.probe(mine, progress=detailed)
            if key == "reliability":
                per_fact["fewshot"] = [prompt_accuracy(f.predictions, fact, words) > 0
                                       for f, fact in zip(probed, mine, strict=True)]
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
                per_fact["zeroshot"] = [prompt_accuracy([a], fact, words) > 0
                                        for a, fact in zip(answers, mine, strict=True)]
                self._write_per_fact(trainer, data.train_unknown, per_fact, row)
        self.history.append(row)
        self._last_probe_s = time.monotonic() - start

    @staticmethod
    def _write_per_fact(trainer: L.Trainer, facts: Sequence[Any], per_fact: dict[str, list[bool]],
                        row: dict[str, float]) -> None:
        """`<run>/probe_facts.jsonl`: the latest probe's verdict on each trained fact under each
        probe (id, relation, `fewshot`, `zeroshot`, the epoch), so a reader can count what was
        learned by relation (capacity's bits) and pair runs fact by fact. Each rank probed its
        shard (`shard`); the verdicts are gathered into the facts' own order. A run without a
        logger has no run folder and gets no file."""
        names = list(per_fact)
        width = -(-len(facts) // trainer.world_size)
        mine = torch.full((len(names), width), -1, dtype=torch.int32)
        for i, name in enumerate(names):
            values = per_fact[name]
            mine[i, : len(values)] = torch.tensor(values, dtype=torch.int32)
        gathered = trainer.strategy.all_gather(mine)  # a collective under DDP
        if trainer.world_size == 1:
            gathered = gathered[None]
        folder = trainer.log_dir if trainer.loggers else None  # a collective under DDP
        if not trainer.is_global_zero or folder is None:  # no run folder: no file
            return
        root = Path(folder)
        lines = []
        for index, fact in enumerate(facts):
            rank, position = index % trainer.world_size, index // trainer.world_size
            verdicts = {name: bool(gathered[rank, i, position]) for i, name in enumerate(names)}
            lines.append(json.dumps({"id": fact.id, "relation": fact.relation, **verdicts,
                                     "epoch": int(row["epoch"]) + 1}))
        atomic_write_text(root / "probe_facts.jsonl", "\n".join(lines) + "\n")

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
