"""The repository keeps its promises about how it is installed and tested."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_quick_start_has_exactly_two_commands_installing_pinned_torch_first():
    commands = _readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command.strip()
        assert command.startswith("pip install torch==2.13.0 && ")


def test_ci_runs_the_readme_test_command():
    main_job, test_command = _readme_commands()
    assert "python -m lora_lightning fit" in main_job
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_transformers_does_not_mistake_our_kernels_for_hf_kernels():
    from transformers.utils.import_utils import is_kernels_available

    import kernels

    assert kernels.__file__.startswith(str(ROOT))
    assert is_kernels_available() is False
