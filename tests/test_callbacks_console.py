"""What people read on the console during an MoE run: the MoE summary, while `log_history` and the `report_to`
loggers get every per-layer key; and the warning when the callbacks sit where those loggers cannot see their keys."""

import ast
import logging
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_moe.training import (
    AuxLossFreeBalancingCallback,
    ExpertStatsCallback,
    NonFiniteGuardCallback,
    add_moe_callbacks,
)

from .conftest import tiny_config

NUM_LAYERS, NUM_EXPERTS = 4, 8
PER_LAYER_METRICS = ("z_loss", "imbalance_max_over_mean", "max_vio", "imbalance_cv", "router_entropy",
                     "dropped_fraction", "expert_activation_rate")  # and expert<e>_fraction
SUMMARY_KEYS = {"moe/aux_loss", "moe/z_loss", "moe/model_aux_loss", "moe/imbalance_cv", "moe/router_entropy",
                "moe/dropped_fraction", "moe/expert_activation_rate", "moe/max_vio", "moe/nonfinite_skipped_steps"}


def _trainer(tmp_path, report_to, disable_tqdm=True, callbacks=None, **config) -> Trainer:
    """Four optimizer steps, logged every two, of a tiny hf_moe model with 4 sparse layers of 8 experts."""
    model = AutoModelForCausalLM.from_config(tiny_config("hf_moe", num_hidden_layers=NUM_LAYERS,
                                                         num_experts=NUM_EXPERTS, **config))
    rows = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             report_to=report_to, disable_tqdm=disable_tqdm, save_strategy="no", use_cpu=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids} for ids in rows],
                   callbacks=callbacks)


def _printed_training_logs(stdout: str) -> list[dict]:
    """The training log dicts the Trainer's printer (PrinterCallback or ProgressCallback) wrote to stdout."""
    return [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{") and "'loss'" in line]


def _per_layer_keys(keys) -> set[str]:
    return {key for key in keys if re.match(r"moe/layer\d+/", key)}


def _tensorboard_scalar_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events_file in folder.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
        events.Reload()
        tags |= {tag.removeprefix("train/") for tag in events.Tags()["scalars"]}
    return tags


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["PrinterCallback", "ProgressCallback"])
def test_console_prints_the_moe_summary_while_log_history_and_tensorboard_get_every_key(tmp_path, capsys, caplog,
                                                                                        disable_tqdm):
    trainer = add_moe_callbacks(_trainer(tmp_path, ["tensorboard"], disable_tqdm), ExpertStatsCallback(),
                                NonFiniteGuardCallback())
    with caplog.at_level(logging.WARNING, logger="hf_moe"):
        trainer.train()
    printed = _printed_training_logs(capsys.readouterr().out)
    assert len(printed) == 2
    for line in printed:
        assert _per_layer_keys(line) == set()
        assert SUMMARY_KEYS | {"loss", "learning_rate"} <= line.keys()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    per_layer = _per_layer_keys(logged[-1])
    # Every sparse layer's 8 metrics and 8 expert fractions: 64 keys the console leaves out.
    assert len(per_layer) == NUM_LAYERS * (len(PER_LAYER_METRICS) + NUM_EXPERTS)
    assert f"moe/layer{NUM_LAYERS - 1}/expert{NUM_EXPERTS - 1}_fraction" in per_layer
    tensorboard = _tensorboard_scalar_tags(tmp_path)
    assert per_layer | SUMMARY_KEYS <= tensorboard, sorted(per_layer | SUMMARY_KEYS - tensorboard)[:5]
    assert "add_moe_callbacks" not in caplog.text


def test_callbacks_passed_to_the_trainer_warn_once_that_report_to_loggers_miss_their_keys(tmp_path, capsys, caplog):
    stats, guard = ExpertStatsCallback(), NonFiniteGuardCallback()
    trainer = _trainer(tmp_path, ["tensorboard"], callbacks=[stats, guard])
    with caplog.at_level(logging.WARNING, logger="hf_moe"):
        trainer.train()
        trainer.train()  # a second run of the same callbacks (e.g. `train_with_rollback`) says nothing new
    warnings = [record.getMessage() for record in caplog.records if "add_moe_callbacks" in record.getMessage()]
    assert len(warnings) == 2, warnings  # one per callback
    assert "ExpertStatsCallback" in warnings[0] and "NonFiniteGuardCallback" in warnings[1]
    assert all("tensorboard" in message for message in warnings)
    # The keys still reach log_history, and the console stays readable.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(_per_layer_keys(logged[-1])) == NUM_LAYERS * (len(PER_LAYER_METRICS) + NUM_EXPERTS)
    assert "moe/nonfinite_skipped_steps" in logged[-1]
    printed = _printed_training_logs(capsys.readouterr().out)
    assert printed and all(_per_layer_keys(line) == set() and SUMMARY_KEYS <= line.keys() for line in printed)


def test_callbacks_passed_to_the_trainer_do_not_warn_without_report_to_loggers(tmp_path, caplog):
    trainer = _trainer(tmp_path, [], callbacks=[ExpertStatsCallback(), NonFiniteGuardCallback()])
    with caplog.at_level(logging.WARNING, logger="hf_moe"):
        trainer.train()
    assert "add_moe_callbacks" not in caplog.text
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(_per_layer_keys(logged[-1])) == NUM_LAYERS * (len(PER_LAYER_METRICS) + NUM_EXPERTS)


def test_the_balancing_gamma_is_recorded_for_the_card_and_not_printed(tmp_path, capsys):
    """The card reads what the run logged: the gamma sits in every `log_history` entry (trainer_state.json), not on
    the console nor in TensorBoard, where it would be a constant plotted as a metric."""
    from hf_moe.hub.training import write_training_card

    trainer = add_moe_callbacks(_trainer(tmp_path, ["tensorboard"], router_bias_update_rate=0.01),
                                AuxLossFreeBalancingCallback(update_rate=0.05), ExpertStatsCallback(heatmap=False))
    trainer.train()
    assert len(trainer.state.log_history) == 3  # two logging steps and the run's summary
    assert all(entry["moe/selection_bias_update_rate"] == 0.05 for entry in trainer.state.log_history)
    printed = _printed_training_logs(capsys.readouterr().out)
    assert len(printed) == 2 and not any("moe/selection_bias_update_rate" in line for line in printed)
    assert not {tag for tag in _tensorboard_scalar_tags(tmp_path) if "selection_bias" in tag}
    card = write_training_card(trainer).read_text()
    assert ("| load balancing | aux loss coef 0.01 (micro_batch); auxiliary-loss-free selection bias, updated every "
            "step (gamma 0.05) |") in card
