"""The LightningModule: a frozen Hugging Face Llama with fused LoRA adapters, trained on facts.

The base is loaded in `configure_model` (so Lightning's strategies see an already-frozen model
and DDP buckets hold LoRA parameters only), and checkpoints carry the LoRA weights alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from lora_lightning.attention import use_packed_attention
from lora_lightning.facts import Fact
from lora_lightning.knowledge import ProbeConfig, categorize, generate_answers
from lora_lightning.lora import count_parameters, inject_lora
from lora_lightning.lora.targets import check_target_spec
from lora_lightning.models import check_world_facts, load_base_model, resolve_model
from lora_lightning.prompts import IGNORE_INDEX, batch_sequences, training_prompt
from lora_lightning.threads import set_threads

log = logging.getLogger(__name__)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
PAPER_TARGETS = ("gate_proj", "up_proj", "down_proj")


# Checkpoints keep the hyper-parameters, the probe's settings among them; Lightning loads them
# with torch's weights-only unpickler, which must be told the class is plain data (also under
# the name checkpoints written before it moved to `knowledge` carry).
torch.serialization.add_safe_globals(
    [ProbeConfig, (ProbeConfig, "lora_lightning.module.ProbeConfig")]
)


class LoRAKnowledgeModule(L.LightningModule):
    """LoRA fine-tuning of a causal LM on fact QA, with the paper's settings as defaults.

    Args:
        model_name_or_path: Any Hugging Face Llama checkpoint (local folder or hub id); None or
            "world" builds/reuses the synthetic world's tiny base model.
        dtype: Weights dtype for the base ("auto" keeps the checkpoint's own).
        rank: LoRA rank r (paper: 1).
        alpha: LoRA alpha (paper: 2).
        lora_dropout: Dropout on the LoRA input (paper: 0.1), fused into the kernel.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r (paper: on).
        target_modules: Which linear layers get LoRA, as PEFT reads `target_modules`: a list of
            module-name suffixes (paper: gate/up/down projections), a regular expression matched
            against full module names (`.*mlp[.](gate|up)_proj`), or `all-linear` (every linear
            layer but `lm_head`).
        backend: Kernel backend of every LoRA linear: "auto" (Triton on CUDA from 2048 tokens a
            call), "triton" (fused Triton GEMMs), "triton-cublas" (cuBLAS GEMMs, the dropout
            work in Triton), "torch".
        lr: AdamW learning rate (paper: 1e-3), decayed linearly to zero.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the decay (paper: 0).
        loss_on: "answer" puts the loss on the assistant turn only; "all" on the whole sequence
            as in the paper's released script. The data module builds the labels accordingly.
        gradient_checkpointing: Recompute activations in backward to save memory.
        probe: How facts are probed by generation (in-loop evaluation and `test`).
        threads: CPU threads for torch. None chooses from the model's size and the cores free
            now (`lora_lightning.threads`: one for a small model, whose matrices are too small
            to split; `OMP_NUM_THREADS` wins); a number is used as given.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        dtype: Dtype = "auto",
        rank: int = 1,
        alpha: float = 2.0,
        lora_dropout: float = 0.1,
        use_rslora: bool = True,
        target_modules: str | tuple[str, ...] = PAPER_TARGETS,
        backend: Literal["auto", "triton", "triton-cublas", "torch"] = "auto",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        loss_on: Literal["answer", "all"] = "answer",
        gradient_checkpointing: bool = False,
        probe: ProbeConfig | None = ProbeConfig(),  # noqa: B008 (frozen: safe to share)
        threads: int | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {lora_dropout}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        # an empty list or a broken regex fails here, before the base model is loaded
        check_target_spec(target_modules, "model.target_modules")
        self.probe_config = probe or ProbeConfig()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.lora_names: list[str] = []
        self.base_model_name: str | None = None
        self.val_loss = torch.nn.ModuleDict({k: MeanMetric() for k in ("unknown", "known")})
        # The loss of the first training batch, before any update (LoRA's B starts at zero, so
        # this is the base model's): the "before" of the end-of-fit summary. Kept in checkpoints.
        self.initial_train_loss: float | None = None
        # The frozen base is not in checkpoints; loading checks the LoRA keys itself.
        self.strict_loading = False

    def setup(self, stage: str) -> None:
        """Refuse to train on the synthetic world's facts (no `data.facts`) unless this is the
        world's base: those facts are categorised for it (see `models.check_world_facts`)."""
        data = self._trainer.datamodule if self._trainer is not None else None
        hparams = getattr(data, "hparams", None)
        if hparams is not None and "facts" in hparams:
            check_world_facts(self.hparams.model_name_or_path, hparams["facts"])

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.base_model_name = resolve_model(hp.model_name_or_path)
        model = load_base_model(self.base_model_name, hp.dtype)
        model.requires_grad_(False)
        use_packed_attention(model)  # padding-free batches (data.packing) attend per example
        self.lora_names = inject_lora(
            model,
            check_target_spec(hp.target_modules, "model.target_modules"),
            rank=hp.rank,
            alpha=hp.alpha,
            dropout=hp.lora_dropout,
            use_rslora=hp.use_rslora,
            backend=hp.backend,
        )
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode, which would switch off LoRA dropout
        self.model = model
        trainable, total = count_parameters(model)
        self._n_params = total
        threads = set_threads(total, hp.threads)
        log.info("torch uses %d CPU thread(s) for a %s-parameter model", threads, f"{total:,}")
        log.info(
            "LoRA on %d linears: %s trainable / %s total parameters (%.4f%%)",
            len(self.lora_names),
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / total,
        )

    # -- steps ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        token_loss, _, _ = self._label_token_losses(batch, top=False)
        loss = token_loss.mean()
        n = batch_sequences(batch)
        # For ThroughputMonitor: forward (2N) plus the input-gradient GEMMs (2N) per token of a
        # frozen base; no weight gradients. The LoRA terms are under 1% and left out.
        self.flops_per_batch = 4 * self._n_params * batch["input_ids"].numel()
        if self.global_step == 0 and self.initial_train_loss is None:
            self.initial_train_loss = float(loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def _label_token_losses(
        self, batch: dict[str, torch.Tensor], top: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Cross-entropy of every labelled next-token position, the example it belongs to, and
        (`top`) whether the label is the model's top choice there (teacher-forced; None
        without `top`, which training steps skip).

        The vocabulary projection runs on the labelled positions alone: with the answer-only
        loss that is a few tokens per fact, while the LM head over every position of a batch is
        a third of the small world base's FLOPs and, on Llama-3's 128k vocabulary, hundreds of
        MB of logits. The mean of the result is the loss Hugging Face's causal-LM forward gives
        (mean over labelled tokens, in fp32).
        """
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        packed = "position_ids" in batch  # `pack_batch`: one row, no attention mask
        layout = (
            {"position_ids": batch["position_ids"]}
            if packed
            else {"attention_mask": batch["attention_mask"]}
        )
        hidden = self.model.get_decoder()(input_ids=batch["input_ids"], **layout).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        token_loss = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="none")
        rows = batch["sequence_ids"][:, 1:][keep] if packed else keep.nonzero()[:, 0]
        correct = logits.detach().argmax(-1) == labels[keep] if top else None
        return token_loss, rows, correct

    def on_train_start(self) -> None:
        trainable, total = count_parameters(self.model)
        for logger in self.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/total": total})

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """Per-example answer loss (logged per kind), and for `callbacks.Convergence` that loss
        and whether every labelled token was the model's top choice given the labels before it:
        then greedy decoding of the training prompt writes the answer."""
        token_loss, rows, correct = self._label_token_losses(batch)
        n = batch_sequences(batch)
        totals = token_loss.new_zeros(n).index_add_(0, rows, token_loss)
        n_tokens = torch.bincount(rows, minlength=n).clamp(min=1)
        per_sample = totals / n_tokens
        kind = batch.get("kind")
        for code, name in enumerate(("unknown", "known")):
            # every rank updates both (maybe with nothing): compute() is a collective
            sel = per_sample if kind is None else per_sample[kind == code]
            if kind is None and code == 1:
                sel = per_sample[:0]
            self.val_loss[name].update(sel)
        assert correct is not None
        wrong = torch.bincount(rows[~correct], minlength=n)
        answered = wrong == 0
        return {"answered": answered, "loss": per_sample.detach(),
                "kind": kind if kind is not None else torch.zeros_like(answered, dtype=torch.long)}

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_loss.items():
            value = metric.compute()  # reduced across ranks; NaN when no rank saw this kind
            if not torch.isnan(value):
                # sync_dist on an already reduced value only keeps Lightning from warning
                self.log(f"val/loss_{name}", value, prog_bar=name == "unknown", sync_dist=True)
            metric.reset()

    # -- probing by generation -------------------------------------------------------------------

    def probe(
        self, facts: Sequence[Fact], checkpoint: Path | None = None, progress: bool = False
    ) -> list[Fact]:
        """Categorise `facts` with the current weights (adapter active): new Fact objects with
        `category`, `p_greedy` and per-prompt `predictions`. The tokenizer and the few-shot pool
        come from the attached data module. With `checkpoint` (a JSONL), facts found there are
        read back instead of probed, and the others are added (`knowledge.categorize`).
        `progress`: progress lines (for long probes outside the test loop's own bar)."""
        if not facts:
            return []
        data = self.trainer.datamodule
        return categorize(
            self.model,
            data.tokenizer,
            facts,
            data.fewshot_pool,
            progress=progress,
            checkpoint=checkpoint,
            **asdict(self.probe_config),
        )

    def probe_zeroshot(self, facts: Sequence[Fact], progress: bool = False) -> list[str]:
        """The greedy answer to each fact's training prompt (`prompts.training_prompt`), one per
        fact, with the current weights: what the adapter holds in the format it was trained in.
        The few-shot probe (`probe`) asks how far that knowledge carries to another prompt; on
        a real model an adapter answered every trained fact here and failed the few-shot probe,
        so reliability is reported under both."""
        if not facts:
            return []
        tokenizer = self.trainer.datamodule.tokenizer
        config = self.probe_config
        answers = generate_answers(
            self.model, tokenizer, [training_prompt(tokenizer, f.question) for f in facts],
            batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
            compute_dtype=config.compute_dtype, progress=progress,
        )
        return [a.text for a in answers]

    def test_step(self, batch: list[Fact], batch_idx: int) -> dict[str, list[Fact]]:
        """Re-categorise a batch of facts; the report callback compares before and after."""
        return {"before": list(batch), "after": self.probe(batch)}

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = hp.warmup_steps
        total: int | None = None

        def linear(step: int) -> float:
            nonlocal total
            if step < warmup:
                return (step + 1) / warmup
            if step == warmup:
                return 1.0
            if total is None:
                # Asked at the first step, not here: Lightning's estimate sets up the training
                # loader, and setting it up before a checkpoint's loop state is restored keeps
                # a run resumed mid-epoch from skipping the batches it already trained on.
                total = max(1, int(self.trainer.estimated_stepping_batches))
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints: LoRA weights only ----------------------------------------------------------

    def _trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lora_lightning"] = {
            "base_model": self.base_model_name,
            "base_config": _config_fingerprint(self.model),
            "lora_names": self.lora_names,
            "initial_train_loss": self.initial_train_loss,
            # Dropout draws from the global generator: restoring it makes a resumed run exact.
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("lora_lightning")
        if meta is None:
            raise ValueError("checkpoint was not written by LoRAKnowledgeModule (no LoRA metadata)")
        if self.model is None:
            self.configure_model()
        mine = _config_fingerprint(self.model)
        if meta["base_config"] != mine:
            diff = {
                k: (meta["base_config"].get(k), mine.get(k))
                for k in set(mine) | set(meta["base_config"])
                if meta["base_config"].get(k) != mine.get(k)
            }
            raise ValueError(
                f"checkpoint was trained on base model {meta['base_model']!r}, which differs from "
                f"{self.base_model_name!r} (checkpoint vs model: {diff})"
            )
        expected = self._trainable_keys()
        got = set(checkpoint["state_dict"])
        if got != expected:
            missing = sorted(expected - got)[:5]
            unexpected = sorted(got - expected)[:5]
            raise ValueError(
                "checkpoint LoRA weights do not match this model's adapters (other target "
                f"modules or rank?): missing {missing}, unexpected {unexpected}"
            )
        self.initial_train_loss = meta.get("initial_train_loss")
        # The frozen base is already loaded: hand it back so the load finds every key.
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k not in expected})
        if self._trainer is not None and self.trainer.training:
            torch.set_rng_state(meta["rng_cpu"])
            if meta["rng_cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(meta["rng_cuda"])


def read_checkpoint(path: str | Path, what: str = "ckpt_path") -> dict[str, Any]:
    """The contents of a checkpoint written by `fit`, read on the CPU with torch's weights-only
    unpickler; anything else (a missing, damaged, truncated or foreign file) is one line naming
    the path and what was expected, not an unpickler traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no checkpoint file at {str(path)!r}")
    expected = "expected a .ckpt written by `python -m lora_lightning fit`"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, OSError, EOFError, RuntimeError, ... by damage
        raise ValueError(
            f"{what}: {str(path)!r} is not a readable checkpoint (damaged, truncated or another "
            f"kind of file: {type(err).__name__}); {expected}"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "lora_lightning"} <= set(checkpoint):
        raise ValueError(
            f"{what}: {str(path)!r} is a PyTorch file but holds no LoRA training state; {expected}"
        )
    return checkpoint


def _config_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The base-model facts an adapter depends on: shapes and vocabulary, not the path."""
    cfg = model.config
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    )
    return {k: getattr(cfg, k, None) for k in keys}
