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
from hf_moe.moe_layers import RoutingGroups
from hf_moe.pruning import ExpertSaliency, measure_saliency, prune, verify_pruning
from hf_moe.pruning.merge import average_linkage_clusters, euclidean_distances, merging_plan
from hf_moe.pruning.plan import LayerPlan
from hf_moe.pruning.prune import open_source, write_pruned_folder

from .conftest import byte_tokenizer, tiny_config

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
    """REAP / EAN (REAP's `ean_sum` and `ean_mean`) / frequency (the share, and the routing counts) from the router
    logits the model returns and experts computed from their weights."""
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
    reap, ean_sum, frequency = (torch.zeros(len(layers), num_experts, dtype=torch.float64) for _ in range(3))
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
            ean_sum[index, expert] = norms.sum()
            frequency[index, expert] = routed.sum()
    return {"reap": reap, "ean_sum": ean_sum, "ean_mean": ean_sum / frequency.clamp(min=1), "counts": frequency,
            "frequency": frequency / frequency.sum(-1, keepdim=True)}


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
    for method in ("reap", "ean_sum", "ean_mean", "frequency"):
        torch.testing.assert_close(saliency.scores(method), reference[method], rtol=1e-5, atol=1e-7)
    assert saliency.tokens == sum(map(len, CALIBRATION))
    assert saliency.frequency.sum() == saliency.tokens * model.config.num_experts_per_tok * len(saliency.layers)
    # sabotage: the other gate convention (renormalised vs raw softmax) is a different, detectable number
    wrong = _independent_saliency(model, CALIBRATION, not renormalise)["reap"]
    assert not torch.allclose(saliency.scores("reap"), wrong, rtol=0.1)


@pytest.mark.parametrize("model_type", ["hf_moe", "hf_mh_moe"])
def test_measure_saliency_refuses_an_expert_choice_model_by_name(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, router_type="expert_choice"))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=rf"model_type='{model_type}'\) routes by expert choice \(sparse layers "
                                         r"\[0, 1, 2\]\): saliency is defined for top-k routing"):
        measure_saliency(model, [torch.tensor([ids]) for ids in CALIBRATION], progress=False)
    assert not calls  # refused before any forward


def test_planted_never_routed_expert_is_the_one_pruned_by_every_method(tmp_path):
    model = _tiny_moe(num_experts=5)
    _plant_never_routed_expert(model)
    source = _save(model, tmp_path / "source")
    for method in ("reap", "frequency", "ean_sum", "ean_mean"):
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
        distances = euclidean_distances(points)
        for count in (1, 3, 6):
            assert average_linkage_clusters(distances, count) == _naive_average_linkage(distances.double(), count)
    centres = torch.eye(3, 8) * 10
    planted = torch.stack([centres[0], centres[1], centres[0], centres[2], centres[1]]) + 0.01 * torch.randn(5, 8)
    assert average_linkage_clusters(euclidean_distances(planted), 3) == [[0, 2], [1, 4], [3]]


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
        frequency = torch.tensor(report["saliency"]["routing_counts"][entry["layer"]], dtype=torch.float64)
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
            frequency = torch.tensor(report["saliency"]["routing_counts"][entry["layer"]], dtype=torch.float64)
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

    from hf_moe.pruning.calibration import calibration_inputs

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
    (4, r"keeps 4 of 4 experts per layer: nothing to prune; choose 2\.\.3"),
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


