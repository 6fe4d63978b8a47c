"""Atomic output folders: plain-mkdir permissions, and no staging folder left by a failure or a signal."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe.checkpoints.atomic import atomic_output_dir


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_output_folder_has_the_permissions_of_a_plain_mkdir(tmp_path, umask):
    previous = os.umask(umask)
    try:
        (tmp_path / "plain").mkdir()
        with atomic_output_dir(tmp_path / "atomic") as staging:
            (staging / "file.txt").write_text("x")
        with atomic_output_dir(tmp_path / "atomic", overwrite=True) as staging:
            (staging / "file.txt").write_text("y")
    finally:
        os.umask(previous)
    plain_mode = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "atomic").stat().st_mode == plain_mode
    assert oct(plain_mode & 0o777) == oct(0o777 & ~umask)
    assert _leftovers(tmp_path, "atomic") == ["atomic"]


INTERRUPTED_UPCYCLE = textwrap.dedent(
    """
    import sys, time
    from hf_moe import upcycle
    from hf_moe.checkpoints import safetensors_writer as writer

    original = writer.ShardedSafetensorsWriter.add
    def slow_add(self, name, tensor):
        original(self, name, tensor)
        if len(self.names) == 5:  # mid-way: shards written, the folder half full
            print("writing", flush=True)
            time.sleep(60)
    writer.ShardedSafetensorsWriter.add = slow_add
    upcycle(sys.argv[1], sys.argv[2], num_experts=4, max_shard_size="10KB")
    """
)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_upcycled_files_are_readable_like_plain_files(tiny_dense, tmp_path):
    """safetensors and the card's temporary file create 0o600 files; the finished folder must not keep that."""
    from hf_moe import upcycle

    previous = os.umask(0o022)
    try:
        folder = upcycle(str(tiny_dense), str(tmp_path / "moe"), num_experts=2)
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir()}
    assert {"model.safetensors", "README.md", "config.json"} <= set(modes)
    assert set(modes.values()) == {oct(0o644)}, modes


# SIGINT (KeyboardInterrupt) unwinds by itself and was checked the same way once; SIGTERM is the one that did not.
def test_sigterm_during_upcycling_leaves_no_staging_folder(tiny_dense, tmp_path):
    signum = signal.SIGTERM
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_UPCYCLE, str(tiny_dense), str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing", process.stderr.read()[-3000:]
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert staged and any(staged[0].iterdir())  # a half-written staging folder exists at this point
        process.send_signal(signum)
        returncode = process.wait(timeout=60)
    finally:
        process.kill()
    assert returncode == 128 + signal.SIGTERM  # SystemExit(143), the shell's convention for "terminated"
    assert _leftovers(tmp_path, "out") == []
