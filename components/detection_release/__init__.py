"""Shipping a detector (`task: detection`): ONNX export with box parity, registration with the
decoder's metadata and golden outputs, promotion on mAP gates and a paired bootstrap."""
