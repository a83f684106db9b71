"""Multi-task duplicate-image detection: a reproducible study of Song & Cho (ETRI).

Folders are the architecture (docs/architecture.md):
    mtl.model, mtl.backbones   the network of the paper's Fig. 1 (§II-A/B)
    mtl.loss, mtl.objective    cross-batch contrastive loss, multi-task objective (§II-C)
    mtl.training               the two training stages (§III-A); `mtl train`
    mtl.data                   corpus, copy transformations, batches, evaluation set
    mtl.eval                   embedding, search, metrics, decisions, the comparison of methods
    mtl.dedup                  `mtl dedup`: duplicates in a folder, reviewed and moved aside
    mtl.study                  the pipeline's stages, as the notebooks call them
"""

__version__ = "0.1.0"
