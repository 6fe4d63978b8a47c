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


def _run(arguments, env=ENVIRONMENT, **kwargs):
    return subprocess.run(arguments, capture_output=True, text=True, env=env, timeout=600, **kwargs)


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


OPTIONAL = ("bitsandbytes", "peft", "trl", "deepspeed")


@pytest.mark.parametrize("module", ["hf_moe", "hf_moe.training", "hf_moe.upcycling", "hf_moe.pruning",
                                    "hf_moe.export"])
def test_importing_a_package_imports_no_optional_library_and_prints_nothing(module):
    result = _run([sys.executable, "-c", f"import sys, {module}\n"
                   f"print(sorted(name for name in {OPTIONAL!r} if name in sys.modules))"])
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "[]", ""), result.stderr


# Whether bitsandbytes asks the `kernels` package for its Hub kernel on this CPU (AVX512-BF16), read in a process
# where it is imported without hf_moe.
_ASKS_FOR_HUB_KERNEL = ("import sys; sys.modules['kernels'] = None\n"
                        "import bitsandbytes.functional as F; print(bool(F.has_avx512bf16()))")
# Imports `statement` with a record of every `kernels.get_kernel` call, and prints the calls.
# (Without `kernels` installed, as transformers < 5.25 leaves it, nothing can be fetched.)
_RECORDING_KERNEL_FETCHES = ("calls = []\ntry:\n    import kernels\nexcept ImportError:\n    pass\nelse:\n"
                             "    kernels.get_kernel = lambda *args, **kwargs: calls.append(args) or 1 / 0\n"
                             "{statement}\nimport bitsandbytes\nprint('kernel fetches:', calls)")


@pytest.mark.parametrize("offline", ["1", "0"])
@pytest.mark.parametrize("statement", ["from hf_moe.training import ExpertStatsCallback",
                                       "import hf_moe; from transformers import Trainer"])
def test_trainer_imports_after_hf_moe_fetch_no_hub_kernel_and_print_nothing(statement, offline):
    """transformers >= 5.25 installs `kernels`, the Trainer imports peft, peft imports bitsandbytes: on AVX512-BF16
    CPUs that would fetch a kernel from the Hub (online) or warn (offline or untrusted)."""
    probe = _RECORDING_KERNEL_FETCHES.format(statement=statement)
    result = _run([sys.executable, "-c", probe], env={**ENVIRONMENT, "HF_HUB_OFFLINE": offline})
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "kernel fetches: []", ""), result.stderr


def test_without_hf_moe_the_trainer_import_asks_for_the_hub_kernel_on_avx512_bf16_cpus():
    """The control of the test above: the same import without hf_moe does ask, where bitsandbytes asks at all."""
    pytest.importorskip("kernels", reason="bitsandbytes asks the `kernels` package, which is not installed")
    if _run([sys.executable, "-c", _ASKS_FOR_HUB_KERNEL]).stdout.strip() != "True":
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never asks for its Hub kernel here")
    trainer_import = _RECORDING_KERNEL_FETCHES.format(statement="from transformers import Trainer")
    result = _run([sys.executable, "-c", trainer_import])
    assert "kernel fetches: [('kernels-community/quantization-bitsandbytes',)]" in result.stdout, result.stdout
    assert "Failed to load CPU gemm_4bit_forward" in result.stderr
