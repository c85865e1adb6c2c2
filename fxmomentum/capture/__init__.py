"""Capture: a model as torch.fx graphs, with shapes, whatever the model.

Modules, lowest first:

* :mod:`~fxmomentum.capture.factories` and :mod:`~fxmomentum.capture.shaped`: what the tracer
  does beyond torch.fx (factories with traced sizes, random draws at run time; proxies that
  carry example values, each decision they steer checked at run time);
* :mod:`~fxmomentum.capture.tracer`: :class:`CaptureTracer`, the ``torch.fx.Tracer``;
* :mod:`~fxmomentum.capture.probe`, :mod:`~fxmomentum.capture.records`,
  :mod:`~fxmomentum.capture.shapes`: running the model on examples without side effects,
  recording how it calls its submodules, propagating shapes;
* :mod:`~fxmomentum.capture.results`, :mod:`~fxmomentum.capture.snapshot`: what a capture
  gives back, and undoing a trace;
* :mod:`~fxmomentum.capture.trace`: :func:`capture`, one module, retried until it settles;
* :mod:`~fxmomentum.capture.descent`: :func:`descend`, the whole model or its capturable
  subtrees;
* :mod:`~fxmomentum.capture.effects`: what a node does besides computing its value;
  :mod:`~fxmomentum.capture.leaf_outputs`: an opaque submodule's output that does not
  depend on its inputs' values, computed by the graph itself.

Every global patch made while tracing is listed in :mod:`fxmomentum.patches`.
"""

from .descent import ChainFinder, Descent, Unit, descend
from .probe import kept_tensors, no_side_effects
from .records import CallRecord, Specialised, record_calls, specialise
from .results import Capture, CaptureError, GraphPerModeError, LeafInfo, Note
from .shaped import ShapedTracing, Specialisation
from .shapes import ShapePropagationError, clear_shapes, propagate_shapes
from .snapshot import TracingSnapshot, tracing_snapshot, undo_tracing
from .trace import capture
from .tracer import TRACE_INTO, CaptureTracer, GraphCodeTracer, TrainingFlag

__all__ = [
    "TRACE_INTO",
    "CallRecord",
    "Capture",
    "CaptureError",
    "CaptureTracer",
    "ChainFinder",
    "Descent",
    "GraphCodeTracer",
    "GraphPerModeError",
    "LeafInfo",
    "Note",
    "ShapePropagationError",
    "ShapedTracing",
    "Specialisation",
    "Specialised",
    "TracingSnapshot",
    "TrainingFlag",
    "Unit",
    "capture",
    "clear_shapes",
    "descend",
    "kept_tensors",
    "no_side_effects",
    "propagate_shapes",
    "record_calls",
    "specialise",
    "tracing_snapshot",
    "undo_tracing",
]
