"""Trainer integration: statistics in every logger, heatmaps, GA scaling, the non-finite guard, freezing, resume,
the embedded mixture, and a short fine-tune."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_moe.data import HELD_IN_FAMILIES, HELD_OUT_FAMILIES, build_mixture
from hf_moe.recipes import build_trainer, evaluate_model
from hf_moe.training import NonFiniteGuardCallback, freeze_moe, train_with_rollback

from .conftest import byte_tokenizer, finetune_arguments, tiny_sft_trainer


def _finetune_args(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "run"), train_per_family=8, eval_per_family=2, max_steps=4,
                  per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3, warmup_steps=0,
                  logging_steps=2, save_steps=4, max_length=96, report_to="none")
    fields.update(overrides)
    fields.setdefault("eval_steps", fields["save_steps"])
    return finetune_arguments(**fields)


def _trainer(tiny_upcycled, tmp_path, extra_callbacks=(), **overrides):
    args, training_args = _finetune_args(tmp_path, model_path=str(tiny_upcycled), **overrides)
    return build_trainer(args, training_args, extra_callbacks=extra_callbacks)


def test_expert_statistics_reach_log_history_and_tensorboard(tiny_upcycled, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tiny_upcycled, tmp_path, report_to="tensorboard")
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("ExpertStatsCallback") < names.index("TensorBoardCallback")  # ahead of the reporters
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for key in ("moe/aux_loss", "moe/z_loss", "moe/model_lm_loss", "moe/model_aux_loss", "moe/model_z_loss",
                "moe/imbalance_max_over_mean", "moe/imbalance_cv", "moe/router_entropy", "moe/dropped_fraction",
                "moe/expert_activation_rate", "moe/layer0/expert3_fraction", "moe/layer1/z_loss",
                "moe/nonfinite_skipped_steps"):
        assert key in logged[-1], key
    fractions = [logged[-1][f"moe/layer0/expert{e}_fraction"] for e in range(4)]
    assert sum(fractions) == pytest.approx(1.0)
    assert 0 < logged[-1]["moe/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6

    events = EventAccumulator(str(next((tmp_path / "run" / "runs").iterdir())),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalar_tags = events.Tags()["scalars"]
    assert any(tag.endswith("moe/aux_loss") for tag in scalar_tags), scalar_tags
    assert any(tag.endswith("moe/layer0/expert0_fraction") for tag in scalar_tags)
    assert "moe/expert_load" in events.Tags()["images"]
    heatmaps = list((tmp_path / "run" / "expert_load").glob("*.png"))
    assert heatmaps and heatmaps[0].read_bytes()[:4] == b"\x89PNG"


def _varied_rows(count=8, width=20):
    """Rows of different lengths (right-padded to `width`, padding masked out of attention and labels)."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(count):
        length = 6 + (5 * index) % (width - 5)
        ids = torch.randint(5, 200, (length,), generator=generator).tolist()
        pad = width - length
        rows.append({"input_ids": ids + [0] * pad, "attention_mask": [1] * length + [0] * pad,
                     "labels": ids + [-100] * pad})
    return rows


def _one_sgd_step(model_path, tmp_path, batch, accumulation, aux=1.0, z=1.0, scope="micro_batch", mark_steps=True):
    """Weights after one SGD step (lr 1) on the 8 varied rows, split into `accumulation` micro-batches of `batch`."""
    from hf_moe.training import OptimizerStepCallback, add_moe_callbacks

    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.config.router_aux_loss_coef, model.config.router_z_loss_coef = aux, z
    model.config.router_aux_loss_scope = scope
    args = TrainingArguments(output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0)
    callbacks = [OptimizerStepCallback()] if mark_steps else []
    add_moe_callbacks(Trainer(model=model, args=args, train_dataset=_varied_rows()), *callbacks).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _max_difference(first: dict, second: dict) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in first)


