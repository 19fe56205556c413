"""Audio: decoding and resampling, the fbank front end, augmentation, toy corpora."""

SAMPLE_RATE = 16000
"""The one sample rate of every model, shard and crop (WavLM and the fbank front end assume it)."""

MIN_SECONDS = 0.1
"""The shortest audio a model is asked to embed: below it the fbank front end has no frames to give."""
