"""Data: the real-image corpus, copy transformations, training batches and the
fixed evaluation set.

    imageio     load any image file as RGB, or say why it was skipped
    corpus      Debian packages or a user folder -> data/corpus/ + manifest.csv
    transforms  named, seedable copy transformations ('train' and 'eval' families)
    batches     K instances x V views training batches
    evalset     references, queries and ground truth under data/eval/
"""
