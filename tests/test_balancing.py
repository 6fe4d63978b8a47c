"""Auxiliary-loss-free balancing (arXiv 2408.15664; DeepSeek-V3): the selection bias of hf_moe's routers, the callback
that updates it for hf_moe and transformers' own families (DeepSeek-V3, GLM-4-MoE), the sequence-wise balance loss,
and MaxVio in the logs, `evaluate` and the card. References are recomputed here from router logits."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_moe.moe_layers import find_moe_layers, selection_bias
from hf_moe.training import (
    AuxLossFreeBalancingCallback,
    ExpertStatsCallback,
    OptimizerStepCallback,
    SelectionBiasBalancer,
    add_moe_callbacks,
    freeze_moe,
)

from .conftest import MODEL_TYPES, tiny_config, tiny_sft_trainer
from .test_builtin_moe import FAMILIES, SMALL

GLM4_MOE = lambda: transformers.Glm4MoeConfig(  # noqa: E731
    **SMALL, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
    moe_intermediate_size=24, n_shared_experts=1, head_dim=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the hand-offs cost more than the
    arithmetic (as in tests/test_docs.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _padded_rows(count: int, width: int = 14, vocab: int = 64, seed: int = 0) -> list[dict]:
    """Rows of different lengths, right-padded to `width` (padding masked out of attention and labels)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        length = width - (3 * index) % 7
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        pad = width - length
        rows.append({"input_ids": ids + [0] * pad, "attention_mask": [1] * length + [0] * pad,
                     "labels": ids + [-100] * pad})
    return rows


def _args(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=4, report_to=[], use_cpu=True,
                  save_strategy="no", optim="adamw_torch", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**fields, **overrides})


def _biases(model) -> list[torch.Tensor]:
    return [selection_bias(model, layer).detach().clone().reshape(-1) for layer in find_moe_layers(model)]


# ------------------------------------------------------------------------------------------------ the router
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_selection_bias_changes_which_experts_but_not_their_gating_weights(model_type):
    config = tiny_config(model_type, router_bias_update_rate=1e-3, router_jitter_noise=0.0, capacity_factor=None,
                         eval_capacity_factor=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    router = find_moe_layers(model)[0].router
    tokens = torch.randn(40, router.weight.shape[1])
    unbiased = router(tokens)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    logits, weights, index = router(tokens)

    # Independent: choose by probs + bias, weight by the unbiased probs of the chosen experts.
    probs = (tokens @ router.weight.t()).softmax(-1)
    expected_index = (probs + torch.tensor([0.0, 0.0, 0.0, 0.5])).topk(config.num_experts_per_tok, -1).indices
    expected_weights = probs.gather(-1, expected_index)
    if config.norm_topk_prob:
        expected_weights = expected_weights / expected_weights.sum(-1, keepdim=True)
    assert torch.equal(index, expected_index)
    assert torch.allclose(weights, expected_weights, atol=1e-6)
    assert torch.equal(logits, unbiased[0])  # the logits (and so every loss on them) carry no bias
    assert (index == 3).any(-1).float().mean() > (unbiased[2] == 3).any(-1).float().mean()  # the choice moved
    # A zero bias routes exactly as no bias.
    router.e_score_correction_bias.zero_()
    assert torch.equal(router(tokens)[2], unbiased[2])
    model.set_router_bias_update_rate(0.0)
    assert router.e_score_correction_bias is None and not any("e_score" in key for key in model.state_dict())


def test_aux_loss_counts_the_biased_choice():
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_bias_update_rate=1e-3)).train()
    ids = torch.randint(3, 97, (2, 9))
    plain = model(input_ids=ids, labels=ids).aux_loss
    for layer in find_moe_layers(model):
        selection_bias(model, layer).copy_(torch.tensor([2.0, 2.0, 0.0, 0.0]))  # every token picks experts 0 and 1
    biased = model(input_ids=ids, labels=ids, output_router_logits=True)
    probs = [logits.softmax(-1) for logits in biased.router_logits]
    expected = torch.stack([4 * (torch.tensor([0.5, 0.5, 0.0, 0.0]) * p.mean(0)).sum() for p in probs]).mean()
    assert biased.aux_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(biased.aux_loss.item() - plain.item()) > 1e-3


