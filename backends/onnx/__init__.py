"""The ONNX Runtime backend: lowering, custom operators and their translations, export."""
