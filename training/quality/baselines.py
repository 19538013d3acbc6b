"""The names of the heatmap baselines `salfctl eval` compares with (training/quality/attributions.py runs
them). Torch-free: `salfctl` builds its command line from it, and a serving host has no torch."""
BASELINES = ("GradCAM", "GradCAM++", "ScoreCAM", "FullGrad", "Integrated Gradients", "LRP")
