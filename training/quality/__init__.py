"""The evaluation harness (issue 14): metric functions (``metrics``), dataset readers (``readers``),
protocols and `salfctl eval`. Heavy imports (torch, grad-cam, captum) stay inside the protocols."""
