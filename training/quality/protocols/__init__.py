"""`salfctl eval`: a trained SALF-CBM against the paper's protocols (sections 4.1-4.2, Tables 1-2) and
the standard heatmap methods, on a dataset in the DESIGN layout. Each protocol returns a JSON-ready
dict; :func:`.run.run_eval` runs them all, :mod:`training.quality.report` prints and renders them.

1. **classification** (Table 1 shape): on the same frozen backbone, a standard dense and a standard
   sparse head on the pooled backbone features, and the SALF-CBM's dense and sparse heads on its
   standardised concept scores (the sparse one is the bundle's own head); test accuracy, mean non-zero
   weights per class, and accuracy at NEC = 5 (the regularisation path refit to at most 5 non-zero
   weights per class), so sparsity compares across methods. Same solver as training (GLM-SAGA-style
   elastic net, alpha 0.99).
2. **localisation** (Table 2 shape): each method's heatmap of the image's true class against the
   object's silhouette; pixel accuracy, mIoU and mAP (training/quality/metrics.py) and the pointing
   game; the baselines explain the standard dense model (attributions.py); trivial maps are rows too.
3. **concepts**: per-concept IoU (maps thresholded at half their range, and at their mean) and the
   pointing game against each concept's mask, next to a position-blind baseline (the concept's mean
   map over the split).
4. **rules**: the share of each class's head weight on its defining concepts (synthetic set).
5. **cost**: seconds per explained image, SALF-CBM (one forward: every concept map, the class map and
   five upsampled heatmaps) against GradCAM and Integrated Gradients on the same backbone and batch.
6. **generalisation**: the same scores on the shifted split (other sizes, aspect ratios, object scales,
   backgrounds) beside the test split's, broken down by the object's share of the frame, and the
   two-object images: top-2 classes and per-object Explain Anything.

Supervision: the table says what the CBL was trained on (the bundle's similarity source). With the
``masks`` source the concept maps were supervised with the synthetic set's own concept masks (the
key object's shape masks among them): localisation on that set is then not zero-shot.

One module per protocol; import from the module that defines a name (this file re-exports nothing):

- ``features``: one pass of the model over a split (pooled features, concept scores, logits, labels).
- ``classification``: protocol 1.
- ``localisation``: protocol 2, plus the silhouette (``foreground``), the seeded test sample and the
  class-concept lookup the other protocols share.
- ``faithfulness``: deletion/insertion curves, localisation's faithfulness columns.
- ``concepts``: protocol 3 and the concept neurons (paper 4.3, C.2).
- ``rules``: protocol 4 (and the synthetic set's defining concepts).
- ``cost``: protocol 5.
- ``generalisation``: protocol 6 (shifted split, size buckets, two-object images).
- ``imagenet_seg``: Table 2 on the ImageNet-segmentation file.
- ``run``: ``run_eval`` (every protocol on a bundle and a dataset) and ``run_imagenet_segmentation``.
"""
