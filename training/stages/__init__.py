"""The training pipeline's stages, one module each (context, backbone, features, similarity source, CBL,
head + bundle + evaluation, report); training/pipeline.py is the entry that runs them in order."""
