"""results/metrics.json gathering and README table generation."""

import json

import pandas as pd

from mtl.report import gather_metrics, main, replace_block


def test_gather_and_readme_tables(tmp_path):
    results = tmp_path / "results"
    (results / "train" / "best" / "frozen").mkdir(parents=True)
    (results / "evaluate").mkdir(parents=True)
    (results / "train" / "best" / "frozen" / "metrics.json").write_text(json.dumps(
        {"epochs": 2, "steps": 40, "final_train_total": 0.5, "final_val_total": 0.6, "wall_seconds": 12.5}))
    (results / "evaluate" / "metrics.json").write_text(json.dumps({"phash": {"muap": 0.25}}))
    pd.DataFrame([{"method": "phash", "muap": 0.25, "recall_at_p90": 0.1, "acc_at_1": 0.5,
                   "fp_at_threshold": 3, "bytes_per_vector": 8}]).to_csv(results / "evaluate" / "methods.csv",
                                                                       index=False)
    readme = tmp_path / "README.md"
    (results / "sweep" / "stage1").mkdir(parents=True)
    pd.DataFrame([{"variant": "memory_0", "overrides": "loss.memory_size=0", "val_muap": 0.5,
                   "val_acc_at_1": 0.7}]).to_csv(results / "sweep" / "stage1" / "table.csv", index=False)
    readme.write_text("intro\n<!-- table:retrieval -->\nold\n<!-- /table:retrieval -->\n"
                      "<!-- table:sweep_stage1 -->\n<!-- /table:sweep_stage1 -->\n"
                      "<!-- table:training -->\nold\n<!-- /table:training -->\n"
                      "<!-- table:recipes -->\nold\n<!-- /table:recipes -->\nend\n")
    main(["--results", str(results), "--readme", str(readme)])
    gathered = json.loads((results / "metrics.json").read_text())
    assert gathered == gather_metrics(results)
    assert gathered["retrieval"]["phash"]["muap"] == 0.25
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("end\n")
    assert "| phash | 0.250 | 0.100 | 0.500 | 3 | 8 |" in text
    assert "| best/frozen | 2 | 40 | 0.500 | 0.600 |" in text
    assert "| memory_0 | loss.memory_size=0 | 0.500 | 0.700 |" in text
    # the recipes, read from params.yaml: real learning rates, the paper's differing cells in bold
    assert "| paper / frozen | 0.45 | 10,240 | none (the paper's) | 0 | chain | **1** | features |" in text
    assert "| **4e-6** |" in text and "| best / frozen |" in text and "| 1e-4 |" in text


def test_replace_block_fills_an_empty_block_and_replaces_it_again():
    empty = "a\n<!-- table:x -->\n<!-- /table:x -->\nb"
    once = replace_block(empty, "x", "| t |")
    assert once == "a\n<!-- table:x -->\n| t |\n<!-- /table:x -->\nb"
    assert replace_block(once, "x", "| u |") == "a\n<!-- table:x -->\n| u |\n<!-- /table:x -->\nb"


def test_replace_block_leaves_text_without_markers_alone():
    assert replace_block("no markers here", "retrieval", "x") == "no markers here"


def test_dedup_table_says_how_to_add_the_trained_model(tmp_path):
    from mtl.report import dedup_table

    csv = tmp_path / "benchmark.csv"
    csv.write_text("folder,images,method,scale,threshold,threshold_source,predicted_pairs,precision,recall,f1,"
                   "s_per_1000_images,images_per_second,warm_s_per_1000_images,peak_mb,new_on_rerun\n"
                   "test,2400,imagededup_phash,hash,10 bits,imagededup default,1266,0.336,0.532,0.412,3.6,280,,150,\n"
                   "test,2400,mtl_phash,normalized,0.0833,val,1284,0.333,0.535,0.411,2.3,430,0.17,300,0.0\n")
    table = dedup_table(csv).splitlines()
    assert table[2].startswith("| test | 2,400 | imagededup_phash | hash | 10 bits | 1,266 | 0.336 |")
    assert table[3].endswith("| 430 | 0.170 | 300 |")
    assert "| mtl_trained | – | *to be regenerated* |" in table[4]
    csv.write_text(csv.read_text() + "test,2400,mtl_trained,normalized,0.0100,best,900,0.6,0.6,0.6,30,70,0.3,900,0\n")
    assert "to be regenerated" not in dedup_table(csv)


