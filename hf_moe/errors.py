"""Errors a user can fix, and the one line the command line says about each.

The library raises ordinary exceptions with messages that name the field, the value and what is allowed; the
command line (`hf_moe.cli.main`) turns the expected ones into `hf-moe <command>: error: <message>` and exit status 2
through `user_message`. Everything else is a bug and keeps its traceback.
"""

from pathlib import Path

# Expected at the command line: invalid values (config validation, `UnsupportedCheckpointError`, argument
# dataclasses' `__post_init__`) are `ValueError`; missing or existing files, permissions and the Hub are `OSError`.
EXPECTED_ERRORS = (ValueError, OSError)


class UserError(Exception):
    """A request hf_moe cannot carry out as asked, with a message that says what to change.

    `report` (optional) is data the command line prints before the error line, e.g. the failed checks of a folder
    check: `raise UserError("2 of 9 checks failed", report=rows)`.
    """

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


class UnsupportedCheckpointError(ValueError):
    """The source is not a checkpoint hf_moe can read for this purpose; the message names what is supported."""


class OutputExistsError(UserError, FileExistsError):
    """The output folder exists and `overwrite` is False (nothing was written). The message names the library's
    `overwrite=True`; the command line says `--overwrite` instead (`user_message`)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        super().__init__(f"{output_dir} already exists; choose another folder or pass overwrite=True")


class HubUnreachableError(UserError, ConnectionError):
    """A Hub id was asked for, the Hub cannot be reached (no network or `HF_HUB_OFFLINE=1`) and it is not cached."""

    def __init__(self, repo_id: str | None = None):
        from huggingface_hub import constants

        what = f"'{repo_id}' is not a local folder nor" if repo_id else "the model is not"
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "no network"
        super().__init__(f"{what} in the local Hub cache, and the Hugging Face Hub cannot be reached ({reason}): "
                         "pass a local model folder, or download it once with network (later runs read the cache, "
                         "also with HF_HUB_OFFLINE=1)")
        self.repo_id = repo_id


def is_hub_unreachable(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) says the Hub could not be reached and nothing was cached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def user_message(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(error, OutputExistsError):
        return f"{error.output_dir} already exists; choose another output folder or pass --overwrite to replace it"
    if not isinstance(error, HubUnreachableError) and is_hub_unreachable(error):
        error = HubUnreachableError()
    if not isinstance(error, (UserError, *EXPECTED_ERRORS)):
        return None
    return " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message's layout
