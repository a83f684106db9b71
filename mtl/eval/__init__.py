"""Evaluation: embed images with any method, search, score with the isc2021
metrics, apply the class-aware decisions, and compare methods side by side.

    embed.py      checkpoint or baseline -> embeddings .npz      (`mtl embed`)
    baselines.py  pHash / dHash descriptors, PCA of the 1280-d backbone output
    search.py     exact inner-product top-k with faiss            (`mtl search`)
    metrics.py    μAP, recall@P90, acc@1, per-transformation recall, FP at a threshold
    decision.py   class gate and score fusion (the paper's future work)
    methods.py    all methods on the same eval set, one table
"""
