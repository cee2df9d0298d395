"""Tiny pipelines of the real model families, built from config and saved in their published on-disk layout.

No weights can be downloaded here, so every loader and every algorithm is tested on pipelines that are the
published ones in everything but size: the same diffusers and transformers classes, the same component
folders, ``model_index.json`` and tokenizer files, written by ``save_pretrained``. A real checkpoint then loads
through exactly the code the tests ran: FLUX.1 (:func:`build_tiny_flux`) and Z-Image (:func:`build_tiny_zimage`),
whose text side speaks the shapes world's words.

The same builders make pipelines of the published *sizes* in memory, for the GPU checks' time and memory
measurements: FLUX.1-dev (:func:`flux_pipeline` at its widths) and SD3.5-Medium (:func:`sd35_medium_pipeline`).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: T5's word-start marker in its SentencePiece vocabulary.
WORD_START = "\u2581"


def world_words() -> list[str]:
    """Every word of the shapes world's prompts and pretraining captions, sorted."""
    from dgpo.worlds import shapes
    from dgpo.worlds.shapes_captions import pretraining_captions
    return sorted({w for text in (*shapes.prompts("all"), *pretraining_captions()) for w in text.split()})


def t5_tokenizer(words: list[str], max_length: int):
    """A ``T5TokenizerFast`` (a SentencePiece-style Unigram model, as T5's) over ``words``: one piece per word,
    single characters as the fallback, ``</s>`` appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    chars = sorted({c for w in words for c in w})
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (WORD_START, -3.0)]
              + [(WORD_START + w, -1.0) for w in words] + [(c, -5.0) for c in chars])
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def latent16_vae(channels: tuple[int, ...]):
    """A 16-latent-channel ``AutoencoderKL`` as FLUX.1 and Z-Image use (their shift and scale), one level per
    entry of ``channels`` (×2 downsampling per level after the first), random weights."""
    from diffusers import AutoencoderKL
    levels = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                         up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=list(channels),
                         latent_channels=16, layers_per_block=1, norm_num_groups=4, sample_size=32,
                         shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)


def flux_pipeline(width: int = 32, heads: int = 2, double_blocks: int = 1, single_blocks: int = 1,
                  guidance_embeds: bool = True, text_width: int = 32, t5_width: int = 32, text_layers: int = 1,
                  vae_channels: tuple[int, ...] = (8, 16), text_tokens: int = 16, seed: int = 0):
    """A ``FluxPipeline`` with random weights, built from config in memory: ``double_blocks`` double-stream and
    ``single_blocks`` single-stream blocks of ``width`` (``heads`` heads), CLIP and T5 encoders of ``text_layers``
    layers at ``text_width`` / ``t5_width``, a 16-channel VAE with ``vae_channels`` (×2 downsampling per level
    after the first). FLUX.1-dev's own sizes: width 3072, 24 heads, 19 + 38 blocks, T5 4096 wide, VAE
    (128, 256, 512, 512)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer
    words = world_words()
    clip_tok = build_clip_tokenizer(words, text_tokens)
    t5_tok = t5_tokenizer(words, text_tokens)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=text_tokens,
        projection_dim=text_width, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_width, d_kv=max(t5_width // 4, 8),
                                 d_ff=2 * t5_width, num_layers=text_layers, num_heads=4, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1))
    vae = latent16_vae(vae_channels)
    head = width // heads
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double_blocks, num_single_layers=single_blocks,
        attention_head_dim=head, num_attention_heads=heads, joint_attention_dim=t5_width,
        pooled_projection_dim=text_width, guidance_embeds=guidance_embeds,
        axes_dims_rope=[head // 8, 7 * head // 16, 7 * head // 16] if head >= 64 else [head // 4, head // 4, head // 2])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def build_tiny_flux(folder: str | Path, guidance_embeds: bool = True, seed: int = 0, width: int = 32,
                    text_tokens: int = 16) -> Path:
    """A FLUX.1-dev (``guidance_embeds``) or -schnell shaped ``FluxPipeline`` with random weights, saved in
    ``folder``: one double- and one single-stream block of width ``width``, CLIP-L and T5 text encoders of one
    layer, a 16-channel VAE with a ×2 downsampling (32 px images are 16 × 16 latents, 64 tokens)."""
    flux_pipeline(width=width, heads=2, guidance_embeds=guidance_embeds, text_width=width, t5_width=width,
                  text_tokens=text_tokens, seed=seed).save_pretrained(str(folder))
    return Path(folder)


