"""Every ```python block of README.md and docs/*.md runs here, so the documentation cannot drift from the code.

Each block runs with `exec` in a fresh namespace, in a fresh temporary folder as the working directory, with one
intra-op thread. The test id names the file and the line of the opening fence (`docs/upcycling.md:42`) and a
traceback points at the failing line of the Markdown file. A block fails its test when it raises; nothing is skipped.

An HTML comment on the line right before the opening fence (invisible on GitHub) prepares what the block needs:

    <!-- doc-test: setup=tiny_llama,tiny_moe network -->

- `setup=NAME[,NAME...]` creates folders under the working directory that the block refers to (see `SETUPS`):
  `tiny_llama` -> `path/to/llama`, a tiny random Llama with a byte-level tokenizer and a chat template;
  `tiny_moe` -> `out/smol-moe`, that Llama upcycled into 4 experts, top-2, with its model card.
- `network`: the block talks to the Hub. The Hub is replaced at its network boundary by `tests/test_hub.py`'s
  `FakeHub` (create_repo / create_commit / the card download recorded into a folder, a fake token set), and the
  block must commit at least once.
- `compile`: the block calls `torch.compile` (directly or through `generate`'s `CompileConfig`). It runs with
  dynamo's full-graph capture and AOT autograd (`backend="aot_eager"`) instead of inductor, which needs about a
  minute per model on a 2-core CPU; a graph break still fails. tests/test_builtin_parity.py does the same.

Only `python` fences run; other languages (`bash`, `text`, `markdown`, ...) are shown, not run. A `>>>` prompt, a
`py` / `python3` / `pycon` fence or a marker this file does not know fails `test_docs_are_collected_and_markers_known`.
"""

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*doc-test:(?P<options>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<language>[^`\s]*)")
PYTHON_LIKE = {"py", "python3", "pycon", "ipython"}
SETUPS = {"tiny_llama": "path/to/llama", "tiny_moe": "out/smol-moe"}


@dataclass
class Block:
    document: str  # path relative to the repository root
    line: int  # line of the opening fence (1-based)
    language: str
    source: str
    setups: list[str] = field(default_factory=list)
    network: bool = False
    compile: bool = False
    marker_problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"


def _parse_marker(text: str, block: Block) -> None:
    for option in text.split():
        key, _, value = option.partition("=")
        if key == "setup" and value:
            for name in value.split(","):
                if name in SETUPS:
                    block.setups.append(name)
                else:
                    block.marker_problems.append(f"unknown setup {name!r} (known: {', '.join(SETUPS)})")
        elif option == "network":
            block.network = True
        elif option == "compile":
            block.compile = True
        else:
            block.marker_problems.append(f"unknown doc-test option {option!r}")


def collect_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the doc-test marker on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, start = opening["fence"], index
        body, index = [], index + 1
        while index < len(lines) and not lines[index].startswith(fence):
            body.append(lines[index])
            index += 1
        block = Block(path.relative_to(ROOT).as_posix(), start + 1, opening["language"].lower(), "\n".join(body) + "\n")
        marker = MARKER.match(lines[start - 1].strip()) if start > 0 else None
        if marker:
            _parse_marker(marker["options"], block)
        blocks.append(block)
        index += 1
    return blocks


ALL_BLOCKS = [block for document in DOCUMENTS for block in collect_blocks(document)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]


def test_docs_are_collected_and_markers_known():
    assert (ROOT / "docs").is_dir() and len(PYTHON_BLOCKS) >= len(DOCUMENTS) // 2
    problems = []
    for block in ALL_BLOCKS:
        problems += [f"{block.name}: {problem}" for problem in block.marker_problems]
        if block.language in PYTHON_LIKE:
            problems.append(f"{block.name}: fence language {block.language!r}; write ```python so the block runs")
        if (block.setups or block.network or block.compile) and block.language != "python":
            problems.append(f"{block.name}: a doc-test marker before a {block.language or 'plain'} block")
        if block.language == "python" and re.search(r"^\s*>>>", block.source, re.MULTILINE):
            problems.append(f"{block.name}: `>>>` prompt; write plain code")
    for document in DOCUMENTS:  # a marker applies only to the fence on the very next line
        lines = document.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if MARKER.match(line.strip()) and not (number < len(lines) and FENCE.match(lines[number])):
                problems.append(f"{document.relative_to(ROOT)}:{number}: doc-test marker not followed by a fence")
    assert not problems, "\n".join(problems)


DEFINED_TESTS = {name for path in (ROOT / "tests").glob("*.py")
                 for name in re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.MULTILINE)}


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file (outside code blocks)."""
    anchors, fence = set(), None
    for line in path.read_text(encoding="utf-8").splitlines():
        opening = FENCE.match(line)
        if opening and (fence is None or line.startswith(fence)):
            fence = opening["fence"] if fence is None else None
        elif fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return anchors


def test_links_and_named_tests_exist_and_no_package_index_is_linked():
    problems = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (document.parent / target) if target else document
            if not path.exists():
                problems.append(f"{document.relative_to(ROOT)}: broken link {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                problems.append(f"{document.relative_to(ROOT)}: no heading #{anchor} in {target or 'this page'}")
        if "pypi.org" in text:
            problems.append(f"{document.relative_to(ROOT)}: links to PyPI")
        for test_file in set(re.findall(r"tests/\w+\.py", text)):
            if not (ROOT / test_file).is_file():
                problems.append(f"{document.relative_to(ROOT)}: names {test_file}, which does not exist")
        for test_name in set(re.findall(r"::(test_\w+)", text)):
            if test_name not in DEFINED_TESTS:
                problems.append(f"{document.relative_to(ROOT)}: names the test {test_name}, which does not exist")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------------- setups
@pytest.fixture(scope="session")
def doc_assets(tmp_path_factory):
    """The folders of SETUPS, built once per session and copied into each block's working directory."""
    from hf_moe import upcycle

    from .conftest import save_tiny_dense

    root = tmp_path_factory.mktemp("doc_assets")
    save_tiny_dense(root / "tiny_llama")
    upcycle(str(root / "tiny_llama"), str(root / "tiny_moe"), num_experts=4, top_k=2)
    return root


def _compile_with_aot_eager(monkeypatch) -> None:
    compile_for_real = torch.compile

    def compile_with_aot_eager(model=None, **options):
        options.pop("mode", None)
        options.pop("options", None)
        return compile_for_real(model, **{**options, "backend": "aot_eager"})

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)


def _run(block: Block) -> None:
    """Exec the block; its code sits at its own line numbers, so a traceback points into the Markdown file."""
    padded = "\n" * block.line + block.source
    exec(compile(padded, str(ROOT / block.document), "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.name for block in PYTHON_BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch, doc_assets):
    workdir = tmp_path / "work"
    workdir.mkdir()
    for name in block.setups:
        shutil.copytree(doc_assets / name, workdir / SETUPS[name])
    monkeypatch.chdir(workdir)
    hub = None
    if block.network:
        from .test_hub import FakeHub

        hub = FakeHub(tmp_path / "hub")
        hub.install(monkeypatch)
    if block.compile:
        _compile_with_aot_eager(monkeypatch)
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread hand-offs cost more
    # than the arithmetic (100x on a loaded CI machine); fresh processes a block starts inherit the setting.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(block)
    finally:
        torch.set_num_threads(threads)
    if hub is not None:
        assert hub.commits, f"{block.name} is marked `network` but committed nothing to the Hub"
