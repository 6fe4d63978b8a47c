"""Training state that a forward moves (the expert-choice thresholds, the optimizer step's shared expert counts in
hf_moe's optimizer-step hook) moves only in forwards that train: train mode with gradients. RL trainers (TRL's GRPO,
online DPO) generate and score with the policy in train mode under `torch.no_grad()`; those forwards must leave the
state alone."""

import torch
from transformers import AutoModelForCausalLM

from hf_moe.moe_layers import find_moe_layers
from hf_moe.training.optimizer_step import begin_optimizer_step, end_optimizer_steps

from .conftest import tiny_config


def _ec_model():
    config = tiny_config("hf_moe", router_type="expert_choice", router_jitter_noise=0.0, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).train()


def _thresholds(model):
    routers = [layer.router for layer in find_moe_layers(model)]
    return ([int(router.expert_choice_threshold_updates) for router in routers],
            torch.stack([router.expert_choice_threshold.clone() for router in routers]))


def test_train_mode_generate_without_gradients_leaves_the_thresholds_alone():
    model = _ec_model()
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, labels=ids)  # one training forward: every threshold estimated once
    counts, thresholds = _thresholds(model)
    assert counts == [1, 1, 1]
    model.train()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    after_counts, after_thresholds = _thresholds(model)
    assert after_counts == [1, 1, 1]
    assert (after_thresholds - thresholds).abs().max().item() == 0.0


def test_a_training_forward_still_moves_the_thresholds():
    """The positive control of the test above: a forward with gradients in train mode updates them."""
    model = _ec_model()
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, labels=ids)
    _, thresholds = _thresholds(model)
    model(input_ids=torch.randint(3, 97, (2, 8)), labels=ids)
    counts, moved = _thresholds(model)
    assert counts == [2, 2, 2]
    assert (moved - thresholds).abs().max().item() > 1e-4


def test_train_mode_full_forward_without_gradients_selects_as_the_training_forward():
    """Scoring a batch under no_grad (RL's old and reference log-probs) gives exactly the training forward's logits:
    the same batch selection, only without the threshold update."""
    model = _ec_model()
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        scored = model(input_ids=ids).logits
    assert _thresholds(model)[0] == [0, 0, 0]
    trained = model(input_ids=ids).logits
    assert _thresholds(model)[0] == [1, 1, 1]
    assert torch.equal(scored, trained)


def test_train_mode_decoding_steps_without_gradients_route_by_the_causal_threshold():
    """A decoding step's tokens form one-token groups, no training selection: it routes as inference does."""
    model = _ec_model()
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, labels=ids)
    router = find_moe_layers(model)[0].router
    seen = []
    router.register_forward_hook(lambda module, inputs, outputs: seen.append((outputs[0], outputs[2])))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(seen) == 4  # the prompt, then 3 decoding steps of 2 tokens each
    for logits, selected in seen[1:]:
        assert selected.shape == (2, 4)
        assert torch.equal(selected, logits.softmax(-1) >= router.expert_choice_threshold)


def test_train_mode_forward_without_gradients_adds_nothing_to_the_optimizer_steps_counts():
    config = tiny_config("hf_moe", router_aux_loss_scope="global_batch", router_jitter_noise=0.0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(3, 97, (2, 8))
    begin_optimizer_step(model)
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert model.optimizer_step_hook.dispatch_counts is None
    model(input_ids=ids, labels=ids)  # a training forward adds its (layers, E) counts: 2 rows x 8 tokens x top-2
    assert model.optimizer_step_hook.dispatch_counts.sum(-1).tolist() == [32.0, 32.0, 32.0]
    model(input_ids=ids, labels=ids)
    assert model.optimizer_step_hook.dispatch_counts.sum(-1).tolist() == [64.0, 64.0, 64.0]
    end_optimizer_steps(model)  # per-forward again: the hook stays, the step's counts go
    assert model.optimizer_step_hook.dispatch_counts is None
    model(input_ids=ids, labels=ids)
    assert model.optimizer_step_hook.dispatch_counts is None
