"""anomaly-pipeline: the library the DVC stages share, one module a job.

The stages (stages/, run by dvc.yaml) only read their parameters, call this package and write their declared
outputs. Nothing here imports a stage; benchmarks/ uses the same functions.

- params.py: params.yaml as typed settings (pydantic v2, strict: each constraint beside its field; unknown keys
  refused with the nearest valid name); run seeds
- layout.py: every path and file name, used by writers (inside their temporary folder) and readers alike
- files.py: atomic writes (temporary file or folder, then one rename), reads, sha256
- images.py: the one image decoder (training, evaluation, features, predict, report thumbnails) and the class-folder
  listing; no torch
- tensors.py: decoded images as uint8 tensors; ImageNet normalisation
- split.py: the grouped, stratified split of one run and its report
- store.py: the decoded-image store: built once per pipeline, read a batch at a time (memory does not grow with the
  data)
- model.py: seeding, device, ImageNet or random weights, building, saving and loading a run's model, scoring
- features.py: the frozen layers' output per distinct image (fast preset): computed once, looked up by sha256
- inputs.py: ModelInputs: a manifest → the trained part's inputs; train.finetune is decided here only
- training.py, augment.py: the training loop (early stopping, best weights); augmentation and class balance
- metrics.py: metrics at a threshold, operating points, thresholds chosen on validation
- summary.py, report.py, explain.py, plots_page.py: averaging the runs; the HTML report; Grad-CAM; the offline plots
  page
- study_dataset.py: the study's pinned dataset (download or local copy, checked file by file)
- predict.py, export.py: the user commands anomaly-predict and anomaly-export
- entry.py, errors.py: logging, --run, the guard every stage runs under; the one error type for the user's mistakes

Each stage depends in dvc.yaml on its own script and on the whole package (a list of modules per stage could
silently miss an import), except study-data, which depends only on study_dataset.py so that no code change
downloads the images again. The torch-free modules keep prepare-split, check-params and aggregate quick to start.
"""
