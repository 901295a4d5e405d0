"""Inference-time transforms of a trained model: int8 quantisation (more to come: ONNX)."""
