"""What the bench scripts share: a randomly initialised LLaVA of chosen shapes around the tiny model's tokenizer."""

from __future__ import annotations


def llava_config_and_processor(tokenizer, chat_template: str, vision: dict, text: dict, image_size: int,
                               patch_size: int):
    """(LlavaConfig, LlavaProcessor) for a CLIP vision tower (`vision`: CLIPVisionConfig sizes) and a Llama
    (`text`: LlamaConfig sizes) at `image_size` px in `patch_size` patches. The model is left to the caller, which
    picks its seed, device and dtype."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(**text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )
    return config, processor