def test_index_scale_table_marks_a_flat_index_too_large_to_build(tmp_path):
    from mtl.report import index_scale_table

    csv = tmp_path / "index.csv"
    csv.write_text("n,index,nprobe,build_s,index_mb,peak_rss_mb,load_s,ms_per_query_batch,ms_single_query,"
                   "copy_recall_at_10,recall_at_10_vs_flat,note\n"
                   "10000000,Flat,,nan,12207,nan,nan,nan,nan,1,1,not built\n"
                   '10000000,"IVF4096,PQ64x4fs",32,600,400,2500,1,0.1,0.2,0.8,0.1,\n')
    table = index_scale_table(csv)
    assert "| 10,000,000 | Flat (not built: 11.9 GB) | – | – | – |" in table
    assert "| 10,000,000 | IVF4096,PQ64x4fs | 32 | 600 | 400 | 2,500 | 0.100 | 0.200 | 0.800 | 0.100 |" in table


def test_scientific_notation_and_the_normalized_rows():
    from mtl.tables import scientific, split_normalized

    assert [scientific(v) for v in (4e-6, 2e-5, 1.5e-4, 0.0)] == ["4e-6", "2e-5", "1.5e-4", "0.000"]
    assert split_normalized("best_finetune_norm") == ("best_finetune", "normalized")
    assert split_normalized("best_finetune_norm_gate") == ("best_finetune_gate", "normalized")
    assert split_normalized("phash") == ("phash", "raw")


def test_the_folder_table_adds_the_benchmarks_large_folder_and_marks_the_defaults(tmp_path):
    from mtl.report import folder_table, normalization_summary

    folder = tmp_path / "folder.csv"
    folder.write_text("name,decision,default,split,threshold,hamming_radius,images,accepted,true_positives,"
                      "n_true_pairs,precision,recall,f1\n"
                      "best,raw,False,val,0.97,,480,91,82,160,0.90,0.51,0.65\n"
                      "best,normalized,True,val,0.01,,480,153,141,160,0.92,0.88,0.90\n"
                      "best,raw,False,test,0.97,,2400,854,414,800,0.48,0.52,0.50\n"
                      "best,normalized,True,test,0.01,,2400,729,645,800,0.88,0.81,0.84\n")
    bench = tmp_path / "benchmark.csv"
    bench.write_text("folder,images,method,scale,threshold,threshold_source,true_pairs,predicted_pairs,true_positives,"
                     "precision,recall,f1,precision_labelled,f1_labelled\n"
                     "large,10000,mtl_trained_raw,raw,0.9700,x,900,4000,450,0.11,0.50,0.18,0.20,0.29\n"
                     "large,10000,mtl_trained,normalized,0.0100,x,900,800,700,0.60,0.78,0.68,0.87,0.82\n"
                     "large,10000,imagededup_phash,hash,10 bits,x,900,3000,500,0.17,0.55,0.26,0.3,0.39\n")
    table = folder_table(folder, bench).splitlines()
    large = [line for line in table if "| large |" in line]
    assert len(large) == 2 and "| `best` (default) | normalized | large | 10,000 |" in large[0] + large[1]
    # the transfer is judged on labelled pairs; the lower bound stands beside it
    assert "| 0.870 | 0.600 |" in [line for line in large if "normalized" in line][0]
    assert "| 0.920 | 0.920 |" in [line for line in table if "| val |" in line and "normalized" in line][0]
    methods = tmp_path / "methods.csv"
    methods.write_text("method,muap,recall_at_p90,norm_k,norm_beta\nbest_finetune,0.80,0.60,,\n"
                       "best_finetune_norm,0.85,0.70,1,0.75\n")
    summary = normalization_summary(methods, folder, None, bench)
    assert "μAP 0.800 → 0.850 (+0.050)" in summary and "(k=1, β=0.75)" in summary
    assert "raw 0.90 → 0.48 → 0.20; normalized 0.92 → 0.88 → 0.87" in summary
    assert "normalized precision is 0.60, a lower bound" in summary
    assert "480 → 2,400 → 10,000 images" in summary


