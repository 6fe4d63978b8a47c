"""Shared fixtures: tiny random configs of the three architectures (CPU, float32, fast)."""

import pytest
import torch

import hf_moe  # noqa: F401  (registers the Auto classes)
from hf_moe import MHMoeConfig, MoeConfig, SwitchConfig

TINY_DECODER = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(model_type: str, **overrides):
    """A tiny random config of `model_type` ('hf_moe', 'hf_switch' or 'hf_mh_moe')."""
    fields = dict(TINY_DECODER, num_experts=4)
    if model_type == "hf_moe":
        fields.update(num_experts_per_tok=2)
        return MoeConfig(**{**fields, **overrides})
    if model_type == "hf_switch":
        return SwitchConfig(**{**fields, **overrides})
    fields.update(num_experts_per_tok=2, num_moe_heads=2, moe_intermediate_size=24)
    return MHMoeConfig(**{**fields, **overrides})


def finetune_arguments(**fields):
    """(FinetuneArguments, FinetuneTrainingArguments) of `hf-moe finetune` from one flat set of options."""
    from hf_moe.recipes import FinetuneArguments, FinetuneTrainingArguments

    own = {name: fields.pop(name) for name in list(fields) if name in FinetuneArguments.__dataclass_fields__}
    return FinetuneArguments(**own), FinetuneTrainingArguments(**fields)


MODEL_TYPES = ["hf_moe", "hf_switch", "hf_mh_moe"]


@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) with a chat template: real text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>",
                                                          *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_dense(folder):
    """A tiny random Llama with the byte tokenizer, saved at `folder` (a fixed seed: the same model every time)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_upcycled(tmp_path_factory):
    """A tiny random Llama with a byte tokenizer, upcycled into a 4-expert top-2 hf_moe folder."""
    from hf_moe import upcycle

    root = tmp_path_factory.mktemp("tiny_upcycled")
    return upcycle(str(save_tiny_dense(root / "dense")), str(root / "moe"), num_experts=4, top_k=2)


def tiny_sft_trainer(model, tokenizer, tmp_path, *callbacks):
    """MoeSFTTrainer on eight short texts of different lengths (padded batches of 4), 2 steps, with `callbacks` added
    through `add_moe_callbacks`."""
    import trl
    from datasets import Dataset

    from hf_moe.training import add_moe_callbacks
    from hf_moe.training.trl import MoeSFTTrainer

    texts = ["the cat sat on the mat", "a", "experts route tokens", "hi", "load balancing", "ok", "z", "mixture"]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         max_length=64, seed=0)
    return add_moe_callbacks(MoeSFTTrainer(model=model, args=args, processing_class=tokenizer,
                                           train_dataset=Dataset.from_dict({"text": texts})), *callbacks)
