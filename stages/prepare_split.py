"""prepare-split: write one run's train/val/test manifests (path, label, sha256) and its split report.

No image is copied. The split is stratified per class and grouped so that no test image has a copy in
training (anomaly_pipeline.split).
"""

from __future__ import annotations

import logging

from anomaly_pipeline.entry import main_guard, run_arg
from anomaly_pipeline.files import atomic_dir, write_csv_atomic, write_json_atomic
from anomaly_pipeline.layout import SPLITS, RunPaths, SplitFiles
from anomaly_pipeline.params import load_params
from anomaly_pipeline.split import make_split

log = logging.getLogger("anomaly_pipeline.prepare_split")


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    manifests, report = make_split(params, run)
    with atomic_dir(RunPaths(run).split.dir) as out:
        for split in SPLITS:
            write_csv_atomic(SplitFiles(out).manifest(split), manifests[split])
        write_json_atomic(SplitFiles(out).report, report)
    counts = report["counts"]  # by role (clean = data.negative_class, faulty = data.positive_class)
    names = {"clean": params.data.negative_class, "faulty": params.data.positive_class}
    log.info("run %d: %d images (%d distinct, %d groups of identical images kept on one side); %s", run,
             report["images"], report["distinct_images"], report["duplicate_groups"],
             "; ".join(f"{split} " + ", ".join(f"{names[role]} {count}" for role, count in counts[split].items())
                       for split in SPLITS))
    log.info("run %d: a plain random split would have put %d of %d test images beside a byte-identical "
             "copy in training; this split puts none", run, report["naive_split_test_images_with_train_twin"],
             sum(counts["test"].values()))
    near = report["near_duplicates_train_test"]
    if near:
        log.warning("run %d: %d test images look nearly identical to a training image (32x32 greyscale "
                    "thumbnails within %.1f grey levels RMS; see %s), e.g. %s", run,
                    len({pair["test"] for pair in near}), params.split.near_duplicate_rms, RunPaths(run).split.report,
                    "; ".join(f"{pair['test']} ~ {pair['train']}" for pair in near[:3]))


if __name__ == "__main__":
    main_guard(main)
