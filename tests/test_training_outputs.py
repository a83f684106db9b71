"""What a training run leaves: resumable run folders and training-log summaries."""

import json

import pandas as pd
import pytest

from mtl.training.outputs import prepare_run_dir, summarize_log


def test_run_folder_is_kept_for_the_same_run_and_cleared_for_another(tmp_path):
    out = tmp_path / "models" / "frozen"
    fingerprint = {"stage_config": {"lr": 0.001}, "corpus": "abc", "code": "123", "init": None}
    prepare_run_dir(out, fingerprint)
    (out / "last.pt").write_bytes(b"checkpoint of an interrupted run")
    prepare_run_dir(out, fingerprint)                      # same run: resume
    assert (out / "last.pt").is_file()
    prepare_run_dir(out, {**fingerprint, "corpus": "def"})  # another corpus: start over
    assert not (out / "last.pt").exists()
    assert json.loads((out / "run.json").read_text())["corpus"] == "def"


def test_summarize_log_reports_last_epoch_and_totals():
    from mtl.training.outputs import LOG_COLUMNS

    log = pd.DataFrame({"epoch": [1, 2], "train_total": [1.0, 0.5], "val_total": [1.2, 0.7],
                        "train_contrastive": [0.8, 0.4], "images_per_second": [100.0, 200.0],
                        "wall_seconds": [10.0, 5.0], "val_class_accuracy": [0.8, 0.9], "train_steps": [30, 30],
                        "train_negatives_compared": [1000.0, 1000.0], "train_active_negatives": [100.0, 10.0]})
    log = log.reindex(columns=LOG_COLUMNS, fill_value=0.0)
    summary = summarize_log(log)
    assert summary["epochs"] == 2 and summary["steps"] == 60
    assert summary["active_share_first_epoch"] == 0.1 and summary["active_share_last_epoch"] == 0.01
    assert summary["final_train_total"] == 0.5 and summary["first_train_total"] == 1.0
    assert summary["final_val_class_accuracy"] == 0.9
    assert summary["images_per_second"] == pytest.approx(150.0)
    assert summary["wall_seconds"] == 15.0
