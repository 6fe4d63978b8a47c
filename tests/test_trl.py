"""TRL 1.16's SFTTrainer / DPOTrainer on hf_moe models: the optimised and logged loss is the model's own
(`lm_loss + aux_coef * aux_loss + z_coef * z_loss`), padded MH-MoE batches train, the saved config is unchanged,
and the expert statistics work."""

import json

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_moe.training import ExpertStatsCallback, add_moe_callbacks, find_moe_layers
from hf_moe.training.trl import MoeDPOTrainer, MoeSFTTrainer

from .conftest import byte_tokenizer, tiny_config

TEXTS = ["the cat sat on the mat", "a", "experts route tokens", "mixture of experts layers, sparsely",
         "hi", "load balancing matters", "z-loss keeps logits small", "ok"]  # unequal lengths: padded batches


def _model(model_type):
    tokenizer = byte_tokenizer()
    config = tiny_config(model_type, vocab_size=len(tokenizer), router_jitter_noise=0.0, router_aux_loss_coef=0.1,
                         router_z_loss_coef=0.01, num_hidden_layers=2)
    return AutoModelForCausalLM.from_config(config), tokenizer


def _sft_args(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=64, seed=0)
    return trl.SFTConfig(**{**fields, **overrides})


def _sft_trainer(trainer_class, model_type, tmp_path, **overrides):
    model, tokenizer = _model(model_type)
    return trainer_class(model=model, args=_sft_args(tmp_path, **overrides), processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": TEXTS}))


def _padded_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    return {key: value for key, value in batch.items()}


def test_stock_sft_trainer_mistrains_hf_moe_models(tmp_path):
    """Why MoeSFTTrainer exists (TRL 1.16): Mixtral's aux loss on hf_moe is k times the model's, z-loss dropped,
    MH-MoE fails on padded batches, and `output_router_logits=True` lands in the config."""
    trainer = _sft_trainer(trl.SFTTrainer, "hf_moe", tmp_path)
    assert trainer.model.config.output_router_logits is True
    batch = _padded_batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        own = trainer.model(**{k: v for k, v in batch.items()}).loss.item()
        stock = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert abs(stock - own) > 1e-3
    mh = _sft_trainer(trl.SFTTrainer, "hf_mh_moe", tmp_path)
    with pytest.raises(RuntimeError):
        mh.compute_loss(mh.model, _padded_batch(mh))


@pytest.mark.parametrize("model_type", ["hf_moe", "hf_switch", "hf_mh_moe"])
def test_sft_loss_is_the_models_own_loss_and_training_keeps_the_config(model_type, tmp_path):
    trainer = add_moe_callbacks(_sft_trainer(MoeSFTTrainer, model_type, tmp_path), ExpertStatsCallback())
    model = trainer.model.train()
    assert model.config.output_router_logits is False
    batch = _padded_batch(trainer)
    labels = int((batch["labels"][:, 1:] != -100).sum())
    for num_items in (None, 2 * labels):  # alone, and as one of two micro-batches of an accumulated step
        with torch.no_grad():
            own = model(**batch, num_items_in_batch=num_items)
            trl_loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        assert own.aux_loss.item() > 0.5 and own.z_loss.item() > 0  # both terms present and not negligible
        assert (own.loss - own.lm_loss).abs().item() > 1e-2
        assert trl_loss.item() == pytest.approx(own.loss.item(), abs=1e-5)

    trainer.train()  # padded batches, ExpertStatsCallback under TRL
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    layer = find_moe_layers(model)[-1].index  # (Switch: every other layer is sparse)
    assert {"aux_loss", "z_loss", "moe/aux_loss", f"moe/layer{layer}/expert0_fraction"} <= set(logged[-1])
    fractions = [logged[-1][f"moe/layer{layer}/expert{e}_fraction"] for e in range(4)]
    assert sum(fractions) == pytest.approx(1.0)
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["output_router_logits"] is False and saved["router_aux_loss_coef"] == 0.1


def test_dpo_adds_the_models_aux_terms_and_trains_padded_mh_moe(tmp_path):
    model, tokenizer = _model("hf_mh_moe")
    reference, _ = _model("hf_mh_moe")
    reference.load_state_dict(model.state_dict())
    pairs = Dataset.from_dict({"prompt": ["say a", "name a layer", "hi", "route"],
                               "chosen": [" a", " the mixture of experts layer", " hello there", " top-k"],
                               "rejected": [" b", " none", " bye", " random routing everywhere"]})
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = MoeDPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                            train_dataset=pairs)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()
    model.train()
    with torch.no_grad():
        with_terms = trainer.compute_loss(model, dict(batch)).item()
        trainer.moe_aux_coef = model.config.router_z_loss_coef = 0.0
        without = trainer.compute_loss(model, dict(batch)).item()
        trainer.moe_aux_coef, model.config.router_z_loss_coef = 0.1, 0.01
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True)
    import hf_moe

    aux = hf_moe.load_balancing_loss(own.router_logits, 2, batch["attention_mask"], 2)
    z = hf_moe.router_z_loss(own.router_logits, batch["attention_mask"], 2)
    assert with_terms - without == pytest.approx((0.1 * aux + 0.01 * z).item(), abs=1e-5)
    trainer.train()
    assert {"aux_loss", "z_loss"} <= set(trainer.state.log_history[0])
    assert model.config.output_router_logits is False


