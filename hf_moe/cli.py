"""`hf-moe`: the command line. Each subcommand parses its arguments dataclass with `HfArgumentParser` and calls the
library; `hf-moe SUBCOMMAND --help` lists the options.

Adding a subcommand (every one gets `--json`, `--debug` and one-line errors from `main`):

1. Write `def _name(args)` that calls the library and RETURNS its result instead of printing: plain data (a dict is
   shown as a key/value summary, a list of row dicts as a table) or `Report(data, text)` when people should see a
   text of your own (build it with `hf_moe.text_table.table` / `hf_moe.cli_output.summary`). `--json` prints the data.
2. Add `"name": ("module:ArgumentsDataclass", _name, "one-line help")` to `_commands()` (a string, so the
   dataclass's module is imported only when the command runs), and its leading positional arguments to
   `POSITIONALS` if it takes any.
3. Raise, don't print, on bad input: `ValueError` (a value; name the field, the value and what is allowed),
   `FileNotFoundError` / `OutputExistsError` (paths), or `hf_moe.errors.UserError(message, report=...)` for a
   request that ran but failed, e.g. a check with failed items: the report is printed, then the error line.
   These print `hf-moe NAME: error: MESSAGE` on stderr and exit with status 2; anything else is a bug and keeps
   its traceback. `--debug` or `HF_MOE_DEBUG=1` always shows the traceback.
"""

import importlib
import importlib.metadata
import json
import os
import sys
import traceback
from dataclasses import dataclass, field, fields, make_dataclass

from . import __version__
from .cli_output import Report, format_verification, render
from .errors import UserError, user_message

POSITIONALS = {"upcycle": ("source", "output_dir"), "export": ("source", "output_dir"),
               "prune": ("source", "output_dir"),
               "finetune": ("model_path",),
               "evaluate": ("model_path",), "check": ("folder",), "publish": ("folder", "repo_id"),
               "adapter-export": ("adapter", "output_dir"), "adapter-check": ("adapter",)}
# `hf-moe adapter export ...` runs the command "adapter-export": two-word commands are one name in `_commands()`.
GROUPS = ("adapter",)


@dataclass
class ExitReport(Report):
    """A result printed like a `Report`, after which `hf-moe` exits with `status`: a command that ran and found
    problems (1, as `diff` and `grep` do), which is not a user error (2)."""

    status: int = 1


def _demo(args) -> list[dict]:
    from .recipes.demo import run_demo

    return run_demo(args)


def _benchmark(args) -> Report:
    from .recipes.benchmark_blocks import (
        DecodeBenchmarkArguments,
        benchmark_decoding,
        benchmark_sparse_blocks,
        format_decoding_table,
        format_table,
    )

    rows = benchmark_sparse_blocks(args)
    result, text = {"sparse_blocks": rows}, format_table(rows)
    if args.decode:
        decode_args = DecodeBenchmarkArguments(new_tokens=args.decode_new_tokens, repeats=args.repeats,
                                               model_types=args.decode_model_types, seed=args.seed)
        result["decoding"] = benchmark_decoding(decode_args)
        text += "\n\n" + format_decoding_table(result["decoding"])
    return Report(result if args.decode else rows, text)


def _upcycle(args) -> Report:
    from .hub.upcycled import routing_accuracy_markdown
    from .upcycling import open_dense_checkpoint, run_upcycle, verify_upcycling

    dense = open_dense_checkpoint(args.source, args.gguf_file)  # opened (and a GGUF dequantised) once
    folder = run_upcycle(args, dense)
    result, text = {"output_dir": str(folder)}, f"upcycled model written to {folder}"
    if args.verify and args.experts:  # a mix is not the dense function: report how its routers sort the domains
        mixing = json.loads((folder / "mixing.json").read_text())
        result.update(mixing)
        if "routing_accuracy" in mixing:
            text += "\n\n" + routing_accuracy_markdown(args.experts, mixing["routing_accuracy"])
    elif args.verify:
        report = verify_upcycling(dense, folder)
        result.update(report)
        text += "\n\n" + format_verification(report)
    return Report(result, text)


