"""A torchrun worker for tests/test_faults.py: one healthy ring call, then rank 1 dies
(`killed`) or stops answering (`frozen`) in the middle of the next one."""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

import ringmem
from ringmem.comm import RingComm
from ringmem.timeouts import exit_on_comm_error, init_process_group


def main() -> None:
    kind, out_dir = sys.argv[1], sys.argv[2]
    init_process_group("gloo")  # the timeout comes from RINGMEM_TIMEOUT
    rank = dist.get_rank()
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    with exit_on_comm_error("fault_worker"):
        ringmem.ring_attention(q, k, v)
        if rank == 1:
            def fault(self, *args, **kw) -> None:  # in the ring, before sending its block
                with open(os.path.join(out_dir, "fault"), "w") as f:
                    f.write(repr(time.time()))
                if kind == "killed":
                    os._exit(3)
                time.sleep(600)  # frozen: alive, but never answers
            RingComm.move = fault
        ringmem.ring_attention(q, k, v, schedule="kv")  # the schedule that moves
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