def test_the_memory_probe_reads_as_a_verdict(tmp_path):
    import pandas as pd

    from mtl.report import memory_probe_table, memory_reading

    columns = ["mean_norm", "batch_similarity", "memory_alignment", "memory_mean_norm", "active_memory",
               "active_batch", "share_from_memory", "grad_memory", "grad_batch", "grad_angle"]

    def run(size, values, muap):
        row = {"memory_size": size, "steps": 100, "val_muap": muap}
        for c in columns:
            for window in ("start", "early", "end"):
                row[f"{c}_{window}"] = values.get((c, window), 0.1)
        return row

    bunched = {("mean_norm", "start"): 0.76, ("mean_norm", "early"): 0.99, ("batch_similarity", "start"): 0.57,
               ("batch_similarity", "early"): 0.98, ("memory_alignment", "early"): -0.3}
    spread = {("mean_norm", "start"): 0.76, ("mean_norm", "early"): 0.3, ("batch_similarity", "start"): 0.57,
              ("batch_similarity", "early"): 0.1}
    summary = tmp_path / "summary.csv"
    pd.DataFrame([run(10240, bunched, 0.24), run(0, spread, 0.87)]).to_csv(summary, index=False)
    assert memory_reading(summary).startswith("**The hypothesis holds**")
    assert "turns away from the memory's mean" in memory_reading(summary)
    assert "| memory 10,240, early steps (1-10 %) |" in memory_probe_table(summary)
    pd.DataFrame([run(10240, bunched, 0.24), run(0, bunched, 0.87)]).to_csv(summary, index=False)
    assert memory_reading(summary).startswith("**The hypothesis does not hold as stated**")  # the control bunches too
    # a momentum run (mtl.memory_study --momenta) is read against the plain memory run, not taken for it
    plain, ema = run(10240, bunched, 0.24), run(10240, spread, 0.85)
    ema.update(momentum=0.99, label="memory 10,240, momentum encoder m=0.99")
    plain.update(momentum=0.0, label="memory 10,240")
    none = {**run(0, spread, 0.87), "momentum": 0.0, "label": "no memory"}
    pd.DataFrame([plain, none, ema]).to_csv(summary, index=False)
    reading = memory_reading(summary)
    assert reading.startswith("**The hypothesis holds**") and "Val μAP 0.240 with the memory, 0.870 without" in reading
    assert "With a momentum encoder (m=0.99) filling the same memory, the early batch bunches to norm 0.30" in reading
    assert reading.endswith("val μAP 0.850.")
    assert "| memory 10,240, momentum encoder m=0.99, last tenth |" in memory_probe_table(summary)
    # a transient: the early window's means hide it, its extremes (mtl.memory_study.EXTREMES) do not
    blurred = run(10240, {**bunched, ("memory_alignment", "early"): 0.24}, 0.24)
    blurred.update(mean_norm_early_max=0.99, batch_similarity_early_max=0.99, memory_alignment_early_min=-0.31)
    control = run(0, {("mean_norm", "start"): 0.76, ("mean_norm", "early"): 0.9, ("batch_similarity", "start"): 0.57,
                      ("batch_similarity", "early"): 0.8}, 0.83)
    control.update(mean_norm_early_max=0.93, batch_similarity_early_max=0.87, memory_alignment_early_min=float("nan"))
    pd.DataFrame([blurred, control]).to_csv(summary, index=False)
    reading = memory_reading(summary)
    assert reading.startswith("**The hypothesis holds in part**"), reading
    assert "their cosine falls to -0.31; 0.24 on average" in reading and "bunches too, less far" in reading
    control.update(mean_norm_early_max=0.99, batch_similarity_early_max=0.99)  # as far as with the memory
    pd.DataFrame([blurred, control]).to_csv(summary, index=False)
    assert memory_reading(summary).startswith("**The hypothesis does not hold as stated**")


