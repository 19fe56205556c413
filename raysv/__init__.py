"""raysv: speaker-verification encoders trained without speaker labels, on Ray."""

__version__ = "0.1.0"


def load_model(path, device=None, runtime=None, threads=None):
    """A trained model (a raysv model folder, or an exported ``.onnx`` file) as a :class:`raysv.inference.SpeakerModel`."""
    from raysv.inference import load_model as _load

    return _load(path, device, runtime, threads)


__all__ = ["load_model", "__version__"]
