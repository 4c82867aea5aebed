"""A tiny, randomly initialised XTTS-v2 model written in the released file layout.

Built with coqui-tts's own XttsConfig/XttsArgs/Xtts and a real `tokenizers` BPE vocabulary, saved
as config.json + model.pth + vocab.json, so the engine loads it exactly as it loads real weights.
Random weights make noise; the tests check mechanics and shapes, not quality.
"""

from __future__ import annotations

import string
from pathlib import Path

from gpu_service.speech.engines.xtts import LANGUAGES

TINY_MAX_AUDIO_TOKENS = 24
"""GPT audio-token budget: random weights never say stop, so generation runs to this bound (~1 s)."""

TINY_MODEL_DIM = 64


def write_tiny_vocab(path: Path) -> None:
    """A character-level BPE vocabulary in the `tokenizers` JSON format VoiceBpeTokenizer reads.

    Like XTTS's own vocab.json: [STOP], [UNK], [SPACE], [START] and one [lang] tag per language as
    special tokens, then plain symbols; words are split on whitespace and punctuation.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    special = ["[STOP]", "[UNK]", "[SPACE]", "[START]"] + [f"[{lang}]" for lang in LANGUAGES]
    symbols = list(string.ascii_lowercase + string.digits + ".,!?;:'-\"")
    vocab = {tok: i for i, tok in enumerate(special + symbols)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens(special)
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))


def build_tiny_xtts(model_dir: Path, seed: int = 0) -> Path:
    """Write config.json, vocab.json and model.pth of a tiny XTTS-v2 (perceiver conditioning, as v2) to `model_dir`."""
    import torch
    from TTS.tts.configs.xtts_config import XttsArgs, XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    model_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_vocab(model_dir / "vocab.json")
    args = XttsArgs(
        gpt_layers=1,
        gpt_n_model_channels=TINY_MODEL_DIM,
        gpt_n_heads=4,
        gpt_max_audio_tokens=TINY_MAX_AUDIO_TOKENS,
        gpt_max_text_tokens=402,
        gpt_max_prompt_tokens=70,
        gpt_num_audio_tokens=258,
        gpt_start_audio_token=256,
        gpt_stop_audio_token=257,
        gpt_use_perceiver_resampler=True,
        # The HiFi-GAN's width and the speaker encoder's 512-d output are fixed by coqui-tts;
        # only its input width (the GPT's) is configurable.
        decoder_input_dim=TINY_MODEL_DIM,
        d_vector_dim=512,
    )
    config = XttsConfig(model_args=args, languages=list(LANGUAGES), gpt_cond_len=6, gpt_cond_chunk_len=3, max_ref_len=10)
    config.save_json(str(model_dir / "config.json"))
    torch.manual_seed(seed)
    model = Xtts(config)
    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(model_dir / "vocab.json"))
    model.init_models()  # sizes the text embedding from the vocabulary, as load_checkpoint will
    with torch.no_grad():
        # Random weights would say "stop" at a random step; never saying it makes every generation
        # run to the cap, so lengths and chunk counts are deterministic.
        model.gpt.mel_head.bias[args.gpt_stop_audio_token] = -1e4
    torch.save({"model": model.state_dict()}, model_dir / "model.pth")
    return model_dir


def link_model(src: Path, dst: Path) -> Path:
    """A second model folder sharing `src`'s files by symlink (so a variant costs no disk)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.pth", "vocab.json"):
        (dst / name).symlink_to(src / name)
    return dst