def test_run_times_read_each_profiles_own_record(tmp_path):
    from mtl.report import run_times_table

    assert run_times_table(tmp_path) is None
    (tmp_path / "timing").mkdir()
    (tmp_path / "timing" / "fresh_clone.json").write_text(
        '{"wall_seconds": 1140.0, "date": "2026-12-06", "commit": "abc1234", "cores": 2}')
    only_default = run_times_table(tmp_path)
    assert "| default |" in only_default and "| 19.0 |" in only_default and "full" not in only_default
    (tmp_path / "profiles" / "full").mkdir(parents=True)
    (tmp_path / "profiles" / "full" / "run.json").write_text(
        '{"profile": "full", "wall_seconds": 5700, "date": "2026-12-06", "commit": "def5678"}')
    both = run_times_table(tmp_path)
    assert both.index("| default |") < both.index("| full |") and "| 95.0 |" in both and "`def5678`" in both


def test_density_tables_mark_extrapolated_rows(tmp_path):
    from mtl.report import density_cost_table, density_exactness_table

    cost = tmp_path / "densities.csv"
    pd.DataFrame([{"references": 100000, "index": "Flat", "k": 10, "build_s": 0.1, "densities_s": 150.0,
                   "measured_rows": 100000, "extrapolated": False, "densities_mb": 3.8, "peak_mb": 300},
                  {"references": 1000000, "index": "Flat", "k": 10, "build_s": 1.0, "densities_s": 16000.0,
                   "measured_rows": 2000, "extrapolated": True, "densities_mb": 38.1, "peak_mb": 2000}]).to_csv(
        cost, index=False)
    table = density_cost_table(cost)
    assert "16,000 (from 2,000 rows)" in table and "from 100,000" not in table
    exact = tmp_path / "exactness.csv"
    pd.DataFrame([{"gallery": 20900, "search": "IVF64-PQ", "nprobe": 8, "median_density_error": 0.01,
                   "p95_density_error": 0.05, "density_rank_correlation": 0.97, "muap": 0.8,
                   "recall_at_p90": 0.6}]).to_csv(exact, index=False)
    assert "IVF64-PQ" in density_exactness_table(exact)


def test_timing_table_sets_each_stage_beside_its_time_before(tmp_path):
    from mtl.report import timing_table

    (tmp_path / "timing").mkdir()
    for stage, wall in (("corpus", 50.0), ("train_frozen@best", 60.0), ("diagnose@best", 30.0)):
        (tmp_path / "timing" / f"{stage}.json").write_text(json.dumps({"stage": stage, "wall_seconds": wall}))
    metrics = {"corpus": {"wall_seconds": 45.0}}
    assert "before" not in timing_table(metrics, tmp_path)
    (tmp_path / "timing_before.json").write_text(json.dumps(
        {"commit": "abc1234", "total_seconds": 400, "stages": {"corpus": 66, "evalset": None, "diagnose": 262}}))
    table = timing_table(metrics, tmp_path)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| stage")}
    assert lines["corpus"] == ["50.0", "45.0", "5.000", "66"]
    assert lines["diagnose"] == ["–", "–", "–", "262"]  # only measured before
    assert "evalset" not in lines  # no number before, none now
    assert lines["**all stages**"][0].startswith("140") and lines["**all stages**"][3] == "400"
    assert "`abc1234`" in table


def test_transfer_reading_says_where_the_threshold_stops_holding():
    from mtl.report import transfer_reading

    holds = pd.DataFrame({"images": [540, 2700, 10000], "precision": [0.90, 0.86, 0.83]})
    assert "at every size" in transfer_reading(holds)
    breaks = pd.DataFrame({"images": [10000, 540, 2700], "precision": [0.43, 0.90, 0.86]})
    text = transfer_reading(breaks)
    assert "up to 2,700 images but not at 10,000 (0.43)" in text and "at every size" not in text


