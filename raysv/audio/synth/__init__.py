"""Toy multi-speaker corpora without downloads: two synthesisers of voices, one corpus layout.

Tests, the demo and the benchmarks need speech whose speaker identity is learnable (pitch,
vocal-tract shape, voice quality) but not given away by the average spectrum.
"""

from raysv.audio.synth.corpus import STYLES, make_trials, speaker_id, synthesize
from raysv.audio.synth.formant import speaker_voice

__all__ = ["STYLES", "make_trials", "speaker_id", "speaker_voice", "synthesize"]