def test_gradient_accumulation_keeps_lm_loss_and_z_loss_exact_with_varied_rows(tiny_upcycled, tmp_path):
    # LM loss alone: the Trainer's num_items_in_batch makes GA exact.
    splits = ((8, 1), (2, 4))
    lm_only = [_one_sgd_step(tiny_upcycled, tmp_path, batch, steps, aux=0.0, z=0.0) for batch, steps in splits]
    assert _max_difference(*lm_only) < 1e-6
    # z-loss weighted by the router-token share of the step: the per-router-token mean however the step is split.
    with_z = [_one_sgd_step(tiny_upcycled, tmp_path, batch, steps, aux=0.0) for batch, steps in splits]
    assert _max_difference(*with_z) < 1e-6
    # Weighted by label tokens instead (no step marking), the rows' different lengths show.
    unmarked = _one_sgd_step(tiny_upcycled, tmp_path, 2, 4, aux=0.0, mark_steps=False)
    assert _max_difference(unmarked, with_z[0]) > 1e-5


def test_load_balancing_scope_under_gradient_accumulation(tiny_upcycled, tmp_path):
    """One micro-batch: both scopes are the same loss. Accumulated (GA 4x2 against 1x8): neither is exact (f_i . P_i
    is not additive over micro-batches), and the global-batch scope, whose f_i counts the whole step, is the closer.
    Measured: max |weight difference| after one SGD step (lr 1) 0.0161 (micro) vs 0.0131 (global)."""
    reference = _one_sgd_step(tiny_upcycled, tmp_path, 8, 1, z=0.0)
    assert _max_difference(_one_sgd_step(tiny_upcycled, tmp_path, 8, 1, z=0.0, scope="global_batch"), reference) == 0
    differences = {scope: _max_difference(_one_sgd_step(tiny_upcycled, tmp_path, 2, 4, z=0.0, scope=scope), reference)
                   for scope in ("micro_batch", "global_batch")}
    assert all(1e-4 < difference < 0.05 for difference in differences.values()), differences
    assert differences["global_batch"] < differences["micro_batch"], differences


def test_global_batch_scope_without_the_optimizer_step_is_the_micro_batch_loss(tiny_upcycled, tmp_path):
    """Without hf_moe's optimizer-step hook (no `OptimizerStepCallback`, no `begin_optimizer_step`) there is no step to
    count f_e over: each forward call balances over its own tokens, exactly as `micro_batch` (and warns once)."""
    unmarked = {scope: _one_sgd_step(tiny_upcycled, tmp_path, 2, 4, z=0.0, scope=scope, mark_steps=False)
                for scope in ("micro_batch", "global_batch")}
    assert _max_difference(unmarked["global_batch"], unmarked["micro_batch"]) == 0


def _snapshot(model, optimizer):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {key: {name: value.clone() if torch.is_tensor(value) else value for name, value in values.items()}
             for key, values in optimizer.state_dict()["state"].items()}
    return weights, state


class _Poison(TrainerCallback):
    """Makes the loss NaN (so every gradient is NaN) during the given (1-based) steps, once; snapshots weights and
    optimizer state before and after each poisoned step."""

    def __init__(self, model, steps):
        self.steps, self.active, self.done = set(steps), False, False
        model.register_forward_hook(lambda m, i, o: o.__setitem__("loss", o.loss * float("nan"))
                                    if self.active else None)
        self.before, self.after = {}, {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.active = not self.done and (state.global_step + 1) in self.steps
        if self.active:
            self.before[state.global_step + 1] = _snapshot(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.active:
            self.after[state.global_step] = _snapshot(model, optimizer)
            self.done = state.global_step == max(self.steps)
        self.active = False


def test_nonfinite_step_changes_no_weight_and_no_optimizer_state(tiny_upcycled, tmp_path):
    trainer = _trainer(tiny_upcycled, tmp_path, max_steps=5)
    poison = _Poison(trainer.model, steps=[3])
    trainer.add_callback(poison)
    trainer.train()
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuardCallback))
    assert guard.skipped_steps == 1 and not guard.rollback_requested
    (weights_before, state_before), (weights_after, state_after) = poison.before[3], poison.after[3]
    for name, value in weights_before.items():
        assert torch.equal(weights_after[name], value), name
    assert state_before.keys() == state_after.keys() and state_before
    for key, values in state_before.items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_after[key][name])), (key, name)
    logged = [entry for entry in trainer.state.log_history if "moe/nonfinite_skipped_steps" in entry]
    assert logged[-1]["moe/nonfinite_skipped_steps"] == 1.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # The steps around it did train.
    assert any(not torch.equal(p, weights_after[n]) for n, p in trainer.model.named_parameters())


