"""The locally built CLIP tokenizer: every grammar word is one token, and it survives save/load."""

from transformers import CLIPTokenizer

from dgpo.worlds.shapes_base.pretrain import world_vocabulary
from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer
from dgpo.worlds import shapes


def test_every_word_is_a_single_token():
    tok = build_clip_tokenizer(world_vocabulary(), 16)
    for word in world_vocabulary():
        assert tok.tokenize(word) == [word + "</w>"], word


def test_every_prompt_fits_and_ends_with_eos():
    tok = build_clip_tokenizer(world_vocabulary(), 16)
    for p in shapes.prompts("all"):
        ids = tok(p).input_ids
        assert len(ids) == len(p.split()) + 2 <= 16
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_unknown_words_fall_back_to_characters_not_unk(tmp_path):
    tok = build_clip_tokenizer(world_vocabulary(), 16)
    assert tok.tokenize("dog") == ["d", "o", "g</w>"]
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for p in shapes.prompts("all")[:20] + ["", "a photo of a dog"]:
        assert again(p, padding="max_length", max_length=16).input_ids == tok(p, padding="max_length", max_length=16).input_ids
