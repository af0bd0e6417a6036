"""aggregate: average the runs' metrics, tabulate them, write plot data and the HTML report.

metrics/headline.json (the DVC metric that `dvc metrics show`, `diff` and `dvc exp show` print) holds the six
headline means; metrics/summary.json holds mean, std, min and max of every metric, metrics/runs.csv a row per run.
"""

from __future__ import annotations

import logging

from anomaly_pipeline.entry import main_guard
from anomaly_pipeline.files import write_csv_atomic, write_json_atomic, write_text_atomic
from anomaly_pipeline.layout import AggregateFiles
from anomaly_pipeline.params import load_params
from anomaly_pipeline.report import render_report
from anomaly_pipeline.summary import format_summary, headline, per_run_frames, runs_table, summarize

log = logging.getLogger("anomaly_pipeline.aggregate")


def main() -> None:
    params = load_params()
    files = AggregateFiles()
    class_names = (params.data.negative_class, params.data.positive_class)
    table = runs_table(params.runs)
    summary = summarize(table)
    predictions, history, roc, precision_recall, misclassified = per_run_frames(params.runs, class_names)
    write_csv_atomic(files.runs_table, table)
    write_json_atomic(files.summary, summary)
    write_json_atomic(files.headline, headline(summary))
    write_csv_atomic(files.plot("predictions"), predictions)
    write_csv_atomic(files.plot("history"), history)
    write_csv_atomic(files.plot("roc"), roc.round(6))
    write_csv_atomic(files.plot("precision_recall"), precision_recall.round(6))
    write_text_atomic(files.report, render_report(summary, table, history, roc, precision_recall, misclassified,
                                                  params.data.dir, class_names,
                                                  study_dataset=params.data.is_study_dataset))
    log.info("summary over runs %s (report: %s):\n%s", list(params.runs), files.report, format_summary(summary))


if __name__ == "__main__":
    main_guard(main)
