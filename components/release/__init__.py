"""From a checkpoint to @champion: ONNX export, int8 quantization, TensorRT, the MLflow registry,
the promote gates and the promotion log. Imports core, data, training, scoring and drift."""
