"""`torchrun ... tests/sealong/crash_rank.py SAMPLER-FLAGS`: the sampler, except that rank 1 dies (os._exit) in the
middle of writing its second record, leaving one record and a torn line in its shard: a rank killed mid-run."""

import os
import sys

import sealong.jsonl
from sealong.sample.sampler import main

if os.environ.get("RANK") == "1":
    append = sealong.jsonl.append_jsonl
    written = []

    def append_then_die(path, records, fsync=True):
        if written:
            with open(path, "a", encoding="utf-8") as f:
                f.write('{"id": "torn')
            os._exit(1)
        written.append(path)
        append(path, records, fsync)

    sealong.jsonl.append_jsonl = append_then_die

if __name__ == "__main__":
    sys.exit(main())
