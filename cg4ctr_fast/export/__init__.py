"""cg4ctr_fast.export: component contracts, ONNX export + validation, TensorRT builds, manifests.

contracts.py (the data every other part reads), onnx_export.py, validate.py, verify.py, lora.py, manifest.py,
tensorrt_build.py; the command line is cg4ctr_fast.cli.export (`cg4ctr-export`). Importing this package imports
nothing heavy: onnx, onnxruntime and tensorrt load inside the functions that need them.
"""
