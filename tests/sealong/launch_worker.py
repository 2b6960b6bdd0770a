"""A torchrun worker for test_launch.py: joins the gloo group through sealong's own setup (which arms the
parent-death signal under torchrun), writes its pid into the folder argv[1], and sleeps."""

import os
import sys
import time

from sealong.train.distributed import setup

info = setup("cpu")
with open(os.path.join(sys.argv[1], f"rank{info.rank}.pid.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(sys.argv[1], f"rank{info.rank}.pid.tmp"), os.path.join(sys.argv[1], f"rank{info.rank}.pid"))
time.sleep(600)
