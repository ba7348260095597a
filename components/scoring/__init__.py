"""Scoring a model the same way on every backend (PyTorch, ONNX Runtime, TensorRT): predictors,
metrics, latency and robustness. Imports core, data and training."""
