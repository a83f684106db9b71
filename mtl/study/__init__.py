"""The study's stages, one function each, as the DVC pipeline runs them (dvc.yaml).

Each notebook in notebooks/ is a parameters cell, one call to a stage function, and the
figures; everything a stage computes lives in mtl (so the tiny end-to-end test reaches
all of it).

    data_stages.py        corpus_stage, evalset_stage              corpus.ipynb, evalset.ipynb
    training_stages.py    features_stage, train_stage_report       features.ipynb, train.ipynb
    evaluation_stages.py  embeddings_stage, evaluate_stage         embeddings.ipynb, evaluate.ipynb
    (mtl.diagnose)        diagnose                                 diagnose.ipynb
"""