def _export(args) -> Report:
    from .export import run_export, verify_export

    folder = run_export(args)
    result, text = {"output_dir": str(folder)}, f"exported model written to {folder}"
    if args.verify:
        report = verify_export(args.source, folder)
        result.update(report)
        text += "\n\n" + format_verification(report, candidate="exported", reference="hf_moe")
    return Report(result, text)


def _prune(args) -> Report:
    from .pruning import run_prune, verify_pruning
    from .pruning.verify import format_routing_flips
    from .text_table import table

    folder = run_prune(args)
    report = json.loads((folder / "pruning.json").read_text())
    experts = report["num_experts"]
    how = "merged (HC-SMoE)" if report["merge"] else f"pruned by {report['method']}"
    text = (f"{how}: {experts['source']} -> {experts['pruned']} experts per sparse layer, written to {folder}\n\n"
            + table([{"layer": entry["layer"], "kept": entry["kept"], "removed": entry["removed"]}
                     for entry in report["plan"]]))
    result = {"output_dir": str(folder), **report}
    if args.verify:
        verification = verify_pruning(args.source, folder)
        result["verification"] = verification
        text += ("\n\n" + format_verification(verification, candidate="pruned", reference="source") + "\n"
                 + format_routing_flips(verification))
    return Report(result, text)


def _finetune(args, training_args) -> Report:
    from .recipes.finetune import run_finetune

    folder = run_finetune(args, training_args)
    return Report({"output_dir": str(folder)}, f"fine-tuned model written to {folder}")


def _evaluate(args) -> Report:
    from .recipes.evaluate import format_evaluation, run_evaluate

    report = run_evaluate(args)
    report.pop("expert_specialisation", None)
    return Report(report, format_evaluation(report))


def _replicate(args) -> Report:
    from .recipes.replicate import format_rows, run_replication

    rows = run_replication(args)
    return Report(rows, format_rows(rows))


def _benchmark_balancing(args) -> Report:
    from .recipes.balancing import format_balancing_table, run_balancing_benchmark

    rows = run_balancing_benchmark(args)
    return Report(rows, format_balancing_table(rows, args.last_steps))


def _benchmark_stats(args) -> dict:
    from .recipes.benchmark_blocks import benchmark_stats_overhead

    return benchmark_stats_overhead(args)


def _benchmark_upcycle(args) -> dict:
    from .recipes.benchmark_upcycle import benchmark_upcycling

    return benchmark_upcycling(args)


def _benchmark_quantization(args) -> dict:
    from .recipes.benchmark_quantization import benchmark_quantization

    return benchmark_quantization(args)


def _benchmark_export(args) -> dict:
    from .recipes.benchmark_export import benchmark_export

    return benchmark_export(args)


def _benchmark_pruning(args) -> Report:
    from .recipes.benchmark_pruning import benchmark_pruning, format_table

    result = benchmark_pruning(args)
    return Report(result, f"{result['model']}: {result['calibration_sequences']} calibration sequences "
                          f"({result['calibration']}), {result['eval_per_family']} evaluation examples per task "
                          f"family\n\n{format_table(result)}")


def _check(args) -> Report:
    from .hub import check_folder
    from .hub.check import require_folder

    require_folder(args.folder)  # one error line, not a one-row report of it
    problems = check_folder(args.folder, load=not args.skip_load_check)
    rows = [{"severity": problem.severity, "problem": problem.message} for problem in problems]
    errors = sum(problem.severity == "error" for problem in problems)
    if errors:
        raise UserError(f"{args.folder}: {errors} problem(s) block publishing", report=Report(
            rows, "\n".join(map(str, problems))))
    return Report({"folder": args.folder, "ready": True, "problems": rows},
                  "\n".join([*map(str, problems), f"{args.folder}: ready to publish"]))


