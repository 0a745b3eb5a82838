"""Deployment: d2c-sr's networks outside PyTorch.

* :mod:`.export_util`: ONNX export with dynamic sizes, metadata and a self-check against PyTorch.
* :mod:`.runtime_util`: ONNX Runtime and OpenVINO behind the interface inference uses; ``--backend auto``.
* :mod:`.metadata_util`: what an exported file says about itself, read without torch.
* :mod:`.exported_infer_util`: ``d2c-infer`` on an exported D2CNet with numpy, OpenCV and the runtime only.
* :mod:`.spandrel_util`: spandrel's architecture entries, so chaiNNer and ComfyUI load our checkpoints.

Imports the loader (:mod:`d2c_inference`); training (:mod:`d2c_model`) never imports it.
"""
