"""Faults on purpose: killed and interrupted runs resume exactly, a resume cannot silently change
what is trained, exports never mix or half-write folders, and bad input or damaged files end
in one clear line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_lightning.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_lightning", *args], cwd=cwd, env=_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the command line in this process; it must exit 2 with one `error:` line."""
    with mock.patch.object(sys, "argv", ["lora_lightning"]), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def fact_line(i: int, question: str | None = None, category: str = "Unknown") -> str:
    return json.dumps({"id": f"f{i}", "question": question or f"Where is place {i}?",
                       "answers": [f"town {i}"], "category": category})


def run_config(tmp_path: Path, model_dir: Path, files: dict[str, Path], epochs: int) -> Path:
    """A tiny run: 16 samples in 4 batches an epoch, LoRA dropout on (resuming must restore
    the RNG), every step logged, the generation probe only after the last epoch."""
    config = {
        "seed_everything": 3,
        "model": {
            "model_name_or_path": str(model_dir), "rank": 4, "alpha": 8.0,
            "lora_dropout": 0.1, "lr": 5e-3, "probe": {"n_exp": 2, "max_new_tokens": 4},
        },
        "data": {
            "facts": str(files["facts"]), "fewshot_pool": str(files["pool"]), "n_unknown": 8,
            "extra_per_unknown": 1, "extra_kind": "highly_known", "n_val_known": 4,
            "batch_size": 4, "max_length": 128,
        },
        "trainer": {"max_epochs": epochs, "accelerator": "cpu", "log_every_n_steps": 1},
        "knowledge_eval": {"every_n_epochs": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tiny_fact_files, tmp_path_factory):
    """One epoch of `fit` through the command line: (folder, config, the finished process)."""
    root = tmp_path_factory.mktemp("cli_run")
    config = run_config(root, tiny_model_dir, tiny_fact_files, epochs=1)
    fit = cli("fit", "--config", str(config), "--trainer.logger.init_args.save_dir", "run",
              "--knowledge_eval.every_n_epochs", "1", cwd=root)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return root, config, fit


# -- 11: a model path that is no model, a folder without a tokenizer --------------------------


@pytest.mark.parametrize("kind", ["missing", "not a model", "a file"])
def test_a_model_path_that_is_no_model_is_one_line_naming_it(kind, tmp_path, capsys):
    path = {"missing": tmp_path / "runs" / "nowhere" / "model", "not a model": tmp_path,
            "a file": tmp_path / "weights.bin"}[kind]
    if kind == "a file":
        path.write_bytes(b"\0")
    for argv in (
        ["fit", "--model.model_name_or_path", str(path),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "run")],
        ["categorize", "--model", str(path), "--facts", "f.jsonl"],
        ["evaluate", "--model", str(path), "--output", "null"],
    ):
        line = one_error_line(capsys, argv)
        assert str(path) in line and "expected a Hugging Face model folder" in line


def test_a_folder_without_tokenizer_files_is_refused_naming_it(tiny_model_dir, tmp_path):
    import shutil

    from lora_lightning.models import load_tokenizer

    model_only = tmp_path / "weights_only"
    model_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model_only / "config.json")
    with pytest.raises(FileNotFoundError, match=r"weights_only'? is a folder but holds no token"):
        load_tokenizer(str(model_only))


# -- 7: the world's facts belong to the world's model -----------------------------------------


