"""Who a file edit is credited to: the author of the last git commit that touched the
file when the tree is a git checkout, else the file's owner; a file that is gone, nobody.

This sits between a file save and its publication, so git is kept off that path.
`Authors.warm` (started with the daemon) walks the tree's history once, with one
``git log --name-status`` in a thread, and learns the last author of every file.
Answers are cached per (HEAD commit, file), and HEAD is read from the files of the git
directory (a loose or packed ref, or a detached HEAD), not by running git. A file the
cache does not know (HEAD moved, after a pull say) costs one ``git log -1`` in a
thread, bounded by `timeout`. When git is not on PATH, fails, is slow, or the tree is
no checkout git can read (``safe.directory`` refusing another user's checkout, say),
the file's owner is credited instead.

git runs in the tree's root, never prompts, takes no optional lock, takes paths
literally, and is asked only about files inside the tree. Author names come from
commits that anyone can write: only printable text is kept, at most
`DEFAULT_LIMITS.text_chars` characters of it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from configbus.limits import DEFAULT_LIMITS

__all__ = ["Authors"]

log = logging.getLogger(__name__)

_COMMIT_ID: Final = re.compile(rb"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256
_REF_NAME: Final = re.compile(rb"refs/[A-Za-z0-9._/-]+")  # others: ask git
# Inherited variables that would point git at another repository than the tree's.
_REDIRECTS: Final = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_COMMON_DIR",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_NAMESPACE",
    }
)
# Before every command: paths taken literally (a file named `*.yml` is no pattern), and
# the user settings that would change what `git log` prints pinned.
_OPTIONS: Final = (
    "--no-pager",
    "--literal-pathspecs",
    *("-c", "log.showSignature=false"),
    *("-c", "log.showRoot=true"),
    *("-c", "log.follow=false"),
    *("-c", "color.ui=never"),
    *("-c", "i18n.logOutputEncoding=UTF-8"),
)
# Commits, newest first: an empty field, the commit id, the author, then the files the
# commit changed below the working directory as (status, path) fields.
_LOG: Final = (
    "log",
    "--relative",
    "--no-renames",
    "--name-status",
    "-z",
    "--format=%x00%H%x00%an <%ae>",
)


@dataclass(frozen=True, slots=True)
class _Repository:
    """A git checkout: its git executable, where it keeps HEAD (`git_dir`) and where
    its shared refs (`common_dir`: the same but in a linked worktree)."""

    git: str
    git_dir: str
    common_dir: str
    reftable: bool


class _Unusual(Exception):
    """HEAD is kept in a way `_read_head` does not read: git is asked instead."""


class Authors:
    """Who to credit for changed files of the tree at `root` (see the module doc):
    ``await credit(paths)``. ``await warm()`` once, in the background, so that the
    first edit of each file costs no git process."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        timeout: float = 2.0,
        warm_timeout: float = 60.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.timeout = timeout  # for one file's answer (HEAD, when git is asked)
        self.warm_timeout = warm_timeout  # for the walk of the whole history
        self._root = os.path.normpath(self.root)
        self._repository: _Repository | None = None
        self._looked = False  # for the repository
        self._head: str | None = None  # the commit the answers below hold for
        self._walked: dict[str, str | None] | None = None  # every file, from warm()
        self._known: dict[str, str | None] = {}  # files asked about one by one
        # An answer of None: git knows no author (never committed, or deleted in its
        # last commit, or git failed): the file's owner is credited.

    async def credit(self, paths: Iterable[str]) -> str | None:
        """Who to credit for changes to the files at `paths` (absolute): each file's git
        author, else its owner; several people joined with ", " in order; None when
        nobody can be known (every file is gone, say). Never raises but cancellation."""
        relative = self._present(paths)
        try:
            authors = await self._authors([rel for rel in relative.values() if rel is not None])
        except Exception:  # an edit must publish, credited or not
            log.exception("could not ask git who changed %s", ", ".join(relative))
            authors = {}
        names = set()
        for path, rel in relative.items():
            name = (authors.get(rel) if rel is not None else None) or _owner(path)
            if name:
                names.add(name)
        return _clean(", ".join(sorted(names))) or None

    async def warm(self) -> None:
        """Learn the last author of every file of the tree from one walk of its history
        (in a thread, killed after `warm_timeout`). Without it, each file costs one git
        process the first time it changes."""
        repository = await self._repo()
        head = await self._current_head(repository) if repository is not None else None
        if repository is None or head is None:
            return
        started = time.monotonic()
        output = await self._git(repository, [*_LOG, head, "--", "."], walk=True)
        try:
            walked = None if output is None else await asyncio.to_thread(_last_authors, output)
        except ValueError as exc:
            log.warning("could not read the output of git log: %s", exc)
            walked = None
        if walked is None:
            log.info("the tree's git history is not known: each file edited will ask git")
            return
        self._at(head)
        self._walked = walked
        log.info(
            "learnt the last authors of %d files from git in %.2fs",
            len(walked),
            time.monotonic() - started,
        )

    def _present(self, paths: Iterable[str]) -> dict[str, str | None]:
        """Each of `paths` still there (one lstat: microseconds), with its path relative
        to the tree's root, or None when it is not below the root: git is never asked
        about it then. (A symbolic link out of the tree is refused by git itself.)"""
        present: dict[str, str | None] = {}
        for path in map(os.path.abspath, paths):
            if os.path.lexists(path):
                rel = os.path.relpath(path, self._root)
                below = rel not in (os.curdir, os.pardir) and not rel.startswith(os.pardir + os.sep)
                present[path] = rel if below else None
        return present

    def _at(self, head: str) -> None:
        """Answers hold for one HEAD: forget them when it moves."""
        if head != self._head:
            self._head, self._walked, self._known = head, None, {}

    async def _authors(self, rels: list[str]) -> dict[str, str | None]:
        """The git author of each file (relative to the root) at the current HEAD; a
        file git knows nothing about is missing or None. Cached per HEAD."""
        repository = await self._repo() if rels else None
        head = await self._current_head(repository) if repository is not None else None
        if repository is None or head is None:
            return {}
        self._at(head)
        answers: dict[str, str | None] = {}
        missing = []
        for rel in rels:
            if rel in self._known:
                answers[rel] = self._known[rel]
            elif self._walked is not None:
                answers[rel] = self._walked.get(rel)  # complete: absent is uncommitted
            else:
                missing.append(rel)
        if missing:
            found = await self._look_up(repository, head, missing)
            if self._head == head:
                self._known.update(found)
            answers.update(found)
        return answers

    async def _look_up(
        self, repository: _Repository, head: str, rels: list[str]
    ) -> dict[str, str | None]:
        """Each file's last author at `head`: one ``git log -1`` each, side by side in
        threads, all within `timeout` (a file git did not answer for gets None)."""
        tasks = {rel: asyncio.create_task(self._last_author(repository, head, rel)) for rel in rels}
        try:
            await asyncio.wait(tasks.values(), timeout=self.timeout)
        finally:
            pending = [task for task in tasks.values() if not task.done()]
            for task in pending:
                task.cancel()  # kills its git
            if pending:
                await asyncio.wait(pending)
        return {rel: None if task.cancelled() else task.result() for rel, task in tasks.items()}

    async def _last_author(self, repository: _Repository, head: str, rel: str) -> str | None:
        output = await self._git(repository, ["log", "-1", *_LOG[1:], head, "--", rel])
        if output is None:
            return None
        try:
            return _author_of(output, rel)
        except ValueError as exc:
            log.warning("could not read the output of git log for %s: %s", rel, exc)
            return None

    async def _repo(self) -> _Repository | None:
        """The tree's git checkout, found once; None when there is none git can read."""
        if not self._looked:
            self._repository = await self._discover()
            self._looked = True
        return self._repository

    async def _discover(self) -> _Repository | None:
        git = shutil.which("git")
        if git is None:
            log.info("git is not on PATH: file edits are credited to the files' owners")
            return None
        args = ["rev-parse", "--is-inside-work-tree", "--absolute-git-dir"]
        result = await _call([git, *_OPTIONS, *args], self._root, self.timeout)
        lines = result.stdout.splitlines() if result is not None else []
        if result is None or result.returncode != 0 or len(lines) != 2 or lines[0] != b"true":
            reason = _first_line(result.stderr) if result is not None else "no answer"
            log.info(
                "%s is no git checkout git reads here (%s): file edits are credited to the "
                "files' owners",
                self._root,
                reason or "not inside a work tree",
            )
            return None
        return _repository(git, os.fsdecode(lines[1]))

    async def _current_head(self, repository: _Repository) -> str | None:
        """HEAD's commit id (None before the first commit): read from the git
        directory, or from git when kept in a way `_read_head` does not read."""
        try:
            return _read_head(repository)
        except _Unusual:
            args = ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"]
            output = await self._git(repository, args)
            head = output.strip() if output is not None else b""
            return head.decode() if _COMMIT_ID.fullmatch(head) else None

    async def _git(
        self, repository: _Repository, args: list[str], *, walk: bool = False
    ) -> bytes | None:
        """What git prints for `args` in the tree's root; None when it fails or gives no
        answer within `timeout` (`warm_timeout` for a `walk`): it is killed then."""
        command = [repository.git, *_OPTIONS, *args]
        result = await _call(command, self._root, self.warm_timeout if walk else self.timeout)
        if result is None:
            return None
        if result.returncode != 0:
            error = _first_line(result.stderr)
            log.debug("git %s failed (%d): %s", args[0], result.returncode, error)
            return None
        return result.stdout