def _publish(args) -> Report:
    from dataclasses import asdict

    from .hub import publish

    result = publish(**asdict(args))
    data = {"repo_id": result.repo_id, "files": result.files, "left_out": result.left_out,
            "metadata": result.metadata, "commit_url": None if args.dry_run else result.commit_url}
    if args.dry_run:
        text = "\n".join(["would upload:", *(f"  {name}" for name in result.files), "left out:",
                          *(f"  {name}" for name in result.left_out), "card metadata:",
                          json.dumps(result.metadata, indent=1)])
    else:
        text = f"published {len(result.files)} files to https://huggingface.co/{result.repo_id}: {result.commit_url}"
    return Report(data, text)


def _adapter_export(args) -> Report:
    from .adapters import run_adapter_export

    exported = run_adapter_export(args)
    ranks = ", ".join(f"{name} {rank}" for name, rank in exported.ranks.items())
    data = {"output_dir": str(exported.path), "layout": exported.layout, "ranks": exported.ranks,
            "tensors": exported.tensors, "bytes": exported.bytes}
    return Report(data, f"{exported.layout} adapter written to {exported.path} (ranks: {ranks}; {exported.tensors} "
                        f"tensors, {exported.bytes} bytes)")


def _adapter_check(args) -> Report:
    from .adapters import run_adapter_check

    result = run_adapter_check(args)
    if result.ok:
        return Report(result.to_dict(), result.text())
    return ExitReport(result.to_dict(), result.text(), status=1)  # problems found: status 1, not a user error


