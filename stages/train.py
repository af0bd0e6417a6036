"""train: fine-tune the classifier of one run and keep the weights of the best validation epoch (train.best_by).

With train.finetune 'all' every layer trains on the decoded images; with 'last_block' or 'head' the frozen
layers' output comes from the features stage and only the layers after them train (anomaly_pipeline.inputs).
"""

from __future__ import annotations

import logging
import time

import torch

from anomaly_pipeline.entry import main_guard, peak_rss_mb, run_arg
from anomaly_pipeline.files import atomic_dir, write_csv_atomic, write_json_atomic
from anomaly_pipeline.inputs import ModelInputs
from anomaly_pipeline.layout import ModelFiles, RunPaths, read_manifest
from anomaly_pipeline.model import TrainedModel, resolve_device, seed_everything, weights_source
from anomaly_pipeline.params import load_params, run_seed
from anomaly_pipeline.training import fit, use_amp

log = logging.getLogger("anomaly_pipeline.train")


def main() -> None:
    params = load_params()
    run = run_arg(__doc__.splitlines()[0], params)
    paths = RunPaths(run)
    device = resolve_device(params.device)
    if params.train.amp and not use_amp(params.train, device):
        log.info("run %d: train.amp applies on CUDA only; training in float32 on the %s", run, device.type)
    inputs = ModelInputs.for_training(params)
    seed = run_seed(params.seed, run)
    seed_everything(seed)
    started = time.perf_counter()
    model = inputs.initial_network(params.model.arch, params.model.pretrained)
    model = model.to(device, memory_format=torch.channels_last)
    data = {}
    for split in ("train", "val"):
        manifest = read_manifest(paths.split.manifest(split))
        data[split] = inputs.load(manifest), torch.tensor(manifest["label"].to_list(), dtype=torch.long)
    frozen, trainable = inputs.trained_part(model)
    frozen.requires_grad_(False)
    source = weights_source(params.model.arch, params.model.pretrained)
    log.info("run %d: training %s of %s (%s weights) on %s: %d train, %d val images; class balance %s, "
             "augment %s", run, "all layers" if not inputs.frozen_features else
             f"{inputs.finetune} (frozen features cached)", params.model.arch, source, device,
             len(data["train"][0]), len(data["val"][0]), params.train.class_balance, params.train.augment or "none")
    best_state, history = fit(trainable, data["train"], data["val"], params.train, device,
                              torch.Generator().manual_seed(seed), run, prepare=inputs.prepare)
    trainable.load_state_dict(best_state)
    train_seconds = time.perf_counter() - started
    best = history[history["best"]].iloc[-1]
    summary = {
        "arch": params.model.arch,
        "weights": params.model.weights,
        "weights_source": source,
        "finetune": inputs.finetune,
        "device": device.type,
        "epochs_run": len(history),
        "best_by": params.train.best_by,
        "best_epoch": int(best["epoch"]),
        "best_val_loss": float(best["val_loss"]),
        "best_val_accuracy": float(best["val_accuracy"]),
        "best_val_roc_auc": float(best["val_roc_auc"]),
        "train_seconds": round(train_seconds, 2),
        "train_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if device.type == "cuda":
        summary["train_peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    trained = TrainedModel(model, params.model.arch, params.model.image_size, params.model.resize, inputs.finetune,
                           inputs.cache.identity["backbone_sha256"] if inputs.cache is not None else None)
    with atomic_dir(paths.model.dir) as out:
        files = ModelFiles(out)
        trained.save(files.model)
        write_csv_atomic(files.history, history)
        write_json_atomic(files.summary, summary)
    log.info("run %d: best epoch %d of %d by %s (val loss %.4f, ROC-AUC %.3f), %.0f s, peak RSS %.0f MB", run,
             summary["best_epoch"], summary["epochs_run"], summary["best_by"], summary["best_val_loss"],
             summary["best_val_roc_auc"], train_seconds, summary["train_peak_rss_mb"])


if __name__ == "__main__":
    main_guard(main)