def test_the_headline_table_names_each_method_and_counts_false_positives_in_whole_numbers(tmp_path):
    from mtl.report import headline_table

    methods = tmp_path / "methods.csv"
    methods.write_text("method,muap,recall_at_p90,fp_at_threshold\n"
                       "best_finetune,0.784,0.622,556\nbest_finetune_norm,0.836,0.722,163\nphash,0.5,0.4,\n")
    lines = headline_table(methods).splitlines()
    assert lines[0].startswith("| method | scores | μAP |")
    assert "| `best_finetune` | raw | 0.784 | 0.622 | 556 |" in lines
    assert "| `best_finetune` | normalized | 0.836 | 0.722 | 163 |" in lines
    assert "| `phash` | raw | 0.500 | 0.400 | – |" in lines


def test_the_memory_at_scale_finding_reads_the_memory_sweeps(tmp_path):
    from mtl.report import memory_at_scale

    def sweep(name, rows):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        pd.DataFrame(rows).to_csv(tmp_path / "sweep" / name / "table.csv", index=False)

    def row(variant, muap):
        return {"variant": variant, "val_muap": muap, "val_recall_at_p90": muap - 0.1, "val_muap_norm": muap + 0.03}

    assert memory_at_scale(tmp_path) == ""  # no sweep at all pictures yet
    sweep("memory_all", [row("no_memory", 0.848), row("momentum_0.99", 0.874)])
    text = memory_at_scale(tmp_path)
    assert "— **holds**: stage 1 on every training picture" in text and "val μAP 0.874 vs. 0.848" in text
    assert "5,000" not in text
    sweep("memory_5k", [row("no_memory", 0.834), row("memory", 0.239), row("momentum_0.99", 0.840)])
    assert "at 5,000 pictures 0.840 vs. 0.834, and 0.239 with the plain memory" in memory_at_scale(tmp_path)
    sweep("memory_default", [row("no_memory", 0.88), row("memory", 0.89), row("momentum_0.99", 0.885)])
    pd.DataFrame([row("no_memory", 0.848), row("momentum_0.99", 0.852)]).to_csv(
        tmp_path / "sweep" / "memory_all" / "table.csv", index=False)  # a gain under 0.01 is not counted
    text = memory_at_scale(tmp_path)
    assert "— **does not hold here**" in text and "on the default corpus" in text


def test_the_recipe_table_reads_each_recipes_photo_repeats_from_the_parameters():
    from mtl.params import read_yaml
    from mtl.report import recipes_table

    params = read_yaml("params.yaml")
    params["train"]["photo_repeats"] = 3
    params["recipes"]["paper"]["train"] = {"photo_repeats": 1}
    rows = {line.split("|")[1].strip(): line for line in recipes_table(params).splitlines()[2:]}
    header = [cell.strip() for cell in recipes_table(params).splitlines()[0].split("|")]
    column = header.index("photo repeats")
    assert rows["best / frozen"].split("|")[column].strip() == "3"
    assert rows["paper / finetune"].split("|")[column].strip() == "**1**"   # differs from best: bold


def test_false_positive_counts_are_whole_numbers_in_every_table_however_small():
    from mtl.tables import markdown_table

    rows = [{"fp_at_threshold": 60.0, "fp_photo": 7.0, "muap": 0.5, "wall_seconds": 60.0},
            {"fp_at_threshold": float("nan"), "fp_photo": 1234.0, "muap": 0.25, "wall_seconds": 12.5}]
    table = markdown_table(rows, [("fp_at_threshold", "FP"), ("fp_photo", "FP photos"), ("muap", "μAP"),
                                  ("wall_seconds", "wall s")])
    assert table.splitlines()[2:] == ["| 60 | 7 | 0.500 | 60.0 |", "| – | 1,234 | 0.250 | 12.5 |"]


