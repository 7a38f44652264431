"""One run of a trial on several devices: what every process of a torchrun group runs.

With ``train.devices_per_trial: k`` the search's evaluator starts
``python -m torch.distributed.run --standalone --nproc_per_node k -m moeforge.search._group JOB.json``
(torchrun is PyTorch's own launcher; nothing here starts or joins processes by hand). Each process reads
the job (`_training.job`), joins the group (`moeforge.runtime.init_distributed`), builds the spec on the
meta device, materializes it on its device and trains it (`_training.train_spec`), which splits every
global batch over the processes and has rank 0 write the run dir (summary.json, metrics.jsonl,
checkpoint). The evaluator reads the summary when the group has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moeforge.compiler import ModelSpec, build, materialize
from moeforge.runtime import close_distributed, init_distributed, resolve_device, stop_on_sigterm

from ._data import load_search_corpus
from ._spec import SearchSpec, train_config
from ._training import train_spec


def main(path: str) -> int:
    j = json.loads(Path(path).read_text())
    search = SearchSpec.model_validate(j["search"])
    spec = ModelSpec.model_validate(j["spec"])
    cfg = train_config(search, budget_flops=j["budget"], seed=j["seed"], device=j["device"], rule=j["rule"])
    device = resolve_device(cfg.device)
    d = init_distributed(cfg.device)
    stop_on_sigterm(d)
    try:
        corpus = load_search_corpus(search)
        model = build(spec, device="meta")
        materialize(model, spec, device, seed=j["seed"])
        out_dir = Path(j["out_dir"])
        train_spec(model, spec, corpus, cfg, out_dir, resume=j["resume"], extra_summary={"world": d.world})
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
