"""The README and docs/: a README a reader finishes, links that lead somewhere, and commands that still exist.

    python -m pytest tests/test_docs.py -q

Reads the markdown files only: no network, no subprocess.
"""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
README = PROJECT_DIR / "README.md"
PAGES = [README, *sorted((PROJECT_DIR / "docs").glob("*.md"))]
README_MAX_BYTES = 12_000  # issue 21: a README read to the end; everything else has its page under docs/

# Programs a page may show whose commands this test does not check: outside tools and shell built-ins.
EXTERNAL_PROGRAMS = {"az", "pf", "pip", "git", "cp", "cd", "curl", "export", "source", "mlflow", "torchrun",
                     "wc", "ls", "cat", "rm", "mkdir", "sudo", "apt-get", "chromium", "sh",
                     "farm-bench"}

FENCE = re.compile(r"^[ \t]*(```+|~~~+)([^\n]*)\n(.*?)^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def page_id(page):
    """The page as a test id: README.md, docs/x.md."""
    return str(page.relative_to(PROJECT_DIR))


def fenced_blocks(text):
    """(language, body) of each fenced code block."""
    return [(match.group(2).strip().lower(), match.group(3)) for match in FENCE.finditer(text)]


def prose(text):
    """The text without its fenced code blocks (links and inline commands there are examples, not the page's)."""
    return FENCE.sub("", text)


def github_slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens and spaces kept), spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown_file):
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen = {}
    for line in prose(markdown_file.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            yield slug if count == 0 else f"{slug}-{count}"


def exists(relative_path):
    """A path of the repository exists, or will once issue 21's branches are merged."""
    relative_path = relative_path.strip("/").removeprefix("./")
    return (PROJECT_DIR / relative_path).exists()


def relative_links(page):
    """(target, anchor) of each relative link of a page, in its prose."""
    for match in LINK.finditer(prose(page.read_text(encoding="utf-8"))):
        url = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.IGNORECASE):  # http:, https:, mailto:
            continue
        target, _, anchor = url.partition("#")
        yield target, anchor


def link_problems(page):
    """Each relative link of a page that leads nowhere: a missing file or a missing heading."""
    problems = []
    for target, anchor in relative_links(page):
        path = (page.parent / target).resolve() if target else page
        relative = path.relative_to(PROJECT_DIR).as_posix() if path.is_relative_to(PROJECT_DIR) else str(path)
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and path.exists() and anchor not in set(anchors(path)):
            problems.append(f"{target}#{anchor}: no such heading in {relative}")
    return problems


def shell_lines(body):
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    lines, current = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def words_of(command):
    """A shell command as words, comments dropped (None when it does not parse)."""
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return None


def program_and_arguments(words):
    """The program a command runs and its arguments, past leading VAR=value settings.

    `UAI=$(az identity show ...)` runs az: an assignment from a command substitution names its program.
    """
    for index, word in enumerate(words):
        if not ASSIGNMENT.match(word):
            return word, words[index + 1:]
        value = word.split("=", 1)[1]
        if value.startswith("$("):
            return value[2:], words[index + 1:]
    return None, []


def makefile_targets():
    """The targets the Makefile defines."""
    text = (PROJECT_DIR / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE)) - {".PHONY"}


def module_exists(name):
    """`python -m name` would find a module: a file of the repository, or an installed module (not imported)."""
    parts = name.split(".")
    as_file = "/".join(parts)
    if exists(f"{as_file}.py") or exists(f"{as_file}/__main__.py") or exists(as_file):
        return True
    spec = importlib.util.find_spec(parts[0])
    for part in parts[1:]:
        if spec is None or not spec.submodule_search_locations:
            return False
        folders = [Path(folder) for folder in spec.submodule_search_locations]
        if not any((folder / f"{part}.py").exists() or (folder / part / "__init__.py").exists() for folder in folders):
            return False
    return spec is not None


def command_problem(words, targets, strict):
    """Why a shown command would fail to start, or None. strict: a program outside the known ones is a problem."""
    program, arguments = program_and_arguments(words)
    if program is None:
        return None
    if program in ("python", "python3") or program.endswith("/python"):
        if arguments[:1] == ["-m"] and len(arguments) > 1:
            return None if module_exists(arguments[1]) else f"python -m {arguments[1]}: no such module"
        script = next((word for word in arguments if not word.startswith("-")), None)
        if script and script.endswith(".py") and not exists(script):
            return f"python {script}: no such file"
        return None
    if program == "make":
        missing = [target for target in arguments if not target.startswith("-") and "=" not in target
                   and target not in targets]
        return f"make {' '.join(missing)}: no such target in the Makefile" if missing else None
    if strict and program not in EXTERNAL_PROGRAMS:
        return f"{program}: not a command this test knows (add it to EXTERNAL_PROGRAMS if it is an outside tool)"
    return None


def shown_commands(page):
    """(command, strict) for each command a page shows: bash block lines (strict) and inline python/make spans."""
    text = page.read_text(encoding="utf-8")
    for language, body in fenced_blocks(text):
        if language in ("bash", "sh", "shell", "console"):
            for line in shell_lines(body):
                yield line, True
    for match in INLINE_CODE.finditer(prose(text)):
        span = " ".join(match.group(1).split())
        words = words_of(span)
        program, _ = program_and_arguments(words or [])
        if program in ("python", "python3", "make"):
            yield span, False


def command_problems(page):
    """Each command of a page that would not start: a missing script, module or make target."""
    targets = makefile_targets()
    problems = []
    for command, strict in shown_commands(page):
        words = words_of(command)
        if words is None:
            problems.append(f"{command}: does not parse as a shell command")
            continue
        problem = command_problem(words, targets, strict)
        if problem:
            problems.append(problem)
    return problems


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes (at most {README_MAX_BYTES:,}): move a section to docs/"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    problems = link_problems(page)
    assert not problems, "links that lead nowhere:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_shown_command_exists(page):
    problems = command_problems(page)
    assert not problems, "commands that would not start:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES[1:], ids=page_id)
def test_every_docs_page_links_back_to_the_readme(page):
    head = page.read_text(encoding="utf-8").split("\n\n## ")[0]
    assert "](../README.md)" in head, "open the page with a one-line summary and a link back to the README"


def test_github_slugs():
    assert github_slug("Step 3 — deploy") == "step-3--deploy"
    assert github_slug("Chat completions, beside `/score`") == "chat-completions-beside-score"
    assert github_slug("5. The serving runtimes: transformers") == "5-the-serving-runtimes-transformers"


def test_a_missing_script_target_module_or_file_is_caught(tmp_path):
    targets = makefile_targets()
    assert command_problem(["python", "no_such_step.py"], targets, True) == "python no_such_step.py: no such file"
    assert command_problem(["TARGET=azure", "python", "setup_ml.py", "--dry-run"], targets, True) is None
    assert command_problem(["make", "no-such-target"], targets, True).startswith("make no-such-target")
    assert command_problem(["make", "demo"], targets, True) is None
    assert command_problem(["python", "-m", "stand_ins.no_such_module"], targets, True) is not None
    assert command_problem(["python", "-m", "venv", ".venv"], targets, True) is None
    assert command_problem(["UAI=$(az", "identity", "show"], targets, True) is None
    assert command_problem(["frobnicate", "--now"], targets, True) is not None
    page = tmp_path / "page.md"
    page.write_text("See [gone](no_such_file.md) and [here](#nowhere).\n\n# Title\n", encoding="utf-8")
    assert link_problems(page) == ["no_such_file.md: no such file", "#nowhere: no such heading in " + str(page)]