def test_another_model_without_a_fact_file_is_sent_to_categorize(tiny_model_dir, tmp_path, capsys):
    line = one_error_line(capsys, [
        "fit", "--model.model_name_or_path", str(tiny_model_dir), "--trainer.max_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert "data.facts is required" in line and "categorize" in line
    assert str(tiny_model_dir) in line


def test_the_module_refuses_the_world_facts_for_another_model_in_library_use(
    tiny_model_dir, small_world, monkeypatch, tmp_path
):
    """A data module built without a tokenizer cannot tell; the module can."""
    import lightning as L

    from lora_lightning.data import KnowledgeDataModule
    from lora_lightning.module import LoRAKnowledgeModule

    monkeypatch.setattr("lora_lightning.world.ensure_world", lambda progress=True: small_world)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    module = LoRAKnowledgeModule(model_name_or_path=str(tiny_model_dir), rank=2)
    with pytest.raises(ValueError, match="data.facts is required"):
        trainer.fit(module, datamodule=KnowledgeDataModule(n_unknown=2, n_val_known=2))


# -- 8, 9: over-long and empty fact files -----------------------------------------------------


def peak_rss_mb(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run the command line in a child; (exit code, stderr, the child's peak RSS in MB)."""
    code = (
        "import resource, runpy, sys\n"
        "sys.argv = ['lora_lightning', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('lora_lightning', run_name='__main__')\n"
        "finally:\n"
        "    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    print(f'PEAK_RSS_KB {rss}', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    rss = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return done.returncode, done.stderr, int(rss[-1].split()[1]) / 1024


def test_categorize_refuses_a_5_mb_question_by_line_and_length_in_bounded_memory(
    small_world, tmp_path
):
    huge = "Why " + "is it so " * 555_555 + "?"  # 5,000,000 characters
    long_file = write_lines(tmp_path / "long.jsonl", [fact_line(1), fact_line(2, huge),
                                                      *(fact_line(i) for i in range(3, 60))])
    broken = write_lines(tmp_path / "broken.jsonl", [fact_line(1), "{",
                                                     *(fact_line(i) for i in range(3, 60))])
    args = ["categorize", "--model", str(small_world.model_dir), "--output", "c.jsonl",
            "--progress", "false"]
    code, err, peak = peak_rss_mb([*args, "--facts", str(long_file)], tmp_path)
    assert code == 2, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "long.jsonl, line 2, field 'question'" in line and "5,000,000 characters" in line
    assert "more than the model takes (512 tokens)" in line and len(line) < 400
    code, err, baseline = peak_rss_mb([*args, "--facts", str(broken)], tmp_path)
    assert code == 2 and "broken.jsonl, line 2" in err
    assert peak - baseline < 150, f"peak {peak:.0f} MB vs {baseline:.0f} MB without the line"


def test_fit_refuses_a_long_question_with_a_short_excerpt(tiny_model_dir, tmp_path):
    from lora_lightning.data import KnowledgeDataModule

    huge = "Why " + "so " * 100_000 + "?"
    rows = [fact_line(i) for i in range(6)] + [fact_line(6, huge)]
    rows += [fact_line(i, category="HighlyKnown") for i in range(7, 20)]
    path = write_lines(tmp_path / "f.jsonl", rows)
    data = KnowledgeDataModule(facts=str(path), tokenizer=str(tiny_model_dir), n_unknown=2,
                               n_val_known=2)
    with pytest.raises(ValueError) as info:
        data.setup("fit")
    message = str(info.value)
    assert "f.jsonl, line 7, field 'question'" in message and "300,005 characters" in message
    assert len(message) < 400


def test_an_empty_fact_file_is_said_to_be_empty(small_world, tiny_model_dir, tmp_path, capsys):
    from lora_lightning.data import KnowledgeDataModule

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    line = one_error_line(capsys, ["categorize", "--model", str(small_world.model_dir),
                                   "--facts", str(empty), "--output", str(tmp_path / "c.jsonl")])
    assert "empty.jsonl: is empty" in line
    assert not (tmp_path / "c.jsonl").exists()
    data = KnowledgeDataModule(facts=str(empty), tokenizer=str(tiny_model_dir), n_unknown=1)
    with pytest.raises(ValueError, match=r"empty\.jsonl: is empty"):
        data.setup("fit")


# -- 3, 11: export ----------------------------------------------------------------------------


def test_export_refuses_a_non_empty_folder_and_replaces_it_whole_with_overwrite(
    cli_run, tmp_path, capsys
):
    from lora_lightning.commands import export_command

    root, _, _ = cli_run
    ckpt = str(root / "run" / "checkpoints" / "last.ckpt")
    out = export_command(ckpt, str(tmp_path / "out"), format="adapter")
    adapter_files = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" in adapter_files

    with pytest.raises(FileExistsError, match=r"out'? is not empty; pass --overwrite"):
        export_command(ckpt, str(tmp_path / "out"), format="merged")
    assert sorted(p.name for p in out.iterdir()) == adapter_files

    export_command(ckpt, str(tmp_path / "out"), format="merged", overwrite=True)
    merged = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in merged and "config.json" in merged
    assert not any(name.startswith("adapter_") for name in merged), "an export mixed with another"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary folders left behind"

    line = one_error_line(capsys, ["export", "--ckpt_path", ckpt, "--output", str(out)])
    assert "--overwrite" in line


def full_disk_save(written: list[str]):
    """safetensors' writer on a full disk: part of the file, then its own error, which is no
    OSError and names no path (as safetensors 0.8 raises it)."""
    from safetensors import SafetensorError

    def save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        written.append(str(filename))
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    return save


@pytest.mark.parametrize("format", ["adapter", "merged"])
def test_export_to_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(
    format, cli_run, tmp_path, capsys, monkeypatch
):
    root, _, _ = cli_run
    ckpt = str(root / "run" / "checkpoints" / "last.ckpt")
    written: list[str] = []
    writer = ("lora_lightning.lora.adapters.save_file" if format == "adapter" else
              "transformers.modeling_utils.safe_save_file")
    monkeypatch.setattr(writer, full_disk_save(written))
    out = tmp_path / "out"
    line = one_error_line(capsys, ["export", "--ckpt_path", ckpt, "--output", str(out),
                                   "--format", format])
    assert written, "the full disk was never reached"
    assert line == (f"error: ENOSPC: cannot export to {out}: No space left on device; free "
                    "some space there or choose another folder")
    assert list(tmp_path.iterdir()) == [], "a partial export or temporary folder was left"


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o077, 0o600, 0o700)])
def test_an_export_gets_the_umasks_modes(mask, file_mode, dir_mode, cli_run, tmp_path):
    """An export is made in a private temporary folder and renamed into place: once it is the
    output, the folder and its files are as readable as the umask says."""
    from test_run_safety import tree_modes, umask_set

    from lora_lightning.commands import export_command

    root, _, _ = cli_run
    ckpt = str(root / "run" / "checkpoints" / "last.ckpt")
    with umask_set(mask):
        for format in ("adapter", "merged"):
            out = export_command(ckpt, str(tmp_path / format), format=format)
            assert tree_modes(out) == {"dir": {dir_mode}, "file": {file_mode}}, format


def test_export_of_a_garbage_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all" * 100)
    line = one_error_line(capsys, ["export", "--ckpt_path", str(garbage), "--output",
                                   str(tmp_path / "o")])
    assert str(garbage) in line and "not a readable checkpoint" in line
    assert not (tmp_path / "o").exists()


# -- 1, 2: killed and interrupted runs --------------------------------------------------------


def fit_and_signal(
    args: list[str], cwd: Path, when: str, signum: int
) -> tuple[int, str, str]:
    """Run `fit`, send `signum` as soon as it prints a progress line starting with `when`, and
    return (exit code, stdout, stderr)."""
    err_path = cwd / f"stderr-{signum}-{when.replace('/', '_').replace(' ', '_')}.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lora_lightning", "fit", *args], cwd=cwd, env=_env(),
            stdout=subprocess.PIPE, stderr=err, text=True,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(when):
                proc.send_signal(signum)
                break
        lines += proc.stdout.readlines()
        code = proc.wait(timeout=300)
    return code, "".join(lines), err_path.read_text()


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def train_losses(run: Path) -> dict[int, float]:
    """step -> train loss; every step logged at most once."""
    rows = [r for r in metrics_rows(run) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def val_epochs(run: Path) -> list[int]:
    return [int(r["epoch"]) for r in metrics_rows(run) if r.get("val/loss_unknown")]


@pytest.mark.slow
def test_a_run_killed_or_interrupted_at_several_moments_resumes_to_the_same_adapter_and_log(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    """SIGKILL twice mid-epoch (resuming from the last end-of-epoch checkpoint), then SIGINT and
    SIGTERM mid-epoch (each saves a mid-epoch checkpoint and says so): the adapter equals an
    uninterrupted run's bit for bit, and metrics.csv holds every step and epoch exactly once,
    with the same losses."""
    epochs = 10
    config = run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs)
    common = ["--config", str(config)]
    straight = cli("fit", *common, "--trainer.logger.init_args.save_dir", "straight",
                   cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    cut = [*common, "--trainer.logger.init_args.save_dir", "cut"]
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    epochs_saved = []
    for resume, when, signum in [
        (False, "epoch 3/10: 2/4", signal.SIGKILL),
        (True, "epoch 5/10: 3/4", signal.SIGKILL),
        (True, "epoch 7/10: 1/4", signal.SIGINT),
        (True, "epoch 9/10: 2/4", signal.SIGTERM),
    ]:
        code, out, err = fit_and_signal(
            [*cut, *(["--ckpt_path", "last"] if resume else [])], tmp_path, when, signum
        )
        assert code in (-signal.SIGKILL, 128 + signal.SIGINT, 128 + signal.SIGTERM), err[-3000:]
        assert "fit summary" not in out, f"the run ended before the {when!r} signal"
        if signum != signal.SIGKILL:
            assert code == 128 + signum
            name = signal.Signals(signum).name
            said = [line for line in err.splitlines() if line.startswith("fit interrupted")]
            assert len(said) == 1 and name in said[0], err[-3000:]
            assert "cut/checkpoints/last.ckpt" in said[0]
            assert "--ckpt_path last" in said[0]
        saved = torch.load(ckpt, weights_only=False)
        epochs_saved.append(saved["epoch"])
    # SIGKILL: the last end-of-epoch checkpoint; SIGINT/SIGTERM: one taken mid-epoch 7 and 9
    assert epochs_saved[0] in (1, 2) and epochs_saved[2] == 6 and epochs_saved[3] == 8
    assert not list(ckpt.parent.glob(".*partial*")), "a temporary checkpoint was left behind"

    done = cli("fit", *cut, "--ckpt_path", "last", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0

    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")
    assert len(train_losses(tmp_path / "cut")) == epochs * 4
    assert val_epochs(tmp_path / "cut") == val_epochs(tmp_path / "straight") == list(range(10))


def test_a_checkpoint_write_that_dies_half_way_leaves_the_previous_last_ckpt(tmp_path):
    """The new checkpoint goes to a temporary file renamed over last.ckpt only when complete."""
    from types import SimpleNamespace

    from lora_lightning.checkpointing import RunCheckpoint

    last = tmp_path / "last.ckpt"
    torch.save({"global_step": 4}, last)

    def dies_half_way(path, weights_only=False):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[], save_checkpoint=dies_half_way, global_step=8,
        strategy=SimpleNamespace(barrier=lambda name: None),
    )
    with pytest.raises(OSError, match="disk full"):
        RunCheckpoint(dirpath=tmp_path)._save_checkpoint(trainer, str(last))
    assert torch.load(last, weights_only=True) == {"global_step": 4}


def test_a_resumed_metrics_log_keeps_the_earlier_rows_once_and_drops_a_torn_row(tmp_path):
    from lora_lightning.checkpointing import ResumableCSVLogger

    run = tmp_path / "run"
    first = ResumableCSVLogger(tmp_path, name="run", version="")
    for step in range(8):  # an interrupted run; the checkpoint it left is at step 5
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.save()
    with (run / "metrics.csv").open("a") as fh:
        fh.write("7,")  # a row torn by the kill

    resumed = ResumableCSVLogger(tmp_path, name="run", version="")
    assert (run / "metrics.csv").is_file(), "nothing may be deleted before the new rows are"
    resumed.start_at_step(5)
    for step in range(5, 10):
        resumed.log_metrics({"train/loss": 100.0 + step, "val/loss": 1.0}, step=step)
    resumed.save()
    losses = {int(r["step"]): float(r["train/loss"]) for r in metrics_rows(run)}
    assert [int(r["step"]) for r in metrics_rows(run)] == list(range(10))
    assert losses == {**{s: 10.0 - s for s in range(5)}, **{s: 100.0 + s for s in range(5, 10)}}

    fresh = ResumableCSVLogger(tmp_path, name="run", version="")  # a new run in the folder
    fresh.start_at_step(0)
    fresh.log_metrics({"train/loss": 0.5}, step=0)
    fresh.save()
    assert [r["train/loss"] for r in metrics_rows(run)] == ["0.5"]


# -- 5, 11: resuming with other settings, or from a damaged checkpoint ------------------------


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--model.rank", "8", "model.rank (checkpoint 4, now 8)"),
        ("--model.lr", "0.05", "model.lr (checkpoint 0.005, now 0.05)"),
        ("--data.n_unknown", "6", "data.n_unknown (checkpoint 8, now 6)"),
        ("--model.probe.n_exp", "3", "model.probe"),
    ],
)
def test_resuming_with_other_model_or_data_settings_fails_naming_them(
    cli_run, capsys, monkeypatch, option, value, named
):
    root, config, _ = cli_run
    monkeypatch.chdir(root)
    line = one_error_line(capsys, [
        "fit", "--config", str(config), "--trainer.logger.init_args.save_dir", "run",
        option, value, "--ckpt_path", "last",
    ])
    assert named in line and "run/checkpoints/last.ckpt" in line


def test_resuming_with_more_epochs_applies_them(cli_run, tmp_path):
    import shutil

    root, config, _ = cli_run
    shutil.copytree(root / "run", tmp_path / "run")
    more = cli("fit", "--config", str(config), "--trainer.logger.init_args.save_dir", "run",
               "--trainer.max_epochs", "2", "--data.num_workers", "0", "--ckpt_path", "last",
               cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2 * 4
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trainer"][
        "max_epochs"] == 2
    assert val_epochs(tmp_path / "run") == [0, 1]  # epoch 0's row kept, epoch 1's added


def test_fit_from_a_garbage_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all" * 100)
    line = one_error_line(capsys, ["fit", "--ckpt_path", str(garbage),
                                   "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert str(garbage) in line and "not a readable checkpoint" in line


# -- noise, the end-of-fit summary and the evaluate command -----------------------------------


def test_fit_says_nothing_about_litlogger_or_leafspec_and_sums_up_before_and_after(cli_run):
    root, _, fit = cli_run
    assert "litlogger" not in fit.stderr and "LeafSpec" not in fit.stderr
    summary = fit.stdout.split("=== lora-lightning fit summary ===", 1)[1]
    rows = {line.split(":")[0]: line.split(":")[1].split() for line in summary.splitlines()
            if line.startswith(("reliability", "HighlyKnown", "train loss"))}
    assert rows["reliability (trained Unknown facts)"][0] == "0.0000"
    assert rows["HighlyKnown facts retained"][0] == "1.0000"
    before, after = map(float, rows["train loss (first batch / last batch)"])
    assert before > 0 and after > 0
    next_command = (f"python -m lora_lightning test --config {Path('run') / 'config.yaml'} "
                    "--ckpt_path last")
    assert next_command in summary


def test_the_cli_silences_the_tokenizer_warning_about_prompts_it_cuts_on_purpose(
    tiny_model_dir
):
    import logging

    from lora_lightning.__main__ import quiet_known_noise
    from lora_lightning.models import load_tokenizer

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    filters = list(logger.filters)  # as before any command ran in this process
    for f in filters:
        logger.removeFilter(f)
    logger.addHandler(handler)
    try:
        tokenizer = load_tokenizer(str(tiny_model_dir))
        tokenizer.model_max_length = 16
        tokenizer("word " * 50)
        assert any("longer than the specified maximum" in r.getMessage() for r in records)
        records.clear()
        quiet_known_noise()
        again = load_tokenizer(str(tiny_model_dir))
        again.model_max_length = 16
        again("word " * 50)
        assert not records
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters


def test_evaluate_with_only_an_mmlu_limit_limits_truthfulqa_too_and_says_where_it_writes(
    tiny_model_dir, tmp_path, capsys
):
    from lora_lightning.commands import evaluate_command

    data = ROOT.parent / "shared" / "data"
    out = tmp_path / "results" / "evaluation.json"
    results = evaluate_command(model=str(tiny_model_dir), data_dir=str(data), mmlu_limit=2,
                               mmlu_subjects=["astronomy"], n_shot=1, output=str(out),
                               progress=False)
    printed = capsys.readouterr().out
    assert results["truthfulqa"]["n"] == 2 and results["mmlu"]["n"] == 2
    assert "TruthfulQA is limited to 2 questions too" in printed
    assert printed.index(f"results will be written to {out}") < printed.index("MMLU (1-shot)")
    assert json.loads(out.read_text())["truthfulqa"]["n"] == 2
