"""Publishing: model cards on every save path, `check_folder`, `publish`, and the push_to_hub paths, with the Hub
replaced at its network boundary by a recorder that materialises every commit into a folder."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_moe import check_folder, publish, upcycle
from hf_moe.cli import main as cli_main
from hf_moe.hub import FolderCheckError, merge_eval_results
from hf_moe.hub.card import with_model_id
from hf_moe.recipes import build_trainer, run_finetune
from hf_moe.remote_check import load_as_remote_code

from .conftest import byte_tokenizer, finetune_arguments

CODE_FILES = ["configuration_hf_moe.py", "modeling_hf_moe.py", "routing_hf_moe.py", "experts_kernels_hf_moe.py"]
IDS = torch.tensor([[5, 17, 33, 8, 61, 2, 44, 90]])


class FakeHub:
    """HfApi.create_repo / create_branch / create_commit and the card download, materialised under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.commits: list[tuple[str, list[str]]] = []

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def install(self, monkeypatch) -> None:
        hub = self

        def create_repo(api, repo_id, *args, **kwargs):
            hub.repo(repo_id).mkdir(parents=True, exist_ok=True)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, *args, **kwargs):
            paths = []
            for operation in operations:
                target = hub.repo(repo_id) / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                source = operation.path_or_fileobj
                if isinstance(source, (str, Path)):
                    shutil.copyfile(source, target)
                else:
                    target.write_bytes(source if isinstance(source, bytes) else source.read())
                paths.append(operation.path_in_repo)
            hub.commits.append((repo_id, sorted(paths)))
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.commits):040d}",
                              commit_message=kwargs.get("commit_message", ""), commit_description="",
                              oid=f"{len(hub.commits):040d}")

        def hf_hub_download(repo_id, filename, **kwargs):
            path = hub.repo(repo_id) / filename
            if not path.is_file():
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            return str(path)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", lambda api, *a, **k: None)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        # upload_folder asks the Hub to validate README.md's metadata; parse it locally instead (raises if invalid).
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, *a, **k: ModelCard(content))
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", hf_hub_download)
        # upload_folder (Trainer.push_to_hub) then commits through create_commit instead of the xet pipeline.
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")

    def files(self, repo_id: str) -> list[str]:
        root = self.repo(repo_id)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    return hub


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """A tiny Llama in a Hub-cache layout (so its Hub id is known), with an apache-2.0 card, upcycled."""
    root = tmp_path_factory.mktemp("hub")
    dense = root / "cache" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    (dense / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny llama\n")
    return upcycle(str(dense), str(root / "tiny-moe"), num_experts=4, top_k=2)


def _with_training_leftovers(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination)
    (destination / "training_args.bin").write_bytes(b"pickle")
    (destination / "checkpoint-2").mkdir()
    (destination / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (destination / "runs").mkdir()
    (destination / "runs" / "events.out.tfevents.1").write_bytes(b"tb")
    (destination / "rng_state.pth").write_bytes(b"rng")
    return destination


def _logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=IDS).logits


def test_upcycled_card_metadata(upcycled):
    card = ModelCard.load(upcycled / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["mixture-of-experts", "hf_moe", "upcycled"]  # model type hf_moe only once
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "acme/tiny-llama" and data["base_model_relation"] == "finetune"
    assert json.loads((upcycled / "config.json").read_text())["base_model"] == "acme/tiny-llama"
    for row in ("experts per sparse layer | 4, top-2", "sparse layers | 2 of 2", "active per token", "capacity"):
        assert row in card.text



def _snippet_without_hf_moe(folder: Path) -> str:
    """The card's first code block under "## Use": how to load the model with transformers alone."""
    use = ModelCard.load(folder / "README.md").text.split("## Use", 1)[1]
    return use.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_card_snippet_without_hf_moe_trusts_remote_code_in_every_from_pretrained(upcycled):
    calls = re.findall(r"(\w+)\.from_pretrained\(([^)]*)\)", _snippet_without_hf_moe(upcycled))
    assert calls == [("AutoTokenizer", "model_id, trust_remote_code=True"),
                     ("AutoModelForCausalLM", "model_id, trust_remote_code=True")]


def test_the_card_snippet_without_hf_moe_loads_the_remote_code_without_a_prompt(upcycled, tmp_path):
    # A terminal would show transformers' "run the custom code? [y/N]" prompt and wait 15 s; closed stdin shows the
    # prompt text too, then reads no answer.
    snippet = with_model_id(_snippet_without_hf_moe(upcycled), str(upcycled))
    probe = snippet + "print(type(model).__module__.split('.')[0], 'hf_moe' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", "import sys\n" + probe], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "custom code" not in result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "transformers_modules False"  # the shipped code, not hf_moe


def test_upcycle_then_publish_uploads_exactly_the_allow_list(upcycled, fake_hub, tmp_path):
    folder = _with_training_leftovers(upcycled, tmp_path / "tiny-moe")

    result = publish(folder, "acme/tiny-moe", skip_load_check=True)  # the check's load: test_check_runs_the_...

    expected = sorted(["README.md", "chat_template.jinja", "config.json", *CODE_FILES, "generation_config.json",
                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert fake_hub.files("acme/tiny-moe") == expected == result.files
    assert {"training_args.bin", "rng_state.pth", "checkpoint-2/optimizer.pt"} <= set(result.left_out)
    card = ModelCard.load(fake_hub.repo("acme/tiny-moe") / "README.md")
    assert card.data.base_model == "acme/tiny-llama" and card.data.license == "apache-2.0"
    assert 'model_id = "acme/tiny-moe"' in card.text
    remote = load_as_remote_code(fake_hub.repo("acme/tiny-moe"), IDS)
    assert torch.equal(remote["logits"], _logits(folder))


def test_finetune_then_publish_carries_the_training_card_and_its_heatmap(upcycled, fake_hub, tmp_path):
    folder = run_finetune(*finetune_arguments(
        model_path=str(upcycled), output_dir=str(tmp_path / "tiny-ft"), train_per_family=4, eval_per_family=1,
        max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=2, eval_steps=2, max_length=96,
        report_to="none", warmup_steps=0))
    card = ModelCard.load(folder / "README.md")
    assert card.data.tags == ["mixture-of-experts", "hf_moe", "fine-tuned"]
    assert card.data.base_model == "acme/tiny-llama" and card.data.license == "apache-2.0"
    for text in ("| steps | 2 of 2 |", "effective batch | 4 sequences", "final train loss", "final eval loss",
                 "frozen MoE parts | none", "imbalance (max/mean)", "![Expert load per layer](expert_load/"):
        assert text in card.text, text
    assert (folder / "training_args.bin").exists() and list(folder.glob("checkpoint-*"))

    result = publish(folder, "acme/tiny-ft", skip_load_check=True)

    uploaded = fake_hub.files("acme/tiny-ft")
    heatmaps = [name for name in uploaded if name.startswith("expert_load/")]
    assert heatmaps == ["expert_load/expert_load_step2.png"] and heatmaps[0] in card.text
    assert not any(name.startswith(("checkpoint-", "runs/")) or name.endswith((".bin", ".pt", ".pth"))
                   for name in uploaded)
    assert set(CODE_FILES) <= set(uploaded) and uploaded == result.files


def test_the_training_card_names_the_balancing_the_log_history_records():
    from hf_moe.hub.training import balancing_description

    from .conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_bias_update_rate=0.01))
    logged = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "moe/selection_bias_update_rate": 0.05, "step": 2},
              {"train_runtime": 1.0, "step": 2}]
    assert balancing_description(logged, model) == ("aux loss coef 0.01 (micro_batch); auxiliary-loss-free selection "
                                                     "bias, updated every step (gamma 0.05)")
    assert balancing_description(logged[:1], model) == ("aux loss coef 0.01 (micro_batch); selection bias held fixed "
                                                         "(no balancing callback)")
    plain = AutoModelForCausalLM.from_config(tiny_config("hf_moe"))
    assert balancing_description(logged, plain) == "aux loss coef 0.01 (micro_batch)"


