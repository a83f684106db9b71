"""Data: the real-image corpus, copy transformations, training batches and the
fixed evaluation set.

    imageio        load any image file as RGB, or say why it was skipped; the image suffixes
    packages       the Debian package table: per package its class, files, tiling, grouping
    debian         download, unpack, one source file per picture
    decode         decode / tile / store each source, in worker processes, resumable
    splits         duplicates dropped, splits by picture, seeded training subsets
    manifest       image ids, seeded orders, manifest.csv, a split's originals
    corpus         build_corpus(): Debian packages or a user folder -> data/corpus/  (`mtl corpus`)
    corpus_report  report.json and the contact sheets of a build
    sheets         the thumbnail grid behind every contact sheet
    transforms     named, seedable copy transformations ('train' and 'eval' families)
    gallery        every transformation of one image on one sheet                  (`mtl gallery`)
    batches        K instances x V views training batches; the evaluation input
    evalset        references, queries and ground truth under data/eval/           (`mtl evalset`)
"""