def test_a_reused_training_run_is_timed_as_this_run_spent_it_and_says_so(tmp_path):
    from mtl.report import timing_table

    (tmp_path / "timing").mkdir()
    for stage, wall in (("train_frozen@paper", 7.7), ("train_frozen@best", 61.6)):
        (tmp_path / "timing" / f"{stage}.json").write_text(json.dumps({"stage": stage, "wall_seconds": wall}))
    metrics = {"train/paper/frozen": {"wall_seconds": 27.4, "stage_wall_seconds": 0.4, "reused_finished_run": True},
               "train/best/frozen": {"wall_seconds": 50.0, "stage_wall_seconds": 52.5, "reused_finished_run": False}}
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in timing_table(metrics, tmp_path).splitlines()[2:]}
    assert lines["train_frozen@paper (its finished run reused; trained in 27.4 s)"] == ["7.700", "0.400", "7.300"]
    assert lines["train_frozen@best"] == ["61.6", "52.5", "9.100"]


def test_the_training_stage_records_whether_it_reused_a_finished_run(tmp_path, monkeypatch):
    from mtl.study import training_stages

    out_dir = tmp_path / "run"
    out_dir.mkdir()

    def fake_train(params, stage, out, init):      # trains only when no final checkpoint exists
        final = out_dir / "final.pt"
        if not final.is_file():
            final.write_bytes(b"weights")
        (out_dir / "log.csv").write_text("epoch,train_total\n1,0.5\n")
        return final

    monkeypatch.setattr(training_stages, "train_run", fake_train)
    monkeypatch.setattr(training_stages.plots, "loss_curves", lambda *a, **k: None)
    monkeypatch.setattr(training_stages, "summarize_log", lambda log: {"wall_seconds": 1.0})
    params = {"loss": {"memory_size": 0, "margin": 0.45}}
    first = training_stages.train_stage_report(params, "r", "frozen", out_dir, results_dir=tmp_path / "res")
    again = training_stages.train_stage_report(params, "r", "frozen", out_dir, results_dir=tmp_path / "res")
    assert (first["reused_finished_run"], again["reused_finished_run"]) == (False, True)


def test_the_class_branch_finding_says_how_many_false_positives_share_a_content_type():
    from mtl.report import _claims_of_recipe

    base = {"muap": 0.8, "acc_at_1": 0.9, "muap_held_out": 0.3, "bytes_per_vector": 1280}
    r = {"backbone_gap1280": {**base, "bytes_per_vector": 5120, "muap": 0.7},
         "best_finetune": {**base, "fp_at_threshold": 575, "fp_same_type": 574},
         "best_finetune_gate": {**base, "fp_at_threshold": 572}}
    claim = next(line for line in _claims_of_recipe(r, "best") if "class branch" in line)
    assert "**does not hold here**" in claim and "575 → 572 with the class gate" in claim
    assert "574 of its 575 false positives pair two images of one content type" in claim
    del r["best_finetune"]["fp_same_type"]                # not measured: no reason given
    assert "Why" not in next(line for line in _claims_of_recipe(r, "best") if "class branch" in line)


def test_the_unseen_photographs_finding_reads_the_generalization_table(tmp_path):
    from mtl.report import unseen_photographs

    assert unseen_photographs(tmp_path) == ""                      # no check recorded: no line
    (tmp_path / "generalization").mkdir()
    table = tmp_path / "generalization" / "table.csv"
    table.write_text("method,image_size,muap,muap_photo,muap_clipart,muap_photo_norm\n"
                     "imagenet_gap1280,112,0.40,0.30,0.45,0.50\n"
                     "models/best/finetune/final.pt,112,0.45,0.36,0.50,0.52\n"
                     "models/best/finetune/final.pt,160,0.55,0.90,0.90,0.90\n")
    line = unseen_photographs(tmp_path)
    assert "**does not hold here**: photo μAP 0.360 vs. 0.300 (+0.060), normalized 0.520 vs. 0.500 (+0.020)" in line
    assert "clip art 0.500 vs. 0.450 (+0.050)" in line              # the training size, not 160 px
    table.write_text(table.read_text().replace("0.52\n", "0.54\n", 1))
    assert "**holds**" in unseen_photographs(tmp_path)
