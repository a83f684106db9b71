"""Multi-task duplicate-image detection: a reproducible study of Song & Cho (ETRI).

Folders are the architecture:
    mtl.model, mtl.backbones   the network of the paper's Fig. 1 (§II-A/B)
    mtl.loss                   cross-batch contrastive loss (§II-C)
    mtl.train                  the two training stages (§III-A)
    mtl.data                   corpus, copy transformations, batches, evaluation set
    mtl.eval                   embedding, search, metrics, decisions, baselines
"""

__version__ = "0.1.0"
