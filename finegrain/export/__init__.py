"""Export an artifact to ONNX (exporter) for the torch-free runner in finegrain/runtime/."""
