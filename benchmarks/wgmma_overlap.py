"""Does keys-m get faster when its wgmmas run under the next part's decode? An experiment on Triton's TTGIR.

Triton 3.6 waits for every `tl.dot` where it is issued (`warp_group_dot_wait {pendings = 0}` right after each
`warp_group_dot`; benchmarks/NOTES.md session 24), and the kernel source cannot say otherwise. This script rewrites
the keys-m kernel's TTGIR after Triton made it: per pair of wgmmas (K's two norm-group parts; V's two), the first
one's wait moves below the second one's issue with `pendings = 1`, so the first mma runs while the threads load and
decode the second part's codes. The first mma's register operand joins its wait, which keeps it alive until then.
Nothing else changes: the same ops in the same arithmetic order, so the outputs must be bit-identical.

The rewrite is applied by a Triton stages hook to builds launched with a tag in the `ir_override` option (Triton
ignores an `ir_override` that names no IR file, and the option keys the build in the cache, so tagged and untagged
builds live side by side in one process).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/wgmma_overlap.py --out $OUT          # the GPU: time + check
    PYTHONPATH=/tmp/t36:. .venv/bin/python benchmarks/wgmma_overlap.py --sass                # here: sm_90 counts

`--sass` builds the default decode kernel (V along keys, kv_len, kv_start 1; with and without the rope term) for
sm_90 with the installed Triton, rewrites it, and prints registers, loop instructions and the waits ptxas kept
(`WARPGROUP.DEPBAR.LE gsb0, 1`: one wgmma group left in flight; ptxas serializes with a C7514/C7515 note when it
cannot). Install Triton 3.6 beside the venv for the device's build: see benchmarks/sass_counts.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile

import triton

TAG = "rq-overlap:"
PAIRS = {"kv": ((0, 1), (-2, -1)), "k": ((0, 1),), "v": ((-2, -1),)}
_DEF = re.compile(r"^\s*(%[\w]+)(?::\d+)?\s*=")
_SSA = re.compile(r"%[\w]+")
_WAIT = re.compile(r"^(\s*%[\w]+):(\d+) = ttng\.warp_group_dot_wait (.*?) \{pendings = 0 : i32\} : (.*?)( loc\(.*)?$")


def _defined(line: str) -> set[str]:
    m = _DEF.match(line)
    return {m.group(1)} if m else set()


def _used(line: str) -> set[str]:
    rhs = line.split("=", 1)[1] if _DEF.match(line) else line
    return set(_SSA.findall(rhs.split(" loc(")[0]))


def overlap_waits(ttgir: str, pairs: tuple) -> str:
    """The TTGIR with each pair (a, b) of the kernel's warp_group_dots (indices in program order, negative from the
    end) reordered to: issue a; everything up to b that does not need a's result; issue b; wait a (pendings = 1,
    a's register operand among its dependencies); a's consumers; wait b."""
    lines = ttgir.split("\n")
    dots = [i for i, line in enumerate(lines) if "ttng.warp_group_dot " in line]
    if len(dots) < 4:
        raise ValueError(f"expected keys-m's >= 4 warp_group_dots, found {len(dots)}")
    waits = [next(j for j in range(d + 1, len(lines)) if "ttng.warp_group_dot_wait" in lines[j]) for d in dots]
    for a, b in sorted(((a % len(dots), b % len(dots)) for a, b in pairs), reverse=True):
        da, wa, db, wb = dots[a], waits[a], dots[b], waits[b]
        if not wa < db:
            raise ValueError(f"wgmma {a} is not waited for before wgmma {b} is issued")
        tainted, after = _defined(lines[wa]), []
        for i in range(wa + 1, db + 1):  # a's consumers (transitively) move below b's issue
            if _used(lines[i]) & tainted:
                after.append(i)
                tainted |= _defined(lines[i])
        if db in after:
            raise ValueError(f"wgmma {b} needs wgmma {a}'s result")
        m = _WAIT.match(lines[wa])
        operand = re.search(r"ttng\.warp_group_dot (%[\w]+),", lines[da]).group(1)
        operand_type = re.search(r": (tensor<[^>]*dot_op<[^>]*>>)", lines[da]).group(1)
        wait = (
            f"{m.group(1)}:{int(m.group(2)) + 1} = ttng.warp_group_dot_wait {m.group(3)}, {operand} "
            f"{{pendings = 1 : i32}} : {m.group(4)}, {operand_type}{m.group(5) or ''}"
        )
        before = [lines[i] for i in range(wa + 1, db + 1) if i not in after]
        lines[wa : wb + 1] = before + [wait] + [lines[i] for i in after] + [lines[wb]]
    return "\n".join(lines)


def install_hook() -> None:
    """Rewrite the TTGIR of keys-m builds whose launch carries `ir_override="rq-overlap:<PAIRS key>"`."""
    from triton import knobs
    from triton._C.libtriton import ir

    def hook(backend, stages, options, language, capability):
        tag = getattr(options, "ir_override", None) or ""
        if not tag.startswith(TAG):
            return
        make_ttgir = stages["ttgir"]

        def ttgir(src, metadata):
            mod = make_ttgir(src, metadata)
            text = str(mod)
            if "@_attn_keys_m_kernel" not in text:
                return mod
            with tempfile.NamedTemporaryFile("w", suffix=".ttgir", delete=False) as f:
                f.write(overlap_waits(text, PAIRS[tag[len(TAG) :]]))
            new = ir.parse_mlir_module(f.name, mod.context)
            new.context = mod.context
            os.unlink(f.name)
            return new

        stages["ttgir"] = ttgir

    knobs.runtime.add_stages_inspection_hook = hook


class Tagged:
    """launch_attention's `wrap`: every launch gets `ir_override=tag` (the hook rewrites only keys-m)."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, kernel):
        tag = self.tag

        class _Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: kernel[grid](*args, ir_override=tag, **kwargs)

        return _Launch()