def test_consecutive_nonfinite_steps_roll_back_to_the_last_checkpoint_with_new_data_order(tiny_upcycled, tmp_path):
    trainer = _trainer(tiny_upcycled, tmp_path, max_steps=9, save_steps=3, nonfinite_max_consecutive=3)
    poison = _Poison(trainer.model, steps=[4, 5, 6])
    trainer.add_callback(poison)
    first_order = [batch["input_ids"][0, :12].tolist() for batch in trainer.get_train_dataloader()]
    train_with_rollback(trainer)
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuardCallback))
    assert guard.rollbacks == 1 and guard.skipped_steps == 3
    assert trainer.state.global_step == 9
    assert trainer.args.data_seed == 1
    second_order = [batch["input_ids"][0, :12].tolist() for batch in trainer.get_train_dataloader()]
    assert first_order != second_order
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("target, frozen_part, trained_part", [
    ("router", ".mlp.gate.", ".mlp.experts."),
    ("experts", ".mlp.experts.", ".mlp.gate."),
    ("moe", ".mlp.", ".self_attn."),
])
def test_frozen_parameters_stay_bit_identical(tiny_upcycled, tmp_path, target, frozen_part, trained_part):
    trainer = _trainer(tiny_upcycled, tmp_path, max_steps=3, freeze=target)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    frozen = [n for n in before if frozen_part in n and "layers" in n]
    trained = [n for n in before if trained_part in n]
    assert frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trained)


def test_freeze_moe_rejects_unknown_targets_and_non_moe_models():
    from transformers import LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, vocab_size=10))
    with pytest.raises(ValueError, match="`target`='gates' is invalid"):
        freeze_moe(dense, "gates")
    with pytest.raises(ValueError, match="matched no parameter"):
        freeze_moe(dense, "router")


def test_resumed_run_follows_the_uninterrupted_loss_curve(tiny_upcycled, tmp_path):
    full = _trainer(tiny_upcycled, tmp_path / "full", max_steps=6, save_steps=3, logging_steps=1)
    full.train()
    class StopAfterStep3(TrainerCallback):  # an interruption: same schedule, stops after checkpoint-3
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    interrupted = _trainer(tiny_upcycled, tmp_path / "part", max_steps=6, save_steps=3, logging_steps=1,
                           extra_callbacks=[StopAfterStep3()])
    interrupted.train()
    assert interrupted.state.global_step == 3
    resumed = _trainer(tiny_upcycled, tmp_path / "part", max_steps=6, save_steps=3, logging_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "run" / "checkpoint-3"))

    def losses(trainer):
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    full_losses, resumed_losses = losses(full), losses(resumed)
    assert set(resumed_losses) >= {4, 5, 6}
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-5), step


def test_mixture_is_deterministic_and_keeps_held_out_families_out_of_training():
    first, again, other = build_mixture(30, 5, seed=3), build_mixture(30, 5, seed=3), build_mixture(30, 5, seed=4)
    assert first["train"].to_list() == again["train"].to_list()
    assert first["train"].to_list() != other["train"].to_list()
    assert set(first["train"]["family"]) == set(HELD_IN_FAMILIES)
    assert set(first["heldout"]["family"]) == set(HELD_OUT_FAMILIES)
    assert not set(HELD_IN_FAMILIES) & set(HELD_OUT_FAMILIES)
    train_prompts = {m[0]["content"] for m in first["train"]["messages"]}
    assert not train_prompts & {m[0]["content"] for m in first["validation"]["messages"]}
    assert not train_prompts & {m[0]["content"] for m in first["heldout"]["messages"]}
    assert len(HELD_IN_FAMILIES) >= 4 and len(first["train"]) == 30 * len(HELD_IN_FAMILIES)


