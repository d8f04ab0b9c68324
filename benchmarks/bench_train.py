"""Training speed end to end: our `fit` against the Hugging Face `Trainer` + PEFT stack.

Both sides train the same base model on the same encoded fact conversations (our data module's
training set: Unknown facts mixed with HighlyKnown ones, answer-only labels), at the same batch
size, learning rate and schedule, with the paper's LoRA (r 1, alpha 2, rsLoRA, dropout 0.1 on
gate/up/down) and AdamW:

- ours: the LightningCLI `fit` itself (`run_training_cli`), with its callbacks (throughput
  monitor, checkpoint every epoch, adapter export, progress lines, CSV logger), validation off;
  `--with_eval` also keeps its per-epoch validation and reliability probe, as the default run has;
- HF + PEFT: `transformers.Trainer` on `peft.get_peft_model(...)` of the same checkpoint, with
  our collator (the same padded batches), no evaluation, no saving.

The first epoch of each run is warm-up; the timed window is every later epoch, from its first
batch to the end of training, so it counts the per-step overhead of each stack (logging,
callbacks, optimizer, scheduler, data loading) but not model loading. Reported: training tokens
(real, not padding) per second of each side and the ratio ours / HF. Runs alternate
(ours, HF, ours, HF, ...) and the best of `--repeats` is kept, so other load on a shared machine
hits both sides alike.

Models: `world` (the small synthetic world's base), `llama-8m` (a random Llama, hidden 384,
4 layers), `llama-1b` (a random Llama-3.2-1B-shaped model, 128k vocabulary; for a GPU). The
random models use the world's tokenizer and facts (answers are noise to them; speed is what is
measured).

    python benchmarks/bench_train.py --models world,llama-8m --threads 1 --out train.json
    python benchmarks/bench_train.py --models llama-1b --device cuda --n_unknown 300 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _EpochWindow(Callback):
    """Lightning side: time from the start of epoch 2 to the end of training."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start: float | None = None
        self.seconds = float("nan")
        self.epochs = 0
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.losses = []
        if trainer.current_epoch == 1:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(self.device)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.epochs = trainer.current_epoch - 1


def prepare_model(name: str, world, out: Path, device: str) -> Path:
    """The checkpoint folder for `name`: the world's base, or a random Llama saved with the
    world's tokenizer."""
    if name == "world":
        return world.model_dir
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


def ours_args(model_dir: Path, world, args, run_dir: Path) -> list[str]:
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    cli = [
        f"--model.model_name_or_path={model_dir}",
        f"--model.dtype={dtype}",
        "--model.rank=1", "--model.alpha=2", "--model.lora_dropout=0.1",
        "--model.use_rslora=true", f"--model.lr={args.lr}",
        f"--data.facts={world.facts_path}", f"--data.fewshot_pool={world.pool_path}",
        f"--data.n_unknown={args.n_unknown}", "--data.extra_kind=highly_known",
        "--data.extra_per_unknown=1", f"--data.batch_size={args.batch_size}",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "--trainer.logger=lora_lightning.checkpointing.ResumableCSVLogger",
        f"--trainer.logger.save_dir={run_dir}",
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
        f"--save_adapter.dirpath={run_dir / 'adapter'}",
        f"--report.report_dir={run_dir / 'report'}",
    ]
    if args.device == "cpu":
        cli.append(f"--model.threads={args.threads}")
    if not args.with_eval:
        cli += ["--trainer.limit_val_batches=0", "--knowledge_eval.every_n_epochs=0"]
    return cli


def run_ours(
    model_dir: Path, world, args, run_dir: Path, extra: Sequence[str] = ()
) -> dict[str, Any]:
    from lora_lightning.commands.train import run_training_cli

    cli = run_training_cli([*ours_args(model_dir, world, args, run_dir), *extra], run=False)
    window = _EpochWindow(args.device)
    cli.trainer.callbacks.append(window)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    tokens = sum(len(item["input_ids"]) for item in cli.datamodule._train.items)
    result = {
        "seconds": window.seconds,
        "epochs": window.epochs,
        "tokens_per_epoch": tokens,
        "tokens_per_s": window.epochs * tokens / window.seconds,
        "last_epoch_loss": float(torch.stack(window.losses).float().mean()),
    }
    del cli
    return result


def training_examples(model_dir: Path, world, args, run_dir: Path) -> tuple[list[dict], int]:
    """Our data module's training set, encoded, and the pad id: what HF's Trainer gets too."""
    from lora_lightning.commands.train import run_training_cli

    cli = run_training_cli(ours_args(model_dir, world, args, run_dir), run=False)
    cli.datamodule.setup("fit")
    items = [{k: v for k, v in item.items() if k in ("input_ids", "attention_mask", "labels")}
             for item in cli.datamodule._train.items]
    return items, cli.datamodule.tokenizer.pad_token_id


