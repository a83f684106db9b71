"""A sweep run with --only adds its variants to the table an earlier run wrote."""
import pandas as pd

from mtl.sweep import earlier_rows, in_sweep_order


def test_only_rerun_keeps_the_other_variants_and_the_file_order(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("recipe: best\nstages: both\nvariants:\n  a: []\n  b: [loss.margin=0.5]\n  c: [loss.margin=0.6]\n")
    table = tmp_path / "table.csv"
    pd.DataFrame({"variant": ["a", "b"], "overrides": ["", "loss.margin=0.5"], "val_muap": [0.8, 0.7]}).to_csv(
        table, index=False)
    rows = earlier_rows(table, keep_out=["b", "c"])
    assert [r["variant"] for r in rows] == ["a"] and rows[0]["overrides"] == ""
    rows += [{"variant": "c", "overrides": "loss.margin=0.6", "val_muap": 0.9},
             {"variant": "b", "overrides": "loss.margin=0.5", "val_muap": 0.75}]
    merged = in_sweep_order(pd.DataFrame(rows), sweep)
    assert list(merged["variant"]) == ["a", "b", "c"]
    assert list(merged["val_muap"]) == [0.8, 0.75, 0.9]
    assert earlier_rows(tmp_path / "none.csv", keep_out=["a"]) == []
