"""One run of a trial on several devices: what every process of a torchrun group runs.

With ``train.devices_per_trial: k`` the search's evaluator starts
``python -m torch.distributed.run --standalone --nproc_per_node k -m moeforge.search._group JOB.json``
(torchrun is PyTorch's own launcher; nothing here starts or joins processes by hand). Each process reads
the job, joins the group (`moeforge.runtime.init_distributed`), builds the spec on the meta device,
materializes it on its device and trains it with `moeforge.runtime.train`, which splits every global
batch over the processes and has rank 0 write the run dir (summary.json, metrics.jsonl, checkpoint).
The evaluator reads the summary when the group has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def job(search, spec, seed: int, budget: float, device: str, out_dir: Path, resume: bool, rule: dict) -> dict:
    """The job file's content: everything a process needs, as JSON."""
    return {
        "search": search.model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
        "seed": seed,
        "budget": budget,
        "device": device,
        "out_dir": str(out_dir),
        "resume": resume,
        "rule": rule,
    }


def main(path: str) -> int:
    import dataclasses

    from moeforge.compiler import ModelSpec, account, build, materialize
    from moeforge.runtime import close_distributed, init_distributed, resolve_device, stop_on_sigterm, train

    from ._run import load_search_corpus
    from ._spec import SearchSpec, train_config

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
        train(
            model,
            seq_len=spec.seq_len,
            train_flops_per_token=account(spec).train_flops_per_token,
            corpus=dataclasses.replace(corpus, vocab_size=spec.vocab_size),
            cfg=cfg,
            out_dir=Path(j["out_dir"]),
            resume=j["resume"],
            progress=False,
            extra_summary={"spec_name": spec.name, "world": d.world},
        )
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
