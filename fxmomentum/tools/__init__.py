"""What a person uses besides the Python API: the command line and what it is built from.

* :mod:`~fxmomentum.tools.cli`: ``fxmomentum inspect | convert | profile`` (argparse);
* :mod:`~fxmomentum.tools.loader`: a model and its example inputs from ``model.py[:NAME]`` or
  ``package.module:NAME``;
* :mod:`~fxmomentum.tools.measure`: activation memory in a fresh process, paired time ratios;
* :mod:`~fxmomentum.tools.profiling`: original against converted, measured;
* :mod:`~fxmomentum.tools.export`: torch.export, ONNX, files written atomically.

Nothing is imported here, so that the command line starts without importing torch.
"""
