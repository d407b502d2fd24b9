"""The run directory: one job writes into it at a time, and a run resumes from the checkpoint in it
that verifies and fits (or is refused, in one line, rather than started over on top of it)."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .checkpoint import Contents, fit, folder, step_of, verify
from .config import CannotWrite, UsageError, default_run_dir
from .schema import check_isolated, deadline_s

LOCK = ".lock"  # in the run dir; what it says (who holds it) is only read while it is held
_claimed: dict[str, object] = {}  # run dir -> its lock file, held open while this process lives


def claim(run_dir: str) -> None:
    """Take RUN_DIR for this job (rank 0): an exclusive lock on RUN_DIR/.lock that the kernel drops
    when the process ends, however it ends, so a second job started into the same folder (a
    resubmitted job while the first still runs) is refused instead of writing the same
    checkpoints and metrics. A network filesystem may keep a lock of a node that died (NFS v3
    until that node is back): deleting the file frees the folder, the dead lock staying on the
    file removed. On a filesystem without locks, or where the folder cannot be made (the first
    write reports that), the run goes on unguarded."""
    key = os.path.realpath(run_dir)
    if key in _claimed:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        fh = open(os.path.join(run_dir, LOCK), "a+")
    except OSError:
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = " ".join(fh.read(200).split()) or "it did not say which"
        fh.close()
        raise UsageError(f"run dir {run_dir} is in use by another job ({holder}); wait for it to end, or give "
                         f"another --run-dir (if that job is gone with its node, delete {LOCK} there)") from None
    except OSError:
        fh.close()
        return
    _claimed[key] = fh
    try:  # who holds it, for the message of a job refused (a full disk only loses the words)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        fh.flush()
    except OSError:
        pass


def take(run_dir: str, resume: str) -> list[str]:
    """This job's hold on RUN_DIR (`claim`); with resume "none", an earlier run there set aside
    (`set_aside`). Returns the notes to print."""
    claim(run_dir)
    aside = set_aside(run_dir) if resume == "none" else None
    return [f"--resume none: the earlier run's files in {run_dir} are now in {aside}"] if aside else []


WRITTEN = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard")  # what a run writes into its folder


def set_aside(run_dir: str) -> str | None:
    """--resume none in a folder an earlier run wrote into: its files move to RUN_DIR/earlier-<UTC
    time>/ (a fresh run beside them would append to their metrics and mix its checkpoints with
    theirs, which keep-last and a fallback of --resume auto would then pick from). Returns that folder."""
    found = [name for name in WRITTEN if os.path.lexists(os.path.join(run_dir, name))]
    if not found:
        return None
    aside = os.path.join(run_dir, "earlier-" + os.path.basename(default_run_dir(time.time())))  # to the ms
    try:
        os.mkdir(aside)
        for name in found:
            os.rename(os.path.join(run_dir, name), os.path.join(aside, name))
    except OSError as e:
        raise CannotWrite(f"cannot set the earlier run in {run_dir} aside for --resume none: {e}") from None
    return aside


def candidates(run_dir: str) -> list[Path]:
    """Checkpoints to resume from, best first: the one `latest` names, then newest to oldest."""
    ckpt_dir = folder(run_dir)
    if not ckpt_dir.is_dir():
        return []
    found = sorted((p for p in ckpt_dir.glob("ckpt-*.h5") if step_of(p) is not None), key=step_of, reverse=True)
    latest = ckpt_dir / "latest"
    if latest.is_file():
        named = ckpt_dir / latest.read_text().strip()
        found = [named] + [p for p in found if p != named]
    return found


def check_budget(cfg) -> float:
    """Seconds rank 0 may spend checking the checkpoints `choose` would try, each with its deadline."""
    paths = [] if cfg.resume == "none" else candidates(cfg.run_dir) if cfg.resume == "auto" else [Path(cfg.resume)]
    return sum(deadline_s(p.stat().st_size) for p in paths if p.is_file())


def choose(cfg, contents: Contents | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint --resume points at (verified, and fitting `contents`), and notes to print. Raises UsageError."""
    if cfg.resume == "none":
        return None, []
    if cfg.resume != "auto":
        faults = verify(cfg.resume, contents)
        if faults:
            raise UsageError(f"cannot resume from {cfg.resume}: {faults[0]}")
        return Path(cfg.resume), []
    notes, damaged, unfit = [], [], None
    for path in candidates(cfg.run_dir):
        damage = check_isolated(path, full=True) if path.exists() else ["missing"]
        faults = damage or ([] if contents is None else fit(path, contents))
        if not faults:
            if notes:
                notes.append(f"resuming from {path.name} instead")
            return path, notes
        notes.append(f"checkpoint {path.name} " + (f"failed verification ({faults[0]})" if damage else
                                                   f"does not fit this run ({faults[0]})"))
        damaged += notes[-1:] if damage else []
        unfit = unfit or (None if damage else (path, faults[0]))
    if unfit:  # intact checkpoints of another configuration: starting over here would replace them
        raise UsageError(f"cannot resume from {unfit[0]}: {unfit[1]}; resume with the settings it was written "
                         "with, or start over in another --run-dir (or here with --resume none, which sets the "
                         "earlier run aside)", damaged)
    if notes:
        notes.append("no checkpoint verifies: starting from scratch")
    return None, notes
