"""Assembling Uni-MoE from local pretrained pieces: every piece computes inside our model what it computed alone."""


import torch
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperModel,
)

from tests.utils import FIXTURES
from tests.utils.media import tone
from tests.utils.original_checkpoints import original_input_ids, write_sentencepiece_tokenizer
from trl_scripts.conversion.assemble import assemble_unimoe


BEATS_OFFICIAL = FIXTURES / "beats_tiny_official.pt"


def build_pieces(tmp_path, tokenizer):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )).eval()
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    # a full CLIP checkpoint (text + vision), like openai/clip-vit-large-patch14-336
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7),
        projection_dim=16,
    )).eval()
    clip.save_pretrained(tmp_path / "clip")
    whisper = WhisperModel(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
    )).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    return llama, clip, whisper


def test_assembled_pieces_match_their_sources(tmp_path, smollm2):
    _, tokenizer = smollm2
    llama, clip, whisper = build_pieces(tmp_path, tokenizer)
    model, processor = assemble_unimoe(
        tmp_path / "llama", clip=tmp_path / "clip", whisper=tmp_path / "whisper", beats=BEATS_OFFICIAL,
        num_experts=4, num_query_tokens=6,
    )
    config = model.config
    assert processor.tokenizer.image_token == "<image>" and config.image_token_id == processor.tokenizer.image_token_id
    assert config.text_config.vocab_size == len(processor.tokenizer) == len(tokenizer) + 3

    with torch.no_grad():
        pixels = torch.randn(2, 3, 28, 28)
        vision = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
        expected = vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.model.get_image_features(pixels).last_hidden_state, expected)

        mel = processor(text="<audio>", audio=[tone(3.0)])["input_features"]
        torch.testing.assert_close(
            model.model.get_speech_features(mel).last_hidden_state, whisper.encoder(mel).last_hidden_state
        )
        # BEATs inside our model reproduces the official implementation's output (recorded in the fixture)
        official = torch.load(BEATS_OFFICIAL, weights_only=True)
        sound = model.model.audio_tower(official["input_values"], padding_mask=official["padding_mask"])
        torch.testing.assert_close(sound.last_hidden_state, official["output_padded"], atol=1e-5, rtol=0)
        assert processor.feature_extractor.audio_towers == ["whisper", "beats"]

        aligner = model.model.speech_aligner
        for ours, theirs in zip(aligner.layers, whisper.decoder.layers):
            for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
                torch.testing.assert_close(a, b, msg=name)
        torch.testing.assert_close(aligner.embed_positions.weight, whisper.decoder.embed_positions.weight)

        # the upcycled LM is the dense LM on text (identical experts)
        ids = processor.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        torch.testing.assert_close(model(ids).logits[..., : len(tokenizer)], llama(ids).logits, atol=1e-5, rtol=0)

        messages = [{"role": "user", "content": [
            {"type": "image", "image": torch.zeros(28, 28, 3, dtype=torch.uint8).numpy()},
            {"type": "audio", "audio": tone(2.0)}, {"type": "text", "text": "What is this?"},
        ]}]
        inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_the_language_models_tokenizer_options_survive_assembly(tmp_path):
    """Adding the named placeholders reloads the tokenizer; a LLaMA tokenizer's `legacy=True` (the `▁` prefix after
    every special token) must survive that reload and the saved processor's."""
    sp = write_sentencepiece_tokenizer(tmp_path / "sentencepiece")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sentencepiece", legacy=True)
    build_pieces(tmp_path, tokenizer)
    _, processor = assemble_unimoe(tmp_path / "llama", tokenizer, clip=tmp_path / "clip", num_experts=2)
    processor.save_pretrained(tmp_path / "assembled")
    prompt = "USER: Describe it. ASSISTANT: A red square.</s>USER: What is it? ASSISTANT:"
    expected = original_input_ids(prompt, sp, {})
    assert tokenizer(prompt)["input_ids"] == expected
    for assembled in (processor.tokenizer, AutoTokenizer.from_pretrained(tmp_path / "assembled")):
        assert assembled.legacy is True
        assert assembled(prompt)["input_ids"] == expected
