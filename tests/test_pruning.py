"""Pruning and merging experts: the saliency against an independent computation, planted redundancy found, the exact
cases exact (unreached experts, nothing pruned, identical experts merged), transformers' own families written the way
stock transformers loads them, and bad requests refused before anything is written."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hf_moe.errors import UnsupportedCheckpointError
from hf_moe.pruning import (
    LayerPlan,
    average_linkage_clusters,
    measure_saliency,
    open_source,
    prune,
    write_pruned_folder,
)
from hf_moe.pruning.merge import cosine_distances

from .conftest import tiny_config

CALIBRATION = [[1, 5, 9, 13, 20, 33, 7, 8, 41, 3, 60, 61], [4, 4, 90, 17, 2, 60, 11, 12], [30, 31, 32, 33, 34, 35]]


def _tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def _tiny_moe(model_type="hf_moe", **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def _plant_never_routed_expert(model) -> None:
    """E=5, k=2: router rows (+u, -u, +v, -v, 0). Each token's logits are (s, -s, t, -t, 0) with s = u·x, t = v·x, so
    its top 2 are one of experts 0/1 and one of 2/3 (both >= 0): expert 4 is never chosen."""
    with torch.no_grad():
        for layer in model.model.layers:
            router = layer.mlp.gate.weight
            u, v = torch.randn(2, router.shape[1])
            router.copy_(torch.stack([u, -u, v, -v, torch.zeros_like(u)]))


def _no_staging_left(parent) -> bool:
    return not [path for path in parent.iterdir() if path.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ saliency
def _independent_saliency(model, inputs, renormalise: bool) -> dict[str, torch.Tensor]:
    """REAP / EAN / frequency from the router logits the model returns and experts computed from their weights."""
    layers = model.model.layers
    block_inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda module, args, index=index: block_inputs.setdefault(index, []).append(
            args[0].reshape(-1, args[0].shape[-1])))
        for index, layer in enumerate(layers)]
    logits_per_layer = {index: [] for index in range(len(layers))}
    with torch.no_grad():
        for ids in inputs:
            outputs = model(input_ids=torch.tensor([ids]), output_router_logits=True)
            for index, logits in enumerate(outputs.router_logits):
                logits_per_layer[index].append(logits.reshape(-1, logits.shape[-1]))
    for hook in hooks:
        hook.remove()
    top_k, num_experts = model.config.num_experts_per_tok, layers[0].mlp.gate.weight.shape[0]
    reap, ean, frequency = (torch.zeros(len(layers), num_experts, dtype=torch.float64) for _ in range(3))
    for index, layer in enumerate(layers):
        x = torch.cat(block_inputs[index]).double()
        probabilities = torch.cat(logits_per_layer[index]).double().softmax(-1)
        weights, chosen = probabilities.topk(top_k, dim=-1)
        if renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        gate_up, down = layer.mlp.experts.gate_up_proj.double(), layer.mlp.experts.down_proj.double()
        for expert in range(num_experts):
            routed = (chosen == expert).any(-1)
            gate = (weights * (chosen == expert)).sum(-1)[routed]
            hidden_gate, hidden_up = (x[routed] @ gate_up[expert].T).chunk(2, dim=-1)
            norms = ((F.silu(hidden_gate) * hidden_up) @ down[expert].T).norm(dim=-1)
            count = max(int(routed.sum()), 1)
            reap[index, expert] = (gate * norms).sum() / count
            ean[index, expert] = norms.sum() / count
            frequency[index, expert] = routed.sum()
    return {"reap": reap, "ean": ean, "frequency": frequency / frequency.sum(-1, keepdim=True)}


@pytest.mark.parametrize("model_type, renormalise", [("hf_moe", True), ("qwen3_moe", False)])
def test_saliency_equals_an_independent_computation_from_router_logits_and_expert_outputs(model_type, renormalise):
    if model_type == "hf_moe":
        model = _tiny_moe()
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "qwen3_moe", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            norm_topk_prob=False)).eval()
    saliency = measure_saliency(model, [torch.tensor([ids]) for ids in CALIBRATION], progress=False)
    reference = _independent_saliency(model, CALIBRATION, renormalise)
    for method in ("reap", "ean", "frequency"):
        torch.testing.assert_close(saliency.scores(method), reference[method], rtol=1e-5, atol=1e-7)
    assert saliency.tokens == sum(map(len, CALIBRATION))
    assert saliency.frequency.sum() == saliency.tokens * model.config.num_experts_per_tok * len(saliency.layers)
    # sabotage: the other gate convention (renormalised vs raw softmax) is a different, detectable number
    wrong = _independent_saliency(model, CALIBRATION, not renormalise)["reap"]
    assert not torch.allclose(saliency.scores("reap"), wrong, rtol=0.1)


def test_planted_never_routed_expert_is_the_one_pruned_by_every_method(tmp_path):
    model = _tiny_moe(num_experts=5)
    _plant_never_routed_expert(model)
    source = _save(model, tmp_path / "source")
    for method in ("reap", "frequency", "ean"):
        folder = prune(source, tmp_path / method, keep=4, method=method, calibration=CALIBRATION)
        plan = json.loads((folder / "pruning.json").read_text())["plan"]
        assert [entry["removed"] for entry in plan] == [[4], [4], [4]], (method, plan)


def test_pruning_experts_no_calibration_token_reaches_changes_no_logit_on_the_calibration_set(tmp_path):
    model = _tiny_moe(num_experts=5)
    _plant_never_routed_expert(model)
    source = _save(model, tmp_path / "source")
    pruned = AutoModelForCausalLM.from_pretrained(prune(source, tmp_path / "pruned", keep=4, calibration=CALIBRATION))
    assert pruned.config.num_experts == 4
    sabotage = write_pruned_folder(open_source(str(source)), tmp_path / "sabotage",
                                   [LayerPlan.pruning(layer, [1, 2, 3, 4]) for layer in range(3)])  # drops a routed one
    wrong = AutoModelForCausalLM.from_pretrained(sabotage)
    with torch.no_grad():
        for ids in CALIBRATION:
            ids = torch.tensor([ids])
            reference = model(ids).logits
            difference = (pruned(ids).logits - reference).abs().max().item()
            assert difference < 1e-5, difference  # only the softmax denominator's rounding changes
            assert torch.equal(pruned(ids).logits.argmax(-1), reference.argmax(-1))
            assert (wrong(ids).logits - reference).abs().max() > 1e-3


def test_pruning_nothing_is_bit_identical(tmp_path):
    source = _save(_tiny_moe(), tmp_path / "source")
    folder = write_pruned_folder(open_source(str(source)), tmp_path / "same",
                                 [LayerPlan.pruning(layer, range(4)) for layer in range(3)])
    before, after = _tensors(source), _tensors(folder)
    assert list(before) == list(after)
    assert all(before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]) for name in before)
    assert json.loads((folder / "config.json").read_text())["num_experts"] == 4


# ------------------------------------------------------------------------------------------------ merging
def _naive_average_linkage(distances: torch.Tensor, count: int) -> list[list[int]]:
    """Average linkage straight from the definition: mean pairwise distance of the original items, recomputed."""
    clusters = [[i] for i in range(distances.shape[0])]
    while len(clusters) > count:
        pairs = [(distances[a][:, b].mean().item(), i, j) for i, a in enumerate(clusters)
                 for j, b in enumerate(clusters) if i < j]
        _, i, j = min(pairs)
        clusters[i] = sorted(clusters[i] + clusters.pop(j))
    return sorted(clusters)


def test_average_linkage_matches_the_definition_and_finds_planted_clusters():
    torch.manual_seed(0)
    for _ in range(20):
        points = torch.randn(7, 5)
        distances = cosine_distances(points)
        for count in (1, 3, 6):
            assert average_linkage_clusters(distances, count) == _naive_average_linkage(distances.double(), count)
    centres = torch.eye(3, 8) * 10
    planted = torch.stack([centres[0], centres[1], centres[0], centres[2], centres[1]]) + 0.01 * torch.randn(5, 8)
    assert average_linkage_clusters(cosine_distances(planted), 3) == [[0, 2], [1, 4], [3]]


def test_duplicate_experts_are_merged_together_and_the_merge_is_exact(tmp_path):
    model = _tiny_moe()
    with torch.no_grad():  # expert 3 becomes an exact copy of expert 1: weights and router row
        for layer in model.model.layers:
            for tensor in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
                tensor[3] = tensor[1]
    source = _save(model, tmp_path / "source")
    folder = prune(source, tmp_path / "merged", keep=3, merge=True, calibration=CALIBRATION)
    report = json.loads((folder / "pruning.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(folder)
    for entry, layer, merged_layer in zip(report["plan"], model.model.layers, merged.model.layers, strict=True):
        twins = next(group for group in entry["merged"] if len(group["members"]) > 1)
        assert sorted(twins["members"]) == [1, 3] and len(entry["kept"]) == 3, entry  # the twins, and only they
        frequency = torch.tensor(report["saliency"]["frequency"][entry["layer"]], dtype=torch.float64)
        members = twins["members"]
        assert twins["weights"] == pytest.approx((frequency[members] / frequency[members].sum()).tolist())
        # the weighted average of identical experts is each of them, bit for bit, at the representative's place
        for name in ("gate_up_proj", "down_proj"):
            source_tensor = getattr(layer.mlp.experts, name)
            assert torch.equal(getattr(merged_layer.mlp.experts, name), source_tensor[entry["kept"]])
        assert torch.equal(merged_layer.mlp.gate.weight, layer.mlp.gate.weight[entry["kept"]])


def test_merged_expert_is_the_frequency_weighted_average_of_its_cluster(tmp_path):
    source = _save(_tiny_moe(), tmp_path / "source")
    folder = prune(source, tmp_path / "merged", keep=2, merge=True, calibration=CALIBRATION)
    report = json.loads((folder / "pruning.json").read_text())
    before, after = _tensors(source), _tensors(folder)
    merged_somewhere = False
    for entry in report["plan"]:
        prefix = f"model.layers.{entry['layer']}.mlp"
        for position, group in enumerate(entry["merged"]):
            frequency = torch.tensor(report["saliency"]["frequency"][entry["layer"]], dtype=torch.float64)
            members = group["members"]
            weights = frequency[members] / frequency[members].sum()
            for name in ("gate_up_proj", "down_proj"):
                expected = sum(w * before[f"{prefix}.experts.{name}"][m].double()
                               for w, m in zip(weights, members, strict=True))
                torch.testing.assert_close(after[f"{prefix}.experts.{name}"][position].double(), expected)
            torch.testing.assert_close(after[f"{prefix}.gate.weight"][position], before[f"{prefix}.gate.weight"][
                group["into"]], rtol=0, atol=0)
            merged_somewhere |= len(members) > 1
    assert merged_somewhere


# ------------------------------------------------------------------------------------------------ families
FAMILY_DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
}


def _family_model(model_type):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**FAMILY_DECODER,
                                                                                 **FAMILIES[model_type]})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3 starts both at zero
                gate.weight.normal_(std=0.5)
                gate.e_score_correction_bias.normal_(std=0.1)
    return model


def _sliced_in_memory(model, plan: list[dict]):
    """The pruned model built independently: the source in memory with router rows and experts indexed."""
    with torch.no_grad():
        for entry in plan:
            block = model.model.layers[entry["layer"]].mlp
            kept = entry["kept"]
            block.gate.weight.data = block.gate.weight.data[kept]
            if hasattr(block.gate, "e_score_correction_bias"):
                block.gate.e_score_correction_bias.data = block.gate.e_score_correction_bias.data[kept]
            for name in ("gate_up_proj", "down_proj"):
                setattr(block.experts, name, torch.nn.Parameter(getattr(block.experts, name).data[kept]))
            block.gate.num_experts = block.experts.num_experts = len(kept)
    return model


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_transformers_families_prune_into_folders_stock_transformers_loads(model_type, tmp_path):
    model = _family_model(model_type)
    source = _save(model, tmp_path / "source")
    keep = FAMILIES[model_type].get("n_routed_experts", 4) // 2
    folder = prune(source, tmp_path / "pruned", keep=keep, calibration=CALIBRATION)
    plan = json.loads((folder / "pruning.json").read_text())["plan"]
    pruned, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(pruned) is type(model) and not any(info[key] for key in ("missing_keys", "unexpected_keys",
                                                                         "mismatched_keys")), info
    config = json.loads((folder / "config.json").read_text())
    count_field = next(f for f in ("num_experts", "num_local_experts", "n_routed_experts") if f in config)
    assert config[count_field] == keep and config["num_experts_per_tok"] == 2
    if model_type == "deepseek_v3":  # group-limited routing: every group keeps half of its 4 experts
        assert all(sorted(e // 4 for e in entry["kept"]) == [0, 0, 1, 1] for entry in plan), plan
    # on disk as `save_pretrained` writes this family: the same names as the source's, fewer experts
    before, after = _tensors(source), _tensors(folder)
    expected_names = {name for name in before if not any(f".experts.{e}." in name for e in range(keep, 2 * keep))}
    assert set(after) == expected_names
    shared = [name for name in before if "shared_expert" in name]
    assert all(torch.equal(before[name], after[name]) for name in shared)
    assert bool(shared) == (model_type in ("qwen2_moe", "deepseek_v3"))
    reference = _sliced_in_memory(model, plan)
    with torch.no_grad():
        for ids in CALIBRATION:
            ids = torch.tensor([ids])
            assert torch.equal(pruned.eval()(ids).logits, reference(ids).logits)


# ------------------------------------------------------------------------------------------------ hf_moe folders
@pytest.mark.slow  # two fresh processes (remote code, native export): ~20 s on a 2-core CPU
def test_pruned_hf_moe_folder_passes_check_loads_as_remote_code_and_exports(tiny_upcycled, tmp_path):
    from hf_moe import check_folder, export
    from hf_moe.export import load_natively
    from hf_moe.remote_check import load_as_remote_code

    folder = prune(str(tiny_upcycled), tmp_path / "pruned", keep=3, calibration_samples=8, max_length=64)
    report = json.loads((folder / "pruning.json").read_text())
    assert report["calibration"]["data"].startswith("the embedded task mixture") and report["calibration"][
        "sequences"] == 8
    assert len(report["saliency"]["reap"]) == 2 and len(report["saliency"]["reap"][0]) == 4
    assert (folder / "pruning_saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (folder / "README.md").read_text()
    assert "## Pruning" in card and "4 → 3" in card and "pruning_saliency.png" in card and "trust_remote_code" in card
    assert [str(problem) for problem in check_folder(folder) if problem.severity == "error"] == []
    ids = torch.tensor([CALIBRATION[0]])
    in_process = AutoModelForCausalLM.from_pretrained(folder).eval()
    remote = load_as_remote_code(folder, ids, max_new_tokens=4)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], in_process(ids).logits, rtol=0, atol=1e-6)
    native = export(str(folder), str(tmp_path / "native"))  # the upcycled source exports to Mixtral: so does this
    [result] = load_natively([dict(folder=native, inputs=[CALIBRATION[0]], max_new_tokens=4, pad_token_id=0)])
    assert result["class"] == "MixtralForCausalLM" and not result["loading_info"]["missing_keys"]
    with torch.no_grad():
        torch.testing.assert_close(result["logits"][0], in_process(ids).logits, rtol=0, atol=1e-5)


def test_prune_takes_a_model_in_memory_and_mh_moe(tmp_path):
    model = _tiny_moe("hf_mh_moe")
    folder = prune(model, tmp_path / "pruned", keep=0.5, calibration=CALIBRATION)
    pruned = AutoModelForCausalLM.from_pretrained(folder)
    assert pruned.config.num_experts == 2 and pruned.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    assert "hf_mh_moe" in (folder / "README.md").read_text()


def test_calibration_reads_jsonl_text_and_chat_rows(tiny_upcycled, tmp_path):
    from transformers import AutoTokenizer

    from hf_moe.pruning import calibration_inputs

    tokenizer = AutoTokenizer.from_pretrained(tiny_upcycled)
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"experts route token {i}"}) for i in range(5)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "response": str(i)}) for i in range(5)))
    text_inputs, description = calibration_inputs(tokenizer, str(text), samples=3)
    assert len(text_inputs) == 3 and description == "text.jsonl"
    assert all(tokenizer.decode(ids[0]).startswith("experts route token") for ids in text_inputs)
    chat_inputs, _ = calibration_inputs(tokenizer, str(chat), samples=10, max_length=12)
    assert len(chat_inputs) == 5 and all(ids.shape[1] <= 12 for ids in chat_inputs)
    assert "<|user|>" in tokenizer.decode(chat_inputs[0][0])


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def dense_folder(tmp_path):
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return _save(AutoModelForCausalLM.from_config(config), tmp_path / "dense")


@pytest.mark.parametrize("keep, message", [
    (4, r"keeps 4 of 4 experts per layer: nothing to prune; choose 1\.\.3"),
    (6, r"keeps 6 of 4 experts per layer: nothing to prune"),
    (0.99, r"keeps 4 of 4 experts"),
    (1, r"keeping 1 experts per layer is below `num_experts_per_tok`=2"),
    ("half", r"`keep`='half' is invalid"),
])
def test_bad_keep_is_one_clear_error_and_writes_nothing(tmp_path, keep, message):
    source = _save(_tiny_moe(), tmp_path / "source")
    with pytest.raises(ValueError, match=message):
        prune(source, tmp_path / "out", keep=keep, calibration=CALIBRATION)
    assert not (tmp_path / "out").exists() and _no_staging_left(tmp_path)


def test_dense_model_and_broken_groups_are_refused_and_nothing_written(dense_folder, tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match=r"is a dense model \(model_type 'llama', no routed experts"):
        prune(dense_folder, tmp_path / "out", keep=2, calibration=CALIBRATION)
    deepseek = _save(_family_model("deepseek_v3"), tmp_path / "deepseek")
    with pytest.raises(ValueError, match=r"does not split into the model's `n_group`=2 routing groups"):
        prune(deepseek, tmp_path / "out", keep=3, calibration=CALIBRATION)
    with pytest.raises(ValueError, match=r"leaves 1 per routing group"):
        prune(deepseek, tmp_path / "out", keep=2, calibration=CALIBRATION)
    assert not (tmp_path / "out").exists() and _no_staging_left(tmp_path)


def test_cli_prune_errors_are_one_line_and_a_run_prints_the_plan(dense_folder, tiny_upcycled, tmp_path, capsys):
    from hf_moe.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["prune", str(dense_folder), str(tmp_path / "out"), "--keep", "2"])
    error = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and len(error.splitlines()) == 1 and "is a dense model" in error, error
    assert not (tmp_path / "out").exists()
    source = _save(_tiny_moe(), tmp_path / "source")
    (tmp_path / "calibration.jsonl").write_text("\n".join(json.dumps({"text": "abc"}) for _ in range(2)))
    with pytest.raises(SystemExit) as refused:  # a tokenizer-less folder with text calibration
        main(["prune", str(source), str(tmp_path / "out"), "--keep", "3", "--calibration",
              str(tmp_path / "calibration.jsonl")])
    assert refused.value.code == 2 and "needs a tokenizer" in capsys.readouterr().err
    main(["prune", str(tiny_upcycled), str(tmp_path / "pruned"), "--keep", "0.5", "--method", "frequency",
          "--calibration-samples", "4", "--max-length", "48", "--verify", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["num_experts"] == {"source": 4, "pruned": 2} and result["method"] == "frequency"
    assert [len(entry["kept"]) for entry in result["plan"]] == [2, 2]
    verification = result["verification"]
    assert verification["inputs"] == 5 and len(verification["samples"]) == 5
    assert verification["max_abs_logit_difference"] > 0  # half the experts are gone: the function changed


@pytest.mark.slow  # three evaluations with greedy generation: ~40 s on a loaded 2-core CPU
def test_benchmark_pruning_reports_every_variant_relative_to_the_unpruned_model(tiny_upcycled, tmp_path):
    from hf_moe.recipes.benchmark_pruning import PruningBenchmarkArguments, benchmark_pruning, format_table

    result = benchmark_pruning(PruningBenchmarkArguments(
        model_path=str(tiny_upcycled), output_dir=str(tmp_path / "bench"), keep="0.5", variants="reap,merge",
        calibration_samples=4, max_length=48, eval_per_family=1, decode_tokens=4, repeats=1))
    names = [row["variant"] for row in result["rows"]]
    assert names == ["unpruned", "reap 2/4", "HC-SMoE merge 2/4"]
    unpruned = result["rows"][0]
    assert unpruned["validation_loss_delta"] == 0 and unpruned["weights_relative"] == 1
    for row in result["rows"][1:]:
        assert row["weights_mb"] < unpruned["weights_mb"] and row["decode_tokens_per_s"] > 0
        assert row["heldout_loss_delta"] == pytest.approx(row["heldout_loss"] - unpruned["heldout_loss"])
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["rows"] == result["rows"]
    assert "HC-SMoE merge 2/4" in format_table(result)