def test_default_sized_mixture_fills_every_family():
    from collections import Counter

    mixture = build_mixture(200, 25, seed=0)
    assert Counter(mixture["train"]["family"]) == dict.fromkeys(HELD_IN_FAMILIES, 200)
    assert Counter(mixture["validation"]["family"]) == dict.fromkeys(HELD_IN_FAMILIES, 25)
    assert Counter(mixture["heldout"]["family"]) == dict.fromkeys(HELD_OUT_FAMILIES, 25)


def test_short_finetune_lowers_held_out_loss(tiny_upcycled, tmp_path):
    tokenizer = byte_tokenizer()
    heldout = build_mixture(0, 6, seed=0)["heldout"]
    model = AutoModelForCausalLM.from_pretrained(tiny_upcycled)
    before = evaluate_model(model, tokenizer, {"heldout": heldout}, max_new_tokens=2)["heldout"]["loss"]
    trainer = _trainer(tiny_upcycled, tmp_path, max_steps=30, train_per_family=16, learning_rate=3e-3,
                       save_steps=100)
    trainer.train()
    after = evaluate_model(trainer.model, tokenizer, {"heldout": heldout}, max_new_tokens=2)
    assert after["heldout"]["loss"] < before - 0.5, (before, after["heldout"]["loss"])
    assert set(after["heldout"]["exact_match_per_family"]) == set(HELD_OUT_FAMILIES)
    assert "expert_specialisation" in after


def test_router_stats_count_mh_moe_subtokens_and_switch_drops():
    from hf_moe.training import RouterStatsRecorder

    from .conftest import tiny_config

    mh = AutoModelForCausalLM.from_config(tiny_config("hf_mh_moe", num_moe_heads=2, num_experts=4)).train()
    recorder = RouterStatsRecorder(mh)
    mh(input_ids=torch.randint(3, 97, (2, 9)))
    summary = recorder.summary()
    # Each token's 2 sub-tokens pick 2 experts each out of 4: between 2 and 4 distinct experts per token.
    assert 2.0 <= summary["moe/distinct_experts_per_token"] <= 4.0
    assert summary["moe/aux_loss"] > 0 and summary["moe/dropped_fraction"] == 0.0
    layers, matrix = recorder.load_matrix()
    assert matrix.shape == (3, 4) and torch.allclose(matrix.sum(1), torch.ones(3))

    switch = AutoModelForCausalLM.from_config(tiny_config("hf_switch", capacity_factor=0.5)).train()
    recorder = RouterStatsRecorder(switch)
    switch(input_ids=torch.randint(3, 97, (2, 9)))
    assert recorder.summary()["moe/dropped_fraction"] >= 0.5  # half the slots at most
    recorder.reset()
    switch.eval()(input_ids=torch.randint(3, 97, (2, 9)))
    assert recorder.summary() == {}  # evaluation passes are not training statistics


