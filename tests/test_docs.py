"""Every script command shown in README.md and docs/*.md (```bash blocks) parses with that script's own parser.

A command may be too long to run here (80k iterations on 8 GPUs), but its options must exist and its values be
accepted, and its Accelerate config file must exist: a renamed flag or config then fails here, not in a user's
terminal. The demo, eval and test commands themselves are run by other tests and by .ci/run.
"""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPT = re.compile(r"^scripts/(\w+)\.py$")


def bash_lines(page: Path) -> list[str]:
    """The shell lines of the page's ```bash blocks, continuation lines joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in page.read_text().splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        if pending.count("'") % 2:  # inside a quoted multi-line argument (python -c '...'): keep it whole
            line = pending + raw
        else:
            line = pending + raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else pending
        pending = line[:-1] + " " if line.endswith("\\") else line + "\n" if line.count("'") % 2 else ""
        if not pending and line:
            lines.append(line)
    return lines


def script_commands(line: str) -> list[tuple[str, list[str], list[str]]]:
    """(script name, launcher arguments, script arguments) of each command in the line that runs scripts/X.py."""
    commands = []
    for part in re.split(r"\s*(?:&&|;|\|\|?)\s*", line):
        words = [w for w in shlex.split(part) if not re.match(r"^[A-Z_]+=", w)]  # VAR=value prefixes
        found = next((i for i, w in enumerate(words) if SCRIPT.match(w)), None)
        if found is None or not words or words[0] in ("...", "for", "do"):
            continue
        commands.append((SCRIPT.match(words[found]).group(1), words[:found], words[found + 1:]))
    return commands


COMMANDS = [(page.relative_to(REPO).as_posix(), *command) for page in PAGES for line in bash_lines(page)
            for command in script_commands(line)]


def test_the_pages_show_commands():
    # the extraction itself can fail: the README's demo and recipe commands must be among those found
    found = {(page, script) for page, script, _, _ in COMMANDS}
    assert {("README.md", "train"), ("README.md", "eval"), ("README.md", "benchmark")} <= found
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("page, script, launcher, arguments", COMMANDS,
                         ids=[f"{page}:{script}:{i}" for i, (page, script, _, _) in enumerate(COMMANDS)])
def test_a_shown_command_parses(load_script, page, script, launcher, arguments):
    if "--config_file" in launcher:
        config = launcher[launcher.index("--config_file") + 1]
        assert (REPO / config).is_file(), f"{page}: {config} does not exist"
    parser = load_script(script).get_args_parser()
    try:
        parser.parse_args(arguments)
    except SystemExit as exit_:
        pytest.fail(f"{page}: scripts/{script}.py {' '.join(arguments)}: argparse refused it (exit {exit_.code})")
