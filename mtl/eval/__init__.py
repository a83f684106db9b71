"""Evaluation: embed images with any method, search, score with the isc2021
metrics, apply the class-aware decisions, and compare methods side by side.

    embeddings.py  the embeddings file (.npz) and its provenance; parts of a sharded run
    images.py      image lists (folder, list file, eval split), decoded in DataLoader workers
    embed.py       checkpoint or hash -> embeddings, one model loop       (`mtl embed`)
    baselines.py   pHash / dHash descriptors
    methods.py     the compared methods' embeddings of the eval set; the PCA baseline
    evaluation.py  every method on the same eval set, one table; one checkpoint on val
    metrics.py     μAP, recall@P90, acc@1, per-transformation recall, FP at a threshold
    decision.py    class gate and score fusion (the paper's future work)
    search.py      exact inner-product top-k with faiss                   (`mtl search`)
    index.py       on-disk reference index, flat or IVF-PQ                (`mtl index`)
    space.py       t-SNE / UMAP projections and the scores behind them
"""