# ------------------------------------------------------------------------------------------------ the update rule
class _StepLogits(TrainerCallback):
    """Router logits and attention mask of every training forward, grouped by optimizer step, and the biases after
    each step (added after the balancing callback, so it runs after its update)."""

    def __init__(self, model):
        self.steps, self.current, self.biases = [], [], []
        model.config.output_router_logits = True

        def record(module, args, kwargs, outputs):
            if module.training:
                self.current.append(([logits.detach() for logits in outputs.router_logits],
                                     kwargs["attention_mask"].detach()))

        model.register_forward_hook(record, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(self.current)
        self.current = []
        self.biases.append(_biases(model))


def _reference(steps, initial: list[torch.Tensor], top_k: int, gamma: float, scores) -> tuple[list, list]:
    """arXiv 2408.15664 Algorithm 1 from router logits: per step, loads of the choice `top_k(scores + bias)` over
    the step's micro-batches (real tokens only), then `bias += gamma * sign(mean load - load)`.
    Returns (bias after each step, loads of each step)."""
    biases, history, loads_history = [b.clone() for b in initial], [], []
    for micro_batches in steps:
        loads = [torch.zeros_like(b) for b in biases]
        for layer_logits, mask in micro_batches:
            real = mask.reshape(-1).float()
            for layer, logits in enumerate(layer_logits):
                chosen = (scores(logits.float()) + biases[layer]).topk(top_k, dim=-1).indices
                loads[layer] += (F.one_hot(chosen, biases[layer].numel()).sum(1) * real[:, None]).sum(0)
        biases = [b + gamma * torch.sign(load.mean() - load) for b, load in zip(biases, loads, strict=True)]
        history.append([b.clone() for b in biases])
        loads_history.append(loads)
    return history, loads_history


CASES = {
    "hf_moe": (lambda: tiny_config("hf_moe", vocab_size=64, router_bias_update_rate=0.05,
                                   router_sequence_aux_loss_coef=1e-4), lambda x: x.softmax(-1)),
    "deepseek_v3": (FAMILIES["deepseek_v3"], torch.sigmoid),
    "glm4_moe": (GLM4_MOE, torch.sigmoid),
}


@pytest.mark.parametrize("family", list(CASES))
def test_bias_update_equals_the_rule_recomputed_from_router_logits(family, tmp_path):
    make_config, scores = CASES[family]
    model = AutoModelForCausalLM.from_config(make_config())
    gamma = 0.05
    initial = _biases(model)
    capture = _StepLogits(model)
    trainer = add_moe_callbacks(Trainer(model=model, args=_args(tmp_path), train_dataset=_padded_rows(16)),
                                AuxLossFreeBalancingCallback(update_rate=gamma), ExpertStatsCallback(heatmap=False))
    trainer.add_callback(capture)
    trainer.train()

    assert len(capture.steps) == 4 and all(len(step) == 2 for step in capture.steps)  # 4 steps x GA 2
    top_k = find_moe_layers(model)[0].top_k
    expected, loads = _reference(capture.steps, initial, top_k, gamma, scores)
    for step, (got_step, want_step) in enumerate(zip(capture.biases, expected, strict=True)):
        for layer, (got, want) in enumerate(zip(got_step, want_step, strict=True)):
            assert torch.allclose(got, want, atol=1e-6), (step, layer, got, want)
    for before, after in zip([initial, *expected[:-1]], expected, strict=True):  # every step moved some bias
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # The bias entered the choice: from step 2 on, the loads differ from those of an unbiased choice somewhere.
    _, unbiased_loads = _reference(capture.steps, initial, top_k, 0.0, scores)
    assert any(not torch.equal(a, b) for step, unb in zip(loads[1:], unbiased_loads[1:], strict=True)
               for a, b in zip(step, unb, strict=True))
    # MaxVio in the log: each step's max / mean load - 1, averaged over the 4 steps of the logging interval.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert ("moe/model_sequence_aux_loss" in logged) == (family == "hf_moe")
    for position, layer in enumerate(find_moe_layers(model)):
        per_step = [(step[position].max() / step[position].mean() - 1).item() for step in loads]
        assert logged[f"moe/layer{layer.index}/max_vio"] == pytest.approx(sum(per_step) / 4, abs=1e-6)


class _NanGradientAtStep(TrainerCallback):
    """Makes one gradient NaN during the given (1-based) optimizer step, so the non-finite guard skips it; keeps the
    weights and the optimizer's step counts after every step (add it last: it runs after the other callbacks)."""

    def __init__(self, model, step: int):
        self.step, self.active, self.weights, self.optimizer_steps = step, False, [], []
        model.model.norm.weight.register_hook(lambda grad: grad * float("nan") if self.active else grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.active = False
        self.weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
        self.optimizer_steps.append(sorted({float(s["step"]) for s in optimizer.state_dict()["state"].values()}))


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard_first", "balancer_first"])
def test_a_skipped_step_moves_no_bias_and_its_loads_do_not_carry_over(tmp_path, guard_first):
    from hf_moe.training import NonFiniteGuardCallback

    make_config, scores = CASES["hf_moe"]
    model = AutoModelForCausalLM.from_config(make_config())
    initial = _biases(model)
    capture, poison = _StepLogits(model), _NanGradientAtStep(model, step=2)
    guard, balancer = NonFiniteGuardCallback(), AuxLossFreeBalancingCallback(update_rate=0.05)
    trainer = add_moe_callbacks(Trainer(model=model, args=_args(tmp_path), train_dataset=_padded_rows(16)),
                                *((guard, balancer) if guard_first else (balancer, guard)))
    trainer.add_callback(capture)
    trainer.add_callback(poison)
    trainer.train()

    assert guard.skipped_steps == 1
    # The skipped step (2) changed no weight, no optimizer step count and no bias ...
    assert all(torch.equal(poison.weights[1][name], value) for name, value in poison.weights[0].items())
    assert poison.optimizer_steps == [[1.0], [1.0], [2.0], [3.0]]
    assert max((a - b).abs().max().item() for a, b in zip(capture.biases[1], capture.biases[0], strict=True)) == 0
    # ... and the rule, run on the steps that were taken (the skipped step's loads left out), gives every bias.
    taken = [[] if step == 1 else micro_batches for step, micro_batches in enumerate(capture.steps)]
    expected, _ = _reference(taken, initial, 2, 0.05, scores)
    for step, (got_step, want_step) in enumerate(zip(capture.biases, expected, strict=True)):
        for layer, (got, want) in enumerate(zip(got_step, want_step, strict=True)):
            assert torch.allclose(got, want, atol=1e-6), (step, layer, got, want)
    # The step after it trained: weights and biases moved.
    assert any(not torch.equal(poison.weights[2][name], value) for name, value in poison.weights[1].items())
    assert any(not torch.equal(a, b) for a, b in zip(capture.biases[2], capture.biases[1], strict=True))


class _ThresholdsAfterEachStep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append([(layer.router.expert_choice_threshold.clone(),
                            layer.router.expert_choice_threshold_updates.item()) for layer in find_moe_layers(model)])


def test_a_skipped_step_leaves_the_expert_choice_thresholds_as_they_were(tmp_path):
    from hf_moe.training import NonFiniteGuardCallback

    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", vocab_size=64, router_type="expert_choice"))
    thresholds, poison = _ThresholdsAfterEachStep(), _NanGradientAtStep(model, step=2)
    trainer = add_moe_callbacks(Trainer(model=model, args=_args(tmp_path), train_dataset=_padded_rows(16)),
                                NonFiniteGuardCallback())
    trainer.add_callback(thresholds)
    trainer.add_callback(poison)
    trainer.train()

    first, skipped, third = thresholds.steps[:3]
    # Step 2's two forwards estimated the thresholds, then its gradients were found non-finite: all undone.
    assert {updates for _, updates in first} == {updates for _, updates in skipped} == {2}  # 2 micro-batches a step
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, skipped, strict=True))
    # The next step trained and estimated them again.
    assert {updates for _, updates in third} == {4}
    assert all(not torch.equal(a, b) for (a, _), (b, _) in zip(skipped, third, strict=True))


