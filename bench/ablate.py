"""Where (a) loses to (d): seqtrain's loop with parts switched off, against the bare kernel loop (d).

    python -m bench.ablate [--cell lstm] [--steps 48] [--warmup 4] [--repeat 2]

Each variant trains seqtrain for warm-up + steps (as `make bench` does for (a)), rebuilds the exact
batches it trained on, and times (d), the bare kernel loop (Embedding -> cell -> Linear forward +
backward + fused AdamW), on them right after. Printing a/d per variant and per repeat shows how much
of the gap is a piece of seqtrain's step and how much is this machine's run-to-run noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from bench import bench as B
from bench.common import data_path
from bench.reference import CELLS
from bench.train_speed import bench_config, time_pair

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no gradient clipping": {"grad_clip": None},
    "log every step": {"log_every": 1},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm", choices=list(CELLS))
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    s, _ = B.parse_args(["--cells", a.cell, "--steps", str(a.steps), "--warmup", str(a.warmup)])
    tmp = Path(tempfile.mkdtemp(prefix="seqtrain-ablate-"))
    base = bench_config(a.cell, data_path(), tmp / "base", s)
    for r in range(a.repeat):
        for i, (name, change) in enumerate(VARIANTS.items()):
            cfg = dataclasses.replace(
                base,
                output_dir=str(tmp / f"repeat{r}-variant{i}"),
                train=dataclasses.replace(base.train, **change),
            )
            rate, d, _ = time_pair(cfg, s)
            print(
                f"repeat {r}  {name:22s}  a {rate.per_sec:9,.0f}  d {d.per_sec:9,.0f}  "
                f"a/d {rate.per_sec / d.per_sec:.3f}"
                f"  data wait {rate.data_wait:.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
