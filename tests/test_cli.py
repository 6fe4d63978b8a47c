"""`hf-moe` as people and scripts use it: one-line errors with status 2, readable reports, `--json`, `--version`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe.cli import main as cli_main
from hf_moe.cli_output import render
from hf_moe.errors import UserError
from hf_moe.text_table import table

from .conftest import byte_tokenizer

HF_MOE = str(Path(sys.executable).with_name("hf-moe"))


@pytest.fixture(scope="module")
def dense_with_tokenizer(tmp_path_factory):
    """A tiny random Llama with a byte tokenizer and chat template: enough for `upcycle --verify` on real text."""
    folder = tmp_path_factory.mktemp("dense")
    config = AutoConfig.for_model("llama", vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def console_runs(dense_with_tokenizer, tmp_path_factory):
    """Each error case as a user meets it: the console script in a fresh process, all started at once."""
    scratch = tmp_path_factory.mktemp("cli")
    (scratch / "existing").mkdir()
    unsupported = scratch / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2).save_pretrained(unsupported)
    source = str(dense_with_tokenizer)
    cases = {
        "invalid_value": ["upcycle", source, str(scratch / "a"), "--num-experts", "3", "--top-k", "4"],
        "missing_source": ["upcycle", str(scratch / "no-such-model"), str(scratch / "b")],
        "unsupported": ["upcycle", str(unsupported), str(scratch / "c")],
        "existing_output": ["upcycle", source, str(scratch / "existing")],
        "hub_offline": ["upcycle", "hf-moe-tests/not-cached-anywhere", str(scratch / "d")],
    }
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MOE_DEBUG": ""}
    processes = {name: subprocess.Popen([HF_MOE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=environment) for name, argv in cases.items()}
    outputs = {name: process.communicate(timeout=900) for name, process in processes.items()}
    return {name: (processes[name].returncode, *outputs[name]) for name in cases}


@pytest.mark.parametrize("case, message", [
    ("invalid_value", "`num_experts_per_tok`=4 is invalid: choose 1..3 (`num_experts`=3)."),
    ("missing_source", "is neither an existing folder nor a Hub id (owner/name)"),
    ("unsupported", "architecture 'gpt2' is not supported for upcycling; supported dense Llama-family architectures"),
    ("existing_output", "already exists; choose another output folder or pass --overwrite to replace it"),
    ("hub_offline", "'hf-moe-tests/not-cached-anywhere' is not a local folder nor in the local Hub cache, and the "
                    "Hugging Face Hub cannot be reached (HF_HUB_OFFLINE=1 is set): pass a local model folder"),
])
def test_user_errors_are_one_line_with_status_2(console_runs, case, message):
    status, _, stderr = console_runs[case]
    assert status == 2
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("hf-moe upcycle: error: ")
    assert message in error_lines[0]


def test_debug_shows_the_traceback_and_keeps_the_line(dense_with_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_MOE_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["upcycle", str(dense_with_tokenizer), str(tmp_path / "x"), "--num-experts", "3", "--top-k", "4"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" in stderr and "configuration_hf_moe.py" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("hf-moe upcycle: error: `num_experts_per_tok`=4")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from hf_moe import cli

    def buggy(args):
        raise KeyError("a bug")

    commands = cli._commands()
    monkeypatch.setattr(cli, "_commands", lambda: {**commands, "buggy": (commands["benchmark-stats"][0], buggy, "")})
    with pytest.raises(KeyError, match="a bug"):
        cli_main(["buggy"])


def test_version(capsys):
    import hf_moe

    cli_main(["--version"])
    assert capsys.readouterr().out.startswith(f"hf-moe {hf_moe.__version__} (transformers ")


def test_upcycle_verify_prints_a_table_and_json_parses(dense_with_tokenizer, tmp_path, capsys):
    source, output = str(dense_with_tokenizer), str(tmp_path / "moe")
    cli_main(["upcycle", source, output, "--num-experts", "4", "--verify"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"upcycled model written to {output}"
    assert lines[2] == "verification: 5/5 greedy generations identical, max |Δlogit| " + lines[2].rsplit(" ", 1)[1]
    assert lines[3].split() == ["prompt", "dense", "answer", "upcycled", "answer", "max", "|Δlogit|", "identical?"]
    assert set(lines[4]) == {"-", " "}
    rows = lines[5:]
    assert len(rows) == 5 and all(row.endswith("yes") for row in rows)
    assert rows[0].startswith("What is the capital of France?")

    cli_main(["upcycle", source, output, "--num-experts", "4", "--verify", "--overwrite", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["output_dir"] == output
    assert report["inputs"] == 5 and report["identical_generations"] == 5
    assert report["max_abs_logit_difference"] < 1e-4
    assert set(report["samples"][0]) == {"prompt", "dense", "upcycled", "max_abs_logit_difference", "identical"}


def test_a_user_error_with_a_report_prints_the_report_then_the_line(monkeypatch, capsys):
    from hf_moe import cli

    def failing_check(args):
        raise UserError("1 of 2 checks failed", report=[{"check": "config", "ok": True},
                                                        {"check": "weights", "ok": False}])

    commands = cli._commands()
    arguments_class = commands["benchmark-stats"][0]
    monkeypatch.setattr(cli, "_commands", lambda: {**commands, "check": (arguments_class, failing_check, "")})
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["check", "--json"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert json.loads(captured.out)[1] == {"check": "weights", "ok": False}
    assert captured.err.strip() == "hf-moe check: error: 1 of 2 checks failed"


def test_a_result_with_an_exit_status_prints_the_report_then_exits_with_it(monkeypatch, capsys):
    """`hf-moe adapter check` found problems: its report, then status 1 (not 2: the input was fine)."""
    from hf_moe import cli

    def finding(args):
        return cli.ExitReport({"ok": False}, "1 problem: x would reject it", status=1)

    commands = cli._commands()
    monkeypatch.setattr(cli, "_commands", lambda: {**commands, "adapter-check": (commands["benchmark-stats"][0],
                                                                                  finding, "")})
    for argv, out in ((["adapter", "check"], "1 problem: x would reject it\n"), (["adapter", "check", "--json"],
                                                                                 '{\n "ok": false\n}\n')):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 1 and capsys.readouterr() == (out, "")
    assert "  adapter check " in cli._usage(cli._commands()) and cli.display_name("adapter-check") == "adapter check"


def test_generic_report_layouts():
    assert table([{"name": "a", "n": 3}, {"name": "bb", "n": 12}]).splitlines() == [
        "name   n", "----  --", "a      3", "bb    12"]
    assert render({"ratio": 1.23456, "ok": True, "inner": {"seconds": 2.0}}).splitlines() == [
        "ratio  1.235", "ok     yes", "inner:", "  seconds  2"]
    assert json.loads(render({"ratio": 1.23456}, as_json=True)) == {"ratio": 1.23456}


def test_no_script_shadows_a_module_that_hf_moe_imports():
    # `python scripts/X.py` puts scripts/ first on sys.path: a scripts/evaluate.py would be imported instead of the
    # `evaluate` library by everything hf_moe does in that process.
    import importlib.util
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    shadowing = [path.name for path in scripts.glob("*.py") if importlib.util.find_spec(path.stem) is not None]
    assert shadowing == []


def test_balancing_scope_script_builds_valid_runs_that_differ_only_in_the_scope(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "balancing_scope.py"
    spec = importlib.util.spec_from_file_location("balancing_scope", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.ScopeArguments(output_dir=str(tmp_path))
    runs = {scope: script.finetune_arguments(args, tmp_path / "start", tmp_path / scope, scope)
            for scope in ("micro_batch", "global_batch")}
    (micro, micro_training), (global_, global_training) = runs.values()
    assert (micro.router_aux_loss_scope, global_.router_aux_loss_scope) == ("micro_batch", "global_batch")
    assert micro_training.gradient_accumulation_steps == global_training.gradient_accumulation_steps == 4
    assert micro_training.max_steps == global_training.max_steps == args.max_steps


def test_finetune_with_a_malformed_jsonl_dataset_says_one_error_line_naming_the_file_and_the_line(
        dense_with_tokenizer, tmp_path):
    dataset = tmp_path / "bad.jsonl"
    rows = [json.dumps({"instruction": f"Say {number}.", "response": str(number)}) for number in range(12)]
    dataset.write_text("\n".join([*rows, '{"instruction": "Say 12.", "response": ', *rows]) + "\n")  # line 13 cut
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MOE_DEBUG": ""}
    result = subprocess.run([HF_MOE, "finetune", str(dense_with_tokenizer), "--dataset", str(dataset), "--output_dir",
                             str(tmp_path / "run"), "--report_to", "none"], capture_output=True, text=True,
                            env=environment, timeout=900)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()  # the file is checked when the arguments are parsed: nothing else prints
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[-1].startswith(f"hf-moe finetune: error: {dataset}: line 13 is not valid JSON (Expecting value")


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["prune", "--help"], ["finetune", "-h"],
                                  ["adapter", "check", "--help"]])
def test_help_prints_on_stdout_with_status_0(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 0
    assert captured.err == ""
    assert captured.out.startswith("hf-moe " if len(argv) == 1 else f"usage: hf-moe {argv[0]} ")


@pytest.mark.parametrize("argv, error", [
    ([], "hf-moe: error: choose a command"), (["bogus"], "hf-moe: error: unknown command 'bogus'"),
    (["adapter"], "hf-moe: error: choose `adapter export` or `adapter check`"),
    (["adapter", "bogus"],
     "hf-moe: error: unknown command 'adapter bogus': choose `adapter export` or `adapter check`"),
])
def test_a_missing_or_unknown_command_prints_the_usage_on_stderr_with_status_2(argv, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.out == ""
    assert "usage: hf-moe {upcycle," in captured.err
    assert captured.err.rstrip().splitlines()[-1] == error


def _help_texts(monkeypatch, capsys) -> dict[str, str]:
    """The `--help` text of `hf-moe` and of each subcommand, unwrapped (one wide terminal line per option)."""
    from hf_moe.cli import _commands

    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps at the terminal width, which could split a path
    texts = {}
    for command in ["", *_commands()]:
        with pytest.raises(SystemExit):
            cli_main([command, "--help"] if command else ["--help"])
        texts[command or "hf-moe"] = capsys.readouterr().out
    return texts


def test_every_document_a_help_text_names_exists_with_its_heading(monkeypatch, capsys):
    from .test_docs import ROOT, _anchors

    reference = re.compile(r"(README\.md|docs/[\w-]+\.md)(?:#([\w-]+))?")
    problems, checked = [], 0
    for command, text in _help_texts(monkeypatch, capsys).items():
        for mention in re.findall(r"\b(?:README|docs)\b[^\s),;]*", text):  # every pointer, well-formed or not
            match = reference.fullmatch(mention.rstrip(".:"))
            if match is None:
                problems.append(f"{command}: {mention!r} is not a path like docs/training.md#balancing")
            elif not (ROOT / match[1]).is_file():
                problems.append(f"{command}: {match[1]} does not exist")
            elif match[2] and match[2] not in _anchors(ROOT / match[1]):
                problems.append(f"{command}: {match[1]} has no heading #{match[2]}")
            checked += 1
    assert problems == []
    assert checked >= 3


def _finetune_without_loading(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, list[str]]:
    """Run `hf-moe finetune ARGV` in this process with the model and tokenizer loaders replaced by recorders that
    fail: (exit status, stderr, what was loaded)."""
    from transformers import AutoTokenizer

    from hf_moe.recipes import finetune

    loaded = []

    def record(name):
        def loader(*args, **kwargs):
            loaded.append(name)
            raise AssertionError(f"{name} ran")
        return loader

    monkeypatch.setattr(finetune, "load_for_finetuning", record("model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setenv("HF_MOE_DEBUG", "")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["finetune", *argv, "--report_to", "none"])
    return exit_info.value.code, capsys.readouterr().err, loaded


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing-folder"])
def test_finetune_with_a_missing_data_file_names_it_before_loading_anything(dense_with_tokenizer, tmp_path,
                                                                            monkeypatch, capsys, name):
    dataset = tmp_path / name
    status, stderr, loaded = _finetune_without_loading(monkeypatch, capsys, [
        str(dense_with_tokenizer), "--dataset", str(dataset), "--output_dir", str(tmp_path / "run")])
    assert (status, loaded) == (2, [])
    assert stderr.splitlines() == [
        f"hf-moe finetune: error: `dataset`={str(dataset)!r}: no such file or folder; expected a .json or .jsonl "
        "file of rows (instruction + response, or messages), a `datasets` folder, or a Hub dataset id (owner/name)"]


def test_finetune_with_a_missing_model_folder_names_it_before_loading_anything(tmp_path, monkeypatch, capsys):
    model = tmp_path / "no-such-model"
    status, stderr, loaded = _finetune_without_loading(monkeypatch, capsys, [
        str(model), "--output_dir", str(tmp_path / "run")])
    assert (status, loaded) == (2, [])
    assert stderr.splitlines() == [
        f"hf-moe finetune: error: `model_path`={str(model)!r}: no such folder; expected a model folder (config.json, "
        "weights and tokenizer) or a Hub model id (owner/name)"]


def test_an_unknown_option_is_one_error_line_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["benchmark-stats", "--bogus", "1", "--repeats", "2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "hf-moe benchmark-stats: error: unrecognized arguments: --bogus 1 (`hf-moe benchmark-stats --help` lists the "
        "options)"]


@pytest.mark.parametrize("options, message", [
    (["--freeze", "bogus"], "`freeze`='bogus' is invalid: choose one of ('router', 'experts', 'moe')"),
    (["--router_aux_loss_scope", "bogus"],
     "`router_aux_loss_scope`='bogus' is invalid: choose one of ('micro_batch', 'global_batch')"),
    (["--lora_r", "2", "--lora_targets", "bogus"],
     "`lora_targets`='bogus' is invalid: give a comma-separated subset of ('attention', 'experts', 'router')"),
    (["--load_in_4bit"],
     "`load_in_4bit` needs LoRA adapters to train (a 4-bit base is frozen): pass `lora_r` > 0"),
    (["--lora_r", "-1"], "`lora_r`=-1 is invalid: 0 (train the full model) or a positive LoRA rank"),
])
def test_finetune_rejects_an_invalid_option_value_before_loading_anything(dense_with_tokenizer, tmp_path, monkeypatch,
                                                                          capsys, options, message):
    status, stderr, loaded = _finetune_without_loading(monkeypatch, capsys, [
        str(dense_with_tokenizer), "--output_dir", str(tmp_path / "run"), *options])
    assert (status, loaded) == (2, [])
    assert stderr.splitlines() == [f"hf-moe finetune: error: {message}"]


def test_finetune_reads_its_data_before_loading_the_model(dense_with_tokenizer, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, stderr, loaded = _finetune_without_loading(monkeypatch, capsys, [
        str(dense_with_tokenizer), "--dataset", str(empty), "--output_dir", str(tmp_path / "run")])
    assert (status, loaded) == (2, [])
    assert stderr.splitlines() == [f"hf-moe finetune: error: The directory at {empty} doesn't contain any data files"]


def test_evaluate_with_a_missing_model_folder_names_it_before_loading_anything(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def loader(*args, **kwargs):
        raise AssertionError("a loader ran")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", loader)
    model = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", str(model)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hf-moe evaluate: error: `model_path`={str(model)!r}: no such folder; expected a model folder (config.json, "
        "weights and tokenizer) or a Hub model id (owner/name)"]


@pytest.mark.parametrize("option", ["--eval_per_family", "--max_new_tokens"])
def test_evaluate_rejects_a_count_below_1(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "some/model", option, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hf-moe evaluate: error: `{option[2:]}`=0 is invalid: a positive integer is required"]


def test_a_table_without_rows_is_its_header():
    assert table([], {"family": "family", "exact_match": "exact match"}).splitlines() == [
        "family  exact match", "------  -----------"]


@pytest.mark.parametrize("command, options, message", [
    ("benchmark", ["--dtype", "float8"], "`dtype`='float8' is invalid: choose float32 or bfloat16"),
    ("benchmark", ["--repeats", "0"], "`repeats`=0 is invalid: a positive integer is required"),
    ("benchmark", ["--decode_new_tokens", "0"], "`decode_new_tokens`=0 is invalid: a positive integer is required"),
    ("benchmark-stats", ["--repeats", "0"], "`repeats`=0 is invalid: a positive integer is required"),
])
def test_block_benchmarks_reject_invalid_values_when_parsing(command, options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, *options])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"hf-moe {command}: error: {message}"]


@pytest.mark.parametrize("command", ["check", "publish"])
def test_check_and_publish_of_a_missing_folder_say_so_once(command, tmp_path, capsys):
    folder = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, str(folder), *(["acme/x", "--dry-run"] if command == "publish" else [])])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert (captured.out, captured.err.splitlines()) == (
        "", [f"hf-moe {command}: error: {folder}: no such folder; expected a model folder written by hf_moe"])


@pytest.mark.parametrize("model_types", ["bogus", "hf_moe,bogus", ""])
def test_demo_rejects_an_unknown_model_type_naming_only_the_hf_moe_types(model_types, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--model_types", model_types, "--output_dir", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hf-moe demo: error: `model_types`={model_types!r} is invalid: give a comma-separated subset of "
        "('hf_moe', 'hf_switch', 'hf_mh_moe')"]


def _fail_if_called(name):
    def loader(*args, **kwargs):
        raise AssertionError(f"{name} ran")
    return loader


@pytest.mark.parametrize("options, message", [
    (["--num_experts", "0"], "`num_experts`=0 is invalid: choose 2 or more (the upcycled hf_moe routes each token "
                             "to its top 2 experts)"),
    (["--num_experts", "1"], "`num_experts`=1 is invalid: choose 2 or more (the upcycled hf_moe routes each token "
                             "to its top 2 experts)"),
    (["--max_steps", "0"], "`max_steps`=0 is invalid: a positive integer is required"),
    (["--per_device_train_batch_size", "0"],
     "`per_device_train_batch_size`=0 is invalid: a positive integer is required"),
    (["--train_per_family", "-1"], "`train_per_family`=-1 is invalid: a positive integer is required"),
    (["--eval_per_family", "0"], "`eval_per_family`=0 is invalid: a positive integer is required"),
])
def test_replicate_rejects_an_invalid_count_before_loading_anything(options, message, tmp_path, monkeypatch, capsys):
    from hf_moe.recipes import replicate

    for name in ("open_dense_checkpoint", "upcycle", "run_finetune", "run_evaluate"):
        monkeypatch.setattr(replicate, name, _fail_if_called(name))
    output = tmp_path / "replication"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["replicate", "--output_dir", str(output), *options])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"hf-moe replicate: error: {message}"]
    assert not output.exists()


def _benchmark_without_measuring(command, workdir, tmp_path, monkeypatch) -> list[Path]:
    """Run `hf-moe COMMAND --workdir WORKDIR` on tiny inputs with the timed subprocesses replaced by a recorder:
    the scratch folders the measurements were given."""
    from hf_moe.recipes import benchmark_export, benchmark_upcycle

    scratches = []

    def measure(function, source, output, args):
        scratches.append(output.parent)
        output.mkdir()  # what the measured process would have written
        return {"seconds": 1.0, "peak_rss_gib": 1.0}

    if command == "benchmark-upcycle":
        monkeypatch.setattr(benchmark_upcycle, "_measure", measure)
        options = ["--hidden_size", "16", "--intermediate_size", "32", "--num_hidden_layers", "1",
                   "--num_attention_heads", "2", "--num_key_value_heads", "1", "--vocab_size", "64"]
    else:
        monkeypatch.setattr(benchmark_export, "_measure", measure)
        source = tmp_path / "source"
        source.mkdir()
        (source / "config.json").write_text("{}")
        (source / "model.safetensors").write_bytes(bytes(1024))
        options = ["--source", str(source), "--repeats", "1"]
    cli_main([command, "--workdir", str(workdir), *options, "--json"])
    return scratches


@pytest.mark.parametrize("command", ["benchmark-upcycle", "benchmark-export"])
def test_benchmarks_create_a_missing_workdir_and_leave_it_empty(command, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "scratch" / "benchmark"
    scratches = _benchmark_without_measuring(command, workdir, tmp_path, monkeypatch)
    assert json.loads(capsys.readouterr().out)["time_ratio_in_memory_over_streaming"] == 1.0
    assert scratches and {scratch.parent for scratch in scratches} == {workdir}
    assert list(workdir.iterdir()) == []  # the temporary folder inside it is gone


@pytest.mark.parametrize("command", ["benchmark-upcycle", "benchmark-export"])
def test_benchmarks_reject_a_workdir_that_is_a_file_when_parsing(command, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "notes.txt"
    workdir.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        _benchmark_without_measuring(command, workdir, tmp_path, monkeypatch)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hf-moe {command}: error: `workdir`={str(workdir)!r}: not a folder; give a folder for the scratch files "
        "(created if missing), or leave it out for a temporary one"]


def test_benchmark_quantization_with_a_missing_model_folder_names_it_before_loading_anything(tmp_path, monkeypatch,
                                                                                            capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _fail_if_called("the model loader"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", _fail_if_called("the tokenizer loader"))
    model = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["benchmark-quantization", "--model_path", str(model)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hf-moe benchmark-quantization: error: `model_path`={str(model)!r}: no such folder; expected a model folder "
        "(config.json, weights and tokenizer) or a Hub model id (owner/name)"]


def test_upcycle_rejects_zero_experts_before_opening_the_source(tmp_path, monkeypatch, capsys):
    from hf_moe import upcycling
    from hf_moe.upcycling import arguments

    for module in (upcycling, arguments):
        monkeypatch.setattr(module, "open_dense_checkpoint", _fail_if_called("open_dense_checkpoint"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["upcycle", "--output_dir", str(tmp_path / "moe"), "--num_experts", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "hf-moe upcycle: error: `num_experts`=0 is invalid: a positive integer is required"]