@pytest.mark.slow  # six evaluations with greedy generation: ~60 s on a loaded 2-core CPU
def test_benchmark_pruning_reports_every_variant_relative_to_the_unpruned_model(tiny_upcycled, tmp_path):
    from transformers import AutoTokenizer

    from hf_moe.data import build_mixture
    from hf_moe.recipes.benchmark_pruning import PruningBenchmarkArguments, benchmark_pruning, format_table
    from hf_moe.recipes.evaluate import evaluate_model

    model = AutoModelForCausalLM.from_pretrained(tiny_upcycled)
    with torch.no_grad():  # upcycled experts are copies of one MLP: perturbed, pruning and merging change the model
        for layer in model.model.layers:
            for weights in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                weights.add_(0.5 * weights.std() * torch.randn_like(weights))
    source = _save(model, tmp_path / "source")
    tokenizer = AutoTokenizer.from_pretrained(tiny_upcycled)
    tokenizer.save_pretrained(source)
    args = PruningBenchmarkArguments(
        model_path=str(source), output_dir=str(tmp_path / "bench"), keep="0.5", variants="reap,merge",
        calibration_samples=4, max_length=48, eval_per_family=1, decode_tokens=4, repeats=1)
    result = benchmark_pruning(args)
    assert [row["variant"] for row in result["rows"]] == ["unpruned", "reap 2/4", "HC-SMoE merge 2/4"]
    # each row against its own folder, evaluated here independently; the deltas against the unpruned folder's
    validation = {"validation": build_mixture(args.train_per_family, args.eval_per_family, seed=args.seed)[
        "validation"]}
    folders = [source, tmp_path / "bench" / "reap-2", tmp_path / "bench" / "merge-2"]
    losses = [evaluate_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer,
                             validation)["validation"]["loss"] for folder in folders]
    sizes = [sum(path.stat().st_size for path in folder.glob("*.safetensors")) for folder in folders]
    for row, loss, size in zip(result["rows"], losses, sizes, strict=True):
        assert row["validation_loss"] == pytest.approx(loss, rel=1e-6)
        assert row["validation_loss_delta"] == pytest.approx(loss - losses[0], rel=1e-6, abs=1e-9)
        assert row["weights_mb"] == size / 1e6 and row["weights_relative"] == pytest.approx(size / sizes[0])
        assert row["heldout_loss_delta"] == pytest.approx(row["heldout_loss"] - result["rows"][0]["heldout_loss"])
    assert losses[1] != losses[0] and losses[2] != losses[0] and sizes[1] < sizes[0]  # the variants are other models
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["rows"] == result["rows"]
    assert "HC-SMoE merge 2/4" in format_table(result)


# ------------------------------------------------------------------------------------------------ selection bias
def _biased_model_with_a_never_chosen_expert():
    """E=5, k=2 with a selection bias on the probabilities (auxiliary-loss-free balancing) and the byte tokenizer:
    router rows (+u, -u, +v, -v, 0) as in `_plant_never_routed_expert`, and expert 4's bias -1 keeps it out of every
    top 2 (its biased score p - 1 < 0 <= the others'); the other biases are random, so they decide close calls."""
    tokenizer = byte_tokenizer()
    model = _tiny_moe(num_experts=5, vocab_size=len(tokenizer), router_bias_update_rate=0.01)
    _plant_never_routed_expert(model)
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.cat([0.1 * torch.randn(4), torch.tensor([-1.0])]))
    return model, tokenizer


def _chosen_sets(model, ids) -> list[list[set[int]]]:
    """Per sparse layer, each token's chosen experts, from the router logits and the selection bias (k=2)."""
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    chosen = []
    for layer, layer_logits in zip(model.model.layers, logits, strict=True):
        scores = layer_logits.float().softmax(-1) + layer.mlp.gate.e_score_correction_bias
        chosen.append([set(row) for row in scores.topk(2, dim=-1).indices.tolist()])
    return chosen


def test_verify_counts_the_routing_flips_a_selection_bias_causes_when_unreached_experts_go(tmp_path):
    from hf_moe.checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids

    model, tokenizer = _biased_model_with_a_never_chosen_expert()
    source = _save(model, tmp_path / "source")
    tokenizer.save_pretrained(source)
    folder = prune(source, tmp_path / "pruned", keep=4, calibration=CALIBRATION)
    assert [entry["removed"] for entry in json.loads((folder / "pruning.json").read_text())["plan"]] == [[4]] * 3
    pruned = AutoModelForCausalLM.from_pretrained(folder).eval()
    flips = decisions = 0
    for prompt in SAMPLE_PROMPTS:  # the verification's inputs; kept = [0, 1, 2, 3]: the indices stay
        ids = chat_prompt_ids(tokenizer, prompt)
        for before, after in zip(_chosen_sets(model, ids), _chosen_sets(pruned, ids), strict=True):
            flips += sum(a != b for a, b in zip(before, after, strict=True))
            decisions += len(before)
    assert flips > 0  # the kept probabilities renormalise, the bias does not: close calls change
    verification = verify_pruning(source, folder, max_new_tokens=2)
    assert (verification["routing_flips"], verification["routing_decisions"]) == (flips, decisions)
    assert verification["routed_to_removed"] == 0