def _bias_after_steps(tmp_path, batch: int, accumulation: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", vocab_size=64, router_bias_update_rate=0.05,
                                                         router_aux_loss_coef=0.0, router_z_loss_coef=0.0))
    args = _args(tmp_path / f"{batch}x{accumulation}", max_steps=3, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)
    add_moe_callbacks(Trainer(model=model, args=args, train_dataset=_padded_rows(24)), OptimizerStepCallback(),
                      AuxLossFreeBalancingCallback()).train()
    return _biases(model)


def test_gradient_accumulation_gives_the_bias_of_one_batch(tmp_path):
    one_batch = _bias_after_steps(tmp_path, 8, 1)
    accumulated = _bias_after_steps(tmp_path, 2, 4)
    assert any(b.abs().sum() > 0 for b in one_batch)
    for got, want in zip(accumulated, one_batch, strict=True):
        assert torch.equal(got, want), (got, want)


WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_processes_give_the_bias_of_one_process_with_one_all_reduce_per_step(tmp_path):
    """2 processes x 2 micro-batches x 2 rows against 1 process x 8 rows, 3 SGD steps (tests/distributed_worker.py)."""
    torch.manual_seed(0)
    config = tiny_config("hf_moe", vocab_size=64, router_bias_update_rate=0.05, router_aux_loss_coef=0.0,
                         router_z_loss_coef=0.0)
    model = AutoModelForCausalLM.from_config(config).train()
    folder = tmp_path / "selection_bias-hf_moe"
    model.save_pretrained(folder)
    rows = _padded_rows(24)
    batch = {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}
    save_file(batch, str(folder / "batch.safetensors"))
    balancer = SelectionBiasBalancer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        rows_of_step = {key: value[8 * step:8 * step + 8] for key, value in batch.items()}
        model(**rows_of_step).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
    save_file({f"bias.{i}": b for i, b in enumerate(_biases(model))}, str(folder / "reference.safetensors"))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"result_rank{rank}.json").read_text())["selection_bias-hf_moe"]
        assert result["bias"] == 0.0, result  # bit-identical to one process
        assert result["moved"] > 0, result
        assert result["all_reduce_in_forwards"] == 0 and result["all_reduce_per_step"] == [1, 1, 1], result