def run_hf(model_dir: Path, items: list[dict], pad_id: int, args, out: Path) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    config = LoraConfig(r=1, lora_alpha=2, lora_dropout=0.1, use_rslora=True,
                        target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    device = args.device

    class Window(TrainerCallback):
        start: float | None = None
        seconds = float("nan")
        epochs = 0

        def on_epoch_begin(self, targs, state, control, **kwargs):
            if self.start is None and state.epoch is not None and state.epoch >= 1:
                _sync(device)
                self.start = time.perf_counter()

        def on_train_end(self, targs, state, control, **kwargs):
            _sync(device)
            if self.start is not None:
                self.seconds = time.perf_counter() - self.start
                self.epochs = round(state.epoch) - 1

    window = Window()
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
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
    trainer = Trainer(
        model=model, args=targs, train_dataset=items,
        data_collator=lambda rows: pad_batch(rows, pad_id), callbacks=[window],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_epoch = -(-len(items) // args.batch_size)
    tokens = sum(len(item["input_ids"]) for item in items)
    del trainer, model
    return {
        "seconds": window.seconds,
        "epochs": window.epochs,
        "tokens_per_epoch": tokens,
        "tokens_per_s": window.epochs * tokens / window.seconds,
        "last_epoch_loss": statistics.fmean(losses[-per_epoch:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="world,llama-8m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (both sides)")
    parser.add_argument("--n_unknown", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--with_eval", action="store_true",
                        help="ours keeps its per-epoch validation and reliability probe")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                        help="also time ours with these extra fit arguments, e.g. "
                        "'padded=--data.packing=false' (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from lora_lightning.world import WorldConfig, ensure_world

    world = ensure_world(WorldConfig.scale("small"), progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model_dir = prepare_model(name, world, tmp / "models", args.device)
            items, pad_id = training_examples(model_dir, world, args, tmp / "probe_data")
            ours, hf = [], []
            variants: dict[str, list[dict]] = {v.split("=", 1)[0]: [] for v in args.variant}
            for rep in range(args.repeats):
                ours.append(run_ours(model_dir, world, args, tmp / f"ours-{name}-{rep}"))
                hf.append(run_hf(model_dir, items, pad_id, args, tmp / f"hf-{name}-{rep}"))
                print(f"{name} run {rep}: ours {ours[-1]['tokens_per_s']:.0f} tok/s, "
                      f"HF+PEFT {hf[-1]['tokens_per_s']:.0f} tok/s", flush=True)
                for spec in args.variant:
                    label, extra = spec.split("=", 1)
                    variants[label].append(run_ours(
                        model_dir, world, args, tmp / f"{label}-{name}-{rep}", extra.split()
                    ))
                    print(f"{name} run {rep}: ours [{label}] "
                          f"{variants[label][-1]['tokens_per_s']:.0f} tok/s", flush=True)
            best_ours = max(ours, key=lambda r: r["tokens_per_s"])
            best_hf = max(hf, key=lambda r: r["tokens_per_s"])
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model_dir)
            n_params = _count_params(cfg)
            rows.append({
                "model": name,
                "parameters": n_params,
                "samples": len(items),
                "tokens_per_epoch": best_ours["tokens_per_epoch"],
                "ours": best_ours,
                "hf_peft": best_hf,
                "all_ours_tokens_per_s": [r["tokens_per_s"] for r in ours],
                "all_hf_tokens_per_s": [r["tokens_per_s"] for r in hf],
                "speedup": best_ours["tokens_per_s"] / best_hf["tokens_per_s"],
                "variants": {
                    label: {
                        "args": next(v for v in args.variant if v.startswith(label + "="))
                        .split("=", 1)[1],
                        "tokens_per_s": max(r["tokens_per_s"] for r in runs),
                        "speedup": max(r["tokens_per_s"] for r in runs)
                        / best_hf["tokens_per_s"],
                    }
                    for label, runs in variants.items()
                },
                "speedup_median": statistics.median(
                    o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(ours, hf, strict=True)
                ),
            })
    print_table(rows, args)
    if args.out is not None:
        cpu = platform.processor() or platform.machine()
        meta = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu,
            "torch": torch.__version__,
            "threads": args.threads if args.device == "cpu" else None,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


def _count_params(cfg) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def print_table(rows: list[dict], args) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thr"
    print(f"\ntraining tokens/s ({device}, batch {args.batch_size}, r 1, best of {args.repeats}"
          f"{', ours with validation + probe' if args.with_eval else ''})")
    print("| model | parameters | samples | ours tok/s | HF+PEFT tok/s | ours / HF (best) "
          "| ours / HF (median) | last-epoch loss ours / HF |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        lo, lh = r["ours"]["last_epoch_loss"], r["hf_peft"]["last_epoch_loss"]
        print(f"| {r['model']} | {r['parameters']:,} | {r['samples']} "
              f"| {r['ours']['tokens_per_s']:.0f} | {r['hf_peft']['tokens_per_s']:.0f} "
              f"| **{r['speedup']:.2f}** | {r['speedup_median']:.2f} "
              f"| {lo:.3f} / {lh:.3f} |")
    for r in rows:
        for label, v in r["variants"].items():
            print(f"ours [{label}: {v['args']}] on {r['model']}: {v['tokens_per_s']:.0f} tok/s, "
                  f"{v['speedup']:.2f}x HF+PEFT")


if __name__ == "__main__":
    main()