def _write_rows(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


GOOD_ROW = '{"instruction": "Say hi.", "response": "hi"}'


@pytest.mark.parametrize("lines, problem", [
    ([GOOD_ROW] * 12 + ['{"instruction": "Say bye.", "response": '] + [GOOD_ROW] * 3,
     "line 13 is not valid JSON (Expecting value: column 41)"),
    ([GOOD_ROW, "", GOOD_ROW + " trailing"], "line 3 is not valid JSON (Extra data: column 46)"),
    (['{"instruction": "Say bye.", "response": '] + [GOOD_ROW] * 3, "line 1 is not valid JSON"),
    ([GOOD_ROW, "[1, 2]"], "line 2 is not a JSON object (a row): '[1, 2]'"),
    ([], "empty"),
])
def test_malformed_json_lines_dataset_is_a_value_error_naming_the_file_and_the_line(tmp_path, lines, problem):
    from hf_moe.data import load_instruction_dataset

    path = _write_rows(tmp_path / "rows.jsonl", lines)
    with pytest.raises(ValueError) as error:
        load_instruction_dataset(str(path))
    assert str(error.value).startswith(f"{path}: {problem}"), str(error.value)


def test_json_dataset_is_json_lines_or_one_document(tmp_path):
    from hf_moe.data import load_instruction_dataset

    lines = _write_rows(tmp_path / "lines.json", [GOOD_ROW, GOOD_ROW])
    document = _write_rows(tmp_path / "document.json", ["[", f"  {GOOD_ROW},", f"  {GOOD_ROW}", "]"])
    for path in (lines, document):
        assert load_instruction_dataset(str(path))["messages"][1][1] == {"role": "assistant", "content": "hi"}
    broken = _write_rows(tmp_path / "broken.json", ["[", f"  {GOOD_ROW},", f"  {GOOD_ROW[:-1]}", "]"])
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON at line 4, column 1 \(Expecting ','"):
        load_instruction_dataset(str(broken))


# ------------------------------------------------------------------------------------------------ router statistics
def _train_mode_model(**overrides):
    from .conftest import tiny_config

    return AutoModelForCausalLM.from_config(tiny_config("hf_moe", **overrides)).train()


def _load_sums(recorder) -> list[float]:
    return [recorder.loads[layer].sum().item() for layer in sorted(recorder.loads)]


def test_train_mode_forwards_without_gradients_add_no_training_statistics():
    """TRL's GRPO / online trainers generate and score with the policy in train mode under `torch.no_grad()`."""
    from hf_moe.training import RouterStatsRecorder

    model = _train_mode_model()
    recorder = RouterStatsRecorder(model, only_training=True)
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
        model(input_ids=ids, labels=ids)  # scoring the completions
    assert model.training
    assert _load_sums(recorder) == [0.0, 0.0, 0.0]
    assert recorder.end_step() == {} and dict(recorder.loss_terms) == {} and recorder.summary() == {}


def test_a_training_forward_adds_training_statistics():
    from hf_moe.training import RouterStatsRecorder

    model = _train_mode_model()
    recorder = RouterStatsRecorder(model, only_training=True)
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, labels=ids)
    assert _load_sums(recorder) == [32.0, 32.0, 32.0]  # 16 tokens x k=2
    assert [load.sum().item() for load in recorder.end_step().values()] == [32.0, 32.0, 32.0]
    assert len(recorder.loss_terms["aux_loss"]) == 1 and recorder.summary()["moe/layer0/expert0_fraction"] >= 0


# Two rows of 8: the first left-padded (6 real tokens), the second right-padded (5): 11 real tokens.
MIXED_PADDING = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])


def _causal_4d(mask: torch.Tensor, additive: bool) -> torch.Tensor:
    """The (batch, 1, seq, seq) mask transformers builds from a 2-D padding mask: boolean (sdpa) or additive float
    (eager; 0 where attended)."""
    seq = mask.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if additive else allowed


MASK_FORMS = {
    "positional": lambda model, ids: model(ids, MIXED_PADDING),
    "4d_bool": lambda model, ids: model(input_ids=ids, attention_mask=_causal_4d(MIXED_PADDING, additive=False)),
    "4d_additive": lambda model, ids: model(input_ids=ids, attention_mask=_causal_4d(MIXED_PADDING, additive=True)),
    "per_layer_type_dict": lambda model, ids: model(
        input_ids=ids, attention_mask={"full_attention": _causal_4d(MIXED_PADDING, additive=False)}),
}