def test_model_push_to_hub_uploads_the_hf_moe_card_and_code(upcycled, fake_hub):
    model = AutoModelForCausalLM.from_pretrained(upcycled)
    model.push_to_hub("acme/pushed", tags=["my-tag"])

    uploaded = fake_hub.files("acme/pushed")
    assert {"README.md", "config.json", "model.safetensors", *CODE_FILES} <= set(uploaded)
    card = ModelCard.load(fake_hub.repo("acme/pushed") / "README.md")
    assert "<!-- hf_moe model card -->" in card.text and 'model_id = "acme/pushed"' in card.text
    assert card.data.tags == ["mixture-of-experts", "hf_moe", "upcycled", "my-tag"]
    assert card.data.base_model == "acme/tiny-llama"
    remote = load_as_remote_code(fake_hub.repo("acme/pushed"), IDS)
    assert torch.equal(remote["logits"], _logits(upcycled))


def test_trainer_push_to_hub_uploads_the_hf_moe_card(upcycled, fake_hub, tmp_path):
    trainer = build_trainer(*finetune_arguments(  # carries ExpertStatsCallback, through add_moe_callbacks
        model_path=str(upcycled), output_dir=str(tmp_path / "trainer-run"), train_per_family=4, eval_per_family=1,
        max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=2, eval_steps=2, max_length=96,
        report_to="none", warmup_steps=0))
    trainer.args.hub_model_id = "acme/trainer-run"
    trainer.train()
    trainer.push_to_hub()

    uploaded = fake_hub.files("acme/trainer-run")
    assert {"README.md", "model.safetensors", *CODE_FILES} <= set(uploaded)
    card = ModelCard.load(fake_hub.repo("acme/trainer-run") / "README.md")
    assert "fine-tuned" in card.data.tags and "## Training" in card.text
    assert "generated_from_trainer" not in (card.data.tags or [])  # not the Trainer's own card


