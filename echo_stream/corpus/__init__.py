"""A SYNTHETIC dyadic conversation corpus that echo-stream generates itself.

There is no public ECHO data. To train and test the default checkpoint the
project makes its own corpus: every conversation is *synthesised* from rules
written in this module. Nothing in it is recorded from people; the speech is
machine-made pseudo-speech (not intelligible words), the "user webcam" is the
bundled portrait mirrored, tinted and animated by echo-stream's own renderer.

What a conversation holds (``OUT_DIR/convNNNN/``):

* ``avatar.wav`` -- the avatar's own speech, 16 kHz mono PCM: source-filter
  synthesis (glottal pulse train at a varying f0 through three formant
  resonators per vowel, band-limited noise for fricatives and stop bursts,
  silence for stop closures), syllables at about 4-5 Hz, pauses between
  phrases. The phones come from the transcript's letters.
* ``avatar_motion.parquet`` -- the avatar's ground-truth motion (58 channels,
  25 fps): lips/jaw are the *known articulation targets* of its own speech;
  every other region follows the listener rules below.
* ``user.webm`` -- the user side: VP9 video of the user's face at
  ``size`` x ``size`` with the user's speech as Opus audio (or ``user.wav``
  only, without video, when ``render_video=False``).
* ``user_motion.parquet`` -- the motion that drew the user video.
* ``transcript.json`` -- ``[{"start", "end", "speaker", "text"}, ...]``, one
  segment per sentence (the format :mod:`echo_stream.transcript` parses).
* ``events.json`` -- every scripted event with its time (user phrase ends,
  nods, smiles, brow raises, blinks), the rule parameters and the affect
  timing, for evaluation.
* ``conversation.json`` -- the conversation's manifest row.

The rules (all measurable; :mod:`.metrics` measures them)
--------------------------------------------------------
The listener rules -- how the avatar reacts to the user -- are in
:mod:`echo_stream.corpus.listener` (start there): (a) backchannel nods after
the user's sentence ends, (b) micro-nods at the user's phrase-internal pauses,
(c) mirrored smiles, (d) brow raises after the user's questions and at the
start of the user's turns, (e) gaze held on the user while they speak and
averted when the avatar takes the turn. The others:

1. *Lip sync.* Per phone, articulation targets: ``jawOpen = 0.7 x openness x
   loudness`` (openness /a/ 1.0, /e/ 0.55, /o/ 0.6, /u/ 0.22, /i/ 0.2),
   ``mouthFunnel`` / ``mouthPucker`` for /o/ /u/ /w/ /sh/, ``mouthStretch`` for
   /i/ /e/ /s/, ``mouthClose`` + ``mouthPress`` for /p b m/, ``mouthRollLower``
   for /f v/; step targets smoothed with a 25 ms Gaussian (coarticulation,
   about 60 ms wide). A vowel's loudness sets both ``jawOpen`` and the audio
   RMS, so ``jawOpen`` follows the RMS envelope closely (correlation > 0.8)
   (:mod:`.synthesis`).
2. *Always* (:mod:`.idle`). Blinks that close the eyes (gamma-distributed
   intervals, mean ~3.5 s, ~0.28 s each), slow idle head motion below 0.5 Hz
   (so the 1.5-3 Hz band of ``headPitch`` holds the nods), gaze shifts, small
   speaking gestures.
3. *Long-range context.* The first ``early_s`` seconds (20 s) establish the
   affect in the transcript (positive: "great news, I got the job ... so happy
   ... thank you"; negative: "bad news, I lost ... terrible ... so sad ...
   sorry"; neutral: everyday talk). From then on the avatar's baseline
   changes: positive -> smile, cheek squint, raised brows, bigger and more
   frequent nods, livelier head motion; negative -> ``browInnerUp`` +
   ``mouthFrown``, head lowered, slower and smaller head motion, fewer and
   weaker mirrored smiles, smaller nods. Every sentence after the affect
   exchange is affect-neutral, and everything after ``early_s`` (text,
   timing, both voices, the user's behaviour) depends only on the *group*:
   conversations ``3k, 3k+1, 3k+2`` are one positive, one negative and one
   neutral telling of the same later conversation, so only the early context
   explains the late differences (measured from ``late_start_s`` = end of the
   affect exchange + ``context_gap_s`` (30 s)).
4. Deterministic under ``seed``; groups ``g`` with ``(g + seed) % 7 == 3``
   (one in seven, ~14 %) form the ``heldout`` split.

Files of this package, one concern each: ``listener.py`` (the listener
rules), ``idle.py`` (always-on behaviour), ``lexicon.py`` (what is said),
``phones.py`` (letters to phones), ``plans.py`` (voices, timed speech plans),
``synthesis.py`` (audio and articulation), ``conversation.py`` (one
conversation), ``metrics.py`` (measuring the rules), ``files.py`` (writing a
corpus), ``cli.py`` (``echo-stream corpus``).

Public helpers: :func:`generate_corpus` (files), :func:`synthesize_conversation`
(one conversation in memory, no files), :func:`speech_with_targets` (one
utterance and its articulation targets), :func:`rule_metrics` (measure the
rules on any motion, e.g. a model's output), :func:`add_arguments` /
:func:`run` (the ``echo-stream corpus`` command).
"""
from __future__ import annotations

from .base import AFFECTS, CORPUS_VERSION
from .cli import add_arguments, run
from .conversation import Conversation, affect_for, split_for, synthesize_conversation
from .files import generate_corpus, read_manifest, user_portrait
from .lexicon import AFFECT_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS, affect_words
from .listener import AFFECT_BASELINE, AFFECT_DYNAMICS, RULES, Rules
from .metrics import nod_band_power, nod_power_ratio, rule_metrics, smile_lag
from .phones import text_to_syllables
from .plans import AVATAR_VOICE, USER_VOICE, Phone, SpeechPlan, Voice, plan_speech
from .synthesis import Speech, articulation_targets, render_speech, speech_with_targets

__all__ = [
    "CORPUS_VERSION", "AFFECTS", "POSITIVE_WORDS", "NEGATIVE_WORDS", "AFFECT_WORDS",
    "Voice", "AVATAR_VOICE", "USER_VOICE", "Rules", "RULES", "AFFECT_BASELINE", "AFFECT_DYNAMICS",
    "Phone", "SpeechPlan", "Speech", "Conversation",
    "text_to_syllables", "plan_speech", "render_speech", "articulation_targets", "speech_with_targets",
    "affect_for", "split_for", "synthesize_conversation", "user_portrait",
    "nod_band_power", "nod_power_ratio", "smile_lag", "rule_metrics", "affect_words",
    "generate_corpus", "read_manifest", "add_arguments", "run",
]
