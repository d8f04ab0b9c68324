"""Faults on purpose: killed and interrupted runs resume exactly, a resume cannot silently change
what is trained, exports never mix or half-write folders, and bad input or damaged files end
in one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

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


def test_export_of_a_garbage_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all" * 100)
    line = one_error_line(capsys, ["export", "--ckpt_path", str(garbage), "--output",
                                   str(tmp_path / "o")])
    assert str(garbage) in line and "not a readable checkpoint" in line
    assert not (tmp_path / "o").exists()
