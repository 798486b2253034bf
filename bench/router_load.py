"""Expert load and router margins of cached warm starts (issue 28).

For each model directory given (a warm start under `$GSPO_CACHE_DIR/warmstart/`), the figures a
warm start stores in its `warm_start.json` since issue 28, measured again on the probe of the
configuration's task: each layer's load entropy and largest expert's share (means over layers),
the same for all layers' choices pooled, and the top-k margin (k-th minus (k+1)-th router logit)
whose size decides how many expert choices one update can flip. Warm starts trained before these
figures were stored get them here.

    python -m bench.router_load experiment=paper -- ~/.cache/gspo/warmstart/small-qwen3-moe-*

Prints one JSON line per directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gspo_cli.cli import CONF_DIR
    from gspo_cli.config import register_configs
    from gspo_cli.data.tasks import build_task
    from gspo_cli.models.loading import load_model, load_tokenizer
    from gspo_cli.train.warmstart import METADATA, answer_load_balance, probe_and_pool

    split = argv.index("--") if "--" in argv else len(argv)
    overrides, dirs = argv[:split], [Path(d) for d in argv[split + 1:]]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    probe, _ = probe_and_pool(build_task(cfg.task).train)
    for path in dirs:
        # transformers' own kernels, as the warm start trained and measured them
        model = load_model(path, experts_implementation="default", fused_rms_norm=False)
        row = {"dir": str(path), **answer_load_balance(model, load_tokenizer(path), probe)}
        if (path / METADATA).exists():
            row["warm_start"] = json.loads((path / METADATA).read_text()).get("warm_start")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