def _repository(git: str, git_dir: str) -> _Repository:
    """The checkout whose git directory is `git_dir`: a linked worktree names the
    directory of the shared refs in its file `commondir`."""
    try:
        common = Path(git_dir, "commondir").read_bytes().strip()
        common_dir = os.path.normpath(os.path.join(git_dir, os.fsdecode(common)))
    except OSError:  # no such file: not a linked worktree
        common_dir = git_dir
    reftable = os.path.isdir(os.path.join(common_dir, "reftable"))
    return _Repository(git, git_dir, common_dir, reftable)


async def _call(
    command: list[str],
    cwd: str,
    timeout: float,  # noqa: ASYNC109 - enforced in the thread, by killing the process
) -> subprocess.CompletedProcess[bytes] | None:
    """Run `command` in a thread (see `_run`); cancelled, it kills the process."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        return await asyncio.to_thread(_run, command, cwd, timeout, started)
    except asyncio.CancelledError:
        for process in started:
            process.kill()
        raise


def _run(
    command: list[str], cwd: str, timeout: float, started: list[subprocess.Popen[bytes]]
) -> subprocess.CompletedProcess[bytes] | None:
    """Run `command` in `cwd` without input, killed after `timeout` seconds; None when
    it could not start or was killed. The process is added to `started`."""
    environment = {name: value for name, value in os.environ.items() if name not in _REDIRECTS}
    environment |= {"GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}
    try:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        log.debug("could not run %s: %s", command[0], exc)
        return None
    started.append(process)
    with process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            log.warning("git gave no answer within %gs: %s", timeout, " ".join(command[-3:]))
            return None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _read_head(repository: _Repository) -> str | None:
    """HEAD's commit id read from the git directory's files: a detached HEAD, or a branch
    as a loose ref or in packed-refs; None on a branch with no commit yet. Raises
    `_Unusual` on anything else (reftable, a chain of symbolic refs, odd content)."""
    if repository.reftable:
        raise _Unusual
    head = _read(os.path.join(repository.git_dir, "HEAD"))
    if head is None:
        raise _Unusual
    if _COMMIT_ID.fullmatch(head):
        return head.decode()
    name = head.removeprefix(b"ref: ")
    if name == head or not _REF_NAME.fullmatch(name) or b".." in name or b"//" in name:
        raise _Unusual
    for directory in dict.fromkeys((repository.git_dir, repository.common_dir)):
        value = _read(os.path.join(directory, os.fsdecode(name)))
        if value is not None:
            if _COMMIT_ID.fullmatch(value):
                return value.decode()
            raise _Unusual
    for line in (_read(os.path.join(repository.common_dir, "packed-refs")) or b"").splitlines():
        commit, _, ref = line.partition(b" ")
        if ref == name and _COMMIT_ID.fullmatch(commit):
            return commit.decode()
    return None


def _read(path: str) -> bytes | None:
    """The stripped content of `path`; None when it does not exist."""
    try:
        with open(path, "rb") as file:
            return file.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Unusual from exc


def _commits(output: bytes) -> Iterator[tuple[str, list[tuple[bytes, str]]]]:
    """Each commit of `git log` output in the `_LOG` format, newest first: its author
    (`_clean`) and the (status, path) of each file it changed. Commits are separated by
    an empty field (no path is empty). Raises ValueError on output of another shape."""
    if not output:
        return
    if not output.startswith(b"\0"):
        raise ValueError("a commit does not start with an empty field")
    for chunk in output[1:].removesuffix(b"\0").split(b"\0\0"):
        commit, author, *changes = chunk.split(b"\0")
        if not _COMMIT_ID.fullmatch(commit) or len(changes) % 2:
            raise ValueError(f"unexpected fields after {commit[:80]!r}")
        if changes:
            changes[0] = changes[0].removeprefix(b"\n")
        files = [(changes[i], os.fsdecode(changes[i + 1])) for i in range(0, len(changes), 2)]
        yield _clean(author.decode("utf-8", "replace")), files


def _last_authors(output: bytes) -> dict[str, str | None]:
    """The last author of every file in the output of a walk of the whole history;
    None for a file whose last commit deleted it."""
    found: dict[str, str | None] = {}
    for author, files in _commits(output):
        for status, path in files:
            if path not in found:
                found[path] = None if status == b"D" else author or None
    return found


def _author_of(output: bytes, rel: str) -> str | None:
    """The author of the one commit of ``git log -1 -- rel``; None when there is none
    or it deleted the file."""
    for author, files in _commits(output):
        if (b"D", rel) in files:
            return None
        return author or None
    return None


def _clean(text: str) -> str:
    """`text` as it may travel in events and logs: printable characters only, runs of
    spaces as one, at most `DEFAULT_LIMITS.text_chars` characters."""
    limit = DEFAULT_LIMITS.text_chars
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return _clean(lines[0]) if lines else ""


def _owner(path: str) -> str | None:
    """The user name of the owner of the file at `path`; None when it is gone."""
    try:
        return _user(os.stat(path).st_uid)
    except OSError:
        return None


@functools.lru_cache(maxsize=256)
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
