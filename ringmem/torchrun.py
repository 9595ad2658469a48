"""torchrun for the console command: the same launcher, its failures summarised in one line.

`python -m ringmem.torchrun <torchrun arguments>` runs torch.distributed.run. When workers
fail it prints one line naming the failed ranks and their exit codes (each worker has
printed its own one-line error) instead of torchrun's traceback and 35-50-line failure
report; when stopped by a signal, torchrun has terminated and waited for the workers, and
this says so in one line. Exit status: 0, 1 (a worker failed) or 128 + the signal.
"""
from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's per-worker warnings ("Sending process N closing signal") repeat what the
    # summary line says; its errors still show
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.ERROR)
    # its "failed (exitcode: N) local_rank: ..." line: the summary below says the same
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(
        logging.CRITICAL)

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {r} (exit code {f.exitcode})"
                           for r, f in sorted(e.failures.items()))
        print(f"ringmem: worker(s) failed: {failed}", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"ringmem: stopped by {name}; the workers were terminated", file=sys.stderr,
              flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
