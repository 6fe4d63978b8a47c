"""Quiet and quick by default: `hf-moe --help` / `--version` import no torch, `import hf_moe` pulls in no optional
heavy dependency and prints nothing, and an upcycle prints no third-party warning.

DeepSpeed, when installed (`scripts/setup.sh dev`, for the ZeRO-3 tests), logs "Setting accelerator to CPU" on any
transformers model import through accelerate; the subprocesses here set `DS_ACCELERATOR=cpu` (what it would pick on
this machine) so that only hf_moe's own output is judged."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HF_MOE = str(Path(sys.executable).with_name("hf-moe"))
ENVIRONMENT = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def _run(arguments, **kwargs):
    return subprocess.run(arguments, capture_output=True, text=True, env=ENVIRONMENT, timeout=600, **kwargs)


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_import_neither_torch_nor_transformers(option):
    probe = ("import sys; sys.argv = ['hf-moe', '" + option + "']\n"
             "from hf_moe.cli import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))")
    result = _run([sys.executable, "-c", probe])
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert ("upcycle" if option == "--help" else "hf-moe 0.1.0") in result.stdout + result.stderr


def test_the_hf_moe_command_prints_its_version():
    result = _run([HF_MOE, "--version"])
    assert result.returncode == 0 and result.stdout.startswith("hf-moe ") and result.stderr == ""


def test_import_hf_moe_is_silent_and_leaves_optional_libraries_unimported():
    probe = ("import sys, hf_moe\n"
             "heavy = ('bitsandbytes', 'deepspeed', 'peft', 'trl', 'matplotlib', 'evaluate', 'datasets',\n"
             "         'transformers.modeling_utils', 'hf_moe.modeling.modeling_hf_moe')\n"
             "print(sorted(name for name in heavy if name in sys.modules))\n"
             "from transformers import AutoConfig, AutoModelForCausalLM\n"
             "config = AutoConfig.for_model('hf_switch', vocab_size=64, hidden_size=32, intermediate_size=64,\n"
             "                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)\n"
             "print(type(AutoModelForCausalLM.from_config(config)).__name__)")
    result = _run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    # transformers' modeling stack (the bulk of an import's seconds) waits for the first hf_moe config, which then
    # registers the model classes
    assert result.stdout.split() == ["[]", "SwitchForCausalLM"] and result.stderr == "", result.stdout + result.stderr


def test_upcycle_prints_no_third_party_warning(tiny_upcycled, tmp_path):
    result = _run([HF_MOE, "upcycle", str(tiny_upcycled.parent / "dense"), str(tmp_path / "moe"), "--num_experts", "2"])
    assert result.returncode == 0, result.stderr
    # stderr holds the progress bar only
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith("upcycling -> hf_moe:") for line in lines), lines
