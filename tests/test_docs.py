"""The docs cannot drift: every shell and Python block of README.md and docs/*.md runs (docs/generalization.md is
generated, so it is left out), and no link leads outside the repository.

A block is marked by an HTML comment on the line before it:

    <!-- doc-test: skip (why) -->    not run; pytest reports the reason (`-rs` lists it)
    <!-- doc-test: parse (why) -->   each command line of a script of this repository is parsed by that script's
                                     own argument parser and not run, so a renamed or removed option still fails

Unmarked blocks run as written, in a scratch folder that links the repository's top-level entries. Shell blocks
run under bash with a `python` function that appends DOC_TEST_RECIPE_ARGS to `recipes/train.py`'s command lines
and DOC_TEST_EXAMPLE_ARGS to `examples/trainer_finetune.py`'s: later options win in argparse, so a run keeps
every documented option and only gets smaller (fewer samples, one epoch).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = {ROOT / "docs" / "generalization.md"}
DOCS = [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p not in GENERATED]
FENCE = re.compile(r"^```\s*(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(skip|parse)\s*\((.+)\)\s*-->\s*$")
LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "console": "shell", "python": "python"}
# what makes a run small; each is appended to its script's documented command line
SHRINK = {"DOC_TEST_RECIPE_ARGS": "--max-train-samples 128 --epochs 1 --no-progress",
          "DOC_TEST_EXAMPLE_ARGS": "--train-samples 128 --epochs 1"}
PRELUDE = """set -eo pipefail
python() {
  case "$1" in
    recipes/train.py) command python "$@" $DOC_TEST_RECIPE_ARGS ;;
    examples/trainer_finetune.py) command python "$@" $DOC_TEST_EXAMPLE_ARGS ;;
    *) command python "$@" ;;
  esac
}
"""
LAUNCHERS = {"accelerate", "torchrun"}
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    kind: str          # "shell" or "python"
    code: str
    mode: str          # "run", "parse" or "skip"
    reason: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The shell and Python blocks of one markdown file, each with the marker on the line before its fence."""
    lines, found, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = MARKER.match(lines[i - 1]) if i else None
        if fence[1] in LANGUAGES:
            found.append(Block(path, i + 1, LANGUAGES[fence[1]], "\n".join(lines[i + 1:end]) + "\n",
                               marker[1] if marker else "run", marker[2] if marker else ""))
        i = end + 1
    return found


ALL_BLOCKS = [block for path in DOCS for block in read_blocks(path)]


# ---- parse mode: command lines through their scripts' own parsers -----------------------------------------------

def command_lines(code: str) -> list[list[str]]:
    """Each simple command of a shell block as its words: continuations joined, comments dropped, split at
    `&&`, `||`, `;` and `|`."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        current = []
        for word in shlex.split(line, comments=True):
            if word in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def script_and_argv(words: list[str]) -> tuple[str, list[str]] | None:
    """(script, its arguments) for `python SCRIPT ...`, `accelerate launch ... SCRIPT ...`, `torchrun ...
    SCRIPT ...` and `python -m timm_mltp.launch ... SCRIPT ...`; None for other commands."""
    while words and (words[0] == "time" or re.match(r"^\w+=", words[0])):
        words = words[1:]
    if not words or not (words[0] in LAUNCHERS or words[0].startswith("python")):
        return None
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    if words[0].startswith("python") and words[1] == "-m" and not scripts:
        return f"-m {words[2]}", []
    return (words[scripts[0]], words[scripts[0] + 1:]) if scripts else None


@cache
def recipe():
    """recipes/train.py as a module (not run): its parse_args is what the recipe's main calls."""
    return runpy.run_path(str(ROOT / "recipes" / "train.py"), run_name="recipe_under_doc_test")


class Parsed(Exception):
    """Raised right after a script's command line parsed: the script does nothing more."""


def parse_with_own_parser(script: Path, argv: list[str]) -> None:
    """Run `script` as __main__ until its argument parser has parsed argv, then stop it."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise Parsed

    saved = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(script), *argv], [str(script.parent)]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv, sys.path[:] = saved
    pytest.fail(f"{script.relative_to(ROOT)} ended without parsing its command line")


def check_command(words: list[str]) -> bool:
    """Parse one command line with its script's parser; False when it names no script of this repository."""
    target = script_and_argv(words)
    if words[0] == "bash" and len(words) > 1:
        assert (ROOT / words[1]).is_file(), f"{words[1]} does not exist"
        return True
    if target is None:
        return False
    script, argv = target
    if script.startswith("-m "):
        assert importlib.util.find_spec(script[3:]) is not None, f"no module {script[3:]}"
    elif script == "recipes/train.py":
        check_recipe(argv)
    else:
        assert (ROOT / script).is_file(), f"{script} does not exist"
        parse_with_own_parser(ROOT / script, argv)
    return True


def check_recipe(argv: list[str]) -> None:
    """The recipe's own parse (timm's option table included), and a model timm knows."""
    import timm
    try:
        args = recipe()["parse_args"](argv)
    except SystemExit as e:       # --help
        assert e.code == 0, f"recipes/train.py {shlex.join(argv)}: exit {e.code}"
        return
    assert timm.is_model(args.model), f"timm knows no model {args.model!r}"


# ---- run mode --------------------------------------------------------------------------------------------------

def scratch_folder(tmp_path: Path) -> Path:
    """A folder where the docs' relative paths work (recipes/, examples/, ...) and outputs land outside the tree."""
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "output"}:
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", **SHRINK)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"   # this venv's python first
    return env


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    command = ["bash", "-c", PRELUDE + block.code] if block.kind == "shell" else [sys.executable, "-c", block.code]
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=900)


# ---- the tests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.name for b in ALL_BLOCKS])
def test_doc_block(block: Block, tmp_path: Path):
    if block.mode == "skip":
        pytest.skip(f"{block.name}: {block.reason}")
    if block.mode == "parse":
        assert block.kind == "shell", f"{block.name}: parse marks shell blocks only"
        checked = [check_command(words) for words in command_lines(block.code)]
        assert any(checked), f"{block.name}: no command line of this repository to parse; mark it skip"
        return
    done = run_block(block, scratch_folder(tmp_path))
    assert done.returncode == 0, (f"{block.name} exited with {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                                  f"\n--- stderr\n{done.stderr[-3000:]}")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_stay_inside_the_repository(path: Path):
    """Relative links resolve to files of the repository; nothing points at what a clone does not have."""
    text = path.read_text()
    assert "../shared" not in text and "SPEC.md" not in text, f"{path.name} points outside the repository"
    for target in LINK.findall(text):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{path.name}: broken link {target}"


def test_the_docs_have_blocks_of_every_mode():
    """The collection itself works: a marker that stopped matching would quietly turn into a run."""
    assert {b.mode for b in ALL_BLOCKS} == {"run", "parse", "skip"}