def sass() -> None:
    """sm_90 builds of the default decode kernel, as made and rewritten (no GPU needed)."""
    import subprocess

    from triton.backends.compiler import GPUTarget

    from benchmarks.sass_counts import BIN, build, loop_instructions

    for rope in (0, 32):
        base = build(kb=3, vb=3, kvlen=1, vkeys=1, kpre=1, kvstart=1, rope=rope).asm["ttgir"]
        for name, pairs in (("as made", None), *PAIRS.items()):
            text = base if pairs is None else overlap_waits(base, pairs)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.ttgir")
                with open(path, "w") as f:
                    f.write(text)
                ptx = triton.compile(path, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
                with open(os.path.join(tmp, "k.ptx"), "w") as f:
                    f.write(ptx)
                cubin = os.path.join(tmp, "k.cubin")
                run = {"capture_output": True, "text": True}
                notes = subprocess.run([f"{BIN}/ptxas", "-arch=sm_90a", "-v", f.name, "-o", cubin], **run).stderr
                code = subprocess.run([f"{BIN}/cuobjdump", "-sass", cubin], **run).stdout
                res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", cubin], **run).stdout
            regs = re.search(r"REG:(\d+)", res).group(1)
            kept = [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", code)]
            serialized = [line for line in notes.splitlines() if "(C751" in line]
            print(
                f"rope {rope:2d} {name:8s}: {regs} registers, loop {len(loop_instructions(code))} instructions, "
                f"SASS waits {kept}{' SERIALIZED' if serialized else ''}",
                flush=True,
            )


def measure(args) -> None:
    import torch
    from triton.testing import do_bench_cudagraph

    from benchmarks.attn_profile import DIM, along_keys, inputs, rope_inputs
    from rqcompile.kernels.attention import launch_attention

    install_hook()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    variants = [("as made", None)] + [(name, Tagged(TAG + name)) for name in args.variants.split(",")]
    rows = []
    for rope_pairs in (int(r) for r in args.rope.split(",")):
        for shape in args.shapes.split(","):
            batch, ctx = (int(v) for v in shape.split(":"))
            op_args, _ = inputs(batch, ctx, "iso:sfull", 3)
            run_args = along_keys(op_args, 3)
            del op_args
            kv_len = torch.full((batch,), ctx, device="cuda")
            rope = rope_inputs(batch, rope_pairs) if rope_pairs else {}

            def call(wrap, run_args=run_args, kv_len=kv_len, rope=rope):
                return launch_attention(
                    *run_args, None, 1 / math.sqrt(DIM), kv_len, **rope, v_along_keys=True, kv_start=1, wrap=wrap
                )

            ref = call(None).float()
            times = {name: [] for name, _ in variants}
            diffs = {}
            for name, wrap in variants:
                out = call(wrap).float()
                diffs[name] = (out - ref).abs().max().item() if torch.isfinite(out).all() else float("nan")
            for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
                for name, wrap in variants:
                    times[name].append(do_bench_cudagraph(lambda wrap=wrap: call(wrap), rep=100) * 1e3)
            base = min(times["as made"])
            for name, _ in variants:
                best = min(times[name])
                row = {"gpu": gpu, "batch": batch, "ctx": ctx, "rope_pairs": rope_pairs, "variant": name}
                row.update(us=best, all_us=times[name], vs_as_made=best / base, max_abs_diff=diffs[name])
                rows.append(row)
                print(
                    f"B{batch} {ctx // 1024}K rope {rope_pairs:2d} {name:8s} {best:8.1f} us ({best / base:.3f}x) "
                    f"max|diff| {diffs[name]:.1e}  runs {' '.join(f'{t:.1f}' for t in times[name])}",
                    flush=True,
                )
            del run_args
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wgmma_overlap.json"), "w") as f:
        json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sass", action="store_true", help="sm_90 builds here, no GPU")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="8:131072,8:32768,1:32768,1:131072", help="batch:context, comma-separated")
    ap.add_argument("--rope", default="0,32", help="rope pairs per run (0: no rope term)")
    ap.add_argument("--variants", default="kv,k,v", help=f"rewrites to time ({', '.join(PAIRS)})")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.sass:
        sass()
    else:
        measure(args)


if __name__ == "__main__":
    main()
