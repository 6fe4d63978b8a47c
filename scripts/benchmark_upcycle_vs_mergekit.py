"""`hf-moe upcycle` against `mergekit-moe` on the same dense checkpoint: wall time, peak RSS and output size.

    python scripts/benchmark_upcycle_vs_mergekit.py --mergekit_python /tmp/mkvenv/bin/python [--rounds 3]

mergekit lives in its own virtual environment (`python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install
mergekit`); `--mergekit_python` is that environment's interpreter and `mergekit-moe` is taken from beside it.

The dense input is a safetensors folder (`--dense`, default /tmp/smol-dense). When it is missing it is made from
the embedded SmolLM2-135M-Instruct GGUF (float32, as `DenseCheckpoint.save_as_folder` writes it); `--input_dtype
bfloat16` makes a bf16 copy instead, so that both tools read bf16. Both tools read the very same folder.

The same job for both: 8 experts, all copies of the dense MLP, top-2, random router, bfloat16 output. mergekit-moe gets
a YAML config (`gate_mode: random`, Mixtral output, the default for a Llama base); hf-moe gets
`upcycle DENSE OUT --num_experts 8 --top_k 2 --dtype bfloat16 --overwrite`.

Each run is a fresh child under `/usr/bin/time -f "%e %M %U %S"` (wall seconds, peak RSS of that process, CPU
seconds: less sensitive than wall time to other load on the machine), after an `os.sync()`; the
tools alternate in ABBA order (hf-moe, mergekit | mergekit, hf-moe | ...) so that other load falls on both, and
the output folder is deleted after each run. The start-up of each command line (`hf-moe --version`, `hf-moe upcycle
--help`, `mergekit-moe --help`) is timed the same way. The load average is printed before and after.

A last check opens both outputs and compares the expert weights of one layer (both are bf16 copies of the same dense
MLP in transformers' fused `gate_up_proj (E, 2I, H)` / `down_proj (E, H, I)` layout).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit_python", default="/tmp/mkvenv/bin/python",
                        help="python of the virtual environment where mergekit is installed (mergekit-moe beside it)")
    parser.add_argument("--hf_moe", default=str(Path(sys.executable).parent / "hf-moe"),
                        help="the hf-moe command (default: beside this python)")
    parser.add_argument("--dense", default="/tmp/smol-dense", help="dense safetensors folder read by both tools")
    parser.add_argument("--input_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="when --dense is made here: the dtype of its weights")
    parser.add_argument("--work_dir", default=None, help="where the outputs go (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool, alternating")
    parser.add_argument("--startup_rounds", type=int, default=3, help="runs of each start-up command")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--skip_compare", action="store_true", help="do not compare the two outputs' expert weights")
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return parser.parse_args(argv)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def timed(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB, user + system CPU seconds) of `command` run as a fresh child under
    /usr/bin/time; raises on failure."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        completed = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", report.name, *command], cwd=cwd,
                                   env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with status {completed.returncode}:\n"
                               f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
        seconds, kib, user, system = report.read().split()[-4:]  # the last line ("Command exited..." may precede)
    return float(seconds), int(kib) * 1024 / 1e9, float(user) + float(system)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def make_dense(args: argparse.Namespace) -> Path:
    dense = Path(args.dense)
    if (dense / "config.json").is_file():
        return dense
    print(f"making {dense} ({args.input_dtype}) from the embedded SmolLM2-135M-Instruct GGUF", flush=True)
    code = ("import sys, torch\n"
            "from hf_moe.upcycling import open_dense_checkpoint\n"
            "folder = open_dense_checkpoint(None).save_as_folder(sys.argv[1])\n"
            "if sys.argv[2] == 'bfloat16':\n"
            "    from transformers import AutoModelForCausalLM\n"
            "    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)\n"
            "    model.save_pretrained(folder)\n")
    subprocess.run([sys.executable, "-c", code, str(dense), args.input_dtype], check=True)
    return dense


def mergekit_config(dense: Path, num_experts: int, top_k: int) -> str:
    lines = [f"base_model: {dense}", "gate_mode: random", "dtype: bfloat16", f"experts_per_token: {top_k}",
             "experts:", *[f"  - source_model: {dense}" for _ in range(num_experts)]]
    return "\n".join(lines) + "\n"


def compare_outputs(hf_out: Path, mk_out: Path, layer: int = 0) -> dict:
    """Whether both outputs hold the same expert weights for `layer`, and their tensor counts."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found.update({name: handle.get_tensor(name) if f".{layer}.mlp.experts." in name else None
                              for name in handle.keys()})
        return found

    hf, mk = tensors(hf_out), tensors(mk_out)
    result = {"hf_moe_tensors": len(hf), "mergekit_tensors": len(mk)}
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.{layer}.mlp.experts.{proj}"
        a, b = hf.get(name), mk.get(name)
        result[f"layer{layer}_{proj}_equal"] = (a is not None and b is not None and a.shape == b.shape
                                                and a.dtype == b.dtype and bool((a == b).all()))
    result["names_only_in_hf_moe"] = sorted(set(hf) - set(mk))[:5]
    result["names_only_in_mergekit"] = sorted(set(mk) - set(hf))[:5]
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv=None) -> dict:
    args = parse_args(argv)
    mergekit_moe = Path(args.mergekit_python).parent / "mergekit-moe"
    for path, what in ((Path(args.hf_moe), "--hf_moe"), (mergekit_moe, "mergekit-moe beside --mergekit_python")):
        if not path.is_file():
            raise SystemExit(f"{what}: {path} does not exist")
    dense = make_dense(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="upcycle-vs-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "mergekit-moe.yml"
    config_path.write_text(mergekit_config(dense, args.num_experts, args.top_k))
    outputs = {"hf-moe": work / "hf-moe-out", "mergekit-moe": work / "mergekit-out"}
    commands = {
        "hf-moe": [args.hf_moe, "upcycle", str(dense), str(outputs["hf-moe"]), "--num_experts", str(args.num_experts),
                   "--top_k", str(args.top_k), "--dtype", "bfloat16", "--overwrite"],
        "mergekit-moe": [str(mergekit_moe), str(config_path), str(outputs["mergekit-moe"])],
    }
    startup_commands = {
        "hf-moe --version": [args.hf_moe, "--version"],
        "hf-moe upcycle --help": [args.hf_moe, "upcycle", "--help"],
        "mergekit-moe --help": [str(mergekit_moe), "--help"],
    }
    env = {**os.environ, "TQDM_DISABLE": "1"}  # both tools draw tqdm bars; they are not what is measured
    print(f"cpus: {os.cpu_count()}  load average before: {load_average()}", flush=True)
    print(f"dense input: {dense} ({weights_bytes(dense) / 1e9:.3f} GB of safetensors)\n", flush=True)

    startup = {name: {"seconds": [], "rss_gb": [], "cpu_seconds": []} for name in startup_commands}
    for _ in range(args.startup_rounds):
        for name, command in startup_commands.items():
            seconds, rss, cpu = timed(command, work, env)
            startup[name]["seconds"].append(seconds)
            startup[name]["rss_gb"].append(rss)
            startup[name]["cpu_seconds"].append(cpu)

    runs = {tool: {"seconds": [], "rss_gb": [], "cpu_seconds": [], "load": []} for tool in commands}
    sizes, weights = {}, {}
    for round_index in range(args.rounds):
        order = list(commands) if round_index % 2 == 0 else list(commands)[::-1]
        for tool in order:
            shutil.rmtree(outputs[tool], ignore_errors=True)
            os.sync()  # the previous run's written pages go to disk now, not during this run
            seconds, rss, cpu = timed(commands[tool], work, env)
            runs[tool]["seconds"].append(seconds)
            runs[tool]["rss_gb"].append(rss)
            runs[tool]["cpu_seconds"].append(cpu)
            runs[tool]["load"].append(load_average())
            sizes[tool], weights[tool] = folder_bytes(outputs[tool]), weights_bytes(outputs[tool])
            print(f"round {round_index + 1} {tool:<13} {seconds:7.2f} s wall  {cpu:7.2f} s cpu  {rss:5.2f} GB  "
                  f"load {runs[tool]['load'][-1]}", flush=True)
            if round_index < args.rounds - 1 or args.skip_compare:
                shutil.rmtree(outputs[tool], ignore_errors=True)

    comparison = None
    if not args.skip_compare:
        comparison = compare_outputs(outputs["hf-moe"], outputs["mergekit-moe"])
        for folder in outputs.values():
            shutil.rmtree(folder, ignore_errors=True)

    print("\n| tool | median wall s | runs (s) | median CPU s (user+sys) | median peak RSS (GB) | output (GB) | "
          "weights (GB) |")
    print("|---|---|---|---|---|---|---|")
    for tool, run in runs.items():
        print(f"| {tool} | {median(run['seconds']):.2f} | {', '.join(f'{s:.2f}' for s in run['seconds'])} | "
              f"{median(run['cpu_seconds']):.2f} | {median(run['rss_gb']):.2f} | {sizes[tool] / 1e9:.3f} | "
              f"{weights[tool] / 1e9:.3f} |")
    hf, mk = runs["hf-moe"], runs["mergekit-moe"]
    ratios = {"seconds": median(hf["seconds"]) / median(mk["seconds"]),
              "cpu_seconds": median(hf["cpu_seconds"]) / median(mk["cpu_seconds"]),
              "peak_rss": median(hf["rss_gb"]) / median(mk["rss_gb"]),
              "output_size": sizes["hf-moe"] / sizes["mergekit-moe"]}
    print(f"| hf-moe / mergekit | {ratios['seconds']:.2f}x | | {ratios['cpu_seconds']:.2f}x | "
          f"{ratios['peak_rss']:.2f}x | {ratios['output_size']:.3f}x | "
          f"{weights['hf-moe'] / weights['mergekit-moe']:.3f}x |")

    print("\n| start-up | median wall s | median CPU s | median peak RSS (GB) |\n|---|---|---|---|")
    for name, run in startup.items():
        print(f"| {name} | {median(run['seconds']):.2f} | {median(run['cpu_seconds']):.2f} | "
              f"{median(run['rss_gb']):.3f} |")
    if comparison is not None:
        print(f"\noutputs compared: {json.dumps(comparison)}")
    print(f"\nload average after: {load_average()} (1, 5, 15 min; {os.cpu_count()} cpus)")
    result = {"runs": runs, "startup": startup, "output_bytes": sizes, "weights_bytes": weights, "ratios": ratios,
              "comparison": comparison, "load_average_after": load_average(), "cpus": os.cpu_count(),
              "commands": commands, "mergekit_config": config_path.read_text()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
