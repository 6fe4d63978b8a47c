"""The checkpoint layer as its users meet it: one existing-output error for every writer, the verify tables, the
cards, and the one model comparison."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.cli import main
from hf_moe.errors import OutputExistsError


def _dense_folder(tiny_upcycled):
    return tiny_upcycled.parent / "dense"


@pytest.mark.parametrize("command", ["upcycle", "mix", "export", "prune"])
def test_every_writer_refuses_an_existing_output_naming_overwrite(tiny_upcycled, tmp_path, capsys, command):
    dense = str(_dense_folder(tiny_upcycled))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    argv = {"upcycle": ["upcycle", dense, str(existing), "--num_experts", "2"],
            "mix": ["upcycle", dense, str(existing), "--experts", dense, dense],
            "export": ["export", str(tiny_upcycled), str(existing)],
            "prune": ["prune", str(tiny_upcycled), str(existing), "--keep", "2"]}[command]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    error = capsys.readouterr().err.strip()
    assert refused.value.code == 2
    assert error == (f"hf-moe {argv[0]}: error: {existing} already exists; choose another output folder or pass "
                     "--overwrite to replace it")
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]


def test_the_library_raises_output_exists_error_for_mix_and_export(tiny_upcycled, tmp_path):
    from hf_moe import export, upcycle

    dense = str(_dense_folder(tiny_upcycled))
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        upcycle(dense, str(tiny_upcycled), experts=[dense, dense])
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export(str(tiny_upcycled), str(tiny_upcycled))


def test_the_output_folder_resolver_takes_the_default_and_refuses_an_existing_folder(tmp_path):
    from hf_moe.checkpoints.atomic import resolve_output_dir

    assert resolve_output_dir(None, default=tmp_path / "new") == tmp_path / "new"
    assert resolve_output_dir(str(tmp_path / "asked"), default=tmp_path / "new") == tmp_path / "asked"
    with pytest.raises(OutputExistsError, match=f"^{tmp_path} already exists; choose another folder or pass "
                                                "overwrite=True$"):
        resolve_output_dir(None, default=tmp_path)
    assert resolve_output_dir(tmp_path, overwrite=True) == tmp_path
    with pytest.raises(ValueError, match="output_dir"):
        resolve_output_dir(None)


def test_a_model_folder_opens_once_with_its_config_weights_and_tokenizer(tiny_upcycled, tmp_path):
    import shutil

    from hf_moe.checkpoints.reading import folder_tokenizer, open_model_folder

    folder = open_model_folder(str(tiny_upcycled))
    assert (folder.path, folder.hub_id, folder.model_type) == (tiny_upcycled, None, "hf_moe")
    assert folder.config.num_experts == 4 and folder.config is folder.config  # read once
    assert set(folder.weight_files) == set(AutoModelForCausalLM.from_pretrained(tiny_upcycled).state_dict())
    assert folder.load_tokenizer().chat_template and not folder.load_model().training
    cached = tmp_path / "cache" / "models--acme--tiny-moe" / "snapshots" / "0123abc"
    shutil.copytree(tiny_upcycled, cached)
    assert open_model_folder(cached).hub_id == "acme/tiny-moe"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (cached / name).unlink(missing_ok=True)
    assert folder_tokenizer(cached) is None


@pytest.mark.parametrize("command", ["upcycle", "export", "prune"])
def test_every_reader_names_a_folder_without_config_json_alike(tmp_path, capsys, command):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(SystemExit) as refused:
        main([command, str(tmp_path), str(tmp_path / "out"), *(["--keep", "2"] if command == "prune" else [])])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == f"hf-moe {command}: error: {tmp_path}: no config.json"


def test_upcycle_verify_table_shows_the_users_question_not_the_chat_template(tiny_upcycled, tmp_path, capsys):
    from .conftest import CHAT_TEMPLATE, byte_tokenizer

    dense = AutoModelForCausalLM.from_pretrained(_dense_folder(tiny_upcycled))
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "System: you are a helpful assistant.\n" + CHAT_TEMPLATE  # plain text, as SmolLM2's
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num_experts", "2", "--verify"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("What is the capital")]
    assert len(rows) == 1 and "System:" not in table, table


def test_export_verify_table_shows_both_answers_and_the_difference(tiny_upcycled, tmp_path, capsys):
    main(["export", str(tiny_upcycled), str(tmp_path / "native"), "--verify"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("prompt"))
    for column in ("hf_moe answer", "exported answer", "max |Δlogit|", "identical?"):
        assert column in header, header
    assert sum(line.endswith("yes") for line in lines) == 5, lines


def test_cards_link_no_page_that_does_not_exist(tiny_upcycled, tmp_path):
    from hf_moe import export

    native = export(str(tiny_upcycled), str(tmp_path / "native"))
    for folder in (tiny_upcycled, native):
        card = (folder / "README.md").read_text()
        assert "pypi.org" not in card and "hf_moe" in card, folder


def test_exported_card_is_rendered_by_the_hub_renderer_without_remote_code(tiny_upcycled, tmp_path):
    from hf_moe import export
    from hf_moe.hub.card import CARD_MARKER

    card = (export(str(tiny_upcycled), str(tmp_path / "native")) / "README.md").read_text()
    assert CARD_MARKER in card and "MixtralForCausalLM" in card
    assert "trust_remote_code=True" not in card and "model = AutoModelForCausalLM.from_pretrained(model_id)" in card


def test_compare_outputs_matches_an_independent_count():
    from hf_moe.checkpoints.compare import compare_outputs

    torch.manual_seed(0)
    a = [torch.randn(1, 5, 7), torch.randn(1, 3, 7)]
    b = [a[0] + 0.01 * torch.randn(1, 5, 7), torch.randn(1, 3, 7)]
    report = compare_outputs({"logits": a, "generations": [[1, 2, 3], [4, 5]]},
                             {"logits": b, "generations": [[1, 2, 3], [4, 6, 7]]})
    assert report["max_abs_logit_difference"] == max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    argmax_same = sum((x.argmax(-1) == y.argmax(-1)).sum().item() for x, y in zip(a, b, strict=True))
    assert report["next_token_argmax_agreement"] == argmax_same / 8
    assert (report["identical_generations"], report["inputs"]) == (1, 2)
    assert report["greedy_token_agreement"] == 4 / 6  # 3 of 3, then 1 of max(2, 3)


def test_compare_models_sees_a_changed_model(tiny_upcycled):
    from hf_moe.checkpoints.compare import compare_models

    model = AutoModelForCausalLM.from_pretrained(tiny_upcycled).eval()
    changed = AutoModelForCausalLM.from_pretrained(tiny_upcycled).eval()
    with torch.no_grad():
        changed.lm_head.weight.mul_(1.5)
    inputs = [torch.tensor([[5, 6, 7, 8]])]
    assert compare_models(model, model, inputs, 4, 0)["max_abs_logit_difference"] == 0.0
    assert compare_models(model, changed, inputs, 4, 0)["max_abs_logit_difference"] > 0.1
