"""bench.aot's statistics are those of the cubin Triton builds and launches.

* Registers and stack come from the `ptxas -v` log of Triton's own ptxas call, so with its options: Triton 3.9
  passes `--regAllocOptLevel=2`, under which the dK/dV tile below has 177 registers and no spill, where a
  plain `ptxas -v` of the same PTX reports 168 registers and 28 B of spills. Checked against the resource usage
  `cuobjdump -res-usage` reads from the cubin itself.
* Spill sites: local-memory instructions (STL / LDL) of the SASS, inside a loop (a backward branch's range) or
  outside every loop.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.aot import sass_local_sites

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
.L_x_0:
        /*0020*/                   LDL R3, [R1] ;
        /*0030*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0040*/              @!P0 LDL.64 R6, [R1+0x8] ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   STL.128 [R1+0x10], R8 ;
.L_x_1:
        /*0080*/                   EXIT ;
"""


def test_spill_sites_in_and_out_of_loops():
    # the loop is 0x20-0x50 (the backward branch to .L_x_0); the forward branch to .L_x_1 is no loop
    assert sass_local_sites(SASS) == dict(local_in_loops=2, local_outside=2, sass_loops=1)
    assert sass_local_sites(SASS.replace("@P0 BRA `(.L_x_0)", "@P0 BRA `(.L_x_1)")) == dict(
        local_in_loops=0, local_outside=4, sass_loops=0)


SCRIPT = r"""
import json, os, re, subprocess, tempfile
from bench.aot import compile_kernel, ptxas_path, ptxas_stats
from bench.compile_report import attention_case
case = attention_case("dkdv", 128, "bf16", (16, 32, 4, 4), (True, False, True), 90)
kernel = compile_kernel(case["fn"], case["arg_types"], case["constexprs"], arch=90, num_warps=4, num_stages=4,
                        divisible_ints=case["divisible_ints"])
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.cubin")
    open(path, "wb").write(kernel.asm["cubin"])
    usage = subprocess.run([os.path.join(os.path.dirname(ptxas_path(90)), "cuobjdump"), "-res-usage", path],
                           capture_output=True, text=True, check=True).stdout
fields = dict(re.findall(r"(REG|STACK):(\d+)", usage))
print("RESULT" + json.dumps(dict(stats=ptxas_stats(kernel, 90), cubin={k: int(v) for k, v in fields.items()})))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run the real thing")
def test_stats_are_those_of_tritons_cubin():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    stats, cubin = result["stats"], result["cubin"]
    assert stats["registers"] == cubin["REG"] and stats["stack"] == cubin["STACK"], result
