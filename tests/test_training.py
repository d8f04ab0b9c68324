"""Training: a short fit learns, touches only LoRA, resumes exactly and exports faithfully."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_lightning.data import KnowledgeDataModule
from lora_lightning.module import LoRAKnowledgeModule

ROOT = Path(__file__).resolve().parents[1]


def make_module(model_dir: Path, **overrides) -> LoRAKnowledgeModule:
    kwargs = dict(model_name_or_path=str(model_dir), rank=4, alpha=8.0, lora_dropout=0.1, lr=2e-2)
    kwargs.update(overrides)
    return LoRAKnowledgeModule(**kwargs)


def make_data(model_dir: Path, files: dict[str, Path], **overrides) -> KnowledgeDataModule:
    kwargs = dict(
        facts=str(files["facts"]),
        tokenizer=str(model_dir),
        fewshot_pool=str(files["pool"]),
        n_unknown=8,
        extra_per_unknown=1,
        extra_kind="highly_known",
        n_val_known=4,
        batch_size=4,
        max_length=128,
    )
    kwargs.update(overrides)
    return KnowledgeDataModule(**kwargs)


def make_trainer(root: Path, epochs: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=list(callbacks),
    )


def lora_state(module: LoRAKnowledgeModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_short_fit_lowers_loss_and_changes_only_lora(tiny_model_dir, tiny_fact_files, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_model_dir)
    data = make_data(tiny_model_dir, tiny_fact_files)
    history = LossHistory()
    trainer = make_trainer(tmp_path, epochs=6)
    trainer.callbacks.append(history)
    trainer.fit(module, datamodule=data)

    steps_per_epoch = len(history.losses) // 6
    first = sum(history.losses[:steps_per_epoch]) / steps_per_epoch
    last = sum(history.losses[-steps_per_epoch:]) / steps_per_epoch
    assert last < 0.8 * first

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = {
        n.replace(".base.", "."): p
        for n, p in module.model.named_parameters()
        if not p.requires_grad
    }
    for name, param in base.named_parameters():
        assert torch.equal(trained[name], param), f"frozen base weight {name} changed"
    lora = lora_state(module)
    assert lora and all("lora_" in n for n in lora)
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_b" in n)


class StopAfterEpochs(L.Callback):
    """Stops a run early the way a crash or a wall-clock limit would: the schedule still
    believes in `max_epochs`."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_resume_from_mid_run_checkpoint_gives_the_same_adapter(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    def run(root: Path, stop_after: int | None = None, ckpt_path: str | None = None):
        L.seed_everything(7)
        module = make_module(tiny_model_dir)  # dropout 0.1: the RNG must be restored too
        data = make_data(tiny_model_dir, tiny_fact_files)
        callbacks = [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)]
        if stop_after:
            callbacks.append(StopAfterEpochs(stop_after))
        trainer = make_trainer(root, 4, callbacks=callbacks)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = run(tmp_path / "straight")
    run(tmp_path / "interrupted", stop_after=2)
    ckpt = tmp_path / "interrupted" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 2 * 4
    assert all("lora_" in k for k in saved["state_dict"]), "checkpoint must hold LoRA weights only"
    assert saved["optimizer_states"], "checkpoint must hold the optimizer state"
    resumed, trainer = run(tmp_path / "interrupted", ckpt_path=str(ckpt))
    assert trainer.global_step == 4 * 4

    a, b = lora_state(straight), lora_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_checkpoint_from_other_targets_fails_clearly(tiny_model_dir, tiny_fact_files, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_model_dir)
    trainer = make_trainer(tmp_path, epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(module, datamodule=make_data(tiny_model_dir, tiny_fact_files))
    ckpt = next(tmp_path.glob("*.ckpt"))
    other = make_module(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="target modules"):
        make_trainer(tmp_path, epochs=2).fit(
            other, datamodule=make_data(tiny_model_dir, tiny_fact_files), ckpt_path=str(ckpt)
        )


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_model_dir, tiny_fact_files, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    L.seed_everything(0)
    module = make_module(tiny_model_dir)
    trainer = make_trainer(root, epochs=3, callbacks=[ModelCheckpoint(dirpath=root)])
    trainer.fit(module, datamodule=make_data(tiny_model_dir, tiny_fact_files))
    return next(root.glob("*.ckpt"))


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_exported_adapter_loads_in_peft_with_the_same_logits(
    tiny_model_dir, trained_checkpoint, tmp_path
):
    peft = pytest.importorskip("peft")
    from lora_lightning.commands.export import export_command as export

    out = export(str(trained_checkpoint), str(tmp_path / "adapter"), format="adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] and config["r"] == 4
    assert any("lora_A" in k for k in load_file(out / "adapter_model.safetensors"))

    module = LoRAKnowledgeModule.load_from_checkpoint(trained_checkpoint).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    torch.testing.assert_close(_logits(peft_model, ids), _logits(module.model, ids))


def test_merged_export_equals_module_output(tiny_model_dir, trained_checkpoint, tmp_path):
    from lora_lightning.commands.export import export_command as export

    out = export(str(trained_checkpoint), str(tmp_path / "merged"), format="merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    module = LoRAKnowledgeModule.load_from_checkpoint(trained_checkpoint).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    torch.testing.assert_close(_logits(merged, ids), _logits(module.model, ids))


def test_export_of_missing_checkpoint_names_the_path(tmp_path):
    from lora_lightning.commands.export import export_command as export

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        export(str(tmp_path / "nope.ckpt"), str(tmp_path / "out"))


# -- the CLI ---------------------------------------------------------------------------------


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lora_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_config(tmp_path: Path, model_dir: Path, files: dict[str, Path], **trainer) -> Path:
    import yaml

    config = {
        "seed_everything": 3,
        "model": {
            "model_name_or_path": str(model_dir),
            "rank": 4,
            "alpha": 8.0,
            "lora_dropout": 0.0,
            "lr": 5e-3,
        },
        "data": {
            "facts": str(files["facts"]),
            "fewshot_pool": str(files["pool"]),
            "n_unknown": 8,
            "extra_per_unknown": 1,
            "extra_kind": "highly_known",
            "n_val_known": 4,
            "batch_size": 8,
            "max_length": 128,
        },
        "trainer": {
            "max_epochs": 3,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            **trainer,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_with_a_typo_fails_naming_the_key(tiny_model_dir, tiny_fact_files, tmp_path):
    config = small_config(tmp_path, tiny_model_dir, tiny_fact_files)
    config.write_text(config.read_text().replace("n_unknown:", "n_unknwon:"))
    result = cli("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "n_unknwon" in result.stderr


def test_config_with_an_impossible_value_fails_clearly(tiny_model_dir, tiny_fact_files, tmp_path):
    config = small_config(tmp_path, tiny_model_dir, tiny_fact_files)
    result = cli("fit", "--config", str(config), "--data.extra_kind", "cousins", cwd=tmp_path)
    assert result.returncode != 0
    assert "extra_kind" in result.stderr and "cousins" in result.stderr
    result = cli("fit", "--config", str(config), "--model.rank", "1000", cwd=tmp_path)
    assert result.returncode != 0
    assert "rank" in result.stderr and "1000" in result.stderr
    assert "Traceback" not in result.stderr.splitlines()[-1]


def _final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _train_losses(run_dir: Path) -> list[float]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_model_dir, tiny_fact_files, tmp_path):
    config = small_config(tmp_path, tiny_model_dir, tiny_fact_files)
    common = ["fit", "--config", str(config)]
    one = cli(*common, "--trainer.logger.init_args.save_dir", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(
        *common,
        "--trainer.logger.init_args.save_dir",
        "two",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--data.batch_size",
        "4",
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    losses_one, losses_two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert len(losses_one) == len(losses_two) > 0
    for a, b in zip(losses_one, losses_two, strict=True):
        assert a == pytest.approx(b, rel=2e-2, abs=2e-3)
    a, b = _final_adapter(tmp_path / "one"), _final_adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-2, atol=2e-3, msg=name)


def test_knowledge_probe_runs_every_n_epochs_and_after_the_last(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    from lora_lightning.callbacks import KnowledgeEvalCallback
    from lora_lightning.knowledge import ProbeConfig

    L.seed_everything(0)
    module = make_module(tiny_model_dir, probe=ProbeConfig(n_exp=1, max_new_tokens=4))
    probe = KnowledgeEvalCallback(every_n_epochs=2)
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=make_data(tiny_model_dir, tiny_fact_files, n_unknown=2))
    assert [row["epoch"] for row in probe.history] == [1.0, 2.0]
    assert all(0.0 <= row["reliability"] <= 1.0 for row in probe.history)
    assert "val/reliability" in trainer.callback_metrics


def test_knowledge_probe_can_be_left_to_test_and_leaves_the_weights_as_they_were(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    """`every_n_epochs=None` (a sweep cell, whose `test` re-probes every fact) skips the probe
    after the last epoch; the adapter it trains is the one a probing run trains, bit for bit."""
    from lora_lightning.callbacks import KnowledgeEvalCallback
    from lora_lightning.knowledge import ProbeConfig
    from lora_lightning.lora.layer import lora_state_dict

    weights, metrics = [], []
    for every in (0, None):
        L.seed_everything(0)
        module = make_module(tiny_model_dir, probe=ProbeConfig(n_exp=1, max_new_tokens=4))
        probe = KnowledgeEvalCallback(every_n_epochs=every)
        trainer = make_trainer(tmp_path / str(every), epochs=2)
        trainer.callbacks.append(probe)
        trainer.fit(module, datamodule=make_data(tiny_model_dir, tiny_fact_files, n_unknown=2))
        weights.append(lora_state_dict(module.model))
        metrics.append(set(trainer.callback_metrics))
        assert len(probe.history) == (1 if every == 0 else 0)
    assert "val/reliability" in metrics[0] and "val/reliability" not in metrics[1]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ValueError, match="every_n_epochs must be >= 0 or null, got -1"):
        KnowledgeEvalCallback(every_n_epochs=-1)


def test_convergence_stops_when_the_trained_facts_stop_improving_and_probes_there(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    """The convergence mode: with `patience`, training stops once the share of trained facts
    answered (teacher-forced) has not risen for `patience` validations, never before
    `min_epochs`, and the probe that runs after a last epoch runs after that one, its per-fact
    verdicts in `probe_facts.jsonl`; the budget is `max_epochs`."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lora_lightning.callbacks import Convergence, KnowledgeEvalCallback
    from lora_lightning.knowledge import ProbeConfig

    L.seed_everything(0)
    module = make_module(tiny_model_dir, probe=ProbeConfig(n_exp=1, max_new_tokens=4), lr=1e-30)
    data = make_data(tiny_model_dir, tiny_fact_files, n_unknown=3)
    stop, probe = Convergence(patience=2, min_epochs=4), KnowledgeEvalCallback(every_n_epochs=0)
    trainer = L.Trainer(
        max_epochs=30, accelerator="cpu", devices=1, enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="", version=""), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[stop, probe],
    )
    trainer.fit(module, datamodule=data)  # lr ~0: nothing improves after the first epoch
    assert stop.stopped_epoch == 4 and trainer.current_epoch == 4  # 2 idle, then min_epochs
    assert [row["epoch"] for row in probe.history] == [3.0]  # probed after the 4th epoch
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    shares = [float(r["val/answered_unknown"]) for r in rows if r.get("val/answered_unknown")]
    assert len(shares) == 4 and len(set(shares)) == 1
    assert max(float(r["train/epochs"]) for r in rows if r.get("train/epochs")) == 4.0
    verdicts = [json.loads(line) for line in (tmp_path / "probe_facts.jsonl").read_text()
                .splitlines()]
    assert [v["id"] for v in verdicts] == [f.id for f in data.train_unknown]
    assert all(v["epoch"] == 4 and set(v) >= {"relation", "fewshot", "zeroshot"}
               for v in verdicts)
    (row,) = [r for r in rows if r.get("val/reliability")]
    assert float(row["val/reliability_zeroshot"]) == pytest.approx(
        sum(v["zeroshot"] for v in verdicts) / 3)
    assert float(row["val/reliability"]) == pytest.approx(sum(v["fewshot"] for v in verdicts) / 3)


def test_convergence_stops_at_once_when_every_trained_fact_is_answered(
    tiny_model_dir, tiny_fact_files, tmp_path, monkeypatch
):
    """All trained facts answered is convergence itself (after `min_epochs`); without
    `patience` the share is only logged and the run trains its fixed epochs."""
    from lora_lightning.callbacks import Convergence

    def all_answered(self, batch, batch_idx):
        out = real(self, batch, batch_idx)
        return {**out, "answered": torch.ones_like(out["answered"])}

    real = LoRAKnowledgeModule.validation_step
    monkeypatch.setattr(LoRAKnowledgeModule, "validation_step", all_answered)
    for patience, epochs in ((3, 2), (None, 5)):
        L.seed_everything(0)
        stop = Convergence(patience=patience, min_epochs=2)
        trainer = make_trainer(tmp_path, epochs=5)
        trainer.callbacks.append(stop)
        trainer.fit(make_module(tiny_model_dir),
                    datamodule=make_data(tiny_model_dir, tiny_fact_files, n_unknown=2))
        assert trainer.current_epoch == epochs
        assert float(trainer.callback_metrics["val/answered_unknown"]) == 1.0
    with pytest.raises(ValueError, match="convergence.patience must be >= 1 or null"):
        Convergence(patience=0)


def test_convergence_waits_while_the_loss_still_falls_though_no_fact_is_answered_yet():
    """A small adapter answers nothing for many epochs while its loss on the trained facts
    falls: that is improvement, and only `patience` epochs with neither the share up nor the
    loss down by `min_loss_drop` stop training."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from lora_lightning.callbacks import Convergence

    stop = Convergence(patience=2, min_loss_drop=0.01)
    trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING),
                              current_epoch=0, should_stop=False)
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None)
    stopped_after = None
    losses = [2.0, 1.5, 1.2, 1.195, 1.19, 1.0]  # falls, stalls (under 1%) twice, falls again
    for epoch, loss in enumerate(losses):
        trainer.current_epoch = epoch
        stop.on_validation_epoch_start(trainer, module)
        stop.on_validation_batch_end(trainer, module, {
            "answered": torch.zeros(4, dtype=torch.bool), "loss": torch.full((4,), loss),
            "kind": torch.zeros(4, dtype=torch.long)}, None, 0)
        stop.on_validation_epoch_end(trainer, module)
        if trainer.should_stop:
            stopped_after = epoch + 1
            break
    assert stopped_after == 5 and stop.stopped_epoch == 5  # the two stalled epochs: 4 and 5


def test_answered_means_every_answer_token_is_the_top_choice(tiny_model_dir, tiny_fact_files):
    """`validation_step`'s `answered`: every labelled token is the argmax of the full model's
    logits at the position before it, i.e. greedy decoding of the training prompt writes it."""
    L.seed_everything(0)
    module = make_module(tiny_model_dir)
    data = make_data(tiny_model_dir, tiny_fact_files, n_unknown=6, packing=False)
    data.setup("fit")
    module.configure_model()
    with torch.no_grad():  # a non-zero adapter, so that some answers are right and some not
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    module.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        out = module.validation_step(batch, 0)
        logits = module.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    top = logits[:, :-1].argmax(-1)
    expected = [bool(((top[i] == labels[i]) | (labels[i] == -100)).all())
                for i in range(len(labels))]
    assert out["answered"].tolist() == expected


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_training_loss_equals_the_full_causal_lm_loss_on_the_padded_batch(
    tiny_model_dir, tiny_fact_files, loss_on, packed
):
    """The LM head runs on labelled positions alone, and packed batches carry no padding; loss
    and LoRA gradients are still those of Hugging Face's causal-LM loss over the padded batch."""
    from lora_lightning.prompts import pack_batch, pad_batch

    module = make_module(tiny_model_dir, lora_dropout=0.0, loss_on=loss_on)
    module.configure_model()
    data = make_data(tiny_model_dir, tiny_fact_files, loss_on=loss_on)
    data.setup("fit")
    items = [*data._train.items, *data._val.items]
    padded = pad_batch(items, data.tokenizer.pad_token_id)
    assert (padded["attention_mask"] == 0).any(), "the batch should carry padding"
    with torch.no_grad():  # a non-zero adapter, so the LoRA path is exercised
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    lora = [p for p in module.model.parameters() if p.requires_grad]

    token_loss, rows, _ = module._label_token_losses(pack_batch(items) if packed else padded)
    ours = token_loss.mean()
    ours_grads = torch.autograd.grad(ours, lora)
    full = module.model(
        input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
        labels=padded["labels"],
    ).loss
    full_grads = torch.autograd.grad(full, lora)

    assert torch.allclose(ours, full, rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(ours_grads, full_grads, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)
    labelled = (padded["labels"][:, 1:] != -100).sum(1)
    assert torch.equal(torch.bincount(rows, minlength=len(items)), labelled)


def test_validation_loss_per_kind_is_the_same_packed_or_padded(tiny_model_dir, tiny_fact_files):
    losses = {}
    for packed in (False, True):
        module = make_module(tiny_model_dir)
        module.configure_model()
        data = make_data(tiny_model_dir, tiny_fact_files, packing=packed)
        trainer = make_trainer(Path("unused"), epochs=1)
        torch.manual_seed(0)
        out = trainer.validate(module, datamodule=data, verbose=False)[0]
        losses[packed] = out
    assert set(losses[True]) == {"val/loss_unknown", "val/loss_known"}
    for key, value in losses[False].items():
        assert losses[True][key] == pytest.approx(value, rel=1e-5)


def test_a_checkpoint_from_before_the_probe_settings_moved_still_loads(monkeypatch):
    """Checkpoints pickle the probe's settings by class path; those written while the class
    lived in `module` (`lora_lightning.module.ProbeConfig`) load with the weights-only
    unpickler Lightning uses."""
    import io

    import lora_lightning.module  # noqa: F401 (registers the safe globals)
    from lora_lightning.knowledge import ProbeConfig

    buffer = io.BytesIO()
    monkeypatch.setattr(ProbeConfig, "__module__", "lora_lightning.module")
    torch.save({"probe": ProbeConfig(n_exp=3)}, buffer)
    monkeypatch.undo()
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["probe"] == ProbeConfig(n_exp=3)


# -- the run folder a fit writes -----------------------------------------------------------------


def run_main(*args: str, capsys) -> tuple[int, str]:
    """`python -m lora_lightning ARGS` in this process: (exit code, stderr)."""
    from lora_lightning.__main__ import main

    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    return code, capsys.readouterr().err


def test_a_fit_stopped_before_its_first_checkpoint_leaves_a_folder_the_next_fit_starts_afresh(
    tiny_model_dir, tiny_fact_files, tmp_path, monkeypatch, capsys
):
    """A full disk at the first checkpoint (or a kill before it) leaves config.yaml and
    metrics.csv but nothing to resume: the next `fit` was refused with the advice to resume,
    and `--ckpt_path last` then found nothing. Such a folder holds no run."""
    import errno

    config = small_config(tmp_path, tiny_model_dir, tiny_fact_files, max_epochs=1)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "default"

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patched:
        patched.setattr("lora_lightning.checkpointing.fsync_file", disk_full)
        code, err = run_main("fit", "--config", str(config), capsys=capsys)
    assert code == 2 and "ENOSPC" in err
    assert (run / "config.yaml").is_file() and not (run / "checkpoints" / "last.ckpt").exists()

    code, err = run_main("fit", "--config", str(config), "--ckpt_path", "last", capsys=capsys)
    assert code == 2 and "nothing to resume from" in err and "leave out --ckpt_path" in err

    code, err = run_main("fit", "--config", str(config), capsys=capsys)
    assert code == 0, err[-3000:]
    assert "stopped before its first checkpoint" in err and "starting afresh" in err
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # and now the folder holds a run: the next fit is refused, with advice that works
    code, err = run_main("fit", "--config", str(config), capsys=capsys)
    assert code == 2 and "already holds a run" in err and "--ckpt_path last" in err
    assert "--trainer.default_root_dir DIR" in err  # which moves the run (the next test)


def test_a_bad_rank_is_refused_before_data_or_model_load_with_or_without_overwrite(
    tiny_model_dir, tiny_fact_files, tmp_path, monkeypatch, capsys
):
    config = small_config(tmp_path, tiny_model_dir, tiny_fact_files, max_epochs=1)
    monkeypatch.chdir(tmp_path)

    def loading(*args, **kwargs):
        raise AssertionError("data or model loaded before the settings were checked")

    monkeypatch.setattr(KnowledgeDataModule, "setup", loading)
    monkeypatch.setattr(LoRAKnowledgeModule, "configure_model", loading)
    for extra in ([], ["--overwrite"]):
        code, err = run_main("fit", "--config", str(config), "--model.rank", "0", *extra,
                             capsys=capsys)
        assert code == 2
        [line] = [line for line in err.splitlines() if line.startswith("error:")]
        assert "--model.rank must be an integer >= 1, got 0" in line
    assert not (tmp_path / "runs").exists()


def test_default_root_dir_moves_the_run_folder(tiny_model_dir, tiny_fact_files, tmp_path):
    """Lightning ignores `default_root_dir` once the logger has a folder; the run went to
    runs/default while its config.yaml named the other folder. The "already holds a run"
    refusal suggests it, so it must work."""
    import yaml

    config = small_config(tmp_path, tiny_model_dir, tiny_fact_files, max_epochs=1)
    moved = cli("fit", "--config", str(config), "--trainer.default_root_dir", "runs/other",
                cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr[-3000:]
    other = tmp_path / "runs" / "other"
    assert (other / "checkpoints" / "last.ckpt").is_file() and (other / "adapter").is_dir()
    assert (other / "metrics.csv").is_file() and not (tmp_path / "runs" / "default").exists()
    saved = yaml.safe_load((other / "config.yaml").read_text())["trainer"]
    assert saved["default_root_dir"] == "runs/other"
    assert saved["logger"]["init_args"]["save_dir"] == "runs/other"
    # a logger folder set on top (as a sweep sets each cell's) wins, and config.yaml says so
    third = cli("fit", "--config", str(other / "config.yaml"), "--trainer.logger.save_dir",
                "runs/third", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "the run folder is runs/third" in third.stderr
    assert (tmp_path / "runs" / "third" / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((tmp_path / "runs" / "third" / "config.yaml").read_text())["trainer"]
    assert saved["default_root_dir"] == saved["logger"]["init_args"]["save_dir"] == "runs/third"


def test_fit_measures_reliability_under_both_probes_the_zero_shot_one_on_the_training_prompts(
    tiny_model_dir, tiny_fact_files, tmp_path, monkeypatch
):
    """On SmolLM2 every capacity probe's adapter answered its trained facts as trained
    (zero-shot) and failed the four-shot probe: the capacity measured the probe. After the last
    epoch `fit` measures both: the zero-shot probe asks each trained fact once, in exactly the
    tokens it was trained on, and metrics.csv holds both (a capacity search reads either)
    beside the few-shot probe's three figures."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lora_lightning import module as module_file
    from lora_lightning.callbacks import KnowledgeEvalCallback
    from lora_lightning.knowledge import ProbeConfig
    from lora_lightning.metrics.functional import prompt_accuracy
    from lora_lightning.prompts import IGNORE_INDEX, encode_example

    asked: list[tuple[list[str], list[str]]] = []
    real = module_file.generate_answers

    def spy(model, tokenizer, prompts, **kwargs):
        answers = real(model, tokenizer, prompts, **kwargs)
        asked.append((list(prompts), [a.text for a in answers]))
        return answers

    monkeypatch.setattr(module_file, "generate_answers", spy)
    L.seed_everything(0)
    module = make_module(tiny_model_dir, probe=ProbeConfig(n_exp=2, max_new_tokens=4))
    data = make_data(tiny_model_dir, tiny_fact_files, n_unknown=3)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="", version=""), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[KnowledgeEvalCallback(every_n_epochs=0)],
    )
    trainer.fit(module, datamodule=data)

    ((prompts, answers),) = asked  # one zero-shot probe, one prompt per trained fact
    assert len(prompts) == len(data.train_unknown) == 3
    tokenizer = data.tokenizer
    for prompt, fact in zip(prompts, data.train_unknown, strict=True):
        trained = encode_example(tokenizer, fact.question, fact.answer, 128, "answer")
        n = next(i for i, label in enumerate(trained["labels"]) if label != IGNORE_INDEX)
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == trained["input_ids"][:n]
    with open(next(tmp_path.rglob("metrics.csv")), newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("val/reliability")]
    expected = sum(prompt_accuracy([a], f) for a, f in zip(answers, data.train_unknown,
                                                            strict=True)) / 3
    assert float(row["val/reliability_zeroshot"]) == pytest.approx(expected)
    for name in ("reliability", "known_retained"):  # a majority, a mean: never above "any"
        for figure in ("majority", "mean_prompt_accuracy"):
            assert 0.0 <= float(row[f"val/{name}_{figure}"]) <= float(row[f"val/{name}"])
