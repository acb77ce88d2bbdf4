"""The exported model's runner: numpy, Pillow and onnxruntime only, no torch (runner.py, copied into every export
folder as predict.py). Nothing here imports a part of finegrain that imports torch."""
