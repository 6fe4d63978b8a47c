"""hf_moe's card on the transformers save and push paths.

- `model.save_pretrained(folder)` writes an hf_moe card when the folder has none;
- `model.push_to_hub(repo)` uploads an hf_moe card instead of transformers' generic one: the card of the folder the
  model was loaded from (with the images it shows), else one rendered from the config; a repo that already has an
  hf_moe card keeps it;
- `trainer.push_to_hub()` with `ExpertStatsCallback` uploads the fine-tuned card instead of the Trainer's.

The first two go through `MoePreTrainedModel.model_card_writer` (modeling/, set by `import hf_moe`), the third through
`ExpertStatsCallback.on_push_begin`.
"""

import shutil
from pathlib import Path

from huggingface_hub import ModelCard

from .card import is_hf_moe_card, render_card, with_model_id, write_card
from .lineage import lineage_of
from .publish import referenced_files
from .training import write_training_card


def saved_card(model, model_name: str) -> ModelCard:
    """The card of a model saved from memory: architecture, lineage from where it was loaded."""
    return render_card("saved", model.config, model=model, model_name=model_name,
                       lineage=lineage_of(model.name_or_path or None))


def write_card_on_save(model, folder, repo_id: str | None = None) -> None:
    """`MoePreTrainedModel.model_card_writer`: called after `save_pretrained` (repo_id None) and before a push
    uploads `folder` (transformers has just written its own README.md there)."""
    folder = Path(folder)
    readme = folder / "README.md"
    if repo_id is None:
        if not readme.exists():
            write_card(folder, saved_card(model, folder.resolve().name))
        return
    if is_hf_moe_card(readme):  # the repo's own card, loaded by transformers: keep it (results, training)
        return
    pushed_tags = (ModelCard.load(readme).data.tags or []) if readme.exists() else []
    source = Path(model.name_or_path) if model.name_or_path else None
    if source is not None and is_hf_moe_card(source / "README.md"):
        card = ModelCard.load(source / "README.md")
        for image in referenced_files(card.text, source):
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / image, folder / image)
    else:
        card = saved_card(model, repo_id)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *pushed_tags]))
    write_card(folder, with_model_id(str(card), repo_id))


def use_training_card_on_push(trainer) -> None:
    """Make this `trainer.push_to_hub()` write hf_moe's fine-tuned card.

    `Trainer.push_to_hub` saves the model, then calls `self.create_model_card(model_name=..., **kwargs)`, which
    overwrites README.md with the Trainer's summary, then uploads `output_dir`. Replacing the method on this
    instance is the one way in (pinned by tests/test_hub.py::test_trainer_push_to_hub_uploads_the_hf_moe_card).
    """
    def create_model_card(tags=None, dataset=None, **_ignored):
        extra_tags = (tags,) if isinstance(tags, str) else tuple(tags or ())
        write_training_card(trainer, dataset=dataset if isinstance(dataset, str) else None, extra_tags=extra_tags)

    trainer.create_model_card = create_model_card


def register_model_card_writer() -> None:
    """Run by `import hf_moe`: the hf_moe model classes write hf_moe cards on save and push."""
    from ..modeling.modeling_hf_moe import MoePreTrainedModel

    MoePreTrainedModel.model_card_writer = write_card_on_save