# ------------------------------------------------------------------------------------------------ references
def _hand_saliency(frequency, outputs=None, reap=None, norms=None) -> ExpertSaliency:
    """One sparse layer's statistics written by hand (`outputs`: each expert's mean output, one token)."""
    rows = torch.tensor([frequency], dtype=torch.float64)
    saliency = ExpertSaliency(layers=[0], num_experts=len(frequency), tokens=1, frequency=rows)
    if reap is not None:
        saliency.reap_sum = torch.tensor([reap], dtype=torch.float64) * rows
    if norms is not None:
        saliency.norm_sum = torch.tensor([norms], dtype=torch.float64)
    if outputs is not None:
        saliency.output_sum = torch.tensor([outputs], dtype=torch.float64)
    return saliency


def test_hc_smoe_clusters_the_mean_outputs_by_euclidean_distance_with_average_linkage():
    # Euclidean: d(0,2) = 1.41 joins first; then {0,2}-1 = (9 + 10.05) / 2 = 9.52 < {0,2}-3 = (12.04 + 11) / 2 = 11.52
    # < d(1,3) = 15.62. (Cosine would join 0 with 1 and 2 with 3: both pairs point the same way.)
    saliency = _hand_saliency([1, 1, 1, 1], outputs=[[1.0, 0.0], [10.0, 0.0], [0.0, 1.0], [0.0, 12.0]])
    [plan] = merging_plan(saliency, 2, RoutingGroups())
    assert sorted(sorted(members) for members in plan.members) == [[0, 1, 2], [3]]


def test_merged_expert_takes_the_router_row_of_its_most_frequently_routed_member():
    # one cluster of all three; expert 1 routed 5 times, 0 twice, 2 never; REAP ranks expert 0 first
    saliency = _hand_saliency([2, 5, 0], outputs=[[1.0], [1.0], [1.0]], reap=[10.0, 1.0, 0.0])
    [plan] = merging_plan(saliency, 1, RoutingGroups())
    assert plan.kept == (1,) and plan.members == ((1, 0, 2),)
    assert plan.weights == ((5 / 7, 2 / 7, 0.0),)


def test_ean_sum_and_ean_mean_are_reaps_sum_and_mean_of_the_activation_norms():
    saliency = _hand_saliency([2, 4], norms=[6.0, 8.0])  # expert 0: 2 tokens, norms sum 6; expert 1: 4, sum 8
    assert saliency.scores("ean_sum").tolist() == [[6.0, 8.0]]
    assert saliency.scores("ean_mean").tolist() == [[3.0, 2.0]]


# ------------------------------------------------------------------------------------------------ routing counts
def test_pruning_json_keeps_the_routing_counts_beside_the_frequency_share(tmp_path):
    model = _tiny_moe()
    counts = _independent_saliency(model, CALIBRATION, renormalise=True)["counts"]
    folder = prune(_save(model, tmp_path / "source"), tmp_path / "pruned", keep=3, calibration=CALIBRATION)
    saliency = json.loads((folder / "pruning.json").read_text())["saliency"]
    assert saliency["routing_counts"] == counts.long().tolist()
    torch.testing.assert_close(torch.tensor(saliency["frequency"], dtype=torch.float64),
                               counts / counts.sum(-1, keepdim=True))


