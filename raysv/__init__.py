"""raysv: speaker-verification encoders trained without speaker labels, on Ray."""

__version__ = "0.1.0"


def load_model(path, device=None):
    """A trained raysv model folder as an object with ``embed``, ``score`` and ``verify``."""
    from raysv.inference import load_model as _load

    return _load(path, device)


__all__ = ["load_model", "__version__"]
