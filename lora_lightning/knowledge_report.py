"""`KnowledgeReport`, the callback of `test`: the full measurement of what the adapter learned and
what it broke, written to `report.json`, `report.md` and `facts_after.jsonl` and logged to every
logger.

Beside it: one fact's row before and after (`fact_row`), the per-relation headline numbers
(`by_relation`) and `BaseCache`, the base model's scores and answers shared by a sweep's cells
and, for the scores, by every `test` on the same base (`<home>/base_scores/`, keyed by
`weights_checksum` and the checksums of the benchmark data).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

import lora_lightning
from lora_lightning import evaluation, harness
from lora_lightning.callbacks import KnowledgeEvalCallback, shard
from lora_lightning.categorize import (
    categorization_record,
    comparability_problem,
    warn_answer_problems,
)
from lora_lightning.facts import Fact, is_refusal, load_facts
from lora_lightning.files import atomic_write_text, default_home, package_file, sha256_file
from lora_lightning.lora import lora_disabled, lora_modules
from lora_lightning.metrics import (
    AnswerAgreement,
    AnswerConcentration,
    Confidence,
    KnowledgeShift,
    RefusalRate,
    Reliability,
)
from lora_lightning.metrics.functional import prompt_accuracy
from lora_lightning.provenance import environment
from lora_lightning.report import report_metrics, to_python, untrained_known_lost, write_report
from lora_lightning.world.benchmarks import evaluate_world_benchmarks
from lora_lightning.world.cache import BENCHMARKS_DIR, TWO_HOP_FILE

__all__ = [
    "BASE_SCORES_DIR",
    "ENVIRONMENT_FILE",
    "FACTS_AFTER",
    "NO_CACHE",
    "BaseCache",
    "KnowledgeReport",
    "by_relation",
    "fact_row",
    "weights_checksum",
]

log = logging.getLogger(__name__)

_METRICS_PER_CALL = 500
# per fact, its category and answers before and after training (beside report.json)
FACTS_AFTER = "facts_after.jsonl"
# `before_scores` to score the base every time (the default, None, keeps them in the home cache)
NO_CACHE = "off"
BASE_SCORES_DIR = "base_scores"  # under `files.default_home()`
_ANNOUNCED_BYTES = 1 << 30  # a checksum of more weights than this says so first (seconds)


class KnowledgeReport(Callback):
    """`test`: the full measurement of what the adapter learned and what it broke.

    The test set (from the data module) is re-categorised with the adapter; against the
    categories before training this gives the knowledge shift, and the answers give
    concentration, refusals and confidence before vs after. Reliability and known-fact
    retention are read off the trained Unknown and held-out HighlyKnown facts among them, each
    as three figures (any of the k prompts, the paper's; a majority of them; the mean prompt
    accuracy), and reliability once more zero-shot: each trained fact asked once, in the prompt
    it was trained on (`reliability_zeroshot`), what the adapter holds apart from how far it
    carries to a few-shot prompt. The untrained facts the base knew that training lost are
    counted from the per-fact rows (`report.untrained_known_lost`).
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
        before_scores: Where the benchmark scores without the adapter (the base's) are kept,
            so that they are computed once per base and benchmark settings: None (the default)
            = `<home>/base_scores/<weights checksum>.json` in the cache folder
            (`$LORA_LIGHTNING_HOME`), so a second `test` on the same base reads them back; a
            JSON file = one shared by the runs on the same base model (a sweep's cells), read or
            added to under a file lock, beside which the base's answers to the generalisation
            and portability questions are kept the same way (`before_probes-<settings
            hash>.jsonl`); "off" = always compute them. Scores are keyed by everything they
            depend on: a checksum of the base's weights, its dtype and device type, the
            tokenizer, the benchmark settings, the checksums of the benchmark data and the
            library versions.

    Beside the paper's measures the report has the knowledge-editing ones (docs/science.md),
    each before and after with its denominator: generalisation (trained Unknown facts asked with
    their held-out templates, `meta["heldout_questions"]`), locality (the per-prompt answers to
    the other facts of the trained subjects that training left unchanged) and portability
    (2-hop questions through a trained fact).
    """

    # The benchmark arguments' defaults must stay those of `evaluation.BenchmarkSettings`
    # (jsonargparse reads this signature for `--report.*`; a test holds them equal).
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
        benchmark_batch_size: int = evaluation.BenchmarkSettings.batch_size,
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
        # MMLU and TruthfulQA run where their data is given (never downloaded)
        self.benchmarks = evaluation.BenchmarkSettings(
            mmlu_dir=mmlu_dir, mmlu_subjects=mmlu_subjects, mmlu_limit=mmlu_limit,
            truthfulqa_path=truthfulqa_path, truthfulqa_limit=truthfulqa_limit,
            harness_tasks=harness_tasks, harness_include=harness_include,
            harness_limit=harness_limit, harness_num_fewshot=harness_num_fewshot,
            batch_size=benchmark_batch_size,
        )
        self.explosion_factor = explosion_factor
        self.world_dir = world_dir
        self.before_scores = before_scores
        # the probes' answers are kept only in a file a sweep names: their key is fact ids,
        # which another fact file may reuse for other questions
        self.base_cache = (BaseCache(before_scores)
                           if before_scores not in (None, NO_CACHE) else None)
        self.results: dict[str, Any] = {}
        self.report_path: Path | None = None

    @property
    def mmlu_dir(self) -> str | None:
        return self.benchmarks.mmlu_dir

    @property
    def truthfulqa_path(self) -> str | None:
        return self.benchmarks.truthfulqa_path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._warn_answer_problems(trainer, pl_module)
        self._record_environment(trainer, pl_module)

    @staticmethod
    def _record_environment(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`<run>/environment.json`: what `fit` ran on (library versions, CPU, threads) and the
        base's weight checksum, so a run that is never tested (a capacity probe) still says
        where its numbers came from; report.json carries the same for `test`."""
        folder = trainer.log_dir if trainer.loggers else None  # a collective under DDP
        if folder is None or not trainer.is_global_zero:
            return
        facts = ((trainer.datamodule.mix_summary() or {}).get("facts")
                 if hasattr(trainer.datamodule, "mix_summary") else None)
        record = {"environment": environment(Path(facts).parent if facts else None),
                  "weights": weights_checksum(pl_module.model)}
        atomic_write_text(Path(folder) / ENVIRONMENT_FILE, json.dumps(to_python(record), indent=1)
                          + "\n")

    def _warn_answer_problems(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`fit` and `test` say in one line, before training or probing (and after every check
        that refuses a run, which must leave no folder behind), which facts of their file the
        probe's matching rule cannot judge cleanly (`facts.answer_problems`), listed in the run
        folder: such facts count as learned or known by accident."""
        facts = getattr(trainer.datamodule, "all_facts", None)
        probe = getattr(pl_module, "probe_config", None)
        if not facts or probe is None:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        if not trainer.is_global_zero:
            return
        source = (trainer.datamodule.mix_summary() or {}).get("facts") or "the fact file"
        warn_answer_problems(facts, str(source), folder / "answer_problems.jsonl", probe.match)

    # ------------------------------------------------------------------ the test, in order

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A missing lm_eval, a misspelt harness task or a benchmark data path that is not there
        fails now, not after the probe (every rank checks, so that none waits for a failed one in
        a collective). Categories measured otherwise than this probe (in another dtype) are
        said in one line before it starts."""
        self.benchmarks.check_tasks()
        self.benchmarks.check_data()
        self._warn_answer_problems(trainer, pl_module)
        data = trainer.datamodule
        facts = data.mix_summary().get("facts") if hasattr(data, "mix_summary") else None
        probe = getattr(pl_module, "probe_config", None)
        if facts and probe is not None and trainer.is_global_zero:
            dtype = str(next(pl_module.model.parameters()).dtype)
            problem = comparability_problem(facts, categorization_record(facts), dtype, probe)
            if problem:
                log.warning(problem)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._words = _matches_words(pl_module)
        self.metrics = _new_metrics(self._words)
        for metric in self.metrics.values():
            metric.to(pl_module.device)
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
        rows = [fact_row(b, a, self._role.get(b.id, "untrained"))
                for b, a in zip(before, after, strict=True)]
        self._rows += rows
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
        # the zero-shot probe: each trained fact once, in its training prompt
        trained = [f for f in after if f.id in self._roles["reliability"]]
        answers = pl_module.probe_zeroshot(trained)
        m["reliability_zeroshot"].update([[a] for a in answers], trained)
        zeroshot = {f.id: (a, prompt_accuracy([a], f, strict=self._words) > 0)
                    for f, a in zip(trained, answers, strict=True)}
        for row in rows:
            if row["id"] in zeroshot:
                row["zeroshot_after"], row["zeroshot_correct_after"] = zeroshot[row["id"]]
        pairs = [(b, a) for b, a in zip(before, after, strict=True) if self._is_neighbour(b)]
        if any(len(b.predictions) != len(a.predictions) for b, a in pairs):
            # categorised with other probe settings: ask the base now, with this probe's prompts
            with lora_disabled(pl_module.model):
                base = pl_module.probe([b for b, _ in pairs])
            pairs = [(p, a) for p, (_, a) in zip(base, pairs, strict=True)]
        m["locality"].update([b.predictions for b, _ in pairs], [a.predictions for _, a in pairs])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self._computed()
        results["editing"] = {
            "locality": self.metrics["locality"].compute(),
            **self._probed_measures(trainer, pl_module),
        }
        results["benchmarks"] = self._benchmarks(trainer, pl_module)
        for cb in trainer.callbacks:
            if isinstance(cb, KnowledgeEvalCallback):
                results["history"] = cb.history
        data = trainer.datamodule
        results["mix"] = data.mix_summary() if hasattr(data, "mix_summary") else None
        results["match"] = "word" if self._words else "substring"
        facts = (results["mix"] or {}).get("facts")
        results["environment"] = environment(Path(facts).parent if facts else None)
        rows = _gathered_rows(self._rows, trainer)  # a collective: every rank gathers
        results["by_relation"] = by_relation(rows)
        results["untrained_known_lost"] = untrained_known_lost(rows)
        self.results = to_python(results)
        for key in ("reliability", "known_retained", "reliability_zeroshot"):
            if results[key] is not None:
                pl_module.log(f"test/{key}", results[key]["reliability"], sync_dist=True)
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP
        out = Path(self.report_dir) if self.report_dir else Path(root) / "report"
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            # before report.json, which marks the test done; whole or not at all
            atomic_write_text(out / FACTS_AFTER, "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.report_path = write_report(self.results, out)
            rank_zero_info(f"report written to {self.report_path}")
            self._log_report(trainer)

    # ------------------------------------------------------------------ its parts

    def _computed(self) -> dict[str, Any]:
        """The metrics' results: reliability and retention (None without facts to count),
        the shift tables, and concentration, refusals and confidence before and after."""
        m = self.metrics
        # compute() is a collective: every rank calls it for every metric, in the same order.
        results: dict[str, Any] = {
            key: m[key].compute()
            for key in ("reliability", "known_retained", "reliability_strict",
                        "known_retained_strict", "reliability_zeroshot", "shift",
                        "shift_untrained")
        }
        for key in ("reliability", "known_retained", "reliability_strict",
                    "known_retained_strict", "reliability_zeroshot"):
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
        return results

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
            mine = shard(facts, trainer)
            result = {}
            for when in ("before", "after"):
                if when == "before":
                    with lora_disabled(pl_module.model):
                        probed = self._probe_base(trainer, pl_module, mine)
                else:
                    probed = pl_module.probe(mine, progress=len(mine) > 1)
                metric = Reliability(strict=_matches_words(pl_module)).to(pl_module.device)
                metric.update([f.predictions for f in probed], mine)
                result[when] = metric.compute()  # a collective: every rank calls it
            out[name] = result
        if two_hop:
            out["portability"]["ceiling"] = _portability_ceiling(two_hop, data.all_facts)
        return out

    def _probe_base(
        self, trainer: L.Trainer, pl_module: L.LightningModule, facts: list
    ) -> list:
        """The base model's answers to the editing measures' questions (call it under
        `lora_disabled`), kept in the `before_scores` cache per base model and probe settings
        when there is one: the cells of a sweep that train the same facts (every mix at one n)
        probe each question once, not once per cell."""
        if self.base_cache is None or not facts:
            return pl_module.probe(facts, progress=len(facts) > 1)
        settings = {
            "model": getattr(pl_module, "base_model_name", None),
            "dtype": str(next(pl_module.model.parameters()).dtype),
            "probe": dataclasses.asdict(pl_module.probe_config),
            "pool": sorted(f.id for f in trainer.datamodule.fewshot_pool),
        }
        return self.base_cache.probes(settings, lambda path: pl_module.probe(
            facts, checkpoint=path, progress=len(facts) > 1))

    def _benchmarks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Every configured benchmark before (the base, maybe from the cache) and after, as
        `{benchmark: {"before": ..., "after": ...}}` (the harness: per task); rank 0 only."""
        world = self._world(trainer)
        if not (self.benchmarks.chosen or self.benchmarks.tasks or world):
            return {}
        if not trainer.is_global_zero:
            return {}
        tokenizer, model = trainer.datamodule.tokenizer, pl_module.model
        model.eval()
        # the weights' checksum names the home cache's file and is part of every cache's key:
        # hashed once (about a second per GB), and only where a cache is used
        cached = self.before_scores is None or self.base_cache is not None
        checksum = weights_checksum(model) if cached else None
        cache = None if checksum is None else self._scores_cache(checksum)
        if cache is None or checksum is None:  # (a cache implies a checksum)
            before = self._score(model, tokenizer, world, adapter=False)
        else:
            before = cache.scores(
                self._before_settings(world, pl_module, tokenizer, checksum),
                lambda: self._score(model, tokenizer, world, adapter=False),
                about={"model": getattr(pl_module, "base_model_name", None)},
            )
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

    def _scores_cache(self, checksum: str) -> BaseCache | None:
        """The cache of the base's scores: the file `before_scores` names, or the home cache's
        file of the base whose weights have `checksum` (None, with a line saying why, where the
        home cannot hold it)."""
        if self.before_scores is not None:
            return self.base_cache
        folder = default_home() / BASE_SCORES_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            rank_zero_info(f"{folder} is not writable: the base's benchmark scores are computed "
                           "and not kept (set LORA_LIGHTNING_HOME to a writable folder)")
            return None
        return BaseCache(folder / f"{checksum[:16]}.json")

    def _before_settings(
        self, world: Path | None, pl_module: L.LightningModule, tokenizer: Any, checksum: str
    ) -> dict[str, Any]:
        """What the base's benchmark scores depend on, their key in the cache: the weights
        and the data by content (not by path: the same base or data elsewhere is found), how
        the model runs and how each benchmark is scored."""
        import transformers

        b = self.benchmarks
        model = pl_module.model
        first = next(model.parameters())
        settings: dict[str, Any] = {
            "weights": checksum,
            "dtype": str(first.dtype),
            "device": first.device.type,
            "tokenizer": _tokenizer_checksum(tokenizer),
            "mmlu_subjects": b.mmlu_subjects, "mmlu_limit": b.mmlu_limit, "n_shot": b.n_shot,
            "truthfulqa_limit": b.truthfulqa_limit, "batch_size": b.batch_size,
            "data": {
                "mmlu": (_data_checksum(b.mmlu_dir, "cais/mmlu", "*.csv")
                         if "mmlu" in b.chosen else None),
                "truthfulqa": (_data_checksum(b.truthfulqa_path, "truthfulqa/truthful_qa",
                                              "*.csv") if "truthfulqa" in b.chosen else None),
                "world": _data_checksum(str(world / BENCHMARKS_DIR), None) if world else None,
            },
            "versions": {"lora_lightning": lora_lightning.__version__,
                         "torch": torch.__version__, "transformers": transformers.__version__},
        }
        if b.tasks:
            settings["harness"] = {
                "tasks": b.tasks,
                "include": [_data_checksum(str(p), None)
                            for p in harness.include_folders(b.harness_include)],
                "limit": b.harness_limit, "num_fewshot": b.harness_num_fewshot,
                "lm_eval": _version("lm_eval"),
            }
        return settings

    def _score(
        self, model: torch.nn.Module, tokenizer: Any, world: Path | None, adapter: bool
    ) -> dict[str, Any]:
        """Every configured benchmark, with the adapter or without it (the base)."""
        # progress lines name the phase: a test scoring benchmarks before and after once sat
        # silent for half an hour on a CPU
        when = "(with adapter)" if adapter else "(base)"
        world_benchmarks = None if world is None else functools.partial(
            evaluate_world_benchmarks, model, tokenizer, world / BENCHMARKS_DIR,
            self.benchmarks.batch_size, progress=when,
        )
        with (nullcontext() if adapter else lora_disabled(model)), torch.no_grad():
            return evaluation.score_benchmarks(
                model, tokenizer, self.benchmarks, progress=when,
                name="with adapter" if adapter else "base (LoRA disabled)",
                more=world_benchmarks,
            )


class BaseCache:
    """The base model's benchmark scores and probe answers, shared by the runs on one base
    model (a sweep's cells): the scores in one JSON file keyed by their settings, the answers in
    `before_probes-<settings hash>.jsonl` files beside it. Each is read or written under a file
    lock, so the first run to need a number computes it and the others wait, then read it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def scores(
        self,
        settings: dict[str, Any],
        compute: Callable[[], dict[str, Any]],
        about: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The scores stored for `settings`, else `compute()`'s, stored (with `about`, what a
        reader of the file wants to know and the key leaves out, such as the model's name)."""
        from filelock import FileLock

        key = json.dumps(settings, sort_keys=True)
        path = self.path
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
                rank_zero_info(f"benchmark scores before training read from {path} (the same "
                               "base and settings; delete it or set --report.before_scores off "
                               "to score the base again)")
                return stored[key]["scores"]
            scores = to_python(compute())
            stored[key] = {"settings": settings, **({"about": about} if about else {}),
                           "scores": scores}
            atomic_write_text(path, json.dumps(stored, indent=1))
            return scores

    def probes(self, settings: dict[str, Any], probe: Callable[[Path], list]) -> list:
        """`probe(checkpoint)`'s answers, with the JSONL checkpoint of these probe `settings`:
        answers already in it are read back, the others asked and added."""
        from filelock import FileLock

        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = self.path.with_name(f"before_probes-{key}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            return probe(path)


ENVIRONMENT_FILE = "environment.json"


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the base model's weights as they are in memory: every parameter and buffer
    but the LoRA factors, by name (a LoRA layer's base under the name it has without LoRA),
    shape, dtype and bytes. What is scored, wherever it was loaded from (a hub id, a folder, a
    GGUF file): about a second per GB."""
    wrapped = {f"{name}.base.": f"{name}." for name in lora_modules(model)}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b"):
            continue
        for prefix, plain in wrapped.items():
            if name.startswith(prefix):
                name = plain + name[len(prefix):]
                break
        tensors[name] = tensor
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > _ANNOUNCED_BYTES:
        rank_zero_info(f"checksumming the base's weights ({size / 1e9:.1f} GB) to find its "
                       "benchmark scores in the cache")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(memoryview(data))
    return digest.hexdigest()


def _tokenizer_checksum(tokenizer: Any) -> str | None:
    """The tokenizer by content: a fast tokenizer's whole definition (vocabulary, merges, the
    special tokens it adds), else its class and vocabulary."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        text = type(tokenizer).__name__ + json.dumps(vocab, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_checksum(path: str | None, hub_name: str | None, pattern: str = "*") -> str | None:
    """A benchmark's data by content: the file's SHA-256, or one over the folder's files
    matching `pattern` at any depth (relative names and contents); `hub:<name>` when read from
    Hugging Face; "missing" when not there (the scoring then says so in its own words)."""
    if path is None:
        return f"hub:{hub_name}" if hub_name else None
    try:
        root = Path(package_file(path, "benchmark data")).expanduser()
    except FileNotFoundError:
        return "missing"
    if root.is_file():
        return sha256_file(root)
    if not root.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}:{sha256_file(file)};".encode())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def fact_row(before: Fact, after: Fact, role: str) -> dict[str, Any]:
    """One fact before and after training, as `facts_after.jsonl` keeps it: every shift can be
    checked fact by fact, as `categorize` lets one check each category."""
    return {
        "id": before.id, "question": before.question, "answers": before.answers,
        "relation": before.relation, "subject": before.subject, "role": role,
        "category_before": before.category, "category_after": after.category,
        "p_greedy_before": before.p_greedy, "p_greedy_after": after.p_greedy,
        "predictions_before": before.predictions, "predictions_after": after.predictions,
    }


def by_relation(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Reliability and held-out retention per relation (a fact counts when any prompt answers
    it, as `Reliability` counts; beside it, for reliability, the majority of prompts and the
    zero-shot probe where the rows have it): with several relations, one of them can carry a
    headline number alone. None with fewer than two relations."""
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
            shares = [r["p_greedy_after"] or 0 for r in chosen]
            entry[key] = sum(p > 0 for p in shares) / len(chosen) if chosen else None
            entry[f"{key}_n"] = len(chosen)
            if key == "reliability":
                entry["reliability_majority"] = (sum(p > 0.5 for p in shares) / len(chosen)
                                                 if chosen else None)
                zeroshot = [r["zeroshot_correct_after"] for r in chosen
                            if "zeroshot_correct_after" in r]
                entry["reliability_zeroshot"] = (sum(zeroshot) / len(zeroshot)
                                                 if zeroshot else None)
        out[relation] = entry
    return out


def _matches_words(pl_module: L.LightningModule) -> bool:
    """Whether the module's probe judges answers by whole words (`ProbeConfig.match`)."""
    probe = getattr(pl_module, "probe_config", None)
    return getattr(probe, "match", "substring") == "word"


def _new_metrics(words: bool = False) -> dict[str, Any]:
    """The report's metrics, fresh for one test: each measure before and after training; the
    headline reliability and retention by the probe's matching rule (`words`: whole words)."""
    return {
        "shift": KnowledgeShift(),
        # the same table over the facts training did not touch: harm, not retention
        "shift_untrained": KnowledgeShift(),
        "reliability": Reliability(strict=words),
        "known_retained": Reliability(strict=words),
        # beside the paper's substring rule: aliases as whole words only
        "reliability_strict": Reliability(strict=True),
        "known_retained_strict": Reliability(strict=True),
        # one prompt per trained fact, the one it was trained on: its three figures coincide
        "reliability_zeroshot": Reliability(strict=words),
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
        "locality": AnswerAgreement(),
    }


def _gathered_rows(rows: list[dict[str, Any]], trainer: L.Trainer) -> list[dict[str, Any]]:
    """Every rank's fact rows, on every rank (a collective under DDP), sorted by id."""
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return sorted(rows, key=lambda row: row["id"])


def _portability_ceiling(two_hop: list, facts: list) -> dict[str, Any]:
    """How high portability can go: a 2-hop question through a trained fact can only be
    answered when the base knows its second hop (categorised other than Unknown). The share of
    such questions is stated beside the score."""
    category = {f.id: f.category for f in facts}
    known = sum(category.get(f.meta["hops"][1]) not in (None, "Unknown") for f in two_hop)
    return {"second_hop_known": known, "n_facts": len(two_hop), "rate": known / len(two_hop)}
