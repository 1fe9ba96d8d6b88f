"""Atomic, loss-free file writes shared by the steps.

A write goes to a temporary file in the same folder and is renamed over the target, so an interrupted run
never leaves half a file. Files a step generates are recorded with their SHA-256 in `.generated.json` in
their folder: a step replaces its own untouched output freely, but a file someone edited is only replaced
with `force=True`, and then the old one is kept as `<name>.<timestamp>.bak`.
"""

import errno
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from helpers.errors import StepError

MANIFEST_NAME = ".generated.json"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space, a file-size limit, a quota: the same for the user


class DiskFullError(StepError):
    """A write found no room; the file it was replacing is as it was."""


def disk_full(path, error):
    """The sentence for a write that found no room (None for other errors): what to do, and that nothing was lost."""
    if getattr(error, "errno", None) not in DISK_FULL:
        return None
    return DiskFullError(f"No room to write {path} ({os.strerror(error.errno)}): free some disk space and run the step "
                         "again; the previous file (and whatever serves from it) was left as it was.")


class FileChangedError(FileExistsError):
    """A generated file was edited by hand (or not written by us) and force was not given."""


def atomic_write_text(path, text, mode=None):
    """Write `text` to `path` via a temporary file and a rename; `mode` sets permissions (e.g. 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if sentence := disk_full(path, error):
            raise sentence from None
        raise


def sha256_text(text):
    """SHA-256 of text as UTF-8, in hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _manifest(folder):
    """The recorded hashes of the generated files in `folder`."""
    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _known(path):
    """The hashes this step wrote to `path`: one, or two while a replacement is under way."""
    value = _manifest(path.parent).get(path.name)
    return set(value) if isinstance(value, list) else {value} if value else set()


def _record(path, *digests):
    """Remember that `path` holds generated content with one of `digests` (the new one last)."""
    manifest = _manifest(path.parent)
    manifest[path.name] = digests[0] if len(digests) == 1 else list(digests)
    atomic_write_text(path.parent / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _replace(path, text, old_digest, new_digest):
    """Write `text` to `path` so that, interrupted anywhere, the file is whole (old or new) and known as ours."""
    _record(path, *filter(None, (old_digest, new_digest)))  # both known while the file changes
    atomic_write_text(path, text)
    _record(path, new_digest)


def write_generated_file(path, text, force=False):
    """Write a generated file without losing edits; returns 'written', 'unchanged' or 'replaced (backup: …)'."""
    path = Path(path)
    new_digest = sha256_text(text)
    if not path.exists():
        _replace(path, text, None, new_digest)
        return "written"
    old_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if old_digest == new_digest:
        _record(path, new_digest)
        return "unchanged"
    if old_digest in _known(path):
        _replace(path, text, old_digest, new_digest)
        return "written"
    if not force:
        raise FileChangedError(
            f"{path} was changed since this step wrote it (or was not written by it); "
            "rerun with --force to replace it (the current file is kept as a .bak copy)"
        )
    backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
    os.replace(path, backup)
    _replace(path, text, None, new_digest)
    return f"replaced (backup: {backup.name})"


def update_env_file(path, values):
    """Set KEY=value lines in a .env file (others kept as they are), atomically and readable by you alone."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    pending = dict(values)
    for index, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and key in pending:
            lines[index] = f"{key}={pending.pop(key)}"
    lines += [f"{key}={value}" for key, value in pending.items()]
    atomic_write_text(path, "\n".join(lines) + "\n", mode=0o600)
