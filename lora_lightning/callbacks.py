"""Callbacks: token throughput, progress lines for logs, generation-based knowledge evaluation,
adapter export and the `test` report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lora_lightning import evaluation, harness
from lora_lightning.facts import Fact, is_refusal, load_facts
from lora_lightning.files import atomic_write_text
from lora_lightning.lora import lora_disabled, save_adapter
from lora_lightning.metrics import (
    AnswerAgreement,
    AnswerConcentration,
    Confidence,
    KnowledgeShift,
    RefusalRate,
    Reliability,
)
from lora_lightning.progress import LineProgress
from lora_lightning.prompts import batch_sequences, batch_tokens
from lora_lightning.provenance import environment
from lora_lightning.report import report_metrics, to_python, write_report
from lora_lightning.world.benchmarks import evaluate_world_benchmarks
from lora_lightning.world.cache import BENCHMARKS_DIR, TWO_HOP_FILE

_METRICS_PER_CALL = 500
# per fact, its category and answers before and after training (beside report.json)
FACTS_AFTER = "facts_after.jsonl"


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


def _shard(items: Sequence[Any], trainer: L.Trainer) -> list[Any]:
    """This rank's share of a list every rank holds identically."""
    return list(items[trainer.global_rank :: trainer.world_size])


class KnowledgeEvalCallback(Callback):
    """Reliability and known-fact retention over epochs, by few-shot generation.

    At the end of validation (every `every_n_epochs` epochs, and always after the last) the
    model answers the trained Unknown facts and the held-out HighlyKnown facts with the probe's
    few-shot prompts; `val/reliability` is the share of trained facts it now answers (P_greedy >
    0), `val/known_retained` the same over the held-out known facts. Each rank probes its shard;
    the metrics reduce across ranks. The per-epoch history is kept for the report's plot.

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
        for key, facts in (("reliability", data.train_unknown), ("known_retained", data.val_known)):
            if not facts:
                continue
            mine = _shard(facts, trainer)
            probed = pl_module.probe(mine)
            metric = Reliability().to(pl_module.device)
            metric.update([f.predictions for f in probed], mine)
            result = metric.compute()  # syncs across ranks when distributed
            row[key] = float(result["reliability"])
            row[f"{key}_mean_prompt_accuracy"] = float(result["mean_prompt_accuracy"])
            # values are already reduced across ranks; sync_dist keeps Lightning from warning
            pl_module.log(f"val/{key}", result["reliability"], prog_bar=True, sync_dist=True)
            pl_module.log(
                f"val/{key}_mean_prompt_accuracy", result["mean_prompt_accuracy"], sync_dist=True
            )
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "every_n_epochs": self.every_n_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


class KnowledgeReport(Callback):
    """`test`: the full measurement of what the adapter learned and what it broke.

    The test set (from the data module) is re-categorised with the adapter; against the
    categories before training this gives the knowledge shift, and the answers give
    concentration, refusals and confidence before vs after. Reliability and known-fact
    retention are read off the trained Unknown and held-out HighlyKnown facts among them.
    MMLU, TruthfulQA and lm-evaluation-harness tasks run with the adapter and without it (same
    weights, LoRA disabled) when their data paths or task names are given. Rank 0 writes
    `report.json`, `report.md` and `reliability.png`, and logs the report's numbers to every
    logger of the trainer (`report_metrics`), so TensorBoard, MLflow or W&B hold them too.

    Args:
        report_dir: Output folder (default `<log dir>/report`).
        mmlu_dir: Folder in the MMLU layout (`{dev,test}/{subject}_{split}.csv`); None skips MMLU.
        mmlu_subjects: Restrict MMLU to these subjects.
        mmlu_limit: At most this many test questions per subject.
        truthfulqa_path: TruthfulQA.csv; None skips TruthfulQA.
        truthfulqa_limit: At most this many TruthfulQA questions.
        harness_tasks: lm-evaluation-harness tasks, groups or tags ("hellaswag,arc_easy"),
            run by the harness on the model in memory, before (LoRA disabled) and after.
            Needs `pip install "lora-lightning[harness]"`.
        harness_include: Folder(s) of your own harness task YAMLs (the harness'
            `--include_path`).
        harness_limit: At most this many documents per harness task (a float below 1: that
            share of each task).
        harness_num_fewshot: Shots for every harness task (None: each task's own default).
        benchmark_batch_size: Batch size of the log-likelihood scoring.
        explosion_factor: An answer "exploded" if repeated more than this times the base
            model's most repeated answer.
        world_dir: A built synthetic world whose in-world benchmarks (world-MC, world-truthful)
            and 2-hop questions (portability) to measure; "auto" = the world the facts come
            from, when it has them (bench scale); None = none.
        before_scores: A JSON file shared by runs on the same base model (a sweep's cells):
            the benchmark scores without the adapter are read from it when it holds scores for
            these benchmark settings, else computed and added to it under a file lock, so a
            sweep of many runs scores the base once. The base's answers to the generalisation
            and portability questions are kept beside it the same way
            (`before_probes-<settings hash>.jsonl`). None = always compute them.

    Beside the paper's measures the report has the knowledge-editing ones (docs/science.md),
    each before and after with its denominator: generalisation (trained Unknown facts asked with
    their held-out templates, `meta["heldout_questions"]`), locality (the per-prompt answers to
    the other facts of the trained subjects that training left unchanged) and portability
    (2-hop questions through a trained fact).
    """

    def __init__(
        self,
        report_dir: str | None = None,
        mmlu_dir: str | None = None,
        mmlu_subjects: list[str] | None = None,
        mmlu_limit: int | None = None,
        truthfulqa_path: str | None = None,
        truthfulqa_limit: int | None = None,
        harness_tasks: list[str] | str | None = None,
        harness_include: list[str] | str | None = None,
        harness_limit: int | float | None = None,
        harness_num_fewshot: int | None = None,
        benchmark_batch_size: int = 8,
        explosion_factor: float = 2.0,
        world_dir: str | None = "auto",
        before_scores: str | None = None,
    ) -> None:
        harness.check_limits(  # at instantiation: before the model loads
            "report.", mmlu_limit=mmlu_limit, truthfulqa_limit=truthfulqa_limit,
            harness_limit=harness_limit, harness_num_fewshot=harness_num_fewshot,
            benchmark_batch_size=benchmark_batch_size,
        )
        self.report_dir = report_dir
        self.mmlu_dir = mmlu_dir
        self.mmlu_subjects = mmlu_subjects
        self.mmlu_limit = mmlu_limit
        self.truthfulqa_path = truthfulqa_path
        self.truthfulqa_limit = truthfulqa_limit
        self.harness_tasks = harness_tasks
        self.harness_include = harness_include
        self.harness_limit = harness_limit
        self.harness_num_fewshot = harness_num_fewshot
        self.benchmark_batch_size = benchmark_batch_size
        self.explosion_factor = explosion_factor
        self.world_dir = world_dir
        self.before_scores = before_scores
        self.results: dict[str, Any] = {}
        self.report_path: Path | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A missing lm_eval or a misspelt harness task fails now, not after the probe (every
        rank checks, so that none waits for a failed one in a collective)."""
        tasks = harness.parse_tasks(self.harness_tasks)
        if tasks:
            harness.check_tasks(harness.task_manager(self.harness_include), tasks)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self.metrics = {
            "shift": KnowledgeShift(),
            # the same table over the facts training did not touch: harm, not retention
            "shift_untrained": KnowledgeShift(),
            "reliability": Reliability(),
            "known_retained": Reliability(),
            # beside the paper's substring rule: aliases as whole words only
            "reliability_strict": Reliability(strict=True),
            "known_retained_strict": Reliability(strict=True),
            **{
                f"{name}_{when}": cls()
                for name, cls in (
                    ("concentration", AnswerConcentration),
                    # answers that are not refusals: what "exploded" is counted over, since a
                    # base whose top answer is its refusal would otherwise hide any explosion
                    ("concentration_answers", AnswerConcentration),
                    ("refusals", RefusalRate),
                    # refusing an answerable question vs refusing rightly (its answer is one)
                    ("refusals_answerable", RefusalRate),
                    ("refusals_unanswerable", RefusalRate),
                    ("confidence", Confidence),
                )
                for when in ("before", "after")
            },
        }
        self.metrics["locality"] = AnswerAgreement()
        for metric in self.metrics.values():
            metric.to(device)
        data = trainer.datamodule
        self._roles = {
            "reliability": {f.id for f in data.train_unknown},
            "known_retained": {f.id for f in data.val_known},
        }
        trained = {f.id for f in [*data.train_unknown, *data.train_extra]}
        self._trained = trained
        self._role = {
            **{f.id: "held-out known" for f in data.val_known},
            **{f.id: "trained extra" for f in data.train_extra},
            **{f.id: "trained unknown" for f in data.train_unknown},
        }
        self._rows: list[dict[str, Any]] = []
        subjects = {f.subject for f in data.train_unknown if f.subject}
        self._is_neighbour = lambda f: f.subject in subjects and f.id not in trained

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, list],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        before, after = outputs["before"], outputs["after"]
        if any(f.category is None for f in before):
            raise ValueError("test facts need categories from before training (run categorize)")
        if any(not f.predictions for f in before):
            # No stored base answers (e.g. a dataset shipping categories only): ask the base
            # now for its answers, but keep the categories the mix was built from.
            with lora_disabled(pl_module.model):
                probed = pl_module.probe(before)
            before = [
                dataclasses.replace(p, category=f.category)
                for f, p in zip(before, probed, strict=True)
            ]
        m = self.metrics
        m["shift"].update([f.category for f in before], [f.category for f in after])
        for b, a in zip(before, after, strict=True):
            self._rows.append(self._fact_row(b, a))
        untrained = [(b, a) for b, a in zip(before, after, strict=True)
                     if b.id not in self._trained]
        m["shift_untrained"].update([b.category for b, _ in untrained],
                                    [a.category for _, a in untrained])
        for when, facts in (("before", before), ("after", after)):
            answers = [a for f in facts for a in f.predictions]
            m[f"concentration_{when}"].update(answers)
            m[f"concentration_answers_{when}"].update([a for a in answers if not is_refusal(a)])
            m[f"refusals_{when}"].update(answers)
            for kind, wanted in (("answerable", False), ("unanswerable", True)):
                m[f"refusals_{kind}_{when}"].update(
                    [a for f in facts if is_refusal(f.answer) == wanted for a in f.predictions])
            m[f"confidence_{when}"].update(
                [f.confidence for f in facts if f.confidence is not None]
            )
        for role, ids in self._roles.items():  # every rank updates, maybe with nothing
            chosen = [f for f in after if f.id in ids]
            m[role].update([f.predictions for f in chosen], chosen)
            m[f"{role}_strict"].update([f.predictions for f in chosen], chosen)
        pairs = [(b, a) for b, a in zip(before, after, strict=True) if self._is_neighbour(b)]
        if any(len(b.predictions) != len(a.predictions) for b, a in pairs):
            # categorised with other probe settings: ask the base now, with this probe's prompts
            with lora_disabled(pl_module.model):
                base = pl_module.probe([b for b, _ in pairs])
            pairs = [(p, a) for p, (_, a) in zip(base, pairs, strict=True)]
        m["locality"].update([b.predictions for b, _ in pairs], [a.predictions for _, a in pairs])

    def _fact_row(self, before: Fact, after: Fact) -> dict[str, Any]:
        """One fact before and after training, as `facts_after.jsonl` keeps it: every shift
        can be checked fact by fact, as `categorize` lets one check each category."""
        return {
            "id": before.id, "question": before.question, "answers": before.answers,
            "relation": before.relation, "subject": before.subject,
            "role": self._role.get(before.id, "untrained"),
            "category_before": before.category, "category_after": after.category,
            "p_greedy_before": before.p_greedy, "p_greedy_after": after.p_greedy,
            "predictions_before": before.predictions, "predictions_after": after.predictions,
        }

    def _gathered_rows(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Every rank's fact rows, on every rank (a collective under DDP), sorted by id."""
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        return sorted(rows, key=lambda row: row["id"])

    @staticmethod
    def _by_relation(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
        """Reliability and held-out retention per relation (a fact counts when any prompt
        answers it, as `Reliability` counts): with several relations, one of them can carry
        a headline number alone. None with fewer than two relations."""
        relations = sorted({r["relation"] for r in rows if r["relation"]})
        if len(relations) < 2:
            return None
        out: dict[str, dict[str, Any]] = {}
        for relation in relations:
            mine = [r for r in rows if r["relation"] == relation]
            entry: dict[str, Any] = {}
            for role, key in (("trained unknown", "reliability"),
                              ("held-out known", "known_retained")):
                chosen = [r for r in mine if r["role"] == role]
                entry[key] = (sum((r["p_greedy_after"] or 0) > 0 for r in chosen) / len(chosen)
                              if chosen else None)
                entry[f"{key}_n"] = len(chosen)
            out[relation] = entry
        return out

    def _write_fact_rows(self, rows: list[dict[str, Any]], out: Path) -> Path:
        """The rows in one file (rank 0; whole or not at all)."""
        path = out / FACTS_AFTER
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return path

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = self.metrics
        # compute() is a collective: every rank calls it for every metric, in the same order.
        results: dict[str, Any] = {
            key: m[key].compute()
            for key in ("reliability", "known_retained", "reliability_strict",
                        "known_retained_strict", "shift", "shift_untrained")
        }
        for key in ("reliability", "known_retained", "reliability_strict",
                    "known_retained_strict"):
            if int(results[key]["n_facts"]) == 0:
                results[key] = None
        # "exploded": an answer (not a refusal) given more than explosion_factor times as often
        # as the base's most frequent answer that is not a refusal
        answers_before = m["concentration_answers_before"].compute()
        m["concentration_answers_after"].reference_max = answers_before["max_count"]
        m["concentration_answers_after"].explosion_factor = self.explosion_factor
        for name in ("concentration", "concentration_answers", "refusals", "refusals_answerable",
                     "refusals_unanswerable", "confidence"):
            results[name] = {when: m[f"{name}_{when}"].compute() for when in ("before", "after")}
        results["concentration_answers"]["before"] = answers_before
        exploded = results["concentration_answers"]["after"]
        results["concentration"]["after"]["exploded"] = exploded["exploded"]
        results["concentration"]["after"]["threshold"] = exploded["threshold"]
        for when, value in results["confidence"].items():  # a mean probability is never 0
            if float(value) == 0.0:
                results["confidence"][when] = None
        results["editing"] = {
            "locality": m["locality"].compute(),
            **self._probed_measures(trainer, pl_module),
        }
        results["benchmarks"] = self._benchmarks(trainer, pl_module)
        for cb in trainer.callbacks:
            if isinstance(cb, KnowledgeEvalCallback):
                results["history"] = cb.history
        data = trainer.datamodule
        results["mix"] = data.mix_summary() if hasattr(data, "mix_summary") else None
        facts = (results["mix"] or {}).get("facts")
        results["environment"] = environment(Path(facts).parent if facts else None)
        rows = self._gathered_rows(trainer)  # a collective: every rank gathers
        results["by_relation"] = self._by_relation(rows)
        self.results = to_python(results)
        for key in ("reliability", "known_retained"):
            if results[key] is not None:
                pl_module.log(f"test/{key}", results[key]["reliability"], sync_dist=True)
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP
        out = Path(self.report_dir) if self.report_dir else Path(root) / "report"
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self._write_fact_rows(rows, out)  # before report.json, which marks the test done
            self.report_path = write_report(self.results, out)
            rank_zero_info(f"report written to {self.report_path}")
            self._log_report(trainer)

    def _log_report(self, trainer: L.Trainer) -> None:
        """Every number of the report to every logger, straight to the loggers: through
        `pl_module.log` they would also fill Lightning's end-of-test table with a hundred rows
        (and only scalars logged there reach the loggers at all)."""
        items = list(report_metrics(self.results).items())
        for logger in trainer.loggers:
            # MLflow refuses more than 1000 metrics in one call (many harness tasks get there)
            for start in range(0, len(items), _METRICS_PER_CALL):
                chunk = dict(items[start : start + _METRICS_PER_CALL])
                logger.log_metrics(chunk, step=trainer.global_step)
            logger.save()

    def _world(self, trainer: L.Trainer) -> Path | None:
        """The bench world whose benchmarks and 2-hop questions apply, if any."""
        if self.world_dir is None:
            return None
        if self.world_dir != "auto":
            return Path(self.world_dir)
        data = trainer.datamodule
        source = data.mix_summary().get("facts") if hasattr(data, "mix_summary") else None
        root = Path(source).parent if source else None
        if root is not None and (root / BENCHMARKS_DIR).is_dir():
            return root
        return None

    def _probed_measures(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, Any]:
        """Generalisation and portability: extra questions probed before (adapter off) and
        after, each rank its shard; Reliability's any-prompt rule decides a fact."""
        data = trainer.datamodule
        trained = list(data.train_unknown)
        heldout = [
            dataclasses.replace(f, id=f"{f.id}/heldout{j}", question=q, paraphrases=[])
            for f in trained for j, q in enumerate(f.meta.get("heldout_questions", []))
        ]
        world = self._world(trainer)
        two_hop: list = []
        if world is not None and (world / TWO_HOP_FILE).is_file():
            ids = {f.id for f in trained}
            two_hop = [f for f in load_facts(world / TWO_HOP_FILE) if f.meta["hops"][0] in ids]
        out: dict[str, Any] = {}
        for name, facts in (("generalization", heldout), ("portability", two_hop)):
            mine = _shard(facts, trainer)
            result = {}
            for when in ("before", "after"):
                if when == "before":
                    with lora_disabled(pl_module.model):
                        probed = self._probe_base(trainer, pl_module, mine)
                else:
                    probed = pl_module.probe(mine, progress=len(mine) > 1)
                metric = Reliability().to(pl_module.device)
                metric.update([f.predictions for f in probed], mine)
                result[when] = metric.compute()  # a collective: every rank calls it
            out[name] = result
        if two_hop:
            out["portability"]["ceiling"] = self._portability_ceiling(two_hop, data.all_facts)
        return out

    @staticmethod
    def _portability_ceiling(two_hop: list, facts: list) -> dict[str, Any]:
        """How high portability can go: a 2-hop question through a trained fact can only be
        answered when the base knows its second hop (categorised other than Unknown). The
        share of such questions is stated beside the score."""
        category = {f.id: f.category for f in facts}
        known = sum(category.get(f.meta["hops"][1]) not in (None, "Unknown") for f in two_hop)
        return {"second_hop_known": known, "n_facts": len(two_hop),
                "rate": known / len(two_hop)}

    def _probe_base(
        self, trainer: L.Trainer, pl_module: L.LightningModule, facts: list
    ) -> list:
        """The base model's answers to the editing measures' questions (call it under
        `lora_disabled`). With `before_scores`, they are kept beside it in a JSONL per base model
        and probe settings, under a file lock: the cells of a sweep that train the same facts
        (every mix at one n) probe each question once, not once per cell."""
        if self.before_scores is None or not facts:
            return pl_module.probe(facts, progress=len(facts) > 1)
        from filelock import FileLock

        settings = {
            "model": getattr(pl_module, "base_model_name", None),
            "dtype": str(next(pl_module.model.parameters()).dtype),
            "probe": dataclasses.asdict(pl_module.probe_config),
            "pool": sorted(f.id for f in trainer.datamodule.fewshot_pool),
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(self.before_scores).with_name(f"before_probes-{key}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            return pl_module.probe(facts, checkpoint=path, progress=len(facts) > 1)

    def _benchmarks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        world = self._world(trainer)
        tasks = harness.parse_tasks(self.harness_tasks)
        if not (self.mmlu_dir or self.truthfulqa_path or world or tasks):
            return {}
        if not trainer.is_global_zero:
            return {}
        tokenizer, model = trainer.datamodule.tokenizer, pl_module.model
        model.eval()
        if self.before_scores is None:
            before = self._score(model, tokenizer, world, adapter=False)
        else:
            before = self._shared_before_scores(model, tokenizer, world, pl_module)
        after = self._score(model, tokenizer, world, adapter=True)
        out: dict[str, Any] = {}
        for when, scores in (("before", before), ("after", after)):
            for name, value in scores.items():
                if name == "harness":  # one before/after pair per task, as for the others
                    for task, metrics in value.items():
                        out.setdefault("harness", {}).setdefault(task, {})[when] = metrics
                else:
                    out.setdefault(name, {})[when] = value
        return out

    def _shared_before_scores(
        self, model: torch.nn.Module, tokenizer: Any, world: Path | None,
        pl_module: L.LightningModule,
    ) -> dict[str, Any]:
        """The base model's scores from `before_scores`, computed and stored there once."""
        from filelock import FileLock

        settings = {
            "model": getattr(pl_module, "base_model_name", None),
            "dtype": str(next(model.parameters()).dtype),
            "mmlu_dir": self.mmlu_dir, "mmlu_subjects": self.mmlu_subjects,
            "mmlu_limit": self.mmlu_limit, "truthfulqa_path": self.truthfulqa_path,
            "truthfulqa_limit": self.truthfulqa_limit, "world": str(world) if world else None,
        }
        if harness.parse_tasks(self.harness_tasks):  # only then, so older files stay valid
            settings["harness"] = {
                "tasks": harness.parse_tasks(self.harness_tasks),
                "include": [str(p) for p in harness.include_folders(self.harness_include)],
                "limit": self.harness_limit, "num_fewshot": self.harness_num_fewshot,
            }
        key = json.dumps(settings, sort_keys=True)
        path = Path(self.before_scores)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # the other runs wait, then read what this wrote
            try:
                stored = json.loads(path.read_text()) if path.is_file() else {}
            except ValueError:  # damaged (an older, non-atomic write): computed again
                rank_zero_info(f"{path} is damaged; the base's scores are computed again")
                stored = {}
            if not isinstance(stored, dict):
                stored = {}
            if key in stored:
                rank_zero_info(f"benchmark scores before training read from {path}")
                return stored[key]["scores"]
            scores = to_python(self._score(model, tokenizer, world, adapter=False))
            stored[key] = {"settings": settings, "scores": scores}
            atomic_write_text(path, json.dumps(stored, indent=1))
            return scores

    def _score(
        self, model: torch.nn.Module, tokenizer: Any, world: Path | None, adapter: bool
    ) -> dict[str, Any]:
        """Every configured benchmark, with the adapter or without it (the base)."""
        out: dict[str, Any] = {}
        # progress lines name the phase: a test scoring benchmarks before and after once sat
        # silent for half an hour on a CPU
        when = "(with adapter)" if adapter else "(base)"
        with (nullcontext() if adapter else lora_disabled(model)), torch.no_grad():
            if self.mmlu_dir:
                out["mmlu"] = evaluation.evaluate_mmlu(
                    model,
                    tokenizer,
                    self.mmlu_dir,
                    subjects=self.mmlu_subjects,
                    limit=self.mmlu_limit,
                    batch_size=self.benchmark_batch_size,
                    progress=f"MMLU {when}",
                )
            if self.truthfulqa_path:
                out["truthfulqa"] = evaluation.evaluate_truthfulqa(
                    model,
                    tokenizer,
                    self.truthfulqa_path,
                    limit=self.truthfulqa_limit,
                    batch_size=self.benchmark_batch_size,
                    progress=f"TruthfulQA {when}",
                )
            if world is not None:
                out.update(
                    evaluate_world_benchmarks(
                        model, tokenizer, world / BENCHMARKS_DIR, self.benchmark_batch_size,
                        progress=when,
                    )
                )
            tasks = harness.parse_tasks(self.harness_tasks)
            if tasks:
                out["harness"] = harness.evaluate_tasks(
                    model, tokenizer, tasks, self.harness_include, self.harness_limit,
                    self.harness_num_fewshot, self.benchmark_batch_size,
                    name="with adapter" if adapter else "base (LoRA disabled)", progress=True,
                )
        return out