def _finetune_launch(model_path, output, processes: int, batch_per_device: int) -> list[torch.Tensor]:
    """`accelerate launch --num_processes N -m hf_moe.cli finetune ... --router_bias_update_rate 0.01` on the CPU
    (gloo); the final selection biases of the saved model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = ["--multi_gpu"] if processes > 1 else []
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "hf_moe.cli", "finetune", str(model_path), "--output_dir", str(output),
               "--per_device_train_batch_size", str(batch_per_device), "--max_steps", "3", "--learning_rate", "1e-3",
               "--warmup_steps", "0", "--train_per_family", "4", "--eval_per_family", "1", "--max_length", "64",
               "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
               "--router_aux_loss_coef", "0", "--router_bias_update_rate", "0.01"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return _biases(AutoModelForCausalLM.from_pretrained(output))


@pytest.mark.slow  # two accelerate launches of hf-moe finetune: ~1-2 min on a loaded 2-core CPU
def test_ddp_finetune_gives_the_bias_of_one_process_with_the_same_global_batch(tiny_upcycled, tmp_path):
    two_processes = _finetune_launch(tiny_upcycled, tmp_path / "ddp", processes=2, batch_per_device=2)
    one_process = _finetune_launch(tiny_upcycled, tmp_path / "one", processes=1, batch_per_device=4)
    assert any(b.abs().sum() > 0 for b in one_process)
    for got, want in zip(two_processes, one_process, strict=True):
        assert torch.equal(got, want), (got, want)


def test_train_mode_forwards_without_gradients_move_no_bias():
    """TRL's GRPO / online trainers generate and score with the policy in train mode under `torch.no_grad()`."""
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_bias_update_rate=0.05)).train()
    balancer = SelectionBiasBalancer(model, update_rate=0.05)
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
        model(input_ids=ids, labels=ids)  # scoring the completions
    assert [load.sum().item() for load in balancer.step().values()] == [0.0, 0.0, 0.0]
    assert all(torch.equal(b, torch.zeros(4)) for b in _biases(model))
    # A forward that trains still counts: the next step moves every bias by gamma.
    model(input_ids=ids, labels=ids)
    loads = balancer.step()
    assert [load.sum().item() for load in loads.values()] == [32.0, 32.0, 32.0]  # 16 tokens x k=2
    assert all(b.abs().max().item() == pytest.approx(0.05) for b in _biases(model))