def sd35_medium_pipeline(resolution: int = 1024, layers: int = 24, text_layers: int = 0, device="cpu",
                         dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of SD3.5-Medium's shape with random weights, built from config in memory:
    an MM-DiT-X transformer of ``layers`` blocks (SD3.5-Medium: 24) at width 1536 (24 heads of 64), dual
    attention in blocks 0–12, RMS qk-norm, 2×2 patches of a ``resolution`` / 8 latent; the SD3 VAE (16 latent
    channels, 128–512 wide); CLIP-L and CLIP-G sized text encoders (768 wide × 12 layers, 1280 × 32; the first
    ``text_layers`` layers of each when > 0, for a fast smoke test) over the shapes world's CLIP tokenizer; no T5
    (:class:`dgpo.models.handle.SD3Model` gives it 256 zero T5 tokens, as SD3.5 sees). About 2.24B transformer
    parameters at 24 layers.

    Built on ``device`` (a 2B-parameter initialisation on the CPU takes minutes), seeded with ``seed``, then cast
    to ``dtype``."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dgpo.worlds.shapes_base.pretrain import world_vocabulary
    from dgpo.worlds.shapes_base.tokenizer import build_clip_tokenizer
    tok = build_clip_tokenizer(world_vocabulary(), 77)

    def clip(hidden: int, n_layers: int, heads: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
            num_hidden_layers=min(n_layers, text_layers) if text_layers > 0 else n_layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=resolution // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(min(13, layers))),
            qk_norm="rms_norm")
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False)
        pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=clip(768, 12, 12),
                                        tokenizer=tok, text_encoder_2=clip(1280, 32, 20), tokenizer_2=tok,
                                        text_encoder_3=None, tokenizer_3=None,
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


#: A chat template in Qwen's format (the one ``ZImagePipeline`` applies to every prompt).
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer(words: list[str], max_length: int):
    """A byte-level BPE ``Qwen2TokenizerFast`` (Qwen's format: ``Ġ`` marks a space, ``Ċ`` a newline) whose merges
    spell every word of ``words`` and the chat template's role names as one token, with Qwen's chat markers."""
    from transformers import Qwen2TokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    spelled = [*words, "user", "assistant"]
    alphabet = sorted({c for w in spelled for c in w} | {"Ġ", "Ċ"})
    vocab, merges = {t: i for i, t in enumerate(alphabet)}, []
    for word in dict.fromkeys([w for w in spelled] + ["Ġ" + w for w in spelled]):
        for end in range(2, len(word) + 1):  # left to right: (w[:k-1], w[k-1]) → w[:k]
            merge = (word[:end - 1], word[end - 1])
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(word[:end], len(vocab))
    qwen = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None,
                              bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              model_max_length=max_length)
    qwen.add_special_tokens({"additional_special_tokens": specials})
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    return qwen


def build_tiny_zimage(folder: str | Path, seed: int = 0, width: int = 32, text_tokens: int = 64) -> Path:
    """A Z-Image shaped ``ZImagePipeline`` with random weights, saved in ``folder``: one main and one refiner
    layer of width ``width``, a two-layer Qwen3 text encoder, a 16-channel VAE with ×2 downsampling."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model
    tok = qwen_tokenizer(world_words(), text_tokens)
    torch.manual_seed(seed)
    text = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=width // 2, max_position_embeddings=2 * text_tokens))
    vae = latent16_vae((8, 16))
    head = width // 2
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=width, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=width, axes_dims=[head // 4, 3 * head // 8, 3 * head // 8],
        axes_lens=[2 * text_tokens, 32, 32])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok,
                   transformer=transformer).save_pretrained(str(folder))
    return Path(folder)
