"""The two training stages of §III-A.

    config.py    StageConfig: one stage's settings, from params.yaml
    loop.py      train_stage(): the training loop, checkpoints, resume, torchrun
    outputs.py   log.csv, steps.csv, the printed lines, run.json
    stage.py     a stage from the parameters: its model, batches, fingerprint; train_run()
"""