def test_frozen_routers_keep_their_bias(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", vocab_size=64, router_bias_update_rate=0.05))
    freeze_moe(model, "router")
    model.model.layers[2].mlp.gate.weight.requires_grad_(True)  # the positive control: one router trains
    capture = _StepLogits(model)  # the biases after each step
    trainer = add_moe_callbacks(Trainer(model=model, args=_args(tmp_path), train_dataset=_padded_rows(16)),
                                AuxLossFreeBalancingCallback())
    trainer.add_callback(capture)
    trainer.train()
    assert len(capture.biases) == 4
    trained_before = torch.zeros(4)
    for frozen_0, frozen_1, trained in capture.biases:
        assert torch.equal(frozen_0, torch.zeros(4)) and torch.equal(frozen_1, torch.zeros(4))
        assert (trained - trained_before).abs().max().item() == pytest.approx(0.05)  # every step moved it by gamma
        trained_before = trained


PLACEMENTS = {  # where each family keeps the bias, relative to the sparse block `model.layers.<i>.mlp`
    "glm4_moe": (GLM4_MOE, "gate.e_score_correction_bias"),
    "ernie4_5_moe": (lambda: transformers.Ernie4_5_MoeConfig(**SMALL, moe_num_experts=4, moe_k=2,
                                                             moe_intermediate_size=24, moe_layer_start_index=0,
                                                             moe_num_shared_experts=0),
                     "gate.moe_statics.e_score_correction_bias"),
    "minimax_m2": (lambda: transformers.MiniMaxM2Config(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                                        head_dim=8), "e_score_correction_bias"),
}


@pytest.mark.parametrize("family", list(PLACEMENTS))
def test_selection_bias_is_found_and_updated_wherever_the_family_keeps_it(family):
    make_config, where = PLACEMENTS[family]
    model = AutoModelForCausalLM.from_config(make_config()).train()
    layers = find_moe_layers(model)
    assert [layer.selection_bias_name for layer in layers] == [f"model.layers.{i}.mlp.{where}" for i in (0, 1)]
    balancer = SelectionBiasBalancer(model, update_rate=0.5)
    ids = torch.randint(3, 64, (4, 12))
    model.config.output_router_logits = True
    router_logits = model(input_ids=ids, labels=ids).router_logits
    balancer.step()
    for layer, logits in zip(layers, router_logits, strict=True):
        # The bias starts at 0 and sigmoid / softmax keep the order: the choice is the top-2 of the logits.
        load = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4).float()
        assert torch.equal(selection_bias(model, layer).reshape(-1), 0.5 * torch.sign(load.mean() - load))


def test_a_family_without_selection_bias_gets_one_clear_message(tmp_path, caplog):
    model = AutoModelForCausalLM.from_config(FAMILIES["mixtral"]())
    with caplog.at_level(logging.WARNING):
        add_moe_callbacks(Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_padded_rows(4)),
                          AuxLossFreeBalancingCallback()).train()
    messages = [r.getMessage() for r in caplog.records if "AuxLossFreeBalancingCallback" in r.getMessage()]
    assert len(messages) == 1 and "model_type='mixtral'" in messages[0] and "router_bias_update_rate" in messages[0]


