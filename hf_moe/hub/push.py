"""hf_moe's card on the transformers save and push paths.

- `model.save_pretrained(folder)` writes an hf_moe card when the folder has none;
- `model.push_to_hub(repo)` uploads an hf_moe card instead of transformers' generic one: the card of the folder the
  model was loaded from (with the images it shows), else one rendered from the config; a repo that already has an
  hf_moe card keeps it;
- `trainer.push_to_hub()` uploads the fine-tuned card instead of the Trainer's.

The first two are installed on the hf_moe model classes by `install_card_hooks()` (run with the first hf_moe config,
`hf_moe.auto`; the modeling files themselves know nothing of cards, so remote code without hf_moe keeps transformers'
card), the third on a Trainer by `use_training_card_on_push(trainer)`, called by whoever builds the Trainer (`hf-moe
finetune`'s `build_trainer`; hf_moe.training, which knows nothing of cards, does not).
"""

import functools
import shutil
from pathlib import Path

from huggingface_hub import ModelCard

from ..checkpoints.lineage import lineage_of
from .card import is_hf_moe_card, render_card, with_model_id, write_card
from .publish import referenced_files
from .training import write_training_card


def saved_card(model, model_name: str) -> ModelCard:
    """The card of a model saved from memory: architecture, lineage from where it was loaded."""
    return render_card("saved", model.config, model=model, model_name=model_name,
                       lineage=lineage_of(model.name_or_path or None))


def write_card_on_save(model, folder, repo_id: str | None = None) -> None:
    """Called after `save_pretrained` (repo_id None) and before a push uploads `folder` (transformers has just
    written its own README.md there)."""
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
    """Make this `trainer.push_to_hub()` write hf_moe's fine-tuned card (from what the run logged, see
    `write_training_card`).

    Example:
    ```python
    >>> trainer = add_moe_callbacks(Trainer(model=moe, args=args, train_dataset=ds), ExpertStatsCallback())
    >>> use_training_card_on_push(trainer)
    >>> trainer.train(); trainer.push_to_hub()
    ```

    `Trainer.push_to_hub` saves the model, then calls `self.create_model_card(model_name=..., **kwargs)`, which
    overwrites README.md with the Trainer's summary, then uploads `output_dir`. Replacing the method on this
    instance is the one way in (pinned by tests/test_hub.py::test_trainer_push_to_hub_uploads_the_hf_moe_card).
    """
    def create_model_card(tags=None, dataset=None, **_ignored):
        extra_tags = (tags,) if isinstance(tags, str) else tuple(tags or ())
        write_training_card(trainer, dataset=dataset if isinstance(dataset, str) else None, extra_tags=extra_tags)

    trainer.create_model_card = create_model_card


def install_card_hooks() -> None:
    """Run with the first hf_moe config (`hf_moe.auto`): the hf_moe model classes write hf_moe cards on save and push
    (idempotent)."""
    from ..modeling.modeling_hf_moe import MoePreTrainedModel

    if "_hf_moe_card_hooks" in vars(MoePreTrainedModel):
        return
    save_pretrained = MoePreTrainedModel.save_pretrained
    upload_modified_files = MoePreTrainedModel._upload_modified_files

    # Hook 1, `save_pretrained` (public): a folder saved from memory gets an hf_moe card when it has none.
    @functools.wraps(save_pretrained)
    def save_pretrained_with_card(self, save_directory, *args, **kwargs):
        result = save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_card_on_save(self, save_directory)
        return result

    # Hook 2, `PushToHubMixin._upload_modified_files` (private, transformers 5.23-5.24; pinned by
    # tests/test_hub.py::test_model_push_to_hub_uploads_the_hf_moe_card_and_code): both push paths (`push_to_hub`,
    # `save_pretrained(push_to_hub=True)`) write transformers' generic README.md after saving and just before this
    # upload step, and no public hook sits in between, so hf_moe's card replaces it here.
    @functools.wraps(upload_modified_files)
    def upload_with_card(self, working_dir, repo_id, *args, **kwargs):
        write_card_on_save(self, working_dir, repo_id=repo_id)
        return upload_modified_files(self, working_dir, repo_id, *args, **kwargs)

    MoePreTrainedModel.save_pretrained = save_pretrained_with_card
    MoePreTrainedModel._upload_modified_files = upload_with_card
    MoePreTrainedModel._hf_moe_card_hooks = True
