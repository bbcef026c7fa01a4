"""`make demo`: fit -> test -> predict on the embedded synthetic dataset (generated on first use)."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

DEMO_CONFIG = "configs/demo.yaml"
RUN_DIR = Path("runs/demo")
TARGET_DSC = 0.85


def main(config: str = DEMO_CONFIG) -> int:
    from . import cli

    shutil.rmtree(RUN_DIR / "checkpoints", ignore_errors=True)
    start = time.time()
    cli.main(["fit", "--config", config])
    fit_minutes = (time.time() - start) / 60
    ckpt = RUN_DIR / "checkpoints" / "last.ckpt"
    test = cli.main(["test", "--config", config, "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    results = test.model.test_results
    data_dir = Path(test.datamodule.data_dir)
    cli.main(["predict", "--config", config, "--ckpt_path", str(ckpt), "--trainer.logger", "false",
              "--data.predict_dir", str(data_dir / "imagesTs"), "--writer.output_dir", str(RUN_DIR / "predictions"),
              "--writer.overwrite", "true"])
    written = sorted(p.name for p in (RUN_DIR / "predictions").glob("*.nii.gz"))
    mean_dsc = results["summary"]["dsc"]
    (RUN_DIR / "demo_summary.json").write_text(json.dumps({"fit_minutes": fit_minutes, **results["summary"]}, indent=1))
    print(f"fit took {fit_minutes:.1f} min; held-out mean DSC {mean_dsc:.4f} (target >= {TARGET_DSC}), "
          f"NSD {results['summary']['nsd']:.4f}; {len(written)} masks written to {RUN_DIR / 'predictions'}")
    if mean_dsc < TARGET_DSC:
        # the pipeline ran end to end; the quality target is reported, not hidden (see the issue notes)
        print(f"TARGET NOT MET: held-out mean DSC {mean_dsc:.4f} is below {TARGET_DSC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