def test_sft_padding_free_sequence_loss_counts_each_document(tmp_path):
    """A padding-free batch is one row with `position_ids` restarting per document and no attention mask: the
    sequence-wise term counts each document, as the padded batch of the same documents does."""
    tokenizer = byte_tokenizer()
    # Peaked routing (wide init): the documents' loads differ clearly from the packed row's.
    config = tiny_config("hf_moe", vocab_size=len(tokenizer), router_jitter_noise=0.0, num_hidden_layers=2,
                         router_sequence_aux_loss_coef=0.5, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config)
    trainers = {}
    for name, options in (("padded", {}), ("free", dict(padding_free=True, max_length=None))):
        copy = AutoModelForCausalLM.from_config(config)
        copy.load_state_dict(model.state_dict())
        trainers[name] = MoeSFTTrainer(model=copy, args=_sft_args(tmp_path, **options), processing_class=tokenizer,
                                       train_dataset=Dataset.from_dict({"text": TEXTS}))
    padded = _padded_batch(trainers["padded"])
    free = dict(next(iter(trainers["free"].get_train_dataloader())))
    assert "attention_mask" not in free and free["input_ids"].shape[0] == 1
    assert int((free["position_ids"] == 0).sum()) == padded["input_ids"].shape[0] == 4  # the same four documents
    sequence = {}
    for name, batch in (("padded", padded), ("free", free)):
        trainer = trainers[name]
        trainer.model.train()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
        sequence[name] = trainer._metrics["train"]["sequence_aux_loss"][-1]
    assert sequence["free"] == pytest.approx(sequence["padded"], abs=1e-5)
    with torch.no_grad():
        own = trainers["free"].model(input_ids=free["input_ids"], position_ids=free["position_ids"], use_cache=False,
                                     output_router_logits=True)
    import hf_moe

    one_sequence = hf_moe.sequence_balance_loss(own.router_logits, 2, 1)  # the packed row taken as one sequence
    assert abs(one_sequence.item() - sequence["padded"]) > 1e-3


def test_sft_sequence_loss_counts_the_rows_of_a_batch_without_attention_mask(tmp_path):
    tokenizer = byte_tokenizer()
    config = tiny_config("hf_moe", vocab_size=len(tokenizer), router_jitter_noise=0.0, num_hidden_layers=2,
                         router_sequence_aux_loss_coef=0.5, initializer_range=0.2)
    trainer = MoeSFTTrainer(model=AutoModelForCausalLM.from_config(config), args=_sft_args(tmp_path),
                            processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS}))
    ids = torch.randint(5, len(tokenizer), (4, 12))  # four equal-length rows, position ids and no mask
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).expand(4, 12)}
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
        own = trainer.model(**batch)
    assert trainer._metrics["train"]["sequence_aux_loss"][-1] == pytest.approx(own.sequence_aux_loss.item(), abs=1e-6)
