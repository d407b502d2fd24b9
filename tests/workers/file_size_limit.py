"""The command where a file may not grow past LIMIT bytes from the checkpoint at step AT on (the
kernel's per-file size limit, as a quota that free space does not show):

    python file_size_limit.py LIMIT AT [trainer flags...]
"""
import resource
import signal
import sys

from mpitrain import checkpoint, cli

limit, at, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
save = checkpoint.save


def limited_save(run, world, step, *args, **kwargs):
    if step >= at:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return save(run, world, step, *args, **kwargs)


checkpoint.save = limited_save
sys.exit(cli.main(argv))