# ------------------------------------------------------------------------------------------------ MaxVio
def _skewed_model() -> torch.nn.Module:
    """Every token's hidden state leans one way, which the routers' expert 0 prefers: expert 0 takes every token."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_bias_update_rate=0.02,
                                                         router_aux_loss_coef=0.0))
    with torch.no_grad():
        direction = torch.randn(model.config.hidden_size)
        direction /= direction.norm()
        model.model.embed_tokens.weight += 0.1 * direction
        for layer in find_moe_layers(model):
            layer.router.weight[0] += 2.0 * direction / model.config.hidden_size ** 0.5
    return model


def _max_vio_curve(tmp_path, *callbacks) -> list[float]:
    rows = _padded_rows(320, width=16, vocab=97, seed=1)
    args = _args(tmp_path, max_steps=40, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                 learning_rate=1e-3, logging_steps=1)
    trainer = add_moe_callbacks(Trainer(model=_skewed_model(), args=args, train_dataset=rows),
                                ExpertStatsCallback(heatmap=False), *callbacks)
    trainer.train()
    return [entry["moe/max_vio"] for entry in trainer.state.log_history if "moe/max_vio" in entry]


def test_skewed_router_max_vio_falls_with_the_callback_and_not_without(tmp_path):
    balanced = _max_vio_curve(tmp_path / "with", AuxLossFreeBalancingCallback())
    unbalanced = _max_vio_curve(tmp_path / "without")
    assert balanced[0] > 0.95 and unbalanced[0] > 0.95  # expert 0 takes every token: MaxVio = 1 for top-2 of 4
    late_balanced, late_unbalanced = sum(balanced[-5:]) / 5, sum(unbalanced[-5:]) / 5
    assert late_balanced < 0.75 and late_unbalanced > 0.85, (balanced, unbalanced)


def test_evaluate_reports_max_vio_over_each_split():
    from hf_moe.data import build_mixture
    from hf_moe.recipes import evaluate_model
    from hf_moe.recipes.evaluate import format_evaluation

    from .conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", vocab_size=len(tokenizer)))
    split = build_mixture(0, 1, seed=0)["heldout"]
    report = evaluate_model(model, tokenizer, {"heldout": split}, max_new_tokens=1)

    # Independent: top-2 of the logits the model returns for each scored example, summed over the split.
    from hf_moe.data.sft import tokenize_for_sft

    loads = torch.zeros(3, 4)
    for row in split:
        ids = torch.tensor([tokenize_for_sft(tokenizer, row["messages"], max_length=512)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(logits):
            loads[layer] += torch.bincount(layer_logits.topk(2, -1).indices.reshape(-1), minlength=4)
    expected = (loads.max(-1).values / loads.mean(-1) - 1).mean().item()
    assert report["heldout"]["max_vio"] == pytest.approx(expected, abs=1e-6)
    assert "MaxVio" in format_evaluation(report)


# ------------------------------------------------------------------------------------------------ persistence
def test_bias_survives_save_load_bfloat16_and_remote_code(tmp_path):
    from hf_moe.remote_check import load_as_remote_code

    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_bias_update_rate=1e-3)).eval()
    for layer in find_moe_layers(model):
        selection_bias(model, layer).copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    ids = torch.randint(3, 97, (2, 6))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(b, torch.tensor([0.3, -0.2, 0.1, 0.0])) for b in _biases(loaded))
    in_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)  # buffers keep their dtype
    assert {selection_bias(in_bf16, layer).dtype for layer in find_moe_layers(in_bf16)} == {torch.float32}

    remote = load_as_remote_code(tmp_path, ids, max_new_tokens=2)
    assert (remote["logits"] - expected).abs().max().item() < 1e-6
    # ...which the bias decides: without it the same weights give other logits.
    loaded.set_router_bias_update_rate(0.0)
    assert (loaded.eval()(input_ids=ids).logits - expected).abs().max().item() > 1e-4


def test_export_refuses_a_model_with_a_selection_bias():
    from hf_moe.export.mixtral import MixtralTarget

    blockers = MixtralTarget().supports(tiny_config("hf_moe", router_bias_update_rate=1e-3))
    assert any("e_score_correction_bias" in str(blocker) for blocker in blockers)
    assert not any("e_score_correction_bias" in str(b) for b in MixtralTarget().supports(tiny_config("hf_moe")))


# ------------------------------------------------------------------------------------------------ sequence-wise loss
def test_sequence_balance_loss_is_deepseek_v3_eqs_17_to_20_per_sequence():
    from hf_moe import sequence_balance_loss

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3 * 5, 4, generator=generator) * 2,)  # 3 sequences of 5 tokens, 4 experts
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    bias = (torch.tensor([0.0, 0.0, 0.3, 0.0]),)
    got = sequence_balance_loss(logits, 2, 3, mask, selection_biases=bias)

    losses = []
    for sequence in range(2):  # the third has no real token
        length = int(mask[sequence].sum())
        rows = logits[0][sequence * 5:sequence * 5 + length]
        s = rows.softmax(-1)
        chosen = (s + bias[0]).topk(2, -1).indices
        f = torch.tensor([4 / (2 * length) * (chosen == e).sum().item() for e in range(4)])  # N_r / (K_r T) sum 1(.)
        p = (s / s.sum(-1, keepdim=True)).mean(0)  # P_i = 1/T sum s'_i,t
        losses.append((f * p).sum())
    assert got.item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-6)
    uniform = sequence_balance_loss((torch.zeros(8, 4),), 4, 2)
    assert uniform.item() == pytest.approx(1.0)


def test_model_loss_adds_the_sequence_term_and_trl_agrees(tmp_path):


    from .conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = tiny_config("hf_moe", vocab_size=len(tokenizer), router_bias_update_rate=0.05,
                         router_sequence_aux_loss_coef=0.5, router_jitter_noise=0.0, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config).train()
    for layer in find_moe_layers(model):
        selection_bias(model, layer).copy_(torch.tensor([0.2, 0.0, -0.1, 0.0]))
    trainer = tiny_sft_trainer(model, tokenizer, tmp_path, AuxLossFreeBalancingCallback(),
                               ExpertStatsCallback(heatmap=False))
    batch = dict(next(iter(trainer.get_train_dataloader())))
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        own = model(**batch)
        trl_loss = trainer.compute_loss(model, dict(batch))
    expected = own.lm_loss + 0.01 * own.aux_loss + 0.001 * own.z_loss + 0.5 * own.sequence_aux_loss
    assert own.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert own.sequence_aux_loss.item() > 0.5
    assert trl_loss.item() == pytest.approx(own.loss.item(), abs=1e-5)

    before = _biases(model)
    trainer.train()  # the callback moves the bias under TRL too
    assert all((after - b).abs().max().item() == pytest.approx(0.1, abs=1e-6)
               for after, b in zip(_biases(model), before, strict=True))  # 2 steps of gamma 0.05, one direction
    assert "sequence_aux_loss" in [e for e in trainer.state.log_history if "loss" in e][-1]  # TRL's metrics


# ------------------------------------------------------------------------------------------------ hf-moe finetune
def test_finetune_option_adds_and_trains_the_bias_and_the_card_says_so(tiny_upcycled, tmp_path):
    from hf_moe.cli import parse_command

    run, (args, training_args) = parse_command([
        "finetune", str(tiny_upcycled), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
        "--eval_strategy", "no", "--train_per_family", "2", "--eval_per_family", "1", "--max_length", "48",
        "--router_bias_update_rate", "0.01", "--router_sequence_aux_loss_coef", "1e-4"])
    run(args, training_args)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert tuned.config.router_bias_update_rate == 0.01 and tuned.config.router_sequence_aux_loss_coef == 1e-4
    biases = torch.stack(_biases(tuned))
    assert biases.abs().max().item() > 0
    assert torch.all(torch.isclose(biases.abs(), torch.tensor(0.02)) | (biases == 0))  # two steps of +-0.01
    card = (tmp_path / "run" / "README.md").read_text()
    assert "selection bias, updated every step (gamma 0.01)" in card and "MaxVio (per step)" in card


def test_finetune_option_on_a_family_without_bias_is_a_value_error(tmp_path):
    from hf_moe.recipes.finetune import _set_up_selection_bias

    with pytest.raises(ValueError, match="model_type='mixtral'.*no router selection bias"):
        _set_up_selection_bias(AutoModelForCausalLM.from_config(FAMILIES["mixtral"]()), 1e-3)
    deepseek = AutoModelForCausalLM.from_config(FAMILIES["deepseek_v3"]())
    assert _set_up_selection_bias(deepseek, 1e-3) == 1e-3
    assert _set_up_selection_bias(deepseek, None) == 0.0  # the model's bias stays as it is unless asked


def test_balancing_an_expert_choice_model_names_its_routing(caplog):
    from hf_moe.training.balancing import no_selection_bias_message

    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", router_type="expert_choice"))
    message = no_selection_bias_message(model)
    assert "model_type='hf_moe') routes by expert choice (sparse layers [0, 1, 2])" in message
    assert "balanced by construction" in message and "router_bias_update_rate" not in message
    callback = AuxLossFreeBalancingCallback()
    with caplog.at_level(logging.WARNING, logger="hf_moe.training.balancing"):
        callback.on_train_begin(None, None, None, model=model)
    assert "routes by expert choice" in caplog.text and not callback.balancer.layers


# ------------------------------------------------------------------------------------------------ the measurement
def test_balancing_benchmark_rows_differ_only_in_the_balancing(tiny_upcycled, tmp_path, monkeypatch):
    import dataclasses

    from hf_moe.recipes import balancing
    from hf_moe.recipes.balancing import (
        BalancingBenchmarkArguments,
        balancing_settings,
        format_balancing_table,
        run_method,
    )

    args = BalancingBenchmarkArguments(output_dir=str(tmp_path), max_steps=2, train_per_family=2, eval_per_family=1,
                                       max_length=48, last_steps=2)
    assert [balancing_settings(method, args) for method in args.method_list] == [
        {"router_aux_loss_coef": 0.0, "router_bias_update_rate": 0.0},
        {"router_aux_loss_coef": 0.01, "router_bias_update_rate": 0.0},
        {"router_aux_loss_coef": 0.0, "router_bias_update_rate": 1e-3},
        {"router_aux_loss_coef": 0.01, "router_bias_update_rate": 1e-3}]
    runs = []  # (FinetuneArguments, FinetuneTrainingArguments) of each method's run
    build = balancing.build_trainer
    monkeypatch.setattr(balancing, "build_trainer", lambda *arguments: runs.append(arguments) or build(*arguments))
    rows = [run_method(method, tiny_upcycled, args) for method in ("none", "both")]

    # The runs' options differ in the balancing (and the run folder) only.
    (none_options, none_training), (both_options, both_training) = runs
    none_options, both_options = dataclasses.asdict(none_options), dataclasses.asdict(both_options)
    assert {key for key in none_options if none_options[key] != both_options[key]} == {
        "router_aux_loss_coef", "router_bias_update_rate"}
    none_training, both_training = none_training.to_dict(), both_training.to_dict()
    assert {key for key in none_training if none_training[key] != both_training[key]} == {"output_dir"}
    # The rows: the same fields; the balancing differs, the first step (same start, same batch, bias still 0) not.
    assert rows[0].keys() == rows[1].keys()
    assert [(row["method"], row["router_aux_loss_coef"], row["router_bias_update_rate"]) for row in rows] == [
        ("none", 0.0, 0.0), ("both", 0.01, 1e-3)]
    assert rows[0]["max_vio_first_step"] == rows[1]["max_vio_first_step"]
    assert rows[0]["validation_loss"] != rows[1]["validation_loss"]  # the balancing changed the training
    for row in rows:
        assert len(row["max_vio_curve"]) == 2 and row["max_vio_train_last"] == pytest.approx(
            sum(row["max_vio_curve"]) / 2)
        assert all(row[key] >= 0 for key in ("validation_max_vio", "heldout_max_vio", "heldout_loss"))
    table = format_balancing_table(rows, 2)
    assert "| none | 0 | 0 |" in table and "| both | 0.01 | 0.001 |" in table
    with pytest.raises(ValueError, match="`methods`='aux,bias' is invalid"):
        BalancingBenchmarkArguments(methods="aux,bias")