@pytest.mark.parametrize("form", list(MASK_FORMS))
def test_router_loads_count_real_tokens_whatever_form_the_mask_takes(form):
    from hf_moe.training import RouterStatsRecorder

    model = _train_mode_model(router_jitter_noise=0.0)
    recorder = RouterStatsRecorder(model)
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, attention_mask=MIXED_PADDING)
    keyword_2d = _load_sums(recorder)
    assert keyword_2d == [22.0, 22.0, 22.0]  # 11 real tokens x k=2
    recorder.reset()
    MASK_FORMS[form](model, ids)
    assert _load_sums(recorder) == keyword_2d


def test_router_loads_of_generation_with_a_static_cache_count_real_tokens():
    """`generate` with a static cache passes the per-layer-type dict of 4-D masks whose key columns are absolute
    cache positions (wider than the tokens seen so far)."""
    from hf_moe.training import RouterStatsRecorder

    model = _train_mode_model().eval()
    recorder = RouterStatsRecorder(model, only_training=False)
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=MIXED_PADDING, max_new_tokens=3, do_sample=False,
                       pad_token_id=0, cache_implementation="static")
    # Prompt: 11 real tokens; then 2 decoding forwards (the 3rd token comes from the last) of 2 rows; k=2.
    assert _load_sums(recorder) == [(11 + 2 * 2) * 2.0] * 3


def _biased_padded_forward(model, recorder):
    """One training forward with padding (MIXED_PADDING) and every router biased towards expert 0."""
    from hf_moe.moe_layers import find_moe_layers, selection_bias

    for layer in find_moe_layers(model):
        selection_bias(model, layer).copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    ids = torch.randint(3, 97, (2, 8))
    return model(input_ids=ids, attention_mask=MIXED_PADDING, labels=ids.masked_fill(MIXED_PADDING == 0, -100))


def test_logged_aux_loss_is_the_models_with_a_selection_bias_and_padding():
    from hf_moe.training import RouterStatsRecorder

    model = _train_mode_model(router_bias_update_rate=1e-3, initializer_range=0.5)  # far from uniform routing
    recorder = RouterStatsRecorder(model)
    output = _biased_padded_forward(model, recorder)
    assert recorder.summary()["moe/aux_loss"] == pytest.approx(output.aux_loss.item(), abs=1e-6)


def test_logged_z_loss_is_the_models_with_padding():
    from hf_moe.training import RouterStatsRecorder

    model = _train_mode_model(router_bias_update_rate=1e-3, initializer_range=0.5)  # far from uniform routing
    recorder = RouterStatsRecorder(model)
    output = _biased_padded_forward(model, recorder)
    assert recorder.summary()["moe/z_loss"] == pytest.approx(output.z_loss.item(), abs=1e-6)


def test_logged_aux_loss_of_a_builtin_family_is_its_outputs_aux_loss():
    from hf_moe.training import RouterStatsRecorder

    from .test_builtin_moe import FAMILIES

    model = AutoModelForCausalLM.from_config(FAMILIES["mixtral"]()).train()
    recorder = RouterStatsRecorder(model)
    ids = torch.randint(3, 64, (2, 8))
    output = model(input_ids=ids, attention_mask=MIXED_PADDING, labels=ids, output_router_logits=True)
    assert recorder.summary()["moe/aux_loss"] == pytest.approx(output.aux_loss.item(), abs=1e-6)


def test_logged_aux_loss_under_trl_is_the_aux_loss_trl_adds(tmp_path):
    """TRL's fused LM head returns no aux_loss; MoeSFTTrainer adds (and logs) the model's, bias and padding included."""

    from hf_moe.moe_layers import find_moe_layers, selection_bias
    from hf_moe.training import ExpertStatsCallback

    from .conftest import tiny_config

    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", vocab_size=len(tokenizer), num_hidden_layers=2,
                                                         router_bias_update_rate=1e-3, router_jitter_noise=0.0))
    for layer in find_moe_layers(model):
        selection_bias(model, layer).copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    trainer = tiny_sft_trainer(model, tokenizer, tmp_path, ExpertStatsCallback(heatmap=False))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["moe/aux_loss"] == pytest.approx(entry["aux_loss"], abs=1e-6)