def _with_positionals(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`hf-moe upcycle SRC OUT --x 1` -> `--source SRC --output_dir OUT --x 1` (leading bare words only)."""
    result, index = [], 0
    while index < len(argv) and index < len(names) and not argv[index].startswith("-"):
        result += [f"--{names[index]}", argv[index]]
        index += 1
    return result + argv[index:]


def _commands() -> dict:
    """name -> (arguments dataclass(es) as "module:Class" strings, imported only when the command runs or shows its
    help, so `hf-moe --help` stays instant; the function that runs it; the one-line help)."""
    return {
        "upcycle": ("hf_moe.upcycling.arguments:UpcycleArguments", _upcycle, "[SOURCE] [OUTPUT_DIR]: dense "
                    "Llama-family checkpoint -> MoE (no SOURCE: the embedded SmolLM2-135M-Instruct)"),
        "export": ("hf_moe.export.export:ExportArguments", _export, "FOLDER OUTPUT --to auto|mixtral|qwen2_moe|"
                   "qwen3_moe: the same model as a native checkpoint for stock transformers (or a refusal naming why)"),
        "prune": ("hf_moe.pruning.arguments:PruneArguments", _prune, "MODEL OUT --keep N|RATIO --method reap|frequency|"
                  "ean_sum|ean_mean [--merge]: fewer experts per sparse layer, same architecture (REAP / HC-SMoE)"),
        "demo": ("hf_moe.recipes.demo:DemoArguments", _demo,
                 "build, save, reload as remote code and generate, for each architecture"),
        "finetune": (("hf_moe.recipes.finetune:FinetuneArguments", "hf_moe.recipes.finetune:FinetuneTrainingArguments"),
                     _finetune, "MODEL_PATH: instruction-tune with the MoE callbacks; also every TrainingArguments "
                     "option (default data: the embedded task mixture)"),
        "evaluate": ("hf_moe.recipes.evaluate:EvaluateArguments", _evaluate, "MODEL_PATH: perplexity, exact match per "
                     "task family, expert specialisation"),
        "replicate": ("hf_moe.recipes.replicate:ReplicationArguments", _replicate, "dense vs upcycled MoE vs "
                      "upcycled Switch, equal steps on the embedded mixture (SmolLM2 start)"),
        "check": ("hf_moe.hub.check:CheckArguments", _check,
                  "FOLDER: is the model folder ready for the Hub? one line per problem"),
        "publish": ("hf_moe.hub.publish:PublishArguments", _publish, "FOLDER REPO_ID: check, then upload the "
                    "allow-listed files (--dry-run: list them)"),
        "adapter-export": ("hf_moe.adapters.export:AdapterExportArguments", _adapter_export, "ADAPTER OUT --layout "
                           "per-expert|fused|merged [--base MODEL]: an expert LoRA adapter in the layout an engine "
                           "reads (vLLM / SGLang per expert, peft fused), or merged into its base"),
        "adapter-check": ("hf_moe.adapters.check:AdapterCheckArguments", _adapter_check, "ADAPTER [--engine vllm|"
                          "sglang|peft] [--base MODEL]: which expert LoRA tensors the engine would ignore, reject or "
                          "misapply; one line per problem, status 1 when there is any"),
        "benchmark": ("hf_moe.recipes.benchmark_blocks:SparseBlockBenchmarkArguments", _benchmark,
                      "time the sparse blocks against references"),
        "benchmark-balancing": ("hf_moe.recipes.balancing:BalancingBenchmarkArguments", _benchmark_balancing,
                                "aux loss vs selection-bias balancing vs both (vs expert-choice routing) from the "
                                "same drop-upcycled SmolLM2: held-out loss, exact match and MaxVio"),
        "benchmark-stats": ("hf_moe.recipes.benchmark_blocks:StatsOverheadArguments", _benchmark_stats,
                            "training-step time with and without the expert-statistics hooks"),
        "benchmark-upcycle": ("hf_moe.recipes.benchmark_upcycle:UpcycleBenchmarkArguments", _benchmark_upcycle,
                              "time and peak memory: streaming upcycling vs in-memory expansion"),
        "benchmark-export": ("hf_moe.recipes.benchmark_export:ExportBenchmarkArguments", _benchmark_export,
                             "time and peak memory: streaming export vs load + save_pretrained"),
        "benchmark-pruning": ("hf_moe.recipes.benchmark_pruning:PruningBenchmarkArguments", _benchmark_pruning,
                              "prune / merge a fine-tuned MoE to several budgets: held-out loss, exact match, size, "
                              "decoding speed"),
        "benchmark-quantization": ("hf_moe.recipes.benchmark_quantization:QuantizationBenchmarkArguments",
                                   _benchmark_quantization, "4-bit (experts included) vs bf16: weight memory, "
                                   "max |Δlogit|, greedy agreement, forward time"),
    }


def _arguments_classes(spec) -> tuple[type, ...]:
    """A command's argument dataclasses: a class, a "module:Class" string, or a tuple of them."""
    def resolve(item):
        if not isinstance(item, str):
            return item
        module, _, name = item.partition(":")
        return getattr(importlib.import_module(module), name)

    return tuple(resolve(item) for item in (spec if isinstance(spec, tuple) else (spec,)))


@dataclass
class OutputOptions:
    """Options every subcommand takes."""

    json: bool = field(default=False, metadata={"help": "print the result as one JSON document (for machines)"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of any error (also: HF_MOE_DEBUG=1)"})


def _shared_options(arguments_classes: tuple[type, ...]) -> list:
    """The `OutputOptions` fields a command takes: all but those its own dataclasses define (`finetune`'s
    TrainingArguments has its own `--debug`; there, HF_MOE_DEBUG=1 shows tracebacks)."""
    taken = {name for cls in arguments_classes for name in cls.__dataclass_fields__}
    return [option for option in fields(OutputOptions) if option.name not in taken]


def version_line() -> str:
    # Installed versions from the package metadata: importing torch to ask it would take seconds.
    versions = {name: importlib.metadata.version(name) for name in ("transformers", "torch")}
    return f"hf-moe {__version__} (transformers {versions['transformers']}, torch {versions['torch']})"


def display_name(command: str) -> str:
    """How people type a command: "adapter-export" is `adapter export`."""
    group, _, rest = command.partition("-")
    return f"{group} {rest}" if group in GROUPS and rest else command


def _command_argv(argv: list[str], commands: dict) -> list[str]:
    """`["adapter", "export", ...]` -> `["adapter-export", ...]`; anything else unchanged."""
    if argv[:1] and argv[0] in GROUPS and len(argv) > 1 and f"{argv[0]}-{argv[1]}" in commands:
        return [f"{argv[0]}-{argv[1]}", *argv[2:]]
    return argv


def _usage(commands: dict) -> str:
    listing = "\n".join(f"  {display_name(name):<17} {help_text}" for name, (_, _, help_text) in commands.items())
    names = ",".join(display_name(name) for name in commands)
    return (f"{version_line()}\n\nusage: hf-moe {{{names}}} [options] [--json] [--debug]\n"
            f"       hf-moe --version\n\n{listing}\n\n`hf-moe COMMAND --help` lists a command's options.")


def _register_model_types() -> None:
    """`import hf_moe` registers the model types unless the `hf-moe` command imports it (see hf_moe/__init__.py), so
    that `--help` and `--version` start instantly; a subcommand needs them, so it registers here."""
    from . import _register

    _register()


def main(argv: list[str] | None = None) -> None:
    """Run `hf-moe COMMAND ...`: print the command's report (or `--json`); a user error is one line, status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(version_line())
        return
    commands = _commands()
    if argv[:1] in (["-h"], ["--help"]):  # asked for: stdout, like argparse's --help of every subcommand
        print(_usage(commands))
        raise SystemExit(0)
    argv = _command_argv(argv, commands)
    if not argv or argv[0] not in commands:  # a usage error: stderr, status 2, as argparse does
        print(_usage(commands), file=sys.stderr)
        if argv[:1] and argv[0] in GROUPS:
            choices = " or ".join(f"`{display_name(name)}`" for name in commands if name.startswith(f"{argv[0]}-"))
            given = f"unknown command {' '.join(argv[:2])!r}: " if len(argv) > 1 else ""
            problem = f"{given}choose {choices}"
        else:
            problem = f"unknown command {argv[0]!r}" if argv else "choose a command"
        print(f"hf-moe: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    command = argv[0]
    _register_model_types()
    shared = {option.name for option in _shared_options(_arguments_classes(commands[command][0]))}
    debug = ("debug" in shared and "--debug" in argv) or os.environ.get("HF_MOE_DEBUG", "") not in ("", "0")
    as_json = "json" in shared and "--json" in argv
    try:
        run, arguments = parse_command(argv, commands)  # the dataclasses' validation errors obey --json/--debug too
        result = run(*arguments)
    except KeyboardInterrupt:
        print(f"hf-moe {display_name(command)}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        message = user_message(error)
        if message is None:
            raise  # a bug: keep the traceback
        if debug:
            traceback.print_exception(error)
        if getattr(error, "report", None) is not None:  # e.g. the failed checks behind the error
            print(render(error.report, as_json))
        print(f"hf-moe {display_name(command)}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    if result is not None:
        print(render(result, as_json))
    if isinstance(result, ExitReport) and result.status:
        raise SystemExit(result.status)


def parse_command(argv: list[str], commands: dict | None = None) -> tuple:
    """(the subcommand's function, its parsed argument dataclasses) for `argv` = [SUBCOMMAND, options...]; the
    options every command takes (`--json`, `--debug`) are parsed and left out."""
    from transformers import HfArgumentParser

    command = argv[0]
    spec, run, help_text = (commands or _commands())[command]
    arguments_classes = _arguments_classes(spec)  # one dataclass, or several (finetune: + TrainingArguments)
    shared = make_dataclass("OutputOptions", [(option.name, option.type, option)
                                              for option in _shared_options(arguments_classes)])
    parser = HfArgumentParser((*arguments_classes, shared), prog=f"hf-moe {display_name(command)}",
                              description=f"hf-moe {__version__} {display_name(command)}: {help_text}")
    options = _with_positionals(argv[1:], POSITIONALS.get(command, ()))
    *arguments, unrecognized = parser.parse_args_into_dataclasses(args=options, return_remaining_strings=True)
    if unrecognized:  # HfArgumentParser's own message names the parser class, not the command
        raise ValueError(f"unrecognized arguments: {' '.join(unrecognized)} (`hf-moe {display_name(command)} --help` "
                         "lists the options)")
    return run, list(arguments[:len(arguments_classes)])


if __name__ == "__main__":
    main()
