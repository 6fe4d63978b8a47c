"""`MoeGRPOTrainer` under TRL 1.16: routing replay in real GRPO steps.

The routers' outputs are read by the test's own forward hooks (registered after the trainer's, so they see what the
experts received) in the loss forwards, and compared, row by row of the shuffled micro-batch, with the routing the
batch was generated / first scored with: R3 routes every recorded completion token as the rollout, R2 as the first
policy forward; without replay the policy's step between two iterations changes the routing, and the logged
mismatch says so. Refusals, hf_moe's own loss terms, and a model trained with replay saving, loading and exporting.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_moe.export import export
from hf_moe.moe_layers import find_moe_layers
from hf_moe.routing import ExpertChoiceNotReplayable
from hf_moe.training.grpo import MoeGRPOConfig, MoeGRPOTrainer

from .conftest import byte_tokenizer, tiny_config
from .test_builtin_moe import FAMILIES
from .test_moe_layers import _randomise_routers

PROMPTS = ["the cat", "a dog sat on", "experts", "hi there"]


def _reward(completions, **kwargs):
    return [float(completion.count("a")) for completion in completions]


def _model(family, tokenizer):
    if family.startswith("hf_"):
        config = tiny_config(family, vocab_size=len(tokenizer), num_hidden_layers=2, router_jitter_noise=0.0)
    else:
        config = FAMILIES[family]()
        config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _randomise_routers(model)
    return model


def _trainer(tmp_path, family="hf_moe", routing_replay=None, num_iterations=2, max_steps=2, **overrides):
    tokenizer = byte_tokenizer()
    args = MoeGRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=max_steps, per_device_train_batch_size=4,
                         num_generations=4, max_completion_length=8, num_iterations=num_iterations,
                         learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         bf16=False,
                         routing_replay=routing_replay, **overrides)
    return MoeGRPOTrainer(model=_model(family, tokenizer), reward_funcs=_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)


class _LossForwardRouting:
    """The experts each router sent each row to in the forwards that train (grad enabled), and the batches the
    trainer generated and scored (its `_generate_and_score_completions` outputs)."""

    def __init__(self, trainer):
        self.layers = find_moe_layers(trainer.model)
        self.forwards, self.batches, self._current = [], [], None
        stack = trainer.model.get_submodule(self.layers[0].router_name.split(".layers.")[0])
        stack.register_forward_pre_hook(self._start, with_kwargs=True)
        for position, layer in enumerate(self.layers):
            layer.router.register_forward_hook(lambda module, args, output, position=position:
                                               self._routed(position, output))
        generate_and_score = trainer._generate_and_score_completions

        def spy(inputs):
            output = generate_and_score(inputs)
            self.batches.append({key: value.clone() for key, value in output.items()
                                 if isinstance(value, torch.Tensor)})
            return output

        trainer._generate_and_score_completions = spy

    def _start(self, module, args, kwargs):
        self._current = None
        if torch.is_grad_enabled():
            self._current = {"input_ids": kwargs["input_ids"].clone(), "experts": {}}
            self.forwards.append(self._current)

    def _routed(self, position, output):
        if self._current is not None and position not in self._current["experts"]:
            batch, length = self._current["input_ids"].shape
            self._current["experts"][position] = output[2].reshape(batch, length, -1).sort(-1).values

    def compare(self, source_key: str):
        """Per loss forward: (completion tokens the source recorded, tokens routed as the source in every layer)."""
        results = []
        for forward in self.forwards:
            batch = next(b for b in self.batches if any(
                torch.equal(torch.cat([b["prompt_ids"], b["completion_ids"]], 1)[0], row)
                for row in forward["input_ids"]))
            sequences = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
            prompt_length = batch["prompt_ids"].shape[1]
            recorded = same = 0
            for row, ids in enumerate(forward["input_ids"]):
                source_row = next(index for index in range(len(sequences)) if torch.equal(sequences[index], ids))
                source = batch[source_key][source_row].long()  # (layers, seq, rows per token, k)
                completion = batch["completion_mask"][source_row].bool()
                for offset in torch.nonzero(completion).flatten().tolist():
                    position = prompt_length + offset
                    if (source[:, position] < 0).any():
                        continue  # the last generated token: no rollout forward routed it
                    recorded += 1
                    same += all(torch.equal(forward["experts"][layer][row, position],
                                            source[layer, position].reshape(-1).sort().values)
                                for layer in range(len(self.layers)))
            results.append((recorded, same))
        return results


@pytest.mark.parametrize("family", ["hf_moe", "deepseek_v3"])
def test_rollout_replay_routes_every_loss_forward_as_the_rollout(family, tmp_path):
    trainer = _trainer(tmp_path, family, routing_replay="rollout")
    spy = _LossForwardRouting(trainer)
    trainer.train()
    results = spy.compare("rollout_routing")
    assert len(results) == 2  # one batch, optimised twice (num_iterations=2): one step each
    assert all(recorded > 0 and same == recorded for recorded, same in results), results
    logged = [entry for entry in trainer.state.log_history if "moe/routing_mismatch" in entry]
    assert [entry["moe/routing_mismatch"] for entry in logged] == [0.0, 0.0]
    assert all(entry["moe/replayed_tokens"] > 0.8 for entry in logged)


def test_without_replay_the_second_iteration_routes_otherwise_and_the_mismatch_is_logged(tmp_path):
    trainer = _trainer(tmp_path, "hf_moe", routing_replay=None)
    spy = _LossForwardRouting(trainer)
    trainer.train()
    results = spy.compare("rollout_routing")
    first_iteration, second_iteration = results[0], results[1]
    assert first_iteration[0] == first_iteration[1]  # same weights, fp32: the full forward routes as the rollout
    assert second_iteration[1] < second_iteration[0]  # after a step on the batch: some tokens go elsewhere
    logged = [entry["moe/routing_mismatch"] for entry in trainer.state.log_history if "moe/routing_mismatch" in entry]
    assert max(logged) > 0
    assert not any("moe/replayed_tokens" in entry for entry in trainer.state.log_history)


def test_first_step_replay_routes_later_iterations_as_the_first_policy_forward(tmp_path):
    trainer = _trainer(tmp_path, "hf_moe", routing_replay="first_step")
    spy = _LossForwardRouting(trainer)
    trainer.train()
    assert all("replay_routing" in batch for batch in spy.batches)
    results = spy.compare("replay_routing")
    assert all(recorded > 0 and same == recorded for recorded, same in results), results


def test_hf_moe_loss_carries_its_router_terms_under_replay(tmp_path):
    trainer = _trainer(tmp_path, "hf_moe", routing_replay="rollout", max_steps=1, num_iterations=1)
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["aux_loss"] > 0 and entry["z_loss"] > 0
    assert not trainer.model.config.output_router_logits


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="routing_replay.*'rollout'.*'first_step'"):
        MoeGRPOConfig(output_dir=str(tmp_path), use_cpu=True, routing_replay="always")
    tokenizer = byte_tokenizer()
    expert_choice = AutoModelForCausalLM.from_config(
        tiny_config("hf_moe", vocab_size=len(tokenizer), router_type="expert_choice"))
    args = MoeGRPOConfig(output_dir=str(tmp_path / "ec"), max_steps=1, per_device_train_batch_size=4,
                         num_generations=4, max_completion_length=4, report_to=[], use_cpu=True,
                         routing_replay="rollout")
    with pytest.raises(ExpertChoiceNotReplayable, match="expert choice"):
        MoeGRPOTrainer(model=expert_choice, reward_funcs=_reward, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    args.routing_replay = None  # plain GRPO: expert choice trains, nothing recorded
    trainer = MoeGRPOTrainer(model=expert_choice, reward_funcs=_reward, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    assert not any("moe/routing_mismatch" in entry for entry in trainer.state.log_history)


def test_a_model_trained_with_replay_saves_loads_and_exports(tmp_path):
    trainer = _trainer(tmp_path, "hf_moe", routing_replay="rollout", max_steps=1, num_iterations=1)
    trainer.train()
    folder = tmp_path / "trained"
    trainer.save_model(str(folder))
    ids = torch.randint(5, 200, (2, 9))
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert (loaded(input_ids=ids).logits - expected).abs().max() < 1e-5
        exported = AutoModelForCausalLM.from_pretrained(export(str(folder), str(tmp_path / "native"))).eval()
        assert type(exported).__name__ == "MixtralForCausalLM"
        assert (exported(input_ids=ids).logits - expected).abs().max() < 1e-4


class _StandInVllmEngine:
    """Plays TRL's colocated vLLM engine (`llm.generate`): another engine that routes otherwise (a copy of the policy
    with perturbed routers) and returns, per request, vLLM 0.21's split layout: `prompt_routed_experts` int16
    [prompt, sparse layers, k] and `outputs[0].routed_experts` int16 [generated - 1, sparse layers, k] (the last
    token is never forwarded), read by this class's own router hooks."""

    def __init__(self, policy, max_new_tokens=6):
        import copy

        self.model = copy.deepcopy(policy).eval()
        self.model.__dict__.pop("forward", None)  # the trainer's forward wrapper would call the policy itself
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for layer in find_moe_layers(self.model):
                layer.router.weight.add_(torch.randn(layer.router.weight.shape, generator=generator))
        self.max_new_tokens = max_new_tokens
        self.routed = {}  # prompt + completion tokens -> (sequence positions routed, sparse layers, k)

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        from types import SimpleNamespace

        import numpy as np

        outputs = []
        for prompt in prompts:
            calls = []
            handles = [layer.router.register_forward_hook(
                lambda module, args, output, position=position, calls=calls:
                calls.append((position, output[2].clone())))
                for position, layer in enumerate(find_moe_layers(self.model))]
            with torch.no_grad():
                sequence = self.model.generate(torch.tensor([prompt["prompt_token_ids"]]), do_sample=False,
                                               max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens)
            for handle in handles:
                handle.remove()
            layers = len(find_moe_layers(self.model))
            steps = [torch.stack([index for _, index in calls[start:start + layers]], 1)  # (tokens, layers, k)
                     for start in range(0, len(calls), layers)]
            routed = torch.cat(steps).numpy().astype(np.int16)
            prompt_length = len(prompt["prompt_token_ids"])
            completion = sequence[0, prompt_length:].tolist()
            self.routed[tuple(sequence[0].tolist())] = routed
            outputs.append(SimpleNamespace(
                prompt_token_ids=prompt["prompt_token_ids"], prompt_routed_experts=routed[:prompt_length],
                outputs=[SimpleNamespace(token_ids=completion, routed_experts=routed[prompt_length:],
                                         logprobs=[{token: SimpleNamespace(logprob=0.0)} for token in completion])]))
        return outputs


