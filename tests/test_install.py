"""A fresh install works wherever it runs.

Our import names shadow no dependency's (a collision with Hugging Face's `kernels`, which
transformers requires since 5.25, once broke every command), and the installed package and its
commands work from the repository root and from any other folder, as users and sweep cells run
them. Every check runs in a fresh interpreter with no PYTHONPATH: what a user's shell sees.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "lora-lightning"
# folders Python puts on sys.path while our code runs: the repository root (packages, `python -m`
# from it), tests/ (pytest's rootdir mode), benchmarks/ (`python benchmarks/bench_lora.py`)
SEARCH_FOLDERS = (ROOT, ROOT / "tests", ROOT / "benchmarks")


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _our_import_names() -> dict[str, Path]:
    """Every top-level name importable from a folder we put on sys.path."""
    names: dict[str, Path] = {}
    for folder in SEARCH_FOLDERS:
        for path in folder.iterdir():
            if path.is_dir() and (path / "__init__.py").is_file() or path.suffix == ".py":
                names[path.stem] = path
    return names


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def _cli(*args: str, cwd: Path, env: dict[str, str], timeout: int = 900):
    return subprocess.run([sys.executable, "-m", "lora_lightning", *args], cwd=cwd,
                          env={**_clean_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_our_packages_are_the_ones_pyproject_installs():
    packages = {name for name, path in _our_import_names().items() if path.parent == ROOT}
    assert packages == {"lora_lightning", "lora_kernels"}
    assert "kernels" not in _our_import_names()


def test_no_import_name_of_ours_is_one_an_installed_distribution_provides():
    """The next collision like `kernels` fails here, not for a user. Hugging Face's `kernels`
    is installed with the test extra (and with transformers >= 5.25), so the old name fails."""
    assert importlib.metadata.distribution("kernels"), "the test extra installs HF's kernels"
    provided = importlib.metadata.packages_distributions()
    clashes = {
        name: others
        for name in _our_import_names()
        if (others := [d for d in provided.get(name, []) if _normalise(d) != OUR_DISTRIBUTION])
    }
    assert not clashes, f"import names of ours that installed distributions also provide: {clashes}"


_WITH_HF_KERNELS = r"""
import importlib.metadata, json, os
import torch
import transformers.integrations.hub_kernels  # imports Hugging Face's `kernels` when installed
import kernels, lora_kernels, lora_lightning
from transformers import LlamaConfig, LlamaForCausalLM
from lora_lightning.lora import inject_lora

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
base = LlamaForCausalLM(config).state_dict()
ids = torch.randint(0, 64, (2, 8))
losses, grads = {}, {}
for backend in ("triton", "torch"):
    model = LlamaForCausalLM(config)
    model.load_state_dict(base)
    torch.manual_seed(1)
    inject_lora(model, ["gate_proj", "down_proj"], rank=2, alpha=4.0, backend=backend)
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    losses[backend] = loss.item()
    grads[backend] = [p.grad for p in model.parameters() if p.requires_grad]
max_diff = max((a - b).abs().max().item() for a, b in zip(grads["triton"], grads["torch"]))
print(json.dumps({
    "kernels": kernels.__file__, "lora_kernels": lora_kernels.__file__,
    "lora_lightning": lora_lightning.__file__,
    "hf_kernels_has_get_kernel": hasattr(kernels, "get_kernel"),
    "losses": losses, "max_grad_diff": max_diff, "n_grads": len(grads["torch"]),
}))
"""


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_transformers_a_llama_and_our_fused_lora_work_beside_hf_kernels(where, tmp_path):
    """Run from the root, `import kernels` once found our old package; from elsewhere, ours
    (`kernels.BACKENDS`) was Hugging Face's. Both must now be what their owners ship."""
    cwd = ROOT if where == "repository root" else tmp_path
    result = _python(_WITH_HF_KERNELS, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    site = Path(importlib.metadata.distribution("kernels").locate_file("kernels"))
    assert Path(seen["kernels"]).parent == site and seen["hf_kernels_has_get_kernel"]
    assert Path(seen["lora_kernels"]).parent == ROOT / "lora_kernels"
    assert Path(seen["lora_lightning"]).parent == ROOT / "lora_lightning"
    # the fused Triton path (the interpreter on a CPU) agrees with the torch path
    assert seen["n_grads"] == 4
    assert seen["losses"]["triton"] == pytest.approx(seen["losses"]["torch"], rel=1e-5)
    assert seen["max_grad_diff"] < 1e-4


@pytest.mark.slow
def test_fit_and_a_sweep_dry_run_work_from_any_folder(tmp_path):
    """As users, sweep cells and SLURM jobs start them: from their own folder, the package
    found through its install, no PYTHONPATH."""
    env: dict[str, str] = {}  # the default world cache, shared with the other end-to-end tests
    fit = _cli("fit", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
               cwd=tmp_path, env=env)
    assert fit.returncode == 0, fit.stderr[-4000:]
    assert "=== lora-lightning fit summary ===" in fit.stdout
    run = tmp_path / "runs" / "default"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()

    sweep = _cli("sweep", "--config", str(ROOT / "configs/sweeps/world.yaml"), "--dry_run", "true",
                 cwd=tmp_path, env=env)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "75 cells" in sweep.stdout
