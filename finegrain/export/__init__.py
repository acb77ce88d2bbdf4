"""`finegrain export`: an artifact's predict path as one ONNX model (onnx_model.py: preprocessing graph + the network
traced by torch's exporter), int8 quantization (quantize.py), and the folder a device needs (command.py), run by
the torch-free runner in finegrain/runtime/."""

EXPORT_FILE = "export.json"  # what an export folder records: its parent artifact, files, int8 checks