class _StandInVllmGeneration:
    """TRL's `VLLMGeneration` around the stand-in engine: `generate` returns what TRL's does."""

    def __init__(self, engine):
        self.llm = engine

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts])
        completions = [output.outputs[0].token_ids for output in outputs]
        logprobs = [[[0.0] for _ in completion] for completion in completions]
        return prompts, completions, logprobs, [[[token] for token in completion] for completion in completions]


def test_rollout_replay_of_vllm_rollouts_routes_the_loss_forward_as_the_engine_did(tmp_path):
    """The colocated-vLLM path, with a stand-in engine returning vLLM's documented payload (vLLM itself needs a
    GPU): the routing the engine reports is ingested, laid out as TRL lays out the batch, and replayed."""
    trainer = _trainer(tmp_path, "hf_moe", routing_replay="rollout", num_iterations=1, max_steps=1)
    engine = _StandInVllmEngine(trainer.model)
    trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, "colocate", -1
    trainer.vllm_importance_sampling_correction = False
    trainer.vllm_generation = _StandInVllmGeneration(engine)
    trainer.keep_vllm_outputs()
    forwards = []
    stack = trainer.model.get_submodule("model")
    stack.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        {"input_ids": kwargs["input_ids"], "mask": kwargs["attention_mask"], "experts": []})
        if torch.is_grad_enabled() else None, with_kwargs=True)
    for layer in find_moe_layers(trainer.model):
        layer.router.register_forward_hook(lambda module, args, output: forwards[-1]["experts"].append(output[2])
                                           if torch.is_grad_enabled() else None)
    trainer.train()
    (forward,) = forwards
    batch, length = forward["input_ids"].shape
    checked = differs_from_policy = 0
    for row in range(batch):
        real = torch.nonzero(forward["mask"][row]).flatten()
        routed = torch.from_numpy(engine.routed[tuple(forward["input_ids"][row, real].tolist())]).long()
        for token, position in enumerate(real[:-1].tolist()):  # the last token: never forwarded by the engine
            # (GRPO checkpoints activations: the backward's recomputation routes again, after these)
            for layer, experts in enumerate(forward["experts"][:len(find_moe_layers(trainer.model))]):
                used = experts.reshape(batch, length, -1)[row, position].sort().values
                assert torch.equal(used, routed[token, layer].sort().values), (row, position, layer)
                checked += 1
    assert checked > 0
    layers = len(find_moe_layers(trainer.model))  # the backward's recomputation (last layer first) replayed too
    assert len(forward["experts"]) == 2 * layers
    assert all(torch.equal(first, again) for first, again in zip(forward["experts"][:layers],
                                                                 forward["experts"][layers:][::-1], strict=True))
    with torch.no_grad():  # the engine's choices are not the policy's: the replay is what made them equal
        from hf_moe.routing import record_routing

        with record_routing(trainer.model) as recorder:
            trainer.model(input_ids=forward["input_ids"], attention_mask=forward["mask"])
    for row in range(batch):
        real = torch.nonzero(forward["mask"][row]).flatten()
        routed = torch.from_numpy(engine.routed[tuple(forward["input_ids"][row, real].tolist())]).long()
        own = recorder.trace.experts[row, :, real[:-1], 0].sort(-1).values  # (layers, tokens, k)
        differs_from_policy += int((own != routed.transpose(0, 1).sort(-1).values).any(-1).any(0).sum())
    assert differs_from_policy > 0


