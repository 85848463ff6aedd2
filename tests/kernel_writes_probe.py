"""Which arguments of a uniform-width attention kernel torch's wrap_triton analysis says it writes (what
torch.compile then treats as mutated), printed as a JSON list. Used by tests/test_kernels.py in a child process:
torch analyzes the kernel's TTIR for an sm_90 target, generated here without a GPU through a stand-in driver, which
needs Triton's compiler rather than its interpreter.

    python tests/kernel_writes_probe.py OPAQUE   # the split kernel; OPAQUE: 1 as the eager launch, 0 as compiled
    python tests/kernel_writes_probe.py keys-m   # the keys-m kernel (the same launch eager and compiled)
    python tests/kernel_writes_probe.py keys-m-vkeys   # keys-m reading V packed along keys (the VKEYS prototype)
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from torch._higher_order_ops import triton_kernel_wrap
from triton.backends.compiler import GPUTarget

from rqcompile.kernels import attention as kattn


class Sm90Driver:
    """Just enough of a Triton driver for torch's TTIR generation: the target."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def written(opaque: bool, kernel=kattn._attn_split_kernel, vkeys: bool = False) -> list[str]:
    analyze = getattr(triton_kernel_wrap, "identify_accessed_tensors", None) or getattr(
        triton_kernel_wrap, "identify_mutated_tensors", None
    )
    if analyze is None:
        raise SystemExit("torch renamed its Triton mutation analysis: update tests/kernel_writes_probe.py")
    args = {
        "q_ptr": torch.empty(1, 24, 1, 256, dtype=torch.bfloat16),
        "kc_ptr": torch.empty(1, 4, 64, 24, dtype=torch.int32),
        "kn_ptr": torch.empty(1, 4, 64, 2, dtype=torch.float16),
        "vc_ptr": torch.empty(1, 4, 64, 24, dtype=torch.int32),
        "vn_ptr": torch.empty(1, 4, 64, 2, dtype=torch.float16),
        "krot_ptr": torch.empty(4, 128, 2),
        "kscale_ptr": torch.empty(4, 256),
        "klev_ptr": torch.empty(8),
        "vlev_ptr": torch.empty(8),
        "mask_ptr": torch.empty(1, dtype=torch.bfloat16),
        "kvlen_ptr": torch.empty(1, dtype=torch.int32),
        "pm_ptr": torch.empty(4, 2, 6),
        "pl_ptr": torch.empty(4, 2, 6),
        "pacc_ptr": torch.empty(4, 2, 6, 256),
        "qk_scale": 0.1,
        "D": 256,
        "KBITS": 3,
        "VBITS": 3,
        "NGK": 2,
        "NGV": 2,
        "KRB": 2,
        "KNB": 128,
        "MASK_KIND": 0,
        "MASK_ROW": False,
        "HAS_KVLEN": False,
        "KV_START": 0,
        "BLOCK_M": 16,
        "BLOCK_N": 64,
        "DECODE": kattn.DECODES["prmt"],
        "OPAQUE": opaque,
        # keys-m's switches as a default launch sets them (1 for all would ask for two V paths at once, which the
        # kernel refuses at compile time, and a refused build reads to torch as "writes everything")
        "ABLATE": 0,
        "KPREFETCH": kattn.DEFAULTS["k_prefetch"],
        "VPREFETCH": kattn.DEFAULTS["v_prefetch"],
        "VKEYS": vkeys,
        "ROPE_TABLE": False,
    }
    kwargs = {name: args.get(name, 1) for name in kernel.arg_names}  # the int sizes: 1
    triton.runtime.driver.set_active(Sm90Driver())
    found = analyze(kernel, kwargs, {})
    writes = found.read_writes.writes if hasattr(found, "read_writes") else found
    return sorted(getattr(w, "name", w) for w in writes)


if __name__ == "__main__":
    if sys.argv[1] in ("keys-m", "keys-m-vkeys"):
        print(json.dumps(written(False, kattn._attn_keys_m_kernel, vkeys=sys.argv[1] == "keys-m-vkeys")))
    else:
        print(json.dumps(written(bool(int(sys.argv[1])))))
