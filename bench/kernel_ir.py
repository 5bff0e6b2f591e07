"""Which one-row product tiles move data between layouts inside their K loop, read from the compiled kernel.

    python bench/kernel_ir.py            # every one-row gemv row of CONFIGS and FLOAT_CONFIGS (any machine)
    python bench/kernel_ir.py --json     # the same as one JSON line

Triton picks a register layout per tensor; where two tensors that meet in the K loop get different ones, it
converts one of them (`ttg.convert_layout`), through shared memory with a barrier. Converting the input row
([1, BK], a few KB) costs little; converting a weight tile ([BN, BK] per K step) halves the speed of a product
that should stream its weight (a [1, BN, BK] accumulator did exactly that: docs/quantization.md#cuda-kernel).
This script compiles each one-row "gemv" kind row of the launcher's tables for sm_90 (Hopper; no GPU needed:
Triton's own compiler and ptxas) with the argument attributes a real launch specialises on (16-byte aligned
pointers, K and the strides multiples of 16), and lists the shapes converted inside the K loop. With --registers
it also reads each kernel's registers per thread from its cubin, launched plainly and with programmatic dependent
launch (the first K step peeled off, `kernels._pdl`). Layout choices and register counts belong to the Triton
version that compiles; the GPU's may differ from this machine's (install the GPU's Triton here to match it), so a
new tile is still timed there (bench/int8_sweep.py).

    python bench/kernel_ir.py --registers
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter compiles nothing: run without it
    sys.exit("bench/kernel_ir.py compiles kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tnllm.kernels import triton_int8 as ti  # noqa: E402
from tnllm.kernels._pdl import CHAINED, OFF  # noqa: E402

GEMV_KINDS = ("gemv", "gemv_once", "gemv_word")
# Integer arguments a launch at the tnl shapes specialises as multiples of 16 (K, N, the row strides)
MULTIPLES_OF_16 = {"N", "K", "s_xm", "s_x2m", "s_xsm", "s_wn", "s_ym", "s_rm"}
FLOAT_ARGS = {"eps": "fp32"}
POINTER_TYPES = {"w": "*i8", "ss_ws": "*fp32", "ms_in": "*fp32", "ms_out": "*fp32"}


def _signature(fn, constexprs: dict, cfg: ti.Config, int8: bool) -> tuple[dict, dict]:
    """(signature, attrs) of an `ASTSource` for `fn`: bf16 activations, the weight as int8, int32 words or bf16."""
    weight = "*i32" if cfg.kind == "gemv_word" else "*i8" if int8 else "*bf16"
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in POINTER_TYPES or name in ("x", "x2", "xs", "s", "b", "y", "res"):
            signature[name] = weight if name == "w" else POINTER_TYPES.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = FLOAT_ARGS.get(name, "i32")
            if name in MULTIPLES_OF_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_row(cfg: ti.Config, int8: bool = True, pdl: int = OFF):
    """The launcher's plain one-row product with tile `cfg` (a gemv kind, BM = 1) and PDL mode `pdl`, built for
    sm_90: Triton's compiled kernel (`.asm["ttgir"]`, `.asm["cubin"]`)."""
    meta = dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, EVEN_K=True, HAS_SCALES=int8, HAS_BIAS=False, PARTIAL=cfg.SPLIT_K > 1,
                PRO=ti.PROLOGUES.index("none"), NORM=False, ROW_POW=0, T_IN=1, RESIDUAL=False, PDL=pdl)
    if cfg.kind == "gemv_word":
        fn, meta = ti._int8_word_kernel, dict(meta, ASM=True)
    else:
        fn, meta = ti._int8_gemv_kernel, dict(meta, REDUCE_ONCE=cfg.kind == "gemv_once", MAGIC=cfg.magic)
    signature, attrs = _signature(fn, meta, cfg, int8)
    names = fn.arg_names
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in meta.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def registers(compiled) -> int:
    """Registers per thread of a `compile_row` kernel, read from its cubin by the cuobjdump that ships with Triton:
    fewer programs fit on an SM as they grow, and a one-row product needs many in flight."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    return int(re.search(r"REG:(\d+)", usage.stdout).group(1))


def loop_conversions(ttgir: str) -> list[str]:
    """The tensor types converted between layouts inside the kernel's loops, e.g. "64x128xf32"."""
    loops = re.findall(r"scf\.for[\s\S]*?scf\.yield", ttgir)
    return [m for loop in loops for m in re.findall(r"ttg\.convert_layout %\S+ : tensor<([0-9x]+x[a-z0-9]+),", loop)]


def weight_tile_conversions(cfg: ti.Config, int8: bool = True) -> list[str]:
    """The conversions inside the K loop of tile `cfg` that move more than one row (a weight tile or a product)."""
    return [t for t in loop_conversions(compile_row(cfg, int8).asm["ttgir"]) if not t.startswith("1x")]


def one_row_rows() -> list[tuple[str, tuple, ti.Config]]:
    """(table, key, Config) of every one-row gemv row of the launcher's tables."""
    return [(name, key, cfg) for name, table in (("CONFIGS", ti.CONFIGS), ("FLOAT_CONFIGS", ti.FLOAT_CONFIGS))
            for key, cfg in table.items() if key[0] == 1 and cfg.kind in GEMV_KINDS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    parser.add_argument("--registers", action="store_true",
                        help="also the registers per thread without and with programmatic dependent launch")
    args = parser.parse_args()
    rows = []
    for table, key, cfg in one_row_rows():
        int8 = table == "CONFIGS"
        plain = compile_row(cfg, int8)
        converted = loop_conversions(plain.asm["ttgir"])
        row = {"table": table, "key": list(key), "config": ti.config_src(cfg), "loop_conversions": converted}
        if args.registers:
            row["registers"] = {"pdl_off": registers(plain), "pdl_on": registers(compile_row(cfg, int8, CHAINED))}
        rows.append(row)
        if not args.json:
            regs = " regs {pdl_off} / {pdl_on} with PDL".format(**row["registers"]) if args.registers else ""
            print(f"{table:13} {str(key):22} {ti.config_src(cfg):70} {', '.join(converted) or '-'}{regs}", flush=True)
    if args.json:
        print(json.dumps({"bench": "kernel_ir", "triton": triton.__version__, "target": "cuda sm_90", "rows": rows}))


if __name__ == "__main__":
    main()
