"""Who a file edit is credited to (configbus.publisher.authors), against real git
repositories made in tmp_path: the author of the last commit that touched the file,
else the file's owner, and nobody for a file that is gone; a moved HEAD is noticed,
hostile names are bounded, a slow git is killed, and a cache hit runs no git at all."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from configbus.limits import DEFAULT_LIMITS
from configbus.publisher import authors as authors_module
from configbus.publisher.authors import Authors

from .helpers import eventually
from .test_publisher import HELIX, World

ALICE = "Alice <alice@example.com>"
BOB = "Bob <bob@example.com>"
ME = pwd.getpwuid(os.getuid()).pw_name  # the owner of every file a test writes
GIT = shutil.which("git")

pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")


class Repo:
    """A git repository at `root`, made and committed to with a git that reads no
    global or system settings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q")

    def git(self, *args: str, cwd: Path | None = None) -> str:
        env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
        done = subprocess.run(
            ["git", *args], cwd=cwd or self.root, env=env, check=True, capture_output=True
        )
        return done.stdout.decode()

    def write(self, files: dict[str, str]) -> None:
        for relative, text in files.items():
            path = self.root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

    def commit(self, author: str, files: dict[str, str] | None = None, *, rm: str = "") -> str:
        """Commit `files` (and the removal of `rm`) as `author` ("Name <email>")."""
        self.write(files or {})
        if rm:
            self.git("rm", "-q", rm)
        self.git("add", "-A")
        name, email = author.removesuffix(">").split(" <")
        self.git("-c", f"user.name={name}", "-c", f"user.email={email}", "commit", "-qm", "c")
        return self.git("rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A repository where Alice wrote a.yml and b.yml, then Bob changed b.yml."""
    repo = Repo(tmp_path / "tree")
    repo.commit(ALICE, {"a.yml": "a: 1\n", "b.yml": "b: 1\n"})
    repo.commit(BOB, {"b.yml": "b: 2\n"})
    return repo


async def authors_of(root: Path, warm: bool) -> Authors:
    """Authors of the tree at `root`, its cache warmed up front or not (each file is
    then looked up on its own)."""
    authors = Authors(root)
    if warm:
        await authors.warm()
    return authors


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands run by configbus.publisher.authors from now on."""
    commands: list[list[str]] = []
    popen = subprocess.Popen

    def spy(command: list[str], **options: Any) -> Any:
        commands.append(command)
        return popen(command, **options)

    monkeypatch.setattr(authors_module.subprocess, "Popen", spy)
    return commands


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- git authors --------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_file_is_credited_to_the_author_of_its_last_commit(repo: Repo, warm: bool) -> None:
    authors = await authors_of(repo.root, warm)
    assert await authors.credit([str(repo.root / "a.yml")]) == ALICE
    assert await authors.credit([str(repo.root / "b.yml")]) == BOB
    both = [str(repo.root / "b.yml"), str(repo.root / "a.yml")]
    assert await authors.credit(both) == f"{ALICE}, {BOB}"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_file_never_committed_is_credited_to_its_owner(repo: Repo, warm: bool) -> None:
    repo.write({"new.yml": "n: 1\n", "staged.yml": "s: 1\n"})
    repo.git("add", "staged.yml")
    authors = await authors_of(repo.root, warm)
    assert await authors.credit([str(repo.root / "new.yml")]) == ME
    assert await authors.credit([str(repo.root / "staged.yml")]) == ME
    assert await authors.credit([str(repo.root / "new.yml"), str(repo.root / "a.yml")]) == (
        f"{ALICE}, {ME}"
    )


async def test_a_tree_that_is_no_git_checkout_is_credited_to_the_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # whatever holds tmp_path
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.yml").write_text("a: 1\n", encoding="utf-8")
    authors = Authors(root)
    await authors.warm()
    assert await authors.credit([str(root / "a.yml")]) == ME


async def test_without_git_on_the_path_the_owner_is_credited(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    authors = await authors_of(repo.root, warm=True)
    assert await authors.credit([str(repo.root / "a.yml")]) == ME


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_new_commit_is_credited_to_its_author(repo: Repo, warm: bool) -> None:
    authors = await authors_of(repo.root, warm)
    assert await authors.credit([str(repo.root / "a.yml")]) == ALICE
    repo.commit(BOB, {"a.yml": "a: 2\n"})  # HEAD moves: the cached answer no longer holds
    assert await authors.credit([str(repo.root / "a.yml")]) == BOB
    carol = "Carol <carol@example.com>"
    repo.commit(carol, {"b.yml": "b: 3\n"})
    assert await authors.credit([str(repo.root / "a.yml")]) == BOB
    assert await authors.credit([str(repo.root / "b.yml")]) == carol


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_deleted_file_credits_nobody(repo: Repo, warm: bool) -> None:
    authors = await authors_of(repo.root, warm)
    (repo.root / "a.yml").unlink()
    assert await authors.credit([str(repo.root / "a.yml")]) is None
    assert await authors.credit([str(repo.root / "a.yml"), str(repo.root / "b.yml")]) == BOB


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_file_written_again_after_a_commit_deleted_it_is_its_owners(
    repo: Repo, warm: bool
) -> None:
    repo.commit("Dave <dave@example.com>", rm="a.yml")
    repo.write({"a.yml": "a: again\n"})  # untracked now: Dave did not write it
    authors = await authors_of(repo.root, warm)
    assert await authors.credit([str(repo.root / "a.yml")]) == ME


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_hostile_author_name_is_bounded_to_printable_text(repo: Repo, warm: bool) -> None:
    name = "Eve\x1b[2J\u202e\x07\tX" + "e" * 5000
    repo.commit(f"{name} <eve@example.com>", {"a.yml": "a: eve\n"})
    authors = await authors_of(repo.root, warm)
    actor = await authors.credit([str(repo.root / "a.yml")])
    assert actor is not None
    assert len(actor) <= DEFAULT_LIMITS.text_chars
    assert actor.isprintable() and actor.startswith("Eve [2J Xeee"), actor[:20]


async def test_several_long_names_together_stay_within_the_bound(repo: Repo) -> None:
    long = "L" * (DEFAULT_LIMITS.text_chars // 2)
    repo.commit(f"{long}a <a@example.com>", {"a.yml": "a: 2\n"})
    repo.commit(f"{long}b <b@example.com>", {"b.yml": "b: 3\n"})
    actor = await Authors(repo.root).credit([str(repo.root / "a.yml"), str(repo.root / "b.yml")])
    assert actor is not None and len(actor) == DEFAULT_LIMITS.text_chars
    assert actor.startswith(f"{long}a <a@example.com>, {long}"[: len(actor) - 1])
    assert actor.endswith("…")


# -- what git is asked -----------------------------------------------------------------


async def test_git_is_asked_only_about_files_of_the_tree(tmp_path: Path) -> None:
    """The tree is a folder of a repository: a file beside it is not the tree's (it is
    credited to its owner), and a file named like a pattern is no pattern."""
    repo = Repo(tmp_path / "repo")
    repo.commit(ALICE, {"beside.yml": "x: 1\n", "tree/real.yml": "r: 1\n"})
    repo.write({"tree/*.yml": "g: 1\n", "tree/:(top)beside.yml": "t: 1\n"})
    authors = Authors(repo.root / "tree")
    for path in ["beside.yml", "tree/../beside.yml", "tree/*.yml", "tree/:(top)beside.yml"]:
        assert await authors.credit([str(repo.root / path)]) == ME, path
    assert await authors.credit([str(repo.root / "tree" / "real.yml")]) == ALICE


async def test_a_git_that_does_not_answer_is_killed_and_the_owner_credited(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`git log` hangs (a network file system, say): the edit is credited to the file's
    owner once the timeout is up, and the hung git is killed."""
    assert GIT is not None
    bin_dir, pid_file = tmp_path / "bin", tmp_path / "hung.pid"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        f'  [ "$arg" = log ] && echo $$ > {pid_file} && exec sleep 60\n'
        "done\n"
        f'exec {GIT} "$@"\n',
        encoding="utf-8",
    )
    (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    authors = Authors(repo.root, timeout=0.3)
    started = time.monotonic()
    assert await authors.credit([str(repo.root / "a.yml")]) == ME
    assert time.monotonic() - started < 5  # the bound held, not git's 60 s
    await eventually(lambda: gone(int(pid_file.read_text())), "the hung git to be killed")


@pytest.mark.parametrize("layout", ["loose", "packed", "detached", "worktree"])
async def test_a_cache_hit_runs_no_git(
    repo: Repo, tmp_path: Path, layout: str, spawned: list[list[str]]
) -> None:
    """After the warm-up, HEAD is read from the git directory's files, whatever the
    layout, and known files (and files never committed) are answered without git."""
    root = repo.root
    if layout == "packed":
        repo.git("pack-refs", "--all")
        assert not list((root / ".git" / "refs" / "heads").iterdir())
    elif layout == "detached":
        repo.git("checkout", "-q", "--detach")
    elif layout == "worktree":
        root = tmp_path / "worktree"
        repo.git("worktree", "add", "-q", "-b", "other", str(root))
        assert (root / ".git").is_file()
    (root / "new.yml").write_text("n: 1\n", encoding="utf-8")
    authors = await authors_of(root, warm=True)
    assert spawned, "the warm-up ran git"
    spawned.clear()
    assert await authors.credit([str(root / "a.yml")]) == ALICE
    assert await authors.credit([str(root / "b.yml"), str(root / "new.yml")]) == f"{BOB}, {ME}"
    assert spawned == []
    (root / "a.yml").write_text("a: carol\n", encoding="utf-8")
    carol = ("-c", "user.name=Carol", "-c", "user.email=carol@example.com")
    repo.git(*carol, "commit", "-qam", "c", cwd=root)  # HEAD moves, in this layout
    assert await authors.credit([str(root / "a.yml")]) == "Carol <carol@example.com>"


# -- the daemon ---------------------------------------------------------------------


async def test_the_daemon_credits_a_file_edit_to_its_git_author(tmp_path: Path) -> None:
    world = World(tmp_path)
    grace = "Grace <grace@example.com>"
    Repo(world.root).commit(grace)
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
    (*_, last) = (e for e in world.events(HELIX[0]) if e.body.env == HELIX[1])
    assert last.body.version == 2
    assert (last.body.cause.reason, last.body.cause.actor) == ("file changed", grace)
