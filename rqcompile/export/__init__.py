"""Deployment: ONNX translations of the rq ops, the TensorRT-readiness checker and the artifact format."""
