"""Research (session 14, QUALITY.md "Session 14"): a calibrated bit allocation (one block layer, K/V scales) with and
without `rope_key_mean`, at 3.5 and 3.0 bits/element, on the 1K harness of prerope_mean.py (prefill 512, 256
teacher-forced steps, license windows 0 / 8192 / 16384; Calibration from 4,096 stdlib tokens).

    .venv/bin/python benchmarks/alloc_rope_mean.py
"""

import time

import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus

torch.set_num_threads(1)
torch.set_grad_enabled(False)
model, tok = models.load_smollm2()
text = stdlib_corpus(tok, 4096)
cal = {r: calibrate(model, text, key_scale=True, value_scale=True, rope_key_mean=r) for r in (False, True)}
windows = [license_corpus(tok, 512 + 256 + 1, offset=o) for o in (0, 8192, 16384)]
refs = [decode_time_ppl(model, ids, prefill=512, decode=256, chunk=256) for ids in windows]
for backend in ("iso", "planar", "rotor"):
    for kb, vb in ((3.5, 3), (3, 2.5)):
        for rope in (False, True):
            cfg = RQConfig(
                backend=backend,
                key_bits=kb,
                value_bits=vb,
                bit_allocation=(2, 3, 4, 5, 6),
                rotation_stages=1,
                residual_window=0,
                rope_key_mean=rope,
            )
            t0, cells, kls = time.time(), [], []
            for ids, ref in zip(windows, refs):
                res = decode_time_ppl(
                    model,
                    ids,
                    lambda c=cfg, r=rope: RQCache(c, model_config=model.config, calibration=cal[r]),
                    512,
                    256,
                    chunk=256,
                )
                kls.append(kl_divergence(ref, res).mean().item())
                cells.append(100 * (res.ppl / ref.ppl - 1))
            print(
                f"{backend} K{kb} V{vb} alloc rope={rope}: "
                + " / ".join(f"{c:+.2f}%" for c in cells)
                + f" mean {sum(cells) / 3:+.2f}% (KL mean {sum(kls) / 3:.4f}) {time.time() - t0:.0f}s",
                flush=True,
            )
