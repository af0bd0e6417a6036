"""features: run the frozen part of the network once over every distinct image (train.finetune last_block or head).

Every run's train and evaluate stages then look the features up by the image's sha256. With train.finetune
'all' nothing is frozen and the stage writes only the summary that says so. The summary holds nothing that
varies between identical reruns (no timings): train and evaluate depend on this folder.
"""

from __future__ import annotations

import logging
import time

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.features import compute_features, save_features
from anomaly_pipeline.files import atomic_dir, write_json_atomic
from anomaly_pipeline.layout import FeatureFiles
from anomaly_pipeline.model import resolve_device
from anomaly_pipeline.params import load_params

log = logging.getLogger("anomaly_pipeline.features")


def main() -> None:
    params = load_params()
    finetune = params.train.finetune
    with atomic_dir(FeatureFiles().dir) as out:
        files = FeatureFiles(out)
        if finetune == "all":
            write_json_atomic(files.summary, {"finetune": "all", "features": "none: nothing is frozen"})
            log.info("train.finetune is 'all': no frozen features to compute")
            return
        started = time.perf_counter()
        identity, digests, features, state = compute_features(params, resolve_device(params.device))
        save_features(files.features, identity, digests, features, state)
        shape = list(features.shape[1:])
        write_json_atomic(files.summary, {**identity, "images": len(digests), "feature_shape": shape})
    log.info("features for %d distinct images (%s each, %s weights, finetune %s) in %.0f s", len(digests),
             "x".join(map(str, features.shape[1:])), identity["weights"], finetune, time.perf_counter() - started)


if __name__ == "__main__":
    main_guard(main)