def test_save_pretrained_writes_a_card_once(upcycled, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(upcycled)
    model.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.base_model == "acme/tiny-llama" and "hf_moe" in card.data.tags
    (tmp_path / "saved" / "README.md").write_text("---\nlicense: mit\n---\nmine\n")
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text().endswith("mine\n")  # a user's card is kept


def _break(folder: Path, how: str) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if how == "no auto_map":
        del config["auto_map"]
    elif how == "partial auto_map":
        del config["auto_map"]["AutoModelForSequenceClassification"]
    elif how == "absolute path in config":
        config["base_model"] = "/home/someone/models/dense"
    config_path.write_text(json.dumps(config))
    if how == "missing code":
        (folder / "modeling_hf_moe.py").unlink()
    elif how == "pickle weights":
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
    elif how == "absolute path in generation config":
        generation = json.loads((folder / "generation_config.json").read_text())
        generation["_from_model_config_path"] = "/tmp/x"
        (folder / "generation_config.json").write_text(json.dumps(generation))
    elif how == "absolute path in card":
        card = ModelCard.load(folder / "README.md")
        card.data.base_model = "/data/dense"
        card.save(folder / "README.md")
    elif how == "card does not parse":
        (folder / "README.md").write_text("---\nmodel-index: [1, 2\n---\n# x\n")
    elif how == "no card":
        (folder / "README.md").unlink()


CHECK_FAILURES = {
    "no auto_map": "`auto_map` is missing",
    "partial auto_map": "does not cover every class; expected AutoModelForSequenceClassification",
    "missing code": "modeling_hf_moe.py: missing",
    "pickle weights": "pytorch_model.bin: non-safetensors weights",
    "absolute path in config": "config.json.base_model = '/home/someone/models/dense'",
    "absolute path in generation config": "generation_config.json._from_model_config_path = '/tmp/x'",
    "absolute path in card": "README.md metadata.base_model = '/data/dense'",
    "card does not parse": "the card metadata does not parse",
    "no card": "README.md: missing",
}


@pytest.mark.parametrize("how", CHECK_FAILURES)
def test_check_names_each_problem(upcycled, tmp_path, how):
    folder = shutil.copytree(upcycled, tmp_path / "broken")
    _break(folder, how)
    problems = check_folder(folder, load=False)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert len(errors) == 1 and CHECK_FAILURES[how] in errors[0], errors


def test_check_runs_the_fresh_process_load_and_flags_changed_code(upcycled, tmp_path, capsys):
    folder = shutil.copytree(upcycled, tmp_path / "broken")
    with open(folder / "modeling_hf_moe.py", "a") as handle:
        handle.write("\nraise ImportError('broken remote code')\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["check", str(folder)])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert exit_info.value.code == 2 and captured.err.strip().endswith("1 problem(s) block publishing")
    assert lines[0].startswith("warning: modeling_hf_moe.py: differs from the installed hf_moe's copy")
    assert lines[1].startswith("error: the folder does not load as remote code") and "broken remote code" in lines[1]


def test_check_passes_a_good_folder(upcycled, capsys):
    cli_main(["check", str(upcycled), "--skip_load_check"])
    assert capsys.readouterr().out.strip() == f"{upcycled}: ready to publish"


@pytest.mark.parametrize("repo_id", ["no-owner", "a/b/c", "acme/bad name", "acme/x..y"])
def test_publish_rejects_malformed_repo_ids(upcycled, fake_hub, repo_id):
    with pytest.raises(ValueError, match="`repo_id`=.* is invalid"):
        publish(upcycled, repo_id, skip_load_check=True)
    assert not fake_hub.root.exists()


def test_publish_without_token_or_with_a_failed_check_uploads_nothing(upcycled, fake_hub, tmp_path, monkeypatch):
    folder = shutil.copytree(upcycled, tmp_path / "broken")
    _break(folder, "pickle weights")
    with pytest.raises(FolderCheckError, match="pytorch_model.bin: non-safetensors weights"):
        publish(folder, "acme/x", skip_load_check=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(PermissionError, match="no Hugging Face token"):
        publish(upcycled, "acme/x", skip_load_check=True)
    assert not fake_hub.root.exists() and fake_hub.commits == []


def test_publish_dry_run_prints_files_and_metadata(upcycled, fake_hub, capsys):
    cli_main(["publish", str(upcycled), "acme/tiny-moe", "--dry_run", "--skip_load_check"])
    out = capsys.readouterr().out
    assert "would upload:\n  README.md\n" in out and "  modeling_hf_moe.py\n" in out
    assert '"base_model": "acme/tiny-llama"' in out
    assert not fake_hub.root.exists()


def test_evaluation_results_merge_into_the_card(upcycled, tmp_path):
    folder = shutil.copytree(upcycled, tmp_path / "evaluated")
    report = {split: {"perplexity": 12.5, "loss": 2.5, "exact_match": 0.25,
                      "exact_match_per_family": {"arithmetic": 0.5, "copy": 0.0}} for split in ("validation",)}
    merge_eval_results(folder, report)
    report["validation"]["exact_match_per_family"]["copy"] = 1.0
    merge_eval_results(folder, report)  # again: replaced, not duplicated

    card = ModelCard.load(folder / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"perplexity": 12.5, "exact match (mean)": 0.25, "exact match: arithmetic": 0.5,
                       "exact match: copy": 1.0}
    assert card.data.base_model == "acme/tiny-llama" and "## Upcycling" in card.text  # the card is kept
    assert card.text.count("## Evaluation") == 1 and card.text.index("## Evaluation") < card.text.index("## Use")


def test_upcycle_dtype_bfloat16_is_exact_in_float32_and_opens_the_source_once(upcycled, tmp_path, monkeypatch,
                                                                              capsys):
    import hf_moe.checkpoints.reading as reading

    dense_folder = next((upcycled.parent / "cache").rglob("snapshots/*"))
    opened = []
    read_weight_map = reading.read_weight_map
    monkeypatch.setattr(reading, "read_weight_map", lambda folder: opened.append(folder) or read_weight_map(folder))
    cli_main(["upcycle", str(dense_folder), str(tmp_path / "bf16"), "--num_experts", "4", "--dtype", "bfloat16",
              "--verify", "--json"])
    report = json.loads(capsys.readouterr().out)

    assert len(opened) == 1
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    assert report["weights_dtype"] == "bfloat16" and report["max_abs_logit_difference"] < 1e-5
    assert report["identical_generations"] == report["inputs"]
    assert "| weights dtype | bfloat16 |" in (tmp_path / "bf16" / "README.md").read_text()


def test_upcycle_rejects_an_unknown_dtype(upcycled, tmp_path):
    with pytest.raises(ValueError, match="`dtype`='int8' is invalid: choose one of"):
        upcycle(str(upcycled), str(tmp_path / "x"), dtype="int8")


def test_check_asks_for_the_code_files_the_folders_own_code_imports(upcycled, tmp_path):
    current = shutil.copytree(upcycled, tmp_path / "current")
    (current / "routing_hf_moe.py").unlink()
    errors = [str(p) for p in check_folder(current, load=False) if p.severity == "error"]
    assert errors == ["error: routing_hf_moe.py: missing (the remote code `auto_map` refers to)"]
    # A folder saved by an older hf_moe: its modeling file imports only the configuration file, and loads so.
    older = shutil.copytree(upcycled, tmp_path / "older")
    for name in ("routing_hf_moe.py", "experts_kernels_hf_moe.py"):
        (older / name).unlink()
    (older / "modeling_hf_moe.py").write_text("from .configuration_hf_moe import MoeConfig  # noqa: F401\n")
    problems = [str(p) for p in check_folder(older, load=False)]
    assert [p for p in problems if p.startswith("error")] == []
    assert any(p.startswith("warning: modeling_hf_moe.py: differs from the installed hf_moe's copy") for p in problems)