@pytest.mark.parametrize("method, extra_calls", [("frequency", False), ("reap", True)])
def test_frequency_calibration_runs_no_expert_beyond_the_models_own_forward(tmp_path, method, extra_calls):
    model = _tiny_moe()
    calls = []
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_hook(lambda module, args, output: calls.append(1))
    forward_calls = len(model.model.layers) * len(CALIBRATION)  # one experts call per sparse layer and sequence
    prune(model, tmp_path / "pruned", keep=3, method=method, calibration=CALIBRATION)
    assert (len(calls) > forward_calls) == extra_calls and len(calls) >= forward_calls, len(calls)


# ------------------------------------------------------------------------------------------------ CLI messages
@pytest.mark.parametrize("keep, message", [
    ("0", "`keep`='0' keeps no expert of 4; choose 2..3"),
    ("99", "`keep`='99' keeps 99 of 4 experts per layer: nothing to prune; choose 2..3 (or a ratio that rounds "
          "to one of those)"),
    ("1", "keeping 1 experts per layer is below `num_experts_per_tok`=2: every token is routed to 2 experts; "
          "choose 2..3"),
])
def test_cli_keep_outside_the_accepted_counts_names_exactly_those(tmp_path, capsys, keep, message):
    from hf_moe.cli import main

    source = _save(_tiny_moe(), tmp_path / "source")
    capsys.readouterr()  # the saving's progress bar
    with pytest.raises(SystemExit):
        main(["prune", str(source), str(tmp_path / "out"), "--keep", keep])
    assert capsys.readouterr().err == f"hf-moe prune: error: {message}\n"


def test_group_limited_budget_refusal_lists_the_accepted_counts(tmp_path):
    deepseek = _save(_family_model("deepseek_v3"), tmp_path / "deepseek")  # 8 experts, 2 groups, 1 chosen, top-2
    with pytest.raises(ValueError) as refused:
        prune(deepseek, tmp_path / "out", keep=3, calibration=CALIBRATION)
    assert str(refused.value) == ("keeping 3 experts per layer does not split into the model's `n_group`=2 routing "
                                  "groups; choose one of 4, 6")


def test_cli_malformed_calibration_line_names_the_column_once(tiny_upcycled, tmp_path, capsys):
    from hf_moe.cli import main

    calibration = tmp_path / "bad.jsonl"
    calibration.write_text('{"text": "abc}\n')
    with pytest.raises(SystemExit):
        main(["prune", str(tiny_upcycled), str(tmp_path / "out"), "--keep", "3", "--calibration", str(calibration)])
    error = capsys.readouterr().err
    assert error.startswith(f"hf-moe prune: error: {calibration}: line 1 is not valid JSON (") and "at at" not in error


def test_cli_calibration_without_an_accepted_column_names_the_text_field_on_one_line(tiny_upcycled, tmp_path,
                                                                                      capsys):
    from hf_moe.cli import main

    calibration = tmp_path / "body.jsonl"
    calibration.write_text('{"body": "abc"}\n{"body": "def"}\n')
    with pytest.raises(SystemExit):
        main(["prune", str(tiny_upcycled), str(tmp_path / "out"), "--keep", "3", "--calibration", str(calibration)])
    assert capsys.readouterr().err == (
        f"hf-moe prune: error: calibration data {calibration}: rows need a `text` column, a `messages` column or one "
        "of the column pairs instruction/response, instruction/output, prompt/completion, question/answer; found "
        "['body']\n")


def test_cli_prune_verify_prints_the_routing_flips(tiny_upcycled, tmp_path, capsys):
    from hf_moe.cli import main

    main(["prune", str(tiny_upcycled), str(tmp_path / "out"), "--keep", "3", "--method", "frequency", "--verify",
          "--calibration_samples", "4", "--max_length", "32"])
    report = json.loads((tmp_path / "out" / "pruning.json").read_text())
    routing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("routing: ")]
    assert len(routing) == 1 and " (token, sparse layer) choices of experts changed on the prompts" in routing[0]
    assert report["num_experts"]["pruned"] == 3