def test_rollout_replay_routes_the_reference_model_too_so_the_first_kl_is_zero(tmp_path):
    """With `beta` > 0 TRL scores a separate reference model; under R3 it routes as the rollout, as the policy does,
    so that the KL term measures the policies and not routing noise (bf16 autocast: the rollout's cached steps and
    the full forwards round differently)."""
    tokenizer = byte_tokenizer()
    folder = tmp_path / "policy"
    _model("hf_moe", tokenizer).save_pretrained(folder)
    args = MoeGRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=8,
                         num_generations=4, max_completion_length=12, num_iterations=1, beta=0.04,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         routing_replay="rollout")  # bf16 (GRPOConfig's default)
    trainer = MoeGRPOTrainer(model=str(folder), reward_funcs=_reward, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}))
    assert trainer.ref_model is not None
    spy = _LossForwardRouting(trainer)
    reference = []
    for position, layer in enumerate(find_moe_layers(trainer.ref_model)):
        layer.router.register_forward_hook(lambda module, args, output, position=position: reference.append(
            (position, output[2])))
    trainer.train()
    batch = spy.batches[0]
    sequences = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    rollout = batch["rollout_routing"].long()  # (batch, layers, seq, 1, k)
    routed = {position: index for position, index in reference}  # one call per layer: TRL's batch in one chunk
    prompt_length, compared = batch["prompt_ids"].shape[1], 0
    for layer, index in routed.items():
        index = index.reshape(*sequences.shape, -1).sort(-1).values
        for row in range(sequences.shape[0]):
            for position in range(prompt_length, sequences.shape[1]):
                traced = rollout[row, layer, position, 0]
                if batch["completion_mask"][row, position - prompt_length] and (traced >= 0).all():
                    assert torch.equal(index[row, position], traced.sort().values)
                    compared += 1
    assert compared > 0
    (logged,) = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logged["kl"] == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_first_step_records_the_policys_old_log_probs_never_peft_s_reference(beta, tmp_path):
    """With a peft policy TRL scores the reference as the policy with its adapters off. R2 records the old-log-prob
    forward only (TRL scores it when the batch is optimised more than once): with a single pass nothing is recorded
    and nothing replayed, whatever `beta`; with two passes the later one replays the first."""
    from peft import LoraConfig

    replayed = {}
    for passes in (1, 2):
        tokenizer = byte_tokenizer()
        args = MoeGRPOConfig(output_dir=str(tmp_path / f"grpo{passes}"), max_steps=passes,
                             per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                             num_iterations=passes, beta=beta, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=False,
                             routing_replay="first_step")
        trainer = MoeGRPOTrainer(model=_model("hf_moe", tokenizer), reward_funcs=_reward, args=args,
                                 processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                                 peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer.train()
        replayed[passes] = [entry["moe/replayed_tokens"] for entry in trainer.state.log_history
                            if "moe/replayed_tokens" in entry]
    assert replayed[1] == [0.0]
    assert replayed[2] == [1.0, 1.0]
